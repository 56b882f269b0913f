"""The stage table and plot, from one run of bench.course.stages (one machine, one HF baseline).

    python -m bench.course.plot_stages --run milestones/runs/<run id>

Writes milestones/stages.md (the table the course pages include) and docs/assets/stages.png
(output tok/s per stage with this run's transformers `generate` as a line, and beside it each
stage's median decode step, when the run probed the stages). Every number, and so every ratio,
comes from that one run; tests/test_chapters.py checks that stages.md is exactly what this
renders from it.
"""

import argparse
import json
import re
from pathlib import Path

from bench.course.run_files import resolve
from bench.results import REPO_ROOT, read_result

TABLE = REPO_ROOT / "milestones" / "stages.md"
PLOT = REPO_ROOT / "docs" / "assets" / "stages.png"
RUN_MARKER = re.compile(r"<!-- stage table of run (\S+) ")


def load_run(run_dir: str | Path) -> dict:
    """The run's manifest, HF baseline and (throughput, probe or None) per stage, in order; the
    manifest names each file (the stages' beside their chapters, milestones/NN/)."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "run.json").read_text())
    stages = []
    for entry in manifest["stages"]:
        throughput = read_result(resolve(run_dir, entry["throughput"]))
        probe = read_result(resolve(run_dir, entry["probe"])) if entry.get("probe") else None
        stages.append((entry, throughput, probe))
    if manifest.get("hf_baseline"):
        hf = read_result(resolve(run_dir, manifest["hf_baseline"]))["metrics"]
    else:  # runs from before hf-baseline.json: every stage carries the same baseline
        hf = stages[0][1]["hf_baseline"]
        if any(t["hf_baseline"] != hf for _, t, _ in stages):
            raise ValueError(f"{run_dir}: the stages carry different HF baselines: not one run")
    return {"dir": run_dir, "manifest": manifest, "stages": stages, "hf": hf}


def relative(path: Path) -> str:
    """A path as the repository names it (or as given, outside the repository)."""
    path = Path(path).resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def render_table(run_dir: str | Path, run: dict | None = None) -> str:
    run = run or load_run(run_dir)
    manifest, hf = run["manifest"], run["hf"]
    probed = any(probe for _, _, probe in run["stages"])
    repeated = any(spread(throughput) for _, throughput, _ in run["stages"])
    header = ["stage", "code measured", "output tok/s", "vs previous", "vs HF `generate`"]
    if repeated:
        header.insert(3, "timed runs: min–max")
    if probed:
        header += ["decode step (median)", "kernels per decode step"]
    lines = [f"<!-- stage table of run {relative(run['dir'])} "
             "(python -m bench.course.plot_stages --run ...): do not edit -->",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = previous_range = None
    unranked = False
    for entry, throughput, probe in run["stages"]:
        tok_s = throughput["metrics"]["output_tokens_per_s"]
        runs = spread(throughput)
        low, high = runs or (tok_s, tok_s)
        versus = f"{tok_s / previous:.2f}×" if previous else "—"
        if previous and runs and previous_range and overlap((low, high), previous_range):
            versus += " †"
            unranked = True
        cells = [short(entry["tag"]) + (" (untagged)" if entry.get("current") else ""),
                 f"`{entry['commit'][:8]}`", f"{tok_s:,.1f}", versus,
                 f"{tok_s / hf['output_tokens_per_s']:.2f}×"]
        if repeated:
            count = len(throughput["metrics"].get("repeats", [None]))
            cells.insert(3, f"{count}: {low:,.0f}–{high:,.0f}" if runs else "1")
        if probed:
            decode = probe["summary"]["decode"] if probe else None
            on_gpu = probe and str(probe.get("device", "")).startswith("cuda")
            cells += [f"{decode['median_step_ms']:.1f} ms" if decode else "—",
                      f"{probe['decode_step']['kernels']:,}" if on_gpu else "—"]
        lines.append("| " + " | ".join(cells) + " |")
        previous, previous_range = tok_s, (low, high) if runs else None
    batch = hf.get("batch_size", "?")
    cells = [f"HF `generate` (batch {batch})", "transformers", f"{hf['output_tokens_per_s']:,.1f}",
             "", "1×"] + ([""] if repeated else []) + (["", ""] if probed else [])
    lines.append("| " + " | ".join(cells) + " |")
    env = run["stages"][0][1]["env"]
    workload = manifest["workload"]
    when = (manifest.get("started") or env.get("timestamp", "?"))[:16].replace("T", " ")
    lines += [
        "",
        f'!!! info "Provenance: run `{manifest["run_id"]}`"',
        f"    One run of every row above, one after the other on one machine: "
        f"{env.get('device_name')}, torch {env.get('torch')}, started {when} UTC, "
        f"`{manifest.get('command', 'python -m bench.course.stages')}`. Workload "
        f"`{workload['name']}`: {workload['num_prompts']} requests, prompts of "
        f"{workload['input_len'][0]}–{workload['input_len'][1]} tokens, outputs of "
        f"{workload['output_len'][0]}–{workload['output_len'][1]} tokens, temperature "
        f"{workload['temperature']}, ignore_eos; model `{manifest.get('model')}` "
        f"({manifest.get('load_format', 'dummy')} weights). Its files are listed in "
        f"`{relative(run['dir'] / 'run.json')}`.",
    ]
    if repeated:
        lines.append("    Output tok/s is each stage's median timed run: one engine times the "
                     "workload again after its warm-up until its runs add up to a few seconds "
                     "(a stage whose one run lasts longer runs once)." + (
                         " † marks a stage whose runs overlap the previous stage's: this run "
                         "does not rank the two." if unranked else ""))
    for note in manifest.get("notes", []):
        lines.append(f"    {note.rstrip('.')}.")
    return "\n".join(lines) + "\n"


def spread(throughput: dict) -> tuple[float, float] | None:
    """The slowest and fastest of a stage's timed runs, when it ran more than once."""
    repeats = throughput["metrics"].get("repeats", [])
    if len(repeats) < 2:
        return None
    speeds = [run["output_tokens_per_s"] for run in repeats]
    return min(speeds), max(speeds)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def short(tag: str) -> str:
    return tag.split("-")[0]


def write_plot(run: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [short(entry["tag"]) for entry, _, _ in run["stages"]]
    tok_s = [t["metrics"]["output_tokens_per_s"] for _, t, _ in run["stages"]]
    steps = [(short(e["tag"]), p["summary"]["decode"]["median_step_ms"])
             for e, _, p in run["stages"] if p and p["summary"]["decode"]["median_step_ms"]]
    # The decode-step panel only where the run probed a stage: a run without probes draws
    # throughput alone rather than an empty panel.
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(10, 4) if steps else (6.5, 4),
                             squeeze=False)
    left = axes[0][0]
    # where a stage ran several times: the bar is the median, the whisker the slowest-fastest
    ranges = [spread(t) or (m, m) for (_, t, _), m in zip(run["stages"], tok_s, strict=True)]
    whiskers = [[m - low for (low, _), m in zip(ranges, tok_s, strict=True)],
                [high - m for (_, high), m in zip(ranges, tok_s, strict=True)]]
    left.bar(stages, tok_s, color="tab:blue", yerr=whiskers, capsize=3)
    left.axhline(run["hf"]["output_tokens_per_s"], color="tab:red", linestyle="--",
                 label="HF generate, same run")
    left.legend()
    left.set_yscale("log")
    left.set_ylim(bottom=1)
    left.set_ylabel("output tokens/s (log)")
    left.set_title(f"offline throughput, {run['manifest']['workload']['name']} workload")
    if steps:
        right = axes[0][1]
        right.bar([s for s, _ in steps], [ms for _, ms in steps], color="tab:orange")
        right.set_ylabel("median decode step (ms)")
        right.set_title("one decode step")
    fig.suptitle(f"run {run['manifest']['run_id']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_run(table: str | Path = TABLE) -> Path | None:
    """The run folder a stage table was rendered from (its first line names it)."""
    match = RUN_MARKER.search(Path(table).read_text())
    return REPO_ROOT / match.group(1) if match else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.course.plot_stages",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder (default: the one milestones/stages.md "
                                      "was drawn from)")
    parser.add_argument("--table", default=str(TABLE))
    parser.add_argument("--plot", default=str(PLOT))
    args = parser.parse_args(argv)
    run_dir = Path(args.run) if args.run else table_run(args.table)
    if run_dir is None:
        parser.error("name the run: --run milestones/runs/<run id>")
    run = load_run(run_dir)
    Path(args.table).write_text(render_table(run_dir, run))
    write_plot(run, args.plot)
    print(Path(args.table).read_text())


if __name__ == "__main__":
    main()
