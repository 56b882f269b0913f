"""How long the GPU waits between decode steps, with overlap scheduling off and on.

    python -m bench.step_gaps --model qwen3-0.6b --load-format dummy --batch-size 64 \\
        --out gaps.json --timeline-dir DIR

For each setting of `overlap_scheduling`, B requests are prefilled and decoded for a few steps,
then --steps consecutive engine steps run under torch.profiler with no synchronization between
them (as a server runs them). From the GPU's kernels and copies: the window from the first to
the last, the time the GPU was busy in it, and every idle gap, so that the idle time per step
is the window minus the busy time, over the steps. Before that, without the profiler, CUDA
events recorded around each step's launch give the GPU's time per step and the gap between the
end of one step's work and the start of the next, as the GPU saw them. Without overlap the host
builds the next step while the GPU waits; with it, the host works while the GPU runs the step
before. Each setting's window is also written as a timeline for bench.timeline to draw.
"""

import argparse
import functools
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from bench.model_config import parse_engine_args
from bench.probe import Recorder, parse_trace
from bench.results import environment, write_result
from bench.step_hook import StepHook
from serve import LLM, SamplingParams

SETTLE_STEPS = 4  # decode steps before the profiled ones: the batch is steady
UNPROFILED_STEPS = 20  # timed without the profiler, before the profiled ones


def gpu_gaps(timeline: dict) -> dict:
    """Busy time and idle gaps of the GPU between its first and its last event (µs); with no
    GPU (a CPU run), the whole window counts as busy."""
    events = sorted((start, start + duration) for _, start, duration in timeline["gpu"])
    if not events:
        window = timeline["summary"]["step_ms"] * 1e3
        return {"window_us": window, "idle_us": 0.0, "gaps_us": []}
    gaps, busy_until = [], events[0][1]
    for start, stop in events[1:]:
        if start > busy_until:
            gaps.append(start - busy_until)
        busy_until = max(busy_until, stop)
    window = busy_until - events[0][0]
    return {"window_us": window, "idle_us": sum(gaps), "gaps_us": sorted(gaps, reverse=True)}


def profile_steps(llm: LLM, batch_size: int, input_len: int, num_steps: int) -> dict:
    """Profile num_steps consecutive decode steps of a steady batch."""
    engine = llm.engine
    params = SamplingParams(temperature=0,
                            max_tokens=SETTLE_STEPS + UNPROFILED_STEPS + num_steps + 8,
                            ignore_eos=True)
    for i in range(batch_size):
        prompt = [(i * 7919 + j * 31) % 1000 + 10 for j in range(input_len)]
        engine.add_request(f"gaps-{i}", prompt, params)
    produced = 0
    while produced < batch_size * (SETTLE_STEPS + 1):  # the prefill, then settling decodes
        produced += sum(len(o.new_token_ids) for o in engine.step())
    # Unprofiled steps first: the step period, and on a GPU, from CUDA events recorded on the
    # stream around each launch, how long the GPU worked on each step and waited before the
    # next one, without the profiler's own host cost.
    marks, periods, last = [], [], time.perf_counter()  # marks: each step's [start, end] events
    with StepHook(engine) as hook:
        if torch.cuda.is_available():
            stream = torch.cuda.current_stream()
            event = functools.partial(torch.cuda.Event, enable_timing=True)
            hook.before.append(lambda num_tokens: marks.append([stream.record_event(event())]))
            hook.after.append(lambda: marks[-1].append(stream.record_event(event())))
        for _ in range(UNPROFILED_STEPS):
            engine.step()
            now = time.perf_counter()
            periods.append(now - last)
            last = now
    events = None
    if marks:
        torch.cuda.synchronize()
        events = {"gpu_step_ms": statistics.median(s.elapsed_time(e) for s, e in marks),
                  "gap_us": statistics.median(
                      1e3 * marks[i][1].elapsed_time(marks[i + 1][0])
                      for i in range(len(marks) - 1))}
    with Recorder(engine) as recorder, recorder.profiled() as prof:
        for _ in range(num_steps):
            engine.step()
    for i in range(batch_size):
        engine.abort_request(f"gaps-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    timeline = parse_trace(prof, {"rows": batch_size})
    gaps = gpu_gaps(timeline)
    timeline["summary"]["what"] = f"{num_steps} consecutive decode steps"
    timeline["summary"]["unprofiled_step_ms"] = statistics.median(periods) * 1e3
    return {"timeline": timeline, "gaps": gaps, "events": events}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.step_gaps",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="consecutive steps profiled")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out")
    parser.add_argument("--timeline-dir", help="write each setting's timeline JSON here")
    args = parser.parse_args(argv)
    extra = parse_engine_args(args.engine_arg)
    rows = []
    for overlap in (False, True):
        llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype,
                  device=args.device, max_model_len=args.max_model_len,
                  overlap_scheduling=overlap, **extra)
        device = str(llm.engine.runner.device)
        measured = profile_steps(llm, args.batch_size, args.input_len, args.steps)
        summary, gaps = measured["timeline"]["summary"], measured["gaps"]
        events = measured["events"] or {}
        row = {"overlap_scheduling": overlap, "steps": args.steps,
               "unprofiled_step_ms": summary["unprofiled_step_ms"],
               # unprofiled, from CUDA events: the GPU's time on a step and its wait after it
               "gpu_step_ms": events.get("gpu_step_ms"), "gap_between_steps_us":
               events.get("gap_us"),
               "profiled_step_ms": gaps["window_us"] / args.steps / 1e3,
               "gpu_busy_fraction": 1 - gaps["idle_us"] / gaps["window_us"],
               "idle_us_per_step": gaps["idle_us"] / args.steps,
               "largest_gaps_us": [round(g, 1) for g in gaps["gaps_us"][:2 * args.steps]],
               "kernels": summary["kernels"], "launches": summary["launches"]}
        rows.append(row)
        if events:
            print(f"overlap={overlap!s:5}  unprofiled: GPU {events['gpu_step_ms']:.2f} ms a step, "
                  f"then idle {events['gap_us']:.0f} µs (median)", flush=True)
        print(f"overlap={overlap!s:5}  step {row['unprofiled_step_ms']:.2f} ms unprofiled, "
              f"{row['profiled_step_ms']:.2f} ms profiled; GPU idle "
              f"{row['idle_us_per_step']:.0f} µs a step ({100 * row['gpu_busy_fraction']:.1f} % "
              f"busy); largest gaps {row['largest_gaps_us'][:4]} µs", flush=True)
        if args.timeline_dir:
            name = f"timeline-step-gaps-b{args.batch_size}-overlap-{'on' if overlap else 'off'}"
            path = Path(args.timeline_dir) / f"{name}.json"
            path.write_text(json.dumps(measured["timeline"], separators=(",", ":")) + "\n")
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result = {"kind": "step_gaps", "env": environment(device),
              "workload": {"batch_size": args.batch_size, "input_len": args.input_len},
              "engine_args": {"model": args.model, "load_format": args.load_format,
                              "max_model_len": args.max_model_len, **extra},
              "rows": rows}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
