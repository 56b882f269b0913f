"""Where a run's files live, and how a run travels from the GPU machine to the repository.

A chapter's results live beside it, so one run of bench.course.stages or bench.course.compare
spreads its files over the milestone folders and keeps what concerns all its stages in a folder
of its own:

    milestones/runs/<run id>/run.json       the manifest: what ran, and every file's path
    milestones/runs/<run id>/...            the run's cross-stage files (HF baseline, tables,
                                            pictures, server logs)
    milestones/NN/<kind>-<device>-<commit>-<workload>[-<detail>]-<run start>.json
                                            stage NN's results, e.g. bench-h100-9e80078f-
                                            course-20261125-213914.json (bench- is throughput)

The manifest names each file by its path in the repository (`milestones/02/...`), and each result
carries its run_id, so a result finds its manifest whichever folder it sits in. A scratch run
(`--results-dir /tmp/x`) lays out /tmp/x like milestones/ and names its files the same way.
"""

import datetime
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bench.results import REPO_ROOT, read_result

MILESTONES = REPO_ROOT / "milestones"
RUNS_DIR = MILESTONES / "runs"
LISTED_ROOT = PurePosixPath("milestones")  # a manifest's paths start here, wherever the run went
STAGE_FOLDER = re.compile(r"\d\d")


def stage_folder(tag: str) -> str:
    """The milestone folder of a stage's tag: v0.3-continuous-batching -> 03, v1.0-... -> 12."""
    match = re.match(r"v(\d+)\.(\d+)(?:-|$)", tag)
    if match and match[1] == "0":
        return f"{int(match[2]):02d}"
    if match and (match[1], match[2]) == ("1", "0"):
        return "12"  # the release comes after the last v0 stage, v0.11
    raise ValueError(f"{tag!r} is not a milestone tag (v0.N-name or v1.0-name)")


def short_commit(commit: str) -> str:
    """The first 8 hex digits, and whether the tree had changes: 8fa243d5, 8fa243d5-dirty."""
    return commit[:8] + ("-dirty" if commit.endswith("-dirty") else "")


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run's files under a results root laid out like milestones/."""

    root: Path  # milestones/, or a scratch folder laid out like it
    run_id: str  # 20261125-213914-h100-course: when, where, what
    device: str  # h100, cpu, ...
    workload: str  # course, nano-vllm, ...

    @classmethod
    def new(cls, root: str | Path, started: datetime.datetime, device: str, workload: str,
            kind: str = "") -> "RunFiles":
        """A new run, named after when, where and what ran (kind: "compare-" for
        bench.course.compare), with its folder made: a run id is never used twice."""
        run_id = f"{started:%Y%m%d-%H%M%S}-{device}-{kind}{workload}"
        files = cls(Path(root).resolve(), run_id, device, workload)
        files.folder.mkdir(parents=True, exist_ok=False)
        return files

    @property
    def folder(self) -> Path:
        return self.root / "runs" / self.run_id

    @property
    def started(self) -> str:
        """The run's start as its id spells it (20261125-213914): keeps names unique per run."""
        return "-".join(self.run_id.split("-")[:2])

    def stage_file(self, kind: str, tag: str, commit: str, *details: str,
                   suffix: str = ".json") -> Path:
        """A stage's result: milestones/NN/<kind>-<device>-<commit>-<workload>-<details>-<start>."""
        parts = [kind, self.device, short_commit(commit), self.workload, *details, self.started]
        return self.root / stage_folder(tag) / ("-".join(parts) + suffix)

    def listed(self, path: Path) -> str:
        """How the manifest names a file: its path in the repository (milestones/02/...)."""
        return (LISTED_ROOT / path.relative_to(self.root).as_posix()).as_posix()


def resolve(run_dir: Path, listed: str) -> Path:
    """The file a manifest in run_dir names, under the results root that holds run_dir. A bare
    name is a file in run_dir itself: the two oldest runs (20261125-1206, -1230) kept every file
    in their folder, and committed results are never rewritten to move them."""
    path = PurePosixPath(listed)
    if len(path.parts) == 1:
        return run_dir / path
    return run_dir.parent.parent / path.relative_to(LISTED_ROOT)


def listed_files(manifest: dict) -> list[str]:
    """Every file a manifest names: its stages' results and timelines (with each timeline's
    picture, which --adopt draws where the run had no matplotlib), its HF baseline, and for
    bench.course.compare its offline and online results and its servers' logs."""
    files = [manifest.get("hf_baseline")]
    for stage in manifest.get("stages", []):
        files += [stage.get(key) for key in ("throughput", "probe", "timeline", "timeline_png")]
        if stage.get("timeline"):
            files.append(str(PurePosixPath(stage["timeline"]).with_suffix(".png")))
    files += [entry["file"] for entry in manifest.get("offline", []) + manifest.get("online", [])]
    files += manifest.get("server_logs", [])
    return list(dict.fromkeys(file for file in files if file))


def pack(run_dir: Path, archive: str | Path) -> None:
    """One .tar.gz of the run folder and every stage file its manifest names, by their paths
    under the results root (runs/<run id>/..., 02/...), ready for `--adopt`."""
    root = run_dir.parent.parent
    stage_files = [resolve(run_dir, listed)
                   for listed in listed_files(read_result(run_dir / "run.json"))]
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run_dir, arcname=run_dir.relative_to(root).as_posix())
        for path in stage_files:
            if path.exists() and not path.is_relative_to(run_dir):
                tar.add(path, arcname=path.relative_to(root).as_posix())
    print(f"packed {run_dir} and its stages' files into {archive}")


def unpack(archive: str | Path, root: Path = MILESTONES) -> Path:
    """Unpack a packed run into root (milestones/); returns its run folder. A run is adopted
    once: a file that exists already is never overwritten."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        names = [PurePosixPath(member.name) for member in members]
        run_ids = {name.parts[1] for name in names
                   if name.parts[0] == "runs" and len(name.parts) > 1}
        if len(run_ids) != 1:
            raise ValueError(f"{archive} should hold one run folder runs/<run id>/, not "
                             f"{sorted(run_ids)}")
        strays = [str(name) for name in names if name.parts[0] != "runs"
                  and not (STAGE_FOLDER.fullmatch(name.parts[0]) and len(name.parts) <= 2)]
        if strays:
            raise ValueError(f"{archive}: not a run's file: {strays[:3]}")
        existing = [root / member.name for member in members
                    if member.isfile() and (root / member.name).exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} exists: a run is adopted once, and results are "
                                  "never overwritten")
        # the "data" filter (no links out, no absolute paths) where this Python has it
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, **safe)
    return root / "runs" / run_ids.pop()
