"""Two stages side by side on one workload, offline and online, in one run on one machine.

    python -m bench.course.compare --stages-dir .stages --baseline v0.2-paged-kv \\
        --current v0.3-continuous-batching --workload nano-vllm --pools default 8192 \\
        --rates 4 16 64 inf --online-prompts 64 --archive $OUT/compare.tar.gz

Offline, each stage's own `bench.throughput` runs in the stage's own tree once per KV pool size
(`default`: the engine sizes the pool from free memory; a number: that many pages, the same for
both stages). Online, each stage's own server is started from its tree, and this checkout's
`bench.serving` streams the workload to it at each request rate (Poisson arrivals; inf sends
everything at once). `--variant LABEL:KEY=VALUE,...` runs the current stage once more with other
engine settings (`cache-off:enable_prefix_caching=false`; its server gets the same settings as
flags, `--no-enable-prefix-caching`), and `--fresh-prompts-per-rate` gives each rate a workload
of its own seed (the same for every stage), so that a prefix cache cannot reuse an earlier rate's
prompts. The run is named after its UTC start, device and "compare-<workload>"; each
stage's results go beside its chapter, in milestones/NN/ (bench-<device>-<commit>-<workload>-
pool-<pool>-<run start>.json offline, serving-…-r<rate>-….json online), and the run's own folder
milestones/runs/<run id>/ holds run.json (what ran, and the path of every file), the servers'
logs, compare.md (the tables the chapter includes) and ttft.png. `--adopt FILE` unpacks an
archived run into milestones/; `--render RUN_DIR...` rewrites runs' compare.md from their files
(after a change to how the tables are drawn; the results themselves are never touched).
"""

import argparse
import datetime
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.course.run_files import MILESTONES, RunFiles, pack, resolve, short_commit, unpack
from bench.course.stage_trees import (
    load_stages,
    model_path,
    name_harness_commit,
    run,
    short_stage,
    stage_env,
    workload_flags,
)
from bench.model_config import resolve_device
from bench.results import (
    REPO_ROOT,
    command_line,
    environment,
    read_result,
    short_device_name,
    write_result,
)
from bench.workloads import add_workload_args, workload_from_args

SERVER_START_TIMEOUT_S = 600  # a fresh machine compiles FlashInfer's kernels at the first step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.course.compare",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--baseline", help="the earlier stage's tag (required for a run)")
    parser.add_argument("--current",
                        help="this checkout, as the stage TAG (tagged or not yet; required for "
                        "a run)")
    parser.add_argument("--stages-dir", help="stages exported earlier with --export-only")
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--device-name", help="names the run (default: h100, cpu, ...)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--pools", nargs="*", default=["default"],
                        help="KV pool sizes for the offline runs: default, or a page count")
    parser.add_argument("--rates", nargs="*", default=[],
                        help="request rates for the online runs (req/s, or inf)")
    parser.add_argument("--online-prompts", type=int, help="requests per online run "
                        "(default: the workload's)")
    parser.add_argument("--server-args", default="", help="extra flags for both servers")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant,
                        metavar="LABEL:KEY=VALUE,...",
                        help="also run the current stage with these engine settings")
    parser.add_argument("--harness", choices=["stage", "current"], default="stage",
                        help="offline: each stage's own bench.throughput, or this checkout's "
                        "(for a workload older stages' harnesses do not know) driving each "
                        "stage's own serve/")
    parser.add_argument("--fresh-prompts-per-rate", action="store_true",
                        help="rate i runs the workload with seed + i (every stage alike)")
    parser.add_argument("--results-dir", default=str(MILESTONES),
                        help="a folder laid out like milestones/: each stage's files go into "
                             "its NN/, the run's own into runs/<run id>/")
    parser.add_argument("--archive", metavar="FILE", help="also pack the run's files into FILE")
    parser.add_argument("--adopt", metavar="FILE",
                        help="unpack a run archived elsewhere into milestones/; runs nothing")
    parser.add_argument("--render", metavar="RUN_DIR", nargs="+",
                        help="rewrite each run folder's compare.md from its result files; runs "
                        "nothing")
    add_workload_args(parser)
    args = parser.parse_args(argv)
    if not (args.adopt or args.render) and not (args.baseline and args.current):
        parser.error("a run needs --baseline and --current")
    return args


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'cache-off:enable_prefix_caching=false' -> ('cache-off', ['enable_prefix_caching=false'])."""
    label, sep, settings = text.partition(":")
    if not (sep and label and settings):
        raise argparse.ArgumentTypeError(f"expected LABEL:KEY=VALUE,..., got {text!r}")
    return label, settings.split(",")


def server_flags(settings: list[str]) -> list[str]:
    """Engine settings as server flags: a=true -> --a, a=false -> --no-a, a=x -> --a x."""
    flags = []
    for setting in settings:
        key, _, value = setting.partition("=")
        flag = key.replace("_", "-")
        if value.lower() in ("true", "false"):
            flags.append(f"--{flag}" if value.lower() == "true" else f"--no-{flag}")
        else:
            flags += [f"--{flag}", value]
    return flags


def engine_only(stage_folder: Path, scratch: Path) -> Path:
    """A folder that holds only a link to the stage's serve/: run from there, `import serve`
    finds the stage's engine first, and `import bench` this checkout's harness (PYTHONPATH)."""
    scratch.mkdir(exist_ok=True)
    link = scratch / "serve"
    if not link.exists():
        link.symlink_to(stage_folder / "serve", target_is_directory=True)
    return scratch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StageServer:
    """A stage's own server (`python -m serve` in its tree) for the duration of a with-block."""

    def __init__(self, folder: Path, env: dict, flags: list[str], log: Path) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "serve", *flags, "--port", str(self.port),
                   "--log-level", "warning"]
        print(f"$ (cd {folder}) {' '.join(command)} &", flush=True)
        self.log = log.open("w")
        self.process = subprocess.Popen(command, cwd=folder, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "StageServer":
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: see "
                                   f"{self.log.name}")
            try:
                urllib.request.urlopen(f"{self.base_url}/health", timeout=2)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not start") from None
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    if args.adopt:
        return adopt(args.adopt)
    if args.render:
        for run_dir in map(Path, args.render):
            (run_dir / "compare.md").write_text(render(run_dir))
            print(f"wrote {run_dir / 'compare.md'}")
        return None
    workload = workload_from_args(args)
    device = resolve_device(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        stage_args = argparse.Namespace(stages_dir=args.stages_dir, only=[args.baseline],
                                        current=args.current)
        tags, folders, head = load_stages(stage_args, scratch)
        name_harness_commit(head)
        env = environment(device)
        device_name = args.device_name or short_device_name(env["device_name"])
        files = RunFiles.new(args.results_dir, started, device_name, workload.name, "compare-")
        run_id, run_dir = files.run_id, files.folder
        model_flags = ["--model", model_path(args.model), "--load-format", args.load_format,
                       "--max-model-len", str(args.max_model_len)]
        manifest = {"kind": "compare_run", "run_id": run_id, "command": command_line(),
                    "started": started.isoformat(timespec="seconds"), "env": env,
                    "workload": workload.to_dict(), "model": args.model,
                    "baseline": args.baseline, "current": args.current,
                    "offline_harness": args.harness, "offline": [],
                    "online": [], "server_logs": []}
        runs = [(tag, commit, None, []) for tag, commit in tags.items()]
        runs += [(args.current, tags[args.current], label, settings)
                 for label, settings in args.variant]
        for tag, commit, variant, settings in runs:
            folder, stage = folders[tag], stage_env(folders[tag], tag, commit)
            names = [variant] if variant else []
            for pool in args.pools:
                out = files.stage_file("bench", tag, commit, *names, "pool", pool)
                engine_flags = [] if pool == "default" else ["--engine-arg", f"num_pages={pool}"]
                engine_flags += [flag for setting in settings for flag in ("--engine-arg",
                                                                              setting)]
                harness_dir = folder if args.harness == "stage" else engine_only(
                    folder, scratch / f"engine-{short_stage(tag)}")
                run([sys.executable, "-m", "bench.throughput", *model_flags, "--device",
                     args.device, "--warmup", *workload_flags(workload), *engine_flags,
                     "--out", str(scratch / out.name)], harness_dir,
                    stage if args.harness == "stage" else {**stage, "PYTHONPATH": str(REPO_ROOT)})
                write_result(out, {**read_result(scratch / out.name), "run_id": run_id,
                                   "tag": tag, "variant": variant, "pool": pool})
                manifest["offline"].append({"tag": tag, "variant": variant, "pool": pool,
                                            "file": files.listed(out)})
            if not args.rates:
                continue
            log = run_dir / f"server-{'-'.join([short_stage(tag), *names])}-" \
                            f"{short_commit(commit)}.log"
            manifest["server_logs"].append(files.listed(log))
            flags = [*model_flags, *args.server_args.split(), *server_flags(settings)]
            with StageServer(folder, stage, flags, log) as server:
                for index, rate in enumerate(args.rates):
                    out = files.stage_file("serving", tag, commit, *names, f"r{rate}")
                    prompts = ["--num-prompts", str(args.online_prompts)] \
                        if args.online_prompts else []
                    if args.fresh_prompts_per_rate:
                        prompts += ["--seed", str(workload.seed + index)]
                    run([sys.executable, "-m", "bench.serving", "--base-url", server.base_url,
                         *workload_flags(workload), *prompts, "--request-rate", rate,
                         "--out", str(scratch / out.name)], REPO_ROOT,
                        {**os.environ, "PYTHONPATH": os.pathsep.join(
                            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)})
                    write_result(out, {**read_result(scratch / out.name), "run_id": run_id,
                                       "tag": tag, "variant": variant, "server_commit": commit})
                    manifest["online"].append({"tag": tag, "variant": variant, "rate": rate,
                                               "file": files.listed(out)})
        manifest["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        write_result(run_dir / "run.json", manifest)
    (run_dir / "compare.md").write_text(render(run_dir))
    print((run_dir / "compare.md").read_text())
    try:
        plot_ttft(run_dir)
    except ImportError:
        print("matplotlib is missing: ttft.png is drawn later (--adopt)")
    if args.archive:
        pack(run_dir, args.archive)
    return run_dir


def label_of(entry: dict) -> str:
    """A manifest entry's stage, with its variant if it has one: v0.5, v0.5 cache-off."""
    variant = entry.get("variant")
    return short_stage(entry["tag"]) + (f" {variant}" if variant else "")


def render(run_dir: Path) -> str:
    """The run's tables: offline throughput per pool, online latency per rate."""
    manifest = read_result(run_dir / "run.json")
    base = manifest["baseline"]
    lines = []  # a run with no offline (or no online) part gets no table for it, not a header
    offline = [(e, read_result(resolve(run_dir, e["file"]))) for e in manifest["offline"]]
    if offline:
        lines += ["| KV pool | stage | output tok/s | vs " + short_stage(base) + " | preemptions "
                  "| mean batch |", "|---|---|---|---|---|---|"]
    base_tok_s = {e["pool"]: r["metrics"]["output_tokens_per_s"] for e, r in offline
                  if e["tag"] == base and not e.get("variant")}
    for entry, result in offline:
        metrics, pool = result["metrics"], entry["pool"]
        tok_s = metrics["output_tokens_per_s"]
        mean_batch = (metrics.get("steps") or {}).get("mean_batch")
        batch = f"{mean_batch:.1f}" if mean_batch else "—"
        lines.append(f"| {pool} | {label_of(entry)} | {tok_s:.1f} | "
                     f"{tok_s / base_tok_s.get(pool, tok_s):.2f}x "
                     f"| {metrics.get('num_preemptions', '—')} | {batch} |")
    if manifest["online"]:
        online = [(e, read_result(resolve(run_dir, e["file"]))["metrics"])
                  for e in manifest["online"]]
        # Runs that recorded the gaps between a stream's tokens (ITL) or counted cached prompt
        # tokens (bench.serving since stage 5) get a column for each.
        with_itl = any("itl_ms" in metrics for _, metrics in online)
        with_cache = any("total_cached_tokens" in metrics for _, metrics in online)
        lines += [""] if lines else []
        lines += ["| rate (req/s) | stage | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |"
                  + (" ITL p50 / p99 (ms) |" if with_itl else "")
                  + " output tok/s |" + (" prompt tokens cached |" if with_cache else ""),
                  "|---|---|---|---|" + ("---|" if with_itl else "") + "---|"
                  + ("---|" if with_cache else "")]
        for entry, metrics in online:
            ttft, tpot = metrics["ttft_ms"], metrics["tpot_ms"]
            line = (f"| {entry['rate']} | {label_of(entry)} | "
                    f"{ttft['p50']:.0f} / {ttft['p99']:.0f} | "
                    f"{tpot['p50']:.1f} / {tpot['p99']:.1f} | ")
            if with_itl:
                line += f"{percentiles(metrics.get('itl_ms'))} | "
            line += f"{metrics['output_tokens_per_s']:.1f} |"
            if with_cache:
                cached = metrics.get("total_cached_tokens", 0) / metrics["total_input_tokens"]
                line += f" {cached:.1%} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


def percentiles(values: dict | None) -> str:
    """'p50 / p99' of a bench.serving percentile dict, or — where the file has none."""
    if not values or values.get("p50") is None or values.get("p99") is None:
        return "—"
    return f"{values['p50']:.1f} / {values['p99']:.1f}"


def plot_ttft(run_dir: Path) -> Path | None:
    """ttft.png: p50 time to first token against request rate, one line per stage."""
    manifest = read_result(run_dir / "run.json")
    if not manifest["online"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_stage: dict[str, list[tuple[str, float, float]]] = {}
    for entry in manifest["online"]:
        ttft = read_result(resolve(run_dir, entry["file"]))["metrics"]["ttft_ms"]
        by_stage.setdefault(label_of(entry), []).append((entry["rate"], ttft["p50"],
                                                          ttft["p99"]))
    rates = list(dict.fromkeys(entry["rate"] for entry in manifest["online"]))
    fig, axis = plt.subplots(figsize=(6, 4))
    for color, (label, points) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"),
                                      by_stage.items(), strict=False):
        x = [rates.index(rate) for rate, _, _ in points]
        axis.plot(x, [p50 / 1000 for _, p50, _ in points], marker="o", color=color,
                  label=f"{label} p50")
        axis.plot(x, [p99 / 1000 for _, _, p99 in points], linestyle="--", color=color,
                  alpha=0.6, label=f"{label} p99")
    axis.set_xticks(range(len(rates)), [f"{r} req/s" if r != "inf" else "all at once"
                                        for r in rates])
    axis.set_yscale("log")
    axis.set_ylabel("time to first token (s, log)")
    first = read_result(resolve(run_dir, manifest["online"][0]["file"]))
    num_prompts = first["workload"]["num_prompts"]
    axis.set_title(f"{manifest['workload']['name']} lengths, {num_prompts} requests per rate")
    axis.legend()
    fig.tight_layout()
    out = run_dir / "ttft.png"
    fig.savefig(out, dpi=120)
    return out


def adopt(archive: str, root: Path = MILESTONES) -> Path:
    """Unpack a run archived on another machine; draw ttft.png where it could not."""
    run_dir = unpack(archive, root)
    if not (run_dir / "ttft.png").exists():
        plot_ttft(run_dir)
    print(f"adopted {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
