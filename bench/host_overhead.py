"""The host's own work in one engine step, without the model: scheduling, building the step's
inputs, output processing. Measured per batch size, with torch's intra-op threads at each given
count, alone and beside busy processes that compete for the cores.

    python -m bench.host_overhead --model .models/tiny-qwen3 --batch-sizes 1 32 256 \\
        --threads 1 2 --busy-neighbours 0 1 --repeats 5 --out host-overhead.json
    python -m bench.host_overhead --tree .stages/v0.8-tensor-parallel ...   (an earlier stage)

Each step is stubbed where it enters the runner (bench.step_hook): it returns a token per row
without running the model, so the numbers are the engine's Python and host tensor work alone,
on any machine.
"""

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from bench.results import environment, write_result
from bench.step_hook import StepHook

PROMPT_LEN = 290
WARMUP_STEPS = 20


@contextmanager
def busy_neighbours(count: int):
    """count processes that spin on a core each until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)  # let them get scheduled
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def host_step_us(llm, batch_size: int, steps: int, warmup_steps: int = WARMUP_STEPS,
                 core_only: bool = False) -> float:
    """Median host time of a decode step of batch_size requests, the model stubbed out, after
    warmup_steps steps (each request has that many output tokens when the timing starts).
    core_only: the engine core's step alone, without turning its tokens into text."""
    from serve import SamplingParams
    from serve.core.model_runner import LaunchedStep

    engine = llm.engine
    ids = [f"host-{batch_size}-{i}" for i in range(batch_size)]
    params = SamplingParams(temperature=0.6, max_tokens=warmup_steps + steps + 2,
                            ignore_eos=True)
    for request_id in ids:
        engine.add_request(request_id, list(range(10, 10 + PROMPT_LEN)), params)
    try:
        with StepHook(engine) as hook:
            hook.stub = lambda inputs: LaunchedStep(  # every row samples 5, on the host
                None, torch.full((len(inputs.sample_indices),), 5), None)
            times = []
            step_once = engine.core.step if core_only else engine.step
            for step in range(warmup_steps + steps):
                start = time.perf_counter()
                step_once()
                if step >= warmup_steps:
                    times.append(time.perf_counter() - start)
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
        while engine.has_unfinished_requests():  # a step may still be in flight
            engine.step()
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--busy-neighbours", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                        help="steps before the timing: each request's output is this long then")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an LLM(...) argument, e.g. overlap_scheduling=true")
    parser.add_argument("--core-only", action="store_true",
                        help="time the engine core's step alone: what paces the GPU when the "
                             "core runs in its own process (the server's text is elsewhere)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure each setting this many times (the median is reported)")
    parser.add_argument("--tree", help="time the serve/ of this checkout (a stage's exported "
                                       "tree) instead, with this harness")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.tree:  # before anything imports serve
        sys.path.insert(0, args.tree)
    from bench.model_config import parse_engine_args
    from serve import LLM

    # what the longest request needs
    max_model_len = PROMPT_LEN + args.warmup_steps + args.steps + 2
    llm = LLM(args.model, device="cpu", max_model_len=max_model_len,
              num_pages=max(args.batch_sizes) * (max_model_len // 16 + 1),
              **parse_engine_args(args.engine_arg))
    rows = []
    for neighbours in args.busy_neighbours:
        with busy_neighbours(neighbours):
            for threads in args.threads:
                torch.set_num_threads(threads)
                for batch_size in args.batch_sizes:
                    runs = [host_step_us(llm, batch_size, args.steps, args.warmup_steps,
                                         args.core_only) for _ in range(args.repeats)]
                    us = statistics.median(runs)
                    rows.append({"busy_neighbours": neighbours, "threads": threads,
                                 "batch_size": batch_size, "host_step_us": us, "runs_us": runs})
                    print(f"neighbours {neighbours}  threads {threads}  bs {batch_size:4d}  "
                          f"host step {us:8.0f} us", flush=True)
    result = {"kind": "host_overhead", "env": environment("cpu"), "tree": args.tree,
              "core_only": args.core_only,
              "model": args.model,
              "prompt_len": PROMPT_LEN, "warmup_steps": args.warmup_steps, "rows": rows}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
