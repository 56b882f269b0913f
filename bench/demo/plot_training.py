"""The demo models' loss curves, from the result file of their training (bench.demo.train).

    python -m bench.demo.plot_training bench/demo_models/train-demo-<...>.json \\
        --out docs/assets/x.png

One line per model for the training loss (of the batch at that step) and one for the held-out
loss, against the tokens seen; a dot marks the step whose weights were kept.
"""

import argparse
from pathlib import Path

from bench.results import read_result


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.2), dpi=110)
    for (role, model), color in zip(result["models"].items(), ("tab:blue", "tab:orange"),
                                    strict=False):
        curve = model["curve"]
        tokens = [point["tokens"] / 1e6 for point in curve]
        name = f"{model['name']} ({role})"
        axes.plot(tokens, [p["train_loss"] for p in curve], color=color, alpha=0.45,
                  label=f"{name}: training batch")
        axes.plot(tokens, [p["held_out_loss"] for p in curve], color=color,
                  label=f"{name}: held-out files")
        kept = next(p for p in curve if p["step"] == model["best_step"])
        axes.plot([kept["tokens"] / 1e6], [kept["held_out_loss"]], "o", color=color)
    corpus = result["corpus"]
    axes.set_title(f"{corpus['name']}: {corpus['files'] - corpus['held_out_files']} files to "
                   f"train on, {corpus['held_out_files']} held out", fontsize=10)
    axes.set_xlabel("tokens seen (millions)")
    axes.set_ylabel("next-token loss (nats)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.demo.plot_training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="a train-demo result file")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    plot(read_result(args.result), Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
