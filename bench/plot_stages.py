"""The stage-by-stage table and plot, from every milestones/NN/bench-*.json that is committed.

    python -m bench.plot_stages [--device h100]

Writes milestones/stages.md (a table the course pages include) and docs/assets/stages.png
(output tok/s per stage with transformers' `generate` as a line, and p50 TTFT where measured).
"""

import argparse

from bench.results import REPO_ROOT, read_result

TABLE = REPO_ROOT / "milestones" / "stages.md"
PLOT = REPO_ROOT / "docs" / "assets" / "stages.png"


def stage_results(device: str) -> list[tuple[str, dict, dict | None]]:
    """(stage number, throughput result, serving result or None) for each stage, in order."""
    rows = []
    for folder in sorted((REPO_ROOT / "milestones").glob("[0-9][0-9]")):
        throughput = folder / f"bench-{device}.json"
        if not throughput.exists():
            continue
        serving = folder / f"serving-{device}.json"
        rows.append((folder.name, read_result(throughput),
                     read_result(serving) if serving.exists() else None))
    return rows


def write_table(rows: list[tuple[str, dict, dict | None]]) -> None:
    lines = ["| stage | code measured | run (UTC) | output tok/s | vs previous | vs HF generate "
             "| p50 TTFT (ms) |", "|---|---|---|---|---|---|---|"]
    previous = None
    for stage, result, serving in rows:
        tok_s = result["metrics"]["output_tokens_per_s"]
        vs_prev = f"{tok_s / previous:.2f}x" if previous else "—"
        vs_hf = f"{result['ratio_vs_hf']:.2f}x" if result.get("ratio_vs_hf") else "—"
        ttft = f"{serving['metrics']['ttft_ms']['p50']:.0f}" if serving else "—"
        commit = (result["env"].get("git_commit") or "?")[:8]
        run = result["env"].get("timestamp", "?")[:16].replace("T", " ")
        lines.append(f"| {int(stage)} | `{commit}` | {run} | {tok_s:.1f} | {vs_prev} | {vs_hf} "
                     f"| {ttft} |")
        previous = tok_s
    device = rows[0][1]["env"]["device_name"] if rows else "?"
    workload = rows[0][1]["workload"] if rows else {}
    engine = rows[0][1]["engine_args"] if rows else {}
    lines.append("")
    lines.append("Each row is the latest run of that stage; rows from the same run share the "
                 "same HF baseline. Different runs land on different machines, whose "
                 "CPUs (and so these launch-bound engines) differ by up to 1.5x.")
    lines.append("")
    lines.append(f"Measured on {device}; workload `{workload.get('name')}`: "
                 f"{workload.get('num_prompts')} requests, prompts of "
                 f"{workload.get('input_len')} tokens, outputs of {workload.get('output_len')} "
                 f"tokens, temperature {workload.get('temperature')}, ignore_eos; model "
                 f"`{engine.get('model')}` ({engine.get('load_format')} weights, "
                 f"{engine.get('resolved_dtype')}).")
    TABLE.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[tuple[str, dict, dict | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [f"v0.{int(stage)}" for stage, _, _ in rows]
    tok_s = [result["metrics"]["output_tokens_per_s"] for _, result, _ in rows]
    hf = [result["hf_baseline"]["output_tokens_per_s"] for _, result, _ in rows
          if result.get("hf_baseline")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(stages, tok_s, color="tab:blue")
    if hf:
        left.axhline(sum(hf) / len(hf), color="tab:red", linestyle="--", label="HF generate")
        left.legend()
    left.set_yscale("log")
    left.set_ylim(bottom=1)
    left.set_ylabel("output tokens/s (log)")
    left.set_title("offline throughput, course workload")
    ttft = [(f"v0.{int(s)}", serving["metrics"]["ttft_ms"]["p50"])
            for s, _, serving in rows if serving]
    if ttft:
        right.bar([t[0] for t in ttft], [t[1] for t in ttft], color="tab:orange")
    else:
        right.text(0.5, 0.5, "not measured yet", ha="center", va="center")
    right.set_ylabel("p50 time to first token (ms)")
    right.set_title("online serving")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="h100", help="which bench-<device>.json to read")
    args = parser.parse_args(argv)
    rows = stage_results(args.device)
    write_table(rows)
    write_plot(rows)
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
