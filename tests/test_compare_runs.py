"""bench.compare's run folders: every file is in the manifest, and compare.md (which chapters
include) is exactly what the run's result files render."""

import json

import pytest

from bench.compare import render
from bench.results import REPO_ROOT

RUNS = [path.parent for path in sorted((REPO_ROOT / "milestones" / "runs").glob("*/run.json"))
        if json.loads(path.read_text()).get("kind") == "compare_run"]


@pytest.mark.parametrize("run_dir", RUNS, ids=[run.name for run in RUNS])
def test_compare_table_is_what_its_files_render(run_dir):
    assert (run_dir / "compare.md").read_text() == render(run_dir)


@pytest.mark.parametrize("run_dir", RUNS, ids=[run.name for run in RUNS])
def test_every_file_of_a_compare_run_is_in_its_manifest(run_dir):
    manifest = json.loads((run_dir / "run.json").read_text())
    listed = {"run.json", "compare.md"} | {e["file"] for e in manifest["offline"]} | {
        e["file"] for e in manifest["online"]}
    if manifest["online"]:
        listed |= {"ttft.png"} | {f"server-{name}.log" for name in
                                  {e["file"].split("-r")[0].removeprefix("serving-")
                                   for e in manifest["online"]}}
    present = {path.name for path in run_dir.iterdir()}
    assert listed <= present
    assert present <= listed, f"not in run.json: {sorted(present - listed)}"
