# nanoserve: `make serve` runs the server on a tiny demo model; `make test` is what CI runs.

PY ?= .venv/bin/python
DEMO_MODEL := .models/tiny-qwen3
MODEL ?= $(DEMO_MODEL)
PORT ?= 8000
DOCS_PORT ?= 8001

# mkdocs-material prints a banner about MkDocs 2 on every build; it is advice, not a problem here.
export NO_MKDOCS_2_WARNING := 1

.DEFAULT_GOAL := help
.PHONY: help venv demo-model serve test lint docs tags bench-stages stage-sources

help:
	@echo "make venv        create .venv and install nanoserve with its dev tools"
	@echo "make demo-model  build the random demo model in $(DEMO_MODEL)"
	@echo "make serve       serve MODEL (default: the demo model) on PORT ($(PORT))"
	@echo "make test        lint, run the tests, build the docs strictly (what CI runs)"
	@echo "make lint        ruff check"
	@echo "make docs        preview the course site on 127.0.0.1:$(DOCS_PORT)"
	@echo "make tags        tag every commit that carries a 'Milestone: vX.Y-name' trailer"
	@echo "make bench-stages  run every stage's own code on the course workload (a GPU)"

venv: .venv/.installed

# The stamp is newer than pyproject.toml once the install has finished, so this reruns only
# when the dependencies change (or an install was interrupted).
# torch goes first, pinned: this exact version is on local disk as a CPU build. Left to pip, the
# `torch>=2.4` requirement would fetch the newest release, a multi-GB CUDA build.
.venv/.installed: pyproject.toml
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install torch==2.13.0
	.venv/bin/pip install -e '.[dev]'
	touch $@

demo-model: $(DEMO_MODEL)

# The directory appears only when the build has finished (serve.demo_model renames it into place).
$(DEMO_MODEL): | venv
	$(PY) -m serve.demo_model --out $@

# Build the demo model only when it is the one being served.
serve: venv $(if $(filter $(DEMO_MODEL),$(MODEL)),$(DEMO_MODEL))
	$(PY) -m serve --model $(MODEL) --port $(PORT)

test: venv stage-sources
	$(PY) -m ruff check .
	$(PY) -m pytest -q
	$(PY) -m mkdocs build --strict --site-dir site

# Each chapter quotes the code of its own stage: .stages/<tag>/ holds every milestone's tree,
# exported from git (the current stage's chapter quotes the working tree itself).
stage-sources:
	rm -rf .stages
	$(PY) -m bench.stages --export-only .stages >/dev/null

lint: venv
	$(PY) -m ruff check .

docs: venv stage-sources
	$(PY) -m mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

tags:
	bash bench/make_tags.sh

# Every milestone tag's own code on the same workload, then the stage table and plot.
bench-stages: venv
	$(PY) -m bench.stages
