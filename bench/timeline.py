"""Draw one profiled decode step (bench/probe.py's timeline JSON) as a picture.

    python -m bench.timeline milestones/01/timeline-h100-043b376f-course-20261125-213914.json \
        [--out x.png] [--label v0.1]
    python -m bench.timeline milestones/01          # every timeline in the folder

Three rows share one time axis: the engine calls (the model's forward, sampling, output
processing), the PyTorch ops the CPU runs (each one launches GPU work), and the GPU kernels.
A second panel zooms in on 2 ms of the forward pass, where single kernels and the gaps between
them (the GPU waiting for the next launch) are visible. With no GPU the kernel row stays empty.
"""

import argparse
import json
from pathlib import Path

PHASE_COLORS = {"forward": "tab:blue", "sample": "tab:orange", "output": "tab:green"}
ZOOM_US = 2000.0


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def zoom_window(timeline: dict) -> tuple[float, float]:
    """2 ms from the middle of the forward call (or of the step, without one)."""
    forward = [p for p in timeline["phases"] if p[0] == "forward"]
    if forward:
        start, duration = forward[0][1], forward[0][2]
    else:
        start, duration = 0.0, timeline["summary"]["step_ms"] * 1e3
    middle = start + duration / 2
    return max(0.0, middle - ZOOM_US / 2), middle + ZOOM_US / 2


def draw_rows(ax, timeline: dict, window: tuple[float, float] | None) -> None:
    rows = {"engine": 2, "CPU ops": 1, "GPU kernels": 0}
    step_us = timeline["summary"]["step_ms"] * 1e3
    for name, start, duration in timeline["phases"]:
        ax.broken_barh([(start, duration)], (rows["engine"] - 0.4, 0.8),
                       color=PHASE_COLORS.get(name, "tab:gray"), alpha=0.6)
        if window is None and duration > 0.04 * step_us:  # label the calls wide enough to read
            ax.text(start + duration / 2, rows["engine"], name, ha="center", va="center",
                    fontsize=8)
    for parity, color in ((0, "dimgray"), (1, "darkgray")):  # alternate, so ops stay apart
        ax.broken_barh([(start, duration) for _, start, duration in timeline["cpu"][parity::2]],
                       (rows["CPU ops"] - 0.4, 0.8), color=color)
    ax.broken_barh([(start, duration) for _, start, duration in timeline.get("syncs", [])],
                   (rows["CPU ops"] - 0.4, 0.8), color="tab:red")
    ax.broken_barh([(start, max(duration, 0.5)) for _, start, duration in timeline["gpu"]],
                   (rows["GPU kernels"] - 0.4, 0.8), color="tab:purple")
    ax.set_yticks(list(rows.values()), list(rows))
    ax.set_ylim(-0.7, 2.7)
    if window:
        ax.set_xlim(*window)


def title(timeline: dict, label: str) -> str:
    s = timeline["summary"]
    busy = (f", GPU busy {s['gpu_busy_ms']:.1f} ms ({100 * s['gpu_busy_fraction']:.0f} %)"
            if s["kernels"] else ", no GPU")
    unprofiled = (f" ({s['unprofiled_step_ms']:.1f} ms without the profiler)"
                  if s.get("unprofiled_step_ms") else "")
    rows = f"{s['rows']} row{'' if s['rows'] == 1 else 's'}"
    if s.get("tokens"):  # a mixed step: its decode rows plus a prompt chunk
        rows += f" sampled, {s['tokens']:,} tokens"
    return (f"{label}: {s.get('what', 'one decode step')}, {rows}: {s['step_ms']:.1f} ms under the "
            f"profiler{unprofiled}{busy}, {s['kernels']:,} kernels")


def draw(timeline: dict, out: str | Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, zoom) = plt.subplots(2, 1, figsize=(12, 5.2))
    draw_rows(whole, timeline, None)
    whole.set_xlim(0, timeline["summary"]["step_ms"] * 1e3)
    whole.set_xlabel("µs from the start of the step (red: the CPU waits for the GPU)")
    whole.set_title(title(timeline, label), fontsize=10)
    window = zoom_window(timeline)
    draw_rows(zoom, timeline, window)
    zoom.set_xlabel("µs: 2 ms of the forward pass; white in the GPU row is the GPU idle, "
                    "waiting for the next launch")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw_file(path: Path, out: Path | None = None, label: str | None = None) -> Path:
    """timeline-….json -> the .png beside it (or out), titled with label (default: the name)."""
    out = out or path.with_suffix(".png")
    draw(load(path), out, label or path.stem.removeprefix("timeline-"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a timeline JSON, or a folder (draws each one in it)")
    parser.add_argument("--out", help="the PNG (one timeline only; default: beside the JSON)")
    parser.add_argument("--label", help="the picture's title starts with this (e.g. v0.1)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    files = sorted(path.glob("timeline-*.json")) if path.is_dir() else [path]
    for file in files:
        print(draw_file(file, Path(args.out) if args.out else None, args.label))


if __name__ == "__main__":
    main()
