"""bench.course.compare's runs: each stage's results lie beside its chapter, the manifest lists
every file, and compare.md (which chapters include) is exactly what the run's result files
render."""

import json

import pytest

from bench.course.compare import render
from bench.course.run_files import MILESTONES, RUNS_DIR, listed_files, resolve, stage_folder

RUNS = [path.parent for path in sorted(RUNS_DIR.glob("*/run.json"))
        if json.loads(path.read_text()).get("kind") == "compare_run"]


@pytest.mark.parametrize("run_dir", RUNS, ids=[run.name for run in RUNS])
def test_compare_table_is_what_its_files_render(run_dir):
    assert (run_dir / "compare.md").read_text() == render(run_dir)


@pytest.mark.parametrize("run_dir", RUNS, ids=[run.name for run in RUNS])
def test_every_file_of_a_compare_run_is_in_its_manifest(run_dir):
    manifest = json.loads((run_dir / "run.json").read_text())
    for entry in manifest["offline"] + manifest["online"]:  # beside its stage's chapter
        assert resolve(run_dir, entry["file"]).parent == MILESTONES / stage_folder(entry["tag"])
    listed = {resolve(run_dir, file) for file in listed_files(manifest)}
    assert all(path.exists() for path in listed)
    if manifest["online"]:
        # one server per stage, and one per variant of the current stage
        assert len(manifest["server_logs"]) == len({(e["tag"], e.get("variant"))
                                                    for e in manifest["online"]})
        listed.add(run_dir / "ttft.png")
    listed |= {run_dir / "run.json", run_dir / "compare.md"}
    strays = set(run_dir.iterdir()) - listed
    assert not strays, f"not in run.json: {sorted(path.name for path in strays)}"


def test_a_run_without_an_offline_part_has_no_empty_table_and_shows_itl(tmp_path):
    root = tmp_path / "milestones"
    run_dir = root / "runs" / "r"
    metrics = {"ttft_ms": {"p50": 20.0, "p99": 50.0}, "tpot_ms": {"p50": 4.0, "p99": 5.0},
               "itl_ms": {"p50": 4.1, "p99": 18.3}, "output_tokens_per_s": 2000.0}
    (root / "06").mkdir(parents=True)
    (root / "06" / "s.json").write_text(json.dumps({"metrics": metrics}))
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({
        "baseline": "v0.5-a", "offline": [], "online": [
            {"tag": "v0.6-b", "variant": None, "rate": "8", "file": "milestones/06/s.json"}]}))
    table = render(run_dir)
    assert not table.startswith("| KV pool") and "KV pool" not in table
    assert table.splitlines()[0].startswith("| rate (req/s) |") and "ITL p50 / p99" in table
    assert "| 8 | v0.6 | 20 / 50 | 4.0 / 5.0 | 4.1 / 18.3 | 2000.0 |" in table
