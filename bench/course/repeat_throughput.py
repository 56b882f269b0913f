"""A stage's own throughput harness, its timed run repeated until the repeats last long enough.

    python bench/course/repeat_throughput.py --budget-s 8 --max-repeats 11 -- <throughput args>

Run as a file, in a stage's exported tree (cwd and PYTHONPATH: bench.course.stages does this).
From stage 4 on, the course workload runs in half a second, and one such run varies by ~20 %
from the next: one run per stage cannot rank stages. This wraps the stage's own
`bench.throughput.benchmark_engine` (its signature is the same at every tag) so that, after the
warm-up, one engine times the workload again and again until the timed runs add up to
--budget-s (an odd number of them, at most --max-repeats). The result file is the stage's own,
its metrics those of the median run, with every run's numbers under metrics["repeats"]. A stage
slow enough that one run outlasts the budget runs once, as before.
"""

import argparse
import os
import statistics
import sys


def repeat(benchmark_engine, budget_s: float, max_repeats: int):
    """benchmark_engine, timed again (warm-up only the first time) until the runs last budget_s."""

    def repeated(llm, requests, warmup: bool) -> dict:
        runs = []
        while True:
            runs.append(timed_once(benchmark_engine, llm, requests, warmup and not runs))
            spent = sum(run["wall_time_s"] for run in runs)
            if len(runs) >= max_repeats or (spent >= budget_s and len(runs) % 2 == 1):
                break
        speeds = [run["output_tokens_per_s"] for run in runs]
        median = runs[speeds.index(statistics.median_low(speeds))]
        return {**median, "repeats": [{key: run[key] for key in
                                       ("wall_time_s", "output_tokens_per_s")} for run in runs]}

    return repeated


def timed_once(benchmark_engine, llm, requests, warmup: bool) -> dict:
    """One timed run on a clean engine: nothing cached from the last, no step hooks left on it."""
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()
    engine = llm.engine
    scheduler = getattr(engine, "scheduler", None)
    # The harness's step log wraps engine.step and scheduler.schedule for one run; a second run
    # would wrap the wrappers, so each run leaves the engine as it found it.
    saved = [(owner, name, vars(owner).get(name)) for owner, name in
             ((engine, "step"), (scheduler, "schedule")) if owner is not None]
    try:
        return benchmark_engine(llm, requests, warmup)
    finally:
        for owner, name, value in saved:
            if value is None:
                vars(owner).pop(name, None)
            else:
                setattr(owner, name, value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=8.0)
    parser.add_argument("--max-repeats", type=int, default=11)
    parser.add_argument("throughput_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.max_repeats < 1 or args.max_repeats % 2 == 0:
        parser.error("--max-repeats must be odd and >= 1 (the median is one of the runs)")
    rest = args.throughput_args[1:] if args.throughput_args[:1] == ["--"] else args.throughput_args
    sys.path[0] = os.getcwd()  # the stage's tree, not this file's folder
    from bench import throughput

    throughput.benchmark_engine = repeat(throughput.benchmark_engine, args.budget_s,
                                         args.max_repeats)
    throughput.main(rest)


if __name__ == "__main__":
    main()
