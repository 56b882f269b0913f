"""Each stage's own tree: the milestone tags, their export (`git archive`, what travels to a GPU
machine), how a harness loads an export and names its commit, and how a command runs inside a
stage's tree with its own `serve` package. bench.course.stages and bench.course.compare share it."""

import argparse
import hashlib
import json
import os
import shlex
import subprocess
from pathlib import Path

from bench.results import REPO_ROOT, environment
from bench.workloads import Workload

STAGES_FILE = "stages.json"  # written by --export-only: tag -> commit
HEAD_FILE = "HEAD.json"  # written by --export-only: the exporting checkout's commit


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


def export_stages(dest: Path, code_only: bool = False) -> dict[str, str]:
    """`git archive` each milestone's tree into dest/<tag>/; returns {tag: commit}. With
    code_only, without the chapters and results (docs/, milestones/): what a benchmark needs,
    a seventh of the size, for a machine the whole export would not travel to."""
    tags = milestone_tags()
    for tag, commit in tags.items():
        folder = dest / tag
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=REPO_ROOT, capture_output=True,
                                 check=True).stdout
        excluded = ["--anchored", "--exclude=docs", "--exclude=milestones"] if code_only else []
        subprocess.run(["tar", "-x", *excluded, "-C", str(folder)], input=archive, check=True)
    (dest / STAGES_FILE).write_text(json.dumps(tags, indent=2) + "\n")
    env = environment("cpu")
    (dest / HEAD_FILE).write_text(json.dumps({"git_commit": env["git_commit"],
                                              "git_dirty": env["git_dirty"],
                                              "fingerprint": tree_fingerprint()}) + "\n")
    return tags


def tree_fingerprint(root: Path = REPO_ROOT) -> str:
    """A hash of the engine's and the harness's sources as they are in this tree: HEAD.json
    names a commit only for the tree it was exported from (checked by load_stages)."""
    digest = hashlib.sha256()
    for path in sorted([*(root / "serve").rglob("*.py"), *(root / "bench").rglob("*.py")]):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def short_stage(tag: str) -> str:
    """v0.3-paged-kv -> v0.3 (file names)."""
    return tag.split("-")[0]


def workload_flags(workload: Workload) -> list[str]:
    """The CLI flags every stage's harness understands that give exactly this workload."""
    flags = ["--num-prompts", str(workload.num_prompts),
             "--input-len", "{}:{}".format(*workload.input_len),
             "--output-len", "{}:{}".format(*workload.output_len),
             "--temperature", str(workload.temperature), "--seed", str(workload.seed)]
    if workload.shared_prefix_len or workload.turns > 1:  # harnesses since stage 5 know these
        flags += ["--shared-prefix-len", str(workload.shared_prefix_len),
                  "--turns", str(workload.turns)]
    if workload.long_every:  # harnesses since stage 6 know these
        flags += ["--long-every", str(workload.long_every),
                  "--long-input-len", str(workload.long_input_len)]
    # A named workload by its name, so the stage's harness records that name.
    return ["--workload", workload.name] if workload.name != "custom" else flags


def model_path(model: str) -> str:
    """A model directory as an absolute path (the stages run in their own trees), or the name of
    a shipped config as it is."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def stage_env(folder: Path, tag: str, commit: str) -> dict:
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "BENCH_GIT_COMMIT": commit, "BENCH_GIT_TAG": tag,
           "TOKENIZERS_PARALLELISM": "false"}
    if folder != REPO_ROOT:
        # An exported tree may sit inside this checkout (.stages/): git must not find this
        # checkout's commit from there, so the stage's harness records the commit given above.
        env["GIT_CEILING_DIRECTORIES"] = str(folder.parent)
    return env


def run(command: list[str], cwd: Path, env: dict | None = None) -> None:
    print(f"$ (cd {cwd}) {shlex.join(command)}", flush=True)
    subprocess.run(command, cwd=cwd, env=env, check=True)


def load_stages(args: argparse.Namespace, scratch: Path) -> tuple[dict, dict, dict]:
    """({tag: commit}, {tag: folder}, the exporting checkout's commit info)."""
    if args.stages_dir:
        root = Path(args.stages_dir).resolve()
        tags = json.loads((root / STAGES_FILE).read_text())
        head_file = root / HEAD_FILE
        head = json.loads(head_file.read_text()) if head_file.exists() else {}
    else:
        root = scratch / "stages"
        tags = export_stages(root)
        head = json.loads((root / HEAD_FILE).read_text())
    if args.only:
        tags = {tag: commit for tag, commit in tags.items() if tag in args.only}
    folders = {tag: root / tag for tag in tags}
    if args.current:
        # The exporting checkout's commit (HEAD.json) first: the stages were exported from this
        # very tree just before it travelled, while the GPU machine's .git may be stale. An
        # export older than the tree would name the wrong commit: it is refused.
        if head.get("fingerprint") and head["fingerprint"] != tree_fingerprint():
            raise SystemExit(f"{args.stages_dir}/{HEAD_FILE} was exported from another tree "
                             f"(commit {head.get('git_commit')}): export the stages again")
        if head.get("git_commit"):
            commit, dirty = head["git_commit"], head.get("git_dirty")
        else:
            env = environment("cpu")
            commit, dirty = env["git_commit"] or "working-tree", env["git_dirty"]
        tags[args.current] = commit + ("-dirty" if dirty else "")
        folders[args.current] = REPO_ROOT
    return tags, folders, head


def name_harness_commit(head: dict) -> None:
    """Results name this harness's own commit as exported (HEAD.json, see load_stages), not what
    a stale .git beside the tree says."""
    if head.get("git_commit"):
        os.environ["BENCH_GIT_COMMIT"] = head["git_commit"] + (
            "-dirty" if head.get("git_dirty") else "")
