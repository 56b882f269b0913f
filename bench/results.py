"""Result files: the environment every number was measured in, reading, writing and comparing."""

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    """Output of a git command in the repo, or None where it fails (no commits, no tag, no git)."""
    try:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_info() -> dict:
    # A harness that runs a tree it exported itself (bench.course.stages, bench.course.compare)
    # names that tree's commit in the environment: on the GPU machine the copy of the tree may
    # sit beside a .git that is not its own (stale, or an older checkout), so the name given wins.
    given = os.environ.get("BENCH_GIT_COMMIT")
    if given:
        commit, _, dirty = given.partition("-")
        return {"git_commit": commit, "git_tag": os.environ.get("BENCH_GIT_TAG"),
                "git_dirty": dirty == "dirty"}
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit,
        "git_tag": _git("describe", "--tags", "--exact-match"),
        # Changes to tracked files only (like `git describe --dirty`): result files written into
        # the tree must not mark the run as dirty. None when there is no commit to differ from.
        "git_dirty": None if commit is None or status is None else bool(status),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The GPU's name for a cuda device, the CPU model otherwise."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a person would type it: `python -m bench.x ...`."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]) if argv else Path()
    if script.suffix == ".py" and script.resolve().is_relative_to(REPO_ROOT):
        module = ".".join(script.resolve().relative_to(REPO_ROOT).with_suffix("").parts)
        return shlex.join(["python", "-m", module.removesuffix(".__main__"), *argv[1:]])
    return shlex.join(["python", *argv])


def environment(device: str = "auto") -> dict:
    """What a result was measured with. No hostname: result files are committed and shared."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        **git_info(),
        "command": command_line(),
        "device": device,
        "device_name": device_name(device),
        "num_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu_state": gpu_state() if device.startswith("cuda") else None,
    }


GPU_QUERY = ("clocks.sm", "clocks.max.sm", "clocks.mem", "power.draw", "power.limit",
             "temperature.gpu", "utilization.gpu", "clocks_throttle_reasons.active")


def gpu_state() -> dict | None:
    """What nvidia-smi says of the GPU now, and how many processes hold it: two runs of the same
    code that differ by 2x are told apart by clocks, power limits or a neighbour, if anything."""
    try:
        query = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(GPU_QUERY)}",
                                "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True, timeout=10, check=True)
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader",
                               "-i", "0"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in query.stdout.strip().split(",")]
    state = dict(zip(GPU_QUERY, values, strict=False))
    state["compute_processes"] = len(apps.stdout.split())
    return state


def env_of(result: dict) -> dict:
    """The environment a result file records: under "env" (the first demo models' training
    result, written before the name was settled, says "environment")."""
    return result.get("env") or result.get("environment") or {}


def write_result(path: str | Path, result: dict) -> None:
    """Write a new result file. Results are immutable: an existing file is never overwritten, so
    a rerun must name its output after what it ran (see `result_name`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN or inf slipping into a metric should fail here, not in a plot script
    # that reads strict JSON later.
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    try:
        with path.open("x") as file:  # "x": fail if the file exists
            file.write(text)
    except FileExistsError:
        raise FileExistsError(f"{path} exists, and results are never overwritten: "
                              "write this run to a new file") from None


def short_device_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; a CPU -> 'cpu'. Names result files."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", device_name)
    return match.group(1).lower() if match and "NVIDIA" in device_name else "cpu"


def result_name(kind: str, env: dict, *details: str, suffix: str = ".json") -> str:
    """A result file's name from what ran: `step-profile-h100-043b376f-bs1-8.json`."""
    commit = (env.get("git_commit") or "nocommit")[:8]
    dirty = "-dirty" if env.get("git_dirty") else ""
    parts = [kind, short_device_name(env.get("device_name", "")), commit + dirty, *details]
    return "-".join(part for part in parts if part) + suffix


def read_result(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def metric_ratio(result: dict, baseline: dict, metric: str = "output_tokens_per_s") -> float | None:
    """How many times `baseline`'s value of a throughput metric (higher is better) `result` has."""
    return ratio(result["metrics"].get(metric), baseline["metrics"].get(metric))


def speedups(results: list[dict], metric: str = "output_tokens_per_s") -> list[float | None]:
    """Each result's metric relative to the first one (a stage-by-stage plot's y values)."""
    return [metric_ratio(result, results[0], metric) for result in results]
