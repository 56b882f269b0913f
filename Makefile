# nanoserve: `make serve` runs the server on the demo model; `make test` is what CI runs.

PY ?= .venv/bin/python
# The demo model, trained by bench.demo.train and committed; a random one, built on this machine
# for what needs a model's shapes only (tests, the stage pipeline's smoke run).
DEMO_MODEL := bench/demo_models/pycode-8m
RANDOM_MODEL := .models/tiny-qwen3
MODEL ?= $(DEMO_MODEL)
PORT ?= 8000
DOCS_PORT ?= 8001
STAGE ?=
BENCH_ARGS ?=

# mkdocs-material prints a banner about MkDocs 2 on every build; it is advice, not a problem here.
export NO_MKDOCS_2_WARNING := 1

.DEFAULT_GOAL := help
.PHONY: help venv install demo-model random-model serve test test-stage lint docs tags stage-sources \
	chapters bench-stages bench-stages-smoke

help:
	@echo "make venv          create .venv, install nanoserve and its dev tools, make the stage tags"
	@echo "make demo-model    show what the demo model ($(DEMO_MODEL)) writes"
	@echo "make random-model  build a tiny model with random weights in $(RANDOM_MODEL)"
	@echo "make serve         serve MODEL (default: the demo model) on PORT ($(PORT))"
	@echo "make test          lint, run the tests, build the docs strictly (what CI runs)"
	@echo "make test-stage STAGE=v0.1-static-batching"
	@echo "                   run that stage's own tests with this .venv (nothing is reinstalled)"
	@echo "make lint          ruff check"
	@echo "make docs          preview the course site on 127.0.0.1:$(DOCS_PORT)"
	@echo "make tags          tag every commit that carries a 'Milestone: vX.Y-name' trailer"
	@echo "make chapters      regenerate the chapters' tables from their result files"
	@echo "make bench-stages  every stage's own code on the course workload, one run (a GPU)"
	@echo "make bench-stages-smoke  the same on the CPU with the demo model and 4 requests"

# The install reruns when the dependencies change, not when a checkout touches pyproject.toml
# (`git checkout <tag>` does): the stamp holds a checksum of the file without its [tool.ruff]
# and [tool.pytest] sections, and `venv` compares the two.
# torch goes first, pinned: this exact version is on local disk as a CPU build. Left to pip, the
# `torch>=2.4` requirement would fetch the newest release, a multi-GB CUDA build.
# xgrammar is installed without its declared dependencies: pyproject.toml says why.
# The ray extra (Ray Serve, for serve/cluster/) is part of the development install, so that
# the cluster's tests run with the others.
XGRAMMAR_VERSION := 0.2.9
DEPS_SUM := $(shell awk '/^\[/ { skip = ($$0 ~ /^\[tool\.(ruff|pytest)/) } !skip' \
	pyproject.toml | cksum | cut -d' ' -f1)-xgrammar-$(XGRAMMAR_VERSION)

venv: tags
	@if [ "$$(cat .venv/.installed 2>/dev/null)" != "$(DEPS_SUM)" ]; then \
		$(MAKE) --no-print-directory install; fi

install:
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install torch==2.13.0
	.venv/bin/pip install -e '.[dev,ray]'
	.venv/bin/pip install --no-deps xgrammar==$(XGRAMMAR_VERSION)
	echo $(DEPS_SUM) > .venv/.installed

# The demo model is committed (docs/demo-models.md says how it was trained): nothing to build.
demo-model: venv
	$(PY) -m bench.demo.samples --model $(DEMO_MODEL)

random-model: $(RANDOM_MODEL)

# The directory appears only when the build has finished (bench.demo.random_model renames it into place).
$(RANDOM_MODEL): | venv
	$(PY) -m bench.demo.random_model --out $@

# The demo model is served under its own name, not its path; any other under --model's value.
serve: venv $(if $(filter $(RANDOM_MODEL),$(MODEL)),$(RANDOM_MODEL))
	$(PY) -m serve --model $(MODEL) --port $(PORT) \
		$(if $(filter $(DEMO_MODEL),$(MODEL)),--served-model-name $(notdir $(DEMO_MODEL)))

test: venv stage-sources
	$(PY) -m ruff check .
	$(PY) -m pytest -q
	$(PY) -m mkdocs build --strict --site-dir site

# A stage's own tests, from its own tree, against this checkout's .venv: the tag's tree is
# exported to .stages/<tag>/ and pytest runs there, where `import serve` finds that tree first
# (pytest's pythonpath = "."). The editable install keeps pointing at this checkout, and
# pyproject.toml is not touched, so nothing is reinstalled.
STAGE_PY = $(if $(wildcard $(PY)),$(abspath $(PY)),$(PY))
test-stage: venv
	@test -n "$(STAGE)" || { echo "usage: make test-stage STAGE=v0.1-static-batching"; exit 2; }
	rm -rf .stages/$(STAGE) && mkdir -p .stages/$(STAGE)
	git archive $(STAGE) | tar -x -C .stages/$(STAGE)
	cd .stages/$(STAGE) && $(STAGE_PY) -m pytest -q -p no:cacheprovider

# Each chapter quotes the code of its own stage: .stages/<tag>/ holds every milestone's tree,
# exported from git (the current stage's chapter quotes the working tree itself).
stage-sources:
	rm -rf .stages
	$(PY) -m bench.course.stages --export-only .stages >/dev/null

lint: venv
	$(PY) -m ruff check .

docs: venv stage-sources
	$(PY) -m mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

tags:
	@bash bench/course/make_tags.sh

chapters: venv
	$(PY) -m bench.course.chapters --write

# One run of every milestone tag's own code on the same workload: each stage's results beside its
# chapter in milestones/NN/, the run's manifest in a new folder under milestones/runs/, then the
# stage table and plot redrawn from it. BENCH_ARGS adds flags, e.g.
# BENCH_ARGS="--current v0.3-continuous-batching".
bench-stages: venv stage-sources
	$(PY) -m bench.course.stages --stages-dir .stages $(BENCH_ARGS)

# The same pipeline end to end on a CPU in about a minute: the random model, 4 short requests,
# results in /tmp/nanoserve-results/, laid out like milestones/ (the course's files are left alone).
bench-stages-smoke: venv stage-sources $(RANDOM_MODEL)
	$(PY) -m bench.course.stages --stages-dir .stages --model $(RANDOM_MODEL) --load-format auto \
		--device cpu --max-model-len 512 --num-prompts 4 --input-len 8:24 --output-len 4:12 \
		--results-dir /tmp/nanoserve-results --no-stage-table $(BENCH_ARGS)
