"""The course is as trustworthy as the code: every number a chapter states is the number in its
result file, generated tables are what their files give, the stage table comes from one run, and
each chapter quotes its own stage's code. The self-tests below show that a wrong number fails."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from bench.course import chapters, plot_stages
from bench.course.run_files import MILESTONES, RUNS_DIR, listed_files, resolve, stage_folder
from bench.results import REPO_ROOT

CHAPTERS = sorted((REPO_ROOT / "milestones").glob("[0-9][0-9]/README.md"))
SNIPPET = re.compile(r'^--8<-- "([^"]+)"', re.M)
GLOSSARY = REPO_ROOT / "docs" / "glossary.md"
ABBREVIATIONS = REPO_ROOT / "docs" / "includes" / "abbreviations.md"


@pytest.mark.parametrize("page", chapters.chapter_files(), ids=lambda p: p.parent.name + p.stem)
def test_every_number_and_table_matches_its_result_file(page):
    report = chapters.process(page)
    assert not report.errors, "\n".join(report.errors)


@pytest.mark.parametrize("page", CHAPTERS, ids=lambda p: p.parent.name)
def test_each_chapter_states_its_measurements_from_files(page):
    report = chapters.process(page)
    assert report.numbers >= 10 and report.blocks >= 2


def test_stage_table_is_exactly_what_its_run_renders():
    run_dir = plot_stages.table_run()
    assert run_dir is not None, "milestones/stages.md names no run"
    assert plot_stages.TABLE.read_text() == plot_stages.render_table(run_dir)


def test_every_stage_run_lists_its_files_in_its_manifest():
    for run_dir in [path.parent for path in sorted(RUNS_DIR.glob("*/run.json"))]:
        manifest = json.loads((run_dir / "run.json").read_text())
        if manifest.get("kind") == "compare_run":
            continue  # bench.course.compare's runs: tests/test_compare_runs.py
        for stage in manifest["stages"]:  # each stage's files beside its chapter
            for key in ("throughput", "probe", "timeline", "timeline_png"):
                if stage.get(key):
                    path = resolve(run_dir, stage[key])
                    assert path.exists(), f"{run_dir.name}: no {stage[key]}"
                    beside_its_chapter = path.parent == MILESTONES / stage_folder(stage["tag"])
                    in_an_oldest_run = path.parent == run_dir and "/" not in stage[key]
                    assert beside_its_chapter or in_an_oldest_run, stage[key]
        in_run_dir = {resolve(run_dir, f) for f in listed_files(manifest)} | {
            run_dir / name for name in ("run.json", "stages.md", "stages.png")}
        strays = set(run_dir.iterdir()) - in_run_dir
        assert not strays, f"{run_dir.name}: not in run.json: {sorted(p.name for p in strays)}"


def test_every_result_of_a_run_is_in_its_runs_manifest():
    """A result that carries a run_id is one of that run's files: its manifest lists it, so a
    ratio of two of its numbers and the stage table stay within one run."""
    listed = {run_json.parent.name: {resolve(run_json.parent, f) for f in
                                     listed_files(json.loads(run_json.read_text()))}
              for run_json in RUNS_DIR.glob("*/run.json")}
    for path in sorted(MILESTONES.glob("[0-9][0-9]/*.json")):
        run_id = json.loads(path.read_text()).get("run_id")
        if run_id:
            assert path in listed.get(run_id, set()), \
                f"{path.relative_to(REPO_ROOT)}: run {run_id}'s run.json does not list it"


def milestone_tags() -> dict[str, str]:
    from bench.course.stage_trees import milestone_tags

    try:
        return milestone_tags()
    except (subprocess.CalledProcessError, OSError):
        return {}


@pytest.mark.parametrize("page", CHAPTERS, ids=lambda p: p.parent.name)
def test_a_tagged_stage_chapter_quotes_its_own_tag(page):
    tags = [tag for tag in milestone_tags()
            if "-" in tag and stage_folder(tag) == page.parent.name]
    if not tags:
        pytest.skip("no tag for this stage yet (or no git history): it may quote the tree")
    own = f".stages/{tags[0]}/"
    for path in SNIPPET.findall(page.read_text()):
        if path.startswith(("milestones/", "docs/", "bench/demo_models/")):  # results, pages
            continue
        assert path.startswith(own), f"{page.parent.name} quotes {path}, not {own}..."


def test_glossary_defines_every_hover_term_and_the_course_terms():
    glossary = GLOSSARY.read_text()
    terms = re.findall(r"^\*\[(.+?)\]:", ABBREVIATIONS.read_text(), re.M)
    assert len(terms) >= 20
    defined = {line.strip().lower() for line in glossary.splitlines()
               if line and not line.startswith((" ", "#", ":"))}
    defined |= {name.strip() for line in defined for name in line.split(",")}
    missing = [t for t in terms if not {t.lower(), t.lower().rstrip("s")} & defined]
    assert not missing, f"hover terms without a glossary entry: {missing}"
    for term in ("TTFT", "TPOT", "ITL", "p50", "SSE", "GIL", "SM", "SDPA", "GQA", "MHA", "CSR",
                 "indptr", "NHD", "prefill", "decode", "roofline", "launch-bound", "page",
                 "preemption", "CUDA graph", "bucket", "watermark", "token budget",
                 "max_num_seqs", "scheduler output", "fused kernel", "kernel launch"):
        assert term.lower() in defined, f"glossary lacks {term}"


def test_mermaid_is_served_from_the_site_itself():
    config = (REPO_ROOT / "mkdocs.yml").read_text()
    (script,) = re.findall(r"^\s+- (assets/javascripts/mermaid[^\s]+\.js)$", config, re.M)
    assert (REPO_ROOT / "docs" / script).stat().st_size > 1_000_000


# --- the checker itself: a wrong number, a stale table, a cross-run ratio all fail ------------


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def throughput(tok_s: float, hf: float = 100.0, commit: str = "abcdef12") -> dict:
    metrics = {"output_tokens_per_s": tok_s, "requests_per_s": 1.0, "wall_time_s": 10.0}
    return {"env": {"git_commit": commit, "git_tag": None, "device_name": "X",
                    "timestamp": "2026-01-01T00:00:00", "command": "python -m bench.x"},
            "metrics": metrics,
            "hf_baseline": {**metrics, "output_tokens_per_s": hf, "batch_size": 64}}


def page_with(tmp_path, body: str, results: dict) -> Path:
    lines = [f"<!-- result {name}: {path} -->" for name, path in results.items()]
    return write(tmp_path / "chapter.md", "\n".join(lines) + "\n\n" + body + "\n")


def errors(page: Path, write_blocks: bool = False) -> list[str]:
    return chapters.process(page, write=write_blocks).errors


def test_a_number_that_disagrees_with_its_file_fails(tmp_path):
    a = write(tmp_path / "a.json", throughput(30.06))
    good = page_with(tmp_path, "**30.1**<!-- = a.metrics.output_tokens_per_s --> tok/s", {"a": a})
    assert errors(good) == []
    bad = page_with(tmp_path, "**30.2**<!-- = a.metrics.output_tokens_per_s --> tok/s", {"a": a})
    assert "30.2 but a.metrics.output_tokens_per_s" in errors(bad)[0]
    too_precise = page_with(tmp_path, "30.06<!-- = a.metrics.output_tokens_per_s -->", {"a": a})
    assert errors(too_precise) == []
    rounded_wrong = page_with(tmp_path, "30.07<!-- = a.metrics.output_tokens_per_s -->", {"a": a})
    assert errors(rounded_wrong)


def test_numbers_with_separators_units_and_arithmetic(tmp_path):
    a = write(tmp_path / "a.json", {"n": 2216, "f": 0.008038, "rows": [{"ms": 52.03}]})
    page = page_with(tmp_path, "2,216<!-- = a.n --> kernels, 0.8 %<!-- = 100 * a.f -->, "
                     "**52.0 ms**<!-- = a.rows[0].ms -->, 79<!-- = a.n / 28 --> per layer",
                     {"a": a})
    assert errors(page) == []


def one_run(tmp_path, monkeypatch, files: dict[str, dict]) -> dict[str, Path]:
    """A run r1 under tmp_path/milestones/ as bench.course.stages lays it out: each file beside its
    stage's chapter (milestones/01/a.json), listed in milestones/runs/r1/run.json."""
    monkeypatch.setattr(chapters, "RUNS_DIR", tmp_path / "milestones" / "runs")
    paths = {name: write(tmp_path / "milestones" / name, data) for name, data in files.items()}
    write(tmp_path / "milestones" / "runs" / "r1" / "run.json", {"run_id": "r1", "stages": [
        {"tag": "v0.1-x", "throughput": f"milestones/{name}"} for name in files]})
    return paths


def test_a_ratio_across_two_runs_fails_and_within_one_run_passes(tmp_path, monkeypatch):
    paths = one_run(tmp_path, monkeypatch, {"01/a.json": {**throughput(300.0), "run_id": "r1"},
                                            "02/b.json": {**throughput(100.0), "run_id": "r1"}})
    a, b = paths["01/a.json"], paths["02/b.json"]  # one run, two stages' folders
    other = write(tmp_path / "other.json", throughput(100.0, hf=90.0))
    same = page_with(tmp_path, "3.0×<!-- = a.metrics.output_tokens_per_s / "
                     "b.metrics.output_tokens_per_s -->", {"a": a, "b": b, "c": other})
    assert errors(same) == []
    mixed = page_with(tmp_path, "3.0×<!-- = a.metrics.output_tokens_per_s / "
                      "c.metrics.output_tokens_per_s -->", {"a": a, "b": b, "c": other})
    assert "different runs" in errors(mixed)[0]
    # a file of a run sits in the same folder but its run's manifest does not list it
    stray = write(tmp_path / "milestones" / "02" / "c.json", {**throughput(1.0), "run_id": "r1"})
    assert "does not list it" in errors(page_with(tmp_path, "", {"c": stray}))[0]


def test_markers_need_a_number_a_declared_name_and_an_existing_file(tmp_path):
    a = write(tmp_path / "a.json", throughput(30.0))
    assert "must follow the number" in errors(
        page_with(tmp_path, "fast<!-- = a.metrics.output_tokens_per_s -->", {"a": a}))[0]
    assert "not a declared result" in errors(
        page_with(tmp_path, "30<!-- = b.metrics.output_tokens_per_s -->", {"a": a}))[0]
    assert "no file" in errors(page_with(tmp_path, "", {"a": tmp_path / "missing.json"}))[0]
    assert "not allowed" in errors(
        page_with(tmp_path, "1<!-- = __import__('os') -->", {"a": a}))[0]


def test_a_stale_generated_table_fails_until_it_is_regenerated(tmp_path):
    a = write(tmp_path / "a.json", throughput(30.0))
    page = page_with(tmp_path, "<!-- begin throughput a -->\n| stale |\n<!-- end throughput -->",
                     {"a": a})
    assert "differs from its files" in errors(page)[0]
    assert errors(page, write_blocks=True) == []
    assert errors(page) == [] and "| output tokens/s | 30.0 | 100.0 |" in page.read_text()
    write(a, throughput(31.0))  # the file changes: the table no longer matches it
    assert "differs from its files" in errors(page)[0]


def test_markers_inside_code_blocks_are_examples_not_markers(tmp_path):
    page = page_with(tmp_path, "```markdown\n1.0<!-- = nothing.here -->\n"
                     "<!-- begin throughput x -->\n<!-- end throughput -->\n```", {})
    assert errors(page) == []


def test_cpu_op_us_reads_a_profiled_steps_cpu_ops_from_a_timeline_file(tmp_path, monkeypatch):
    # a timeline carries no run_id: the manifest that lists it makes it one of the run's files
    paths = one_run(tmp_path, monkeypatch, {
        "01/timeline.json": {
            "names": ["aten::linear", "aten::scaled_dot_product_attention"],
            "cpu": [[0, 0.0, 10.0], [1, 10.0, 3000.0], [0, 3010.0, 12.0], [1, 3022.0, 500.0]]},
        "01/probe.json": {"decode_step": {"step_ms": 7.0}, "run_id": "r1"}})
    timeline, probe = paths["01/timeline.json"], paths["01/probe.json"]
    sdpa = 'cpu_op_us(t, "aten::scaled_dot_product_attention")'
    page = page_with(tmp_path, f"3.5 ms<!-- = sum({sdpa}) / 1000 --> in "
                     f"2<!-- = len({sdpa}) --> calls, the longest 3.0<!-- = max({sdpa}) / 1000 -->"
                     f" ms, the second 0.5<!-- = {sdpa}[1] / 1000 --> ms: "
                     f"50 %<!-- = 100 * sum({sdpa}) / 1000 / p.decode_step.step_ms -->",
                     {"t": timeline, "p": probe})
    assert errors(page) == []
    assert "no CPU op 'aten::sdpa'" in errors(
        page_with(tmp_path, '1<!-- = len(cpu_op_us(t, "aten::sdpa")) -->', {"t": timeline}))[0]
    assert "reads a timeline file" in errors(
        page_with(tmp_path, '1<!-- = len(cpu_op_us(p, "aten::linear")) -->', {"p": probe}))[0]
    other = write(tmp_path / "other.json", {"decode_step": {"step_ms": 7.0}})
    assert "different runs" in errors(page_with(
        tmp_path, f"50<!-- = 100 * sum({sdpa}) / 1000 / o.decode_step.step_ms -->",
        {"t": timeline, "o": other}))[0]
    assert "not allowed" in errors(page_with(
        tmp_path, '1<!-- = len(cpu_op_us(t, name="aten::linear")) -->', {"t": timeline}))[0]


def test_gpu_kernel_us_sums_the_kernels_whose_names_start_so(tmp_path, monkeypatch):
    paths = one_run(tmp_path, monkeypatch, {"01/timeline.json": {
        "names": ["void flashinfer::Decode<1>", "void flashinfer::Decode<2>", "nvjet_gemm"],
        "gpu": [[0, 0.0, 100.0], [2, 100.0, 40.0], [1, 140.0, 60.0], [2, 200.0, 50.0]]}})
    page = page_with(tmp_path, '0.16 ms<!-- = sum(gpu_kernel_us(t, "void flashinfer::")) / 1000 '
                     '--> in 2<!-- = len(gpu_kernel_us(t, "void flashinfer::")) --> kernels',
                     {"t": paths["01/timeline.json"]})
    assert errors(page) == []
    assert "no GPU kernel" in errors(page_with(
        tmp_path, '1<!-- = len(gpu_kernel_us(t, "cutlass")) -->',
        {"t": paths["01/timeline.json"]}))[0]


def test_provenance_names_a_servers_code_and_what_wrote_a_bare_timeline(tmp_path):
    env = {"git_commit": "aaaaaaaa11", "git_tag": None, "device_name": "X",
           "timestamp": "2026-01-01T00:00:00", "command": "python -m bench.serving"}
    serving = write(tmp_path / "serving.json", {"env": env, "server_commit": "bbbbbbbb22",
                                                "tag": "v0.5-x", "metrics": {}})
    mixed = write(tmp_path / "mixed-step-gpu-cccccccc-m-20260101-000000.json", {
        **throughput(1.0, commit="cccccccc33"), "rows": []})
    timeline = write(tmp_path / "timeline-mixed-step-gpu-cccccccc-m-b64-20260101-000000.json",
                     {"summary": {}, "names": [], "cpu": [], "gpu": []})
    bare = write(tmp_path / "notes.json", {"n": 1})
    page = page_with(tmp_path, "<!-- begin provenance s t b -->\n<!-- end provenance -->",
                     {"s": serving, "t": timeline, "b": bare})
    assert errors(page, write_blocks=True) == []
    box = page.read_text()
    assert "server code `bbbbbbbb` (v0.5-x), requests sent by harness `aaaaaaaa`" in box
    assert f"written with [`{mixed.name}`]" in box and "code `cccccccc`" in box
    assert "code not recorded, device not recorded, time not recorded" in box
    assert not [line for line in box.splitlines() if line.startswith("    - ") and "?" in line]


def test_a_table_without_rows_is_a_line_and_a_mixed_step_table_shows_the_speed_up(tmp_path):
    assert chapters.table(["a", "b"], []) == ["*(The files hold no rows for this table.)*"]
    step = {"mixed_step_ms": 10.0, "decode_step_ms": 4.0}
    rows = [{"batch_size": 0, "budget": 512, "split": step, "eager": step, "split_vs_eager": 1.0},
            {"batch_size": 64, "budget": 512, "split": step,
             "eager": {**step, "mixed_step_ms": 15.0}, "split_vs_eager": 1.5}]
    ms = write(tmp_path / "ms.json", {**throughput(1.0), "rows": rows})
    page = page_with(tmp_path, "<!-- begin mixed-step m -->\n<!-- end mixed-step -->", {"m": ms})
    assert errors(page, write_blocks=True) == []
    assert "| 512 | 10.0 | 4.0 | 10.0 | 15.0 | 1.50× |" in page.read_text()
    empty = page_with(tmp_path, "<!-- begin throughput -->\n<!-- end throughput -->", {})
    assert "names no result" in errors(empty)[0]
