"""Every stage on the same workload, in one run on one machine: `make bench-stages`.

    python -m bench.course.stages [--model qwen3-0.6b] [--workload course] [--stages-dir DIR]
                           [--current TAG] [--archive FILE.tar.gz] [--resume RUN_DIR]

One run measures, one after the other on the same machine:

1. transformers' `generate`, once: the HF baseline of this run;
2. for each milestone tag (and with --current, this checkout as a stage not yet tagged), in the
   stage's own exported tree: its own `bench.throughput` on the workload, its timed run
   repeated until the runs add up to --repeat-budget-s (bench/course/repeat_throughput.py; the
   stage table shows the median run and the spread), then bench/probe.py: what each step
   computed (padding and finished rows included) and where its time went, and one decode step
   under torch.profiler (the timeline picture).

The run is named after when, where and what ran (`20261126-093000-h100-course`), and nothing
ever overwrites its files (bench/course/run_files.py). Each stage's files go beside its chapter, in
milestones/NN/: bench-<device>-<commit>-<workload>-<run start>.json (throughput), probe-….json,
timeline-….json and .png. What concerns every stage goes into the run's own folder
milestones/runs/<run id>/: run.json (the manifest: the command, the machine, the path of every
file), hf-baseline.json, and the run's stages.md and stages.png. Last, milestones/stages.md and
docs/assets/stages.png are redrawn from this run alone (bench.course.plot_stages --run): every
ratio in them is between numbers of this run.

On a machine without the repository's history (the GPU machine gets a bare copy of the tree),
export the stages first (`make stage-sources` writes .stages/), carry that folder there and pass
`--stages-dir .stages`; `--archive FILE.tar.gz` packs the run's files into one file to bring
back, and `--adopt FILE.tar.gz`, run in the repository, unpacks them into milestones/, draws what
the GPU machine could not, and redraws the stage table and plot from it.

A run that outlasts one command (every stage with its probe takes about 13 minutes on an H200,
where one command may run 10) is cut short and resumed: the first command leaves the manifest
so far in the run's folder (run.partial.json, after each stage), and `--resume <run folder>`,
run next on the same machine, runs the stages that are missing in the same run (the course's
GPU machine, while warm, keeps ignored folders of the working tree between calls: give
--results-dir one of those). On another machine, or with another workload, it refuses.
"""

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.course import plot_stages
from bench.course.run_files import (
    MILESTONES,
    RunFiles,
    listed_files,
    pack,
    resolve,
    stage_folder,
    unpack,
)
from bench.course.stage_trees import (
    export_stages,
    load_stages,
    model_path,
    name_harness_commit,
    run,
    short_stage,
    stage_env,
    workload_flags,
)
from bench.model_config import resolve_device, vocab_size_of
from bench.results import (
    REPO_ROOT,
    command_line,
    environment,
    ratio,
    read_result,
    short_device_name,
    write_result,
)
from bench.workloads import (
    Workload,
    add_workload_args,
    make_requests,
    requests_as_json,
    workload_from_args,
)

PARTIAL_FILE = "run.partial.json"  # the manifest so far, after each stage (see --resume)
PROBE = REPO_ROOT / "bench" / "probe.py"
REPEAT = REPO_ROOT / "bench" / "course" / "repeat_throughput.py"
FLASHINFER_BACKEND = Path("serve/attention/flashinfer_backend.py")


class Prewarm:
    """FlashInfer compiles its kernels the first time they run (about 100 s on a fresh machine).
    This compiles them in the background, on the upper half of the CPUs, while the slowest stage
    runs on the others; stages that use FlashInfer wait for it."""

    def __init__(self, folder: Path, tag: str, commit: str, args: list[str], log: Path) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.cpus = cpus[len(cpus) // 2:] or cpus

        def pin() -> None:
            os.sched_setaffinity(0, self.cpus)

        command = [sys.executable, str(PROBE), *args, "--prewarm"]
        print(f"$ (background, CPUs {self.cpus[0]}-{self.cpus[-1]}) {shlex.join(command)}",
              flush=True)
        self.log = log
        env = {**stage_env(folder, tag, commit), "MAX_JOBS": str(len(self.cpus))}
        with log.open("w") as out:
            self.process = subprocess.Popen(command, cwd=folder, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, preexec_fn=pin)
        self.started = time.monotonic()

    def note(self) -> str:
        return (f"FlashInfer's JIT compile ran in the background on CPUs {self.cpus[0]}-"
                f"{self.cpus[-1]} from the start of the first stage's throughput run")

    def wait(self) -> None:
        if self.process.poll() is None:
            print("waiting for the FlashInfer warm-up to finish", flush=True)
        if self.process.wait() != 0:
            print(f"warning: the FlashInfer warm-up failed (see below); the stages compile "
                  f"their own kernels\n{self.log.read_text()[-2000:]}", flush=True)
        else:
            print(f"FlashInfer warm-up done after {time.monotonic() - self.started:.0f} s",
                  flush=True)


def probe_budget(throughput: dict, num_requests: int, budget_s: float) -> int | None:
    """How many requests the probe may run step by step so that it takes about budget_s."""
    wall = throughput["metrics"]["wall_time_s"]
    if wall <= budget_s:
        return None
    return max(2, int(num_requests * budget_s / wall))


def draw_timeline(json_path: Path, tag: str) -> Path | None:
    """The timeline picture, where matplotlib is installed (else --adopt draws it later)."""
    from bench import timeline

    try:
        return timeline.draw_file(json_path, label=short_stage(tag))
    except ImportError:
        print("matplotlib is missing: the timeline picture is drawn later (--adopt)")
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.course.stages",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda, for every harness")
    parser.add_argument("--device-name", help="names the run (default: h100, cpu, ...)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--stages-dir", help="stages exported earlier with --export-only")
    parser.add_argument("--export-only", metavar="DIR", help="export the stages and stop")
    parser.add_argument("--code-only", action="store_true",
                        help="with --export-only: leave out each stage's docs/ and milestones/")
    parser.add_argument("--only", nargs="*", help="run just these tags")
    parser.add_argument("--current", metavar="TAG",
                        help="also run this checkout as stage TAG (a stage not yet tagged)")
    parser.add_argument("--results-dir", default=str(MILESTONES),
                        help="a folder laid out like milestones/: each stage's files go into "
                             "its NN/, the run's own into runs/<run id>/")
    parser.add_argument("--no-probe", action="store_true", help="throughput only")
    parser.add_argument("--repeat-budget-s", type=float, default=8.0,
                        help="time a stage's workload again until its runs add up to this; the "
                             "stage table shows the median run and the spread")
    parser.add_argument("--max-repeats", type=int, default=11, help="odd; 1: one run per stage")
    parser.add_argument("--probe-budget-s", type=float, default=20.0,
                        help="a stage whose throughput run took longer is probed on fewer "
                             "requests, so that its probe takes about this long")
    parser.add_argument("--no-prewarm", action="store_true",
                        help="don't compile FlashInfer's kernels in the background during the "
                             "first stage (cleaner, about 100 s longer on a fresh machine)")
    parser.add_argument("--archive", metavar="FILE", help="also pack the run's files into FILE")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="go on with a run that an earlier command began on this machine "
                             "and that ended early (it had a time limit): the stages it "
                             "finished are kept, the others run")
    parser.add_argument("--adopt", metavar="FILE",
                        help="unpack a run archived elsewhere into milestones/ and redraw the "
                             "stage table and plot from it; runs nothing")
    parser.add_argument("--no-stage-table", action="store_true",
                        help="leave milestones/stages.md and docs/assets/stages.png alone")
    add_workload_args(parser)
    return parser.parse_args(argv)


def adopt(archive: str, stage_table: bool, root: Path = MILESTONES) -> Path:
    """Unpack a run archived on another machine and redraw what derives from it."""
    run_dir = unpack(archive, root)
    for stage in read_result(run_dir / "run.json")["stages"]:
        timeline_json = resolve(run_dir, stage["timeline"]) if stage.get("timeline") else None
        if timeline_json and not timeline_json.with_suffix(".png").exists():
            print(draw_timeline(timeline_json, stage["tag"]))
    if not (run_dir / "stages.png").exists():
        plot_stages.write_plot(plot_stages.load_run(run_dir), run_dir / "stages.png")
    if stage_table:
        plot_stages.main(["--run", str(run_dir)])
    print(f"adopted {plot_stages.relative(run_dir)}")
    return run_dir


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    if args.export_only:
        print(export_stages(Path(args.export_only), args.code_only))
        return None
    if args.adopt:
        return adopt(args.adopt, not args.no_stage_table)

    workload = workload_from_args(args)
    device = resolve_device(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        tags, folders, head = load_stages(args, scratch)
        name_harness_commit(head)
        if args.resume:
            files, manifest = resume_run(args, workload)
        else:
            env = environment(device)
            device_name = args.device_name or short_device_name(env["device_name"])
            files = RunFiles.new(args.results_dir, started, device_name, workload.name)
            manifest = {"kind": "stages_run", "run_id": files.run_id, "command": command_line(),
                        "started": started.isoformat(timespec="seconds"), "env": env,
                        "workload": workload.to_dict(), "model": args.model,
                        "load_format": args.load_format, "max_model_len": args.max_model_len,
                        "device_name": device_name, "host": socket.gethostname(), "notes": [],
                        "hf_baseline": files.listed(files.folder / "hf-baseline.json"),
                        "stages": []}
        run_id, run_dir = files.run_id, files.folder
        print(f"run {run_id}: {', '.join(tags)} -> {run_dir}", flush=True)

        requests = make_requests(workload, vocab_size_of(args.model))
        requests_file = scratch / "requests.json"
        requests_file.write_text(json.dumps(requests_as_json(requests)))
        model_args = ["--model", model_path(args.model), "--load-format", args.load_format,
                      "--device", args.device, "--max-model-len", str(args.max_model_len)]

        if not args.resume:  # the baseline once, with this checkout's harness, for every stage
            hf_out = scratch / "hf.json"
            run([sys.executable, "-m", "bench.hf_baseline", "--model", args.model, "--device",
                 args.device, "--hf-batch-size", str(args.hf_batch_size), "--warmup",
                 *workload_flags(workload), "--out", str(hf_out)], REPO_ROOT)
            write_result(run_dir / "hf-baseline.json", {**read_result(hf_out), "run_id": run_id})
        hf = read_result(run_dir / "hf-baseline.json")
        finished = {entry["tag"] for entry in manifest["stages"]}
        tags = {tag: commit for tag, commit in tags.items() if tag not in finished}
        if args.resume:  # what the stage that was cut short left of this run, it writes anew
            for tag in tags:
                for leftover in (files.root / stage_folder(tag)).glob(f"*-{files.started}.*"):
                    leftover.unlink()

        prewarm = None
        flashinfer_stages = [t for t in tags if (folders[t] / FLASHINFER_BACKEND).exists()]
        if (device.startswith("cuda") and flashinfer_stages and not args.no_prewarm
                and importlib.util.find_spec("flashinfer") is not None):
            tag = flashinfer_stages[-1]
            prewarm = Prewarm(folders[tag], tag, tags[tag],
                              [*model_args, "--requests", str(requests_file)],
                              scratch / "prewarm.log")
            manifest["notes"].append(prewarm.note())

        for tag, commit in tags.items():
            folder = folders[tag]
            if prewarm and tag in flashinfer_stages:
                prewarm.wait()
                prewarm = None
            entry = {"tag": tag, "commit": commit, "current": tag == args.current}
            # the stage's own harness (throughput), in the stage's own tree
            out = files.stage_file("bench", tag, commit)
            scratch_out = scratch / out.name
            run([sys.executable, str(REPEAT), "--budget-s", str(args.repeat_budget_s),
                 "--max-repeats", str(args.max_repeats), "--", *model_args, "--warmup",
                 *workload_flags(workload), "--out", str(scratch_out)],
                folder, stage_env(folder, tag, commit))
            result = read_result(scratch_out)
            result.update({"run_id": run_id, "hf_baseline": hf["metrics"],
                           "ratio_vs_hf": ratio(result["metrics"]["output_tokens_per_s"],
                                                hf["metrics"]["output_tokens_per_s"])})
            write_result(out, result)
            entry["throughput"] = files.listed(out)
            if not args.no_probe:
                entry.update(probe_stage(args, folder, tag, commit, files, scratch, model_args,
                                         requests_file, result, len(requests)))
            manifest["stages"].append(entry)
            (run_dir / PARTIAL_FILE).write_text(json.dumps(manifest, indent=1))
        if prewarm:
            prewarm.wait()
        manifest["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        write_result(run_dir / "run.json", manifest)
        (run_dir / PARTIAL_FILE).unlink(missing_ok=True)
    rows = plot_stages.load_run(run_dir)
    table = plot_stages.render_table(run_dir, rows)
    with (run_dir / "stages.md").open("x") as file:
        file.write(table)
    try:
        plot_stages.write_plot(rows, run_dir / "stages.png")
    except ImportError:
        print("matplotlib is missing: stages.png is drawn later (--adopt)")
    if not args.no_stage_table:
        plot_stages.main(["--run", str(run_dir)])
    if args.archive:
        pack(run_dir, args.archive)
    print(f"run {run_id} done: {run_dir}, and each stage's files in its folder beside it:")
    print("\n".join(f"  {listed}" for listed in listed_files(read_result(run_dir / "run.json"))))
    return run_dir


def resume_run(args: argparse.Namespace, workload: Workload) -> tuple[RunFiles, dict]:
    """The files and manifest so far of the run in --resume. A run's ratios never cross
    machines, so it goes on only on the machine that began it, with the same workload."""
    run_dir = Path(args.resume).resolve()
    manifest = json.loads((run_dir / PARTIAL_FILE).read_text())
    if manifest["host"] != socket.gethostname():
        raise SystemExit(f"{run_dir} was begun on {manifest['host']}, not on this machine")
    asked = {"workload": workload.to_dict(), "model": args.model,
             "load_format": args.load_format, "max_model_len": args.max_model_len}
    asked = json.loads(json.dumps(asked))  # as the manifest holds it (tuples as lists)
    if changed := [key for key, value in asked.items() if manifest[key] != value]:
        raise SystemExit(f"{run_dir} began with another {', '.join(changed)}")
    manifest["notes"].append(f"resumed by a second command on the same machine, at "
                             f"{datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC: "
                             f"{command_line()}")
    files = RunFiles(run_dir.parent.parent, manifest["run_id"], manifest["device_name"],
                     workload.name)
    return files, manifest


def probe_stage(args, folder: Path, tag: str, commit: str, files: RunFiles, scratch: Path,
                model_args: list[str], requests_file: Path, throughput: dict,
                num_requests: int) -> dict:
    """bench/probe.py in the stage's tree; returns the manifest entries of its files."""
    out, timeline_out = files.stage_file("probe", tag, commit), files.stage_file("timeline", tag,
                                                                                 commit)
    probe_out = scratch / out.name
    command = [sys.executable, str(PROBE), *model_args, "--requests", str(requests_file),
               "--out", str(probe_out), "--timeline-out", str(timeline_out)]
    limit = probe_budget(throughput, num_requests, args.probe_budget_s)
    if limit:
        command += ["--max-requests", str(limit)]
    if resolve_device(args.device).startswith("cuda"):
        command.append("--compare-attention-backends")
    if timeline_out.exists():
        raise FileExistsError(timeline_out)
    timeline_out.parent.mkdir(parents=True, exist_ok=True)
    run(command, folder, stage_env(folder, tag, commit))
    probe = json.loads(probe_out.read_text())
    probe.update({"env": throughput["env"], "run_id": throughput["run_id"], "tag": tag,
                  "commit": commit})
    write_result(out, probe)
    entry = {"probe": files.listed(out), "timeline": files.listed(timeline_out)}
    png = draw_timeline(timeline_out, tag)
    if png:
        entry["timeline_png"] = files.listed(png)
    return entry


if __name__ == "__main__":
    main()
