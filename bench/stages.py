"""Every stage on the same workload: `make bench-stages`.

    python -m bench.stages [--workload course] [--device-name h100] [--stages-dir DIR]

For each milestone tag (found from the `Milestone:` trailers), the tag's own code is exported
with `git archive` into a temporary folder and its own `bench.throughput` runs there on the same
workload. transformers' `generate` runs once, in the same invocation, and every stage's result
gets that baseline and its ratio to it. Results go to milestones/NN/bench-<device-name>.json,
then the stage table and plot are redrawn (bench.plot_stages).

On a machine without the repository's history (the GPU machine gets a bare copy of the tree),
export the stages first with `--export-only DIR`, carry DIR there, and pass `--stages-dir DIR`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import plot_stages
from bench.results import REPO_ROOT, ratio, read_result, write_result

STAGES_FILE = "stages.json"  # written by --export-only: tag -> commit


def milestone_tags() -> dict[str, str]:
    """{tag: commit} for every `Milestone: vX.Y-name` trailer, oldest first."""
    log = subprocess.run(
        ["git", "log", "--reverse", "--format=%H%x09%(trailers:key=Milestone,valueonly,"
         "separator=%x20)"], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout
    tags = {}
    for line in log.splitlines():
        commit, _, names = line.partition("\t")
        for name in names.split():
            tags[name] = commit  # a later commit with the same milestone wins, as in make tags
    return tags


def export_stages(dest: Path) -> dict[str, str]:
    """`git archive` each milestone's tree into dest/<tag>/; returns {tag: commit}."""
    tags = milestone_tags()
    for tag, commit in tags.items():
        folder = dest / tag
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=REPO_ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (dest / STAGES_FILE).write_text(json.dumps(tags, indent=2) + "\n")
    return tags


def stage_number(tag: str) -> str:
    """v0.3-paged-kv -> '03' (the milestones/ folder)."""
    return f"{int(tag.split('-')[0].split('.')[1]):02d}"


def run_stage(folder: Path, tag: str, commit: str, out: Path, bench_args: list[str]) -> dict:
    """Run the tag's own bench.throughput inside its exported tree."""
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "BENCH_GIT_COMMIT": commit,
           "BENCH_GIT_TAG": tag}
    command = [sys.executable, "-m", "bench.throughput", *bench_args, "--out", str(out)]
    print(f"== {tag}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=folder, env=env, check=True)
    return read_result(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--workload", default="course")
    parser.add_argument("--device-name", default="h100", help="names the bench-<name>.json files")
    parser.add_argument("--stages-dir", help="stages exported earlier with --export-only")
    parser.add_argument("--export-only", metavar="DIR", help="export the stages and stop")
    parser.add_argument("--only", nargs="*", help="run just these tags")
    parser.add_argument("--current", metavar="TAG",
                        help="also run this checkout as stage TAG (a stage not yet tagged)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args(argv)

    if args.export_only:
        print(export_stages(Path(args.export_only)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        if args.stages_dir:
            root = Path(args.stages_dir)
            tags = json.loads((root / STAGES_FILE).read_text())
        else:
            root = Path(scratch)
            tags = export_stages(root)
        bench_args = ["--model", args.model, "--load-format", "dummy", "--workload",
                      args.workload, "--warmup", "--max-model-len", str(args.max_model_len)]
        # the baseline once, with this checkout's harness, shared by every stage below
        hf_out = Path(scratch) / "hf.json"
        subprocess.run([sys.executable, "-m", "bench.hf_baseline", "--model", args.model,
                        "--workload", args.workload, "--warmup", "--out", str(hf_out)],
                       cwd=REPO_ROOT, check=True)
        hf = read_result(hf_out)["metrics"]
        folders = {tag: root / tag for tag in tags}
        if args.current:
            head = os.environ.get("BENCH_GIT_COMMIT") or tags.get(args.current, "working tree")
            tags, folders[args.current] = {**tags, args.current: head}, REPO_ROOT
        for tag, commit in tags.items():
            if args.only and tag not in args.only:
                continue
            out = REPO_ROOT / "milestones" / stage_number(tag) / f"bench-{args.device_name}.json"
            result = run_stage(folders[tag], tag, commit, out, bench_args)
            result["hf_baseline"] = hf
            result["ratio_vs_hf"] = ratio(result["metrics"]["output_tokens_per_s"],
                                          hf["output_tokens_per_s"])
            write_result(out, result)
    plot_stages.main(["--device", args.device_name])


if __name__ == "__main__":
    main()
