"""What one stage's engine does in each step, measured from outside the engine.

    cd .stages/v0.1-static-batching && PYTHONPATH=. python path/to/bench/probe.py \\
        --model qwen3-0.6b --load-format dummy --requests requests.json \\
        --out probe.json --timeline-out timeline.json

bench.course.stages runs this file in every stage's exported tree, so that `import serve` finds
that stage's engine. It therefore imports nothing from bench/ but its sibling step_hook.py (the
tree's own bench/ is an older copy), and relies only on what every stage keeps:
`LLM(...).engine` with add_request, step, has_unfinished_requests and abort_request, and the
calls of a step that step_hook.py finds in each stage's engine.

For the requests in --requests it records:

- every step: the tokens the model computed (padding included), the rows it produced logits for
  (finished rows included), the tokens that reached a request, and the step's wall time split
  into the model's forward call, sampling, output processing and the rest (mostly waiting for
  the GPU to finish what was launched);
- one decode step under torch.profiler: every CPU op and GPU kernel with its start and length,
  written to --timeline-out for bench.timeline to draw, and summed up (kernels, launches, GPU
  busy time) in the result.
"""

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

if __package__:  # imported as bench.probe
    from bench.step_hook import PHASES, StepHook
else:  # run as a script in a stage's tree, whose `bench` is older: this file's sibling
    from step_hook import PHASES, StepHook

NUM_WARMUP_REQUESTS = 8
WARMUP_OUTPUT_LEN = 8
PROFILE_OUTPUT_LEN = 4  # prefill, one decode step to settle, the profiled one, one more
VARIANT_OUTPUT_LEN = 16  # a second backend is timed on this many tokens per request
STEP_COLUMNS = ("tokens", "rows", "outputs", "prefilled", "ms", "forward_ms", "sample_ms",
                "output_ms")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpyAsync")


class Recorder(StepHook):
    """What an engine's steps do while the with-block lasts, one step at a time (reset()): the
    tokens computed, counted where a step enters the runner (a replayed CUDA graph never calls
    the model's forward), the rows sampled and the time of each phase of a step."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.profiling, self.hooked = False, ["model"]  # hooked: what this engine showed it
        self.reset()

    def __enter__(self) -> "Recorder":
        super().__enter__()
        self.before.append(self.count_tokens)
        self.hooked += [phase for phase in PHASES if self.wrap_phase(phase, self.timed(phase))]
        return self

    def reset(self) -> None:
        self.tokens = 0  # token positions the model ran on
        self.rows = 0  # rows of logits the sampler got
        self.seconds = defaultdict(float)  # phase -> seconds spent in that call

    def count_tokens(self, num_tokens: int) -> None:
        self.tokens += num_tokens

    def timed(self, phase: str):
        """StepHook middleware: times a phase's call (labelled while profiling), counts rows."""

        def call(fn, *args, **kwargs):
            if phase == "sample":
                self.rows += args[0].shape[0]  # logits: [rows, vocab]
            start = time.perf_counter()
            with torch.profiler.record_function(phase) if self.profiling else nullcontext():
                result = fn(*args, **kwargs)
            self.seconds[phase] += time.perf_counter() - start
            return result

        return call

    @contextmanager
    def profiled(self):
        """torch.profiler over the block, labelled "step", with each phase's calls labelled."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.device(self.runner.device).type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiling = True
        with torch.profiler.profile(activities=activities) as prof:
            with torch.profiler.record_function("step"):
                yield prof
        self.profiling = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# sampling rules of v1.0 a request may carry: a step with log-probabilities or penalties
LATER_RULES = ("logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty")


def add_requests(engine, requests: list[dict], prefix: str, max_tokens: int | None = None):
    """Queue the requests; returns {request_id: prompt length}."""
    from serve import SamplingParams

    lengths = {}
    for index, request in enumerate(requests):
        # (the rules only later stages have are passed only when the request names them)
        later = {key: request[key] for key in LATER_RULES if key in request}
        params = SamplingParams(temperature=request["temperature"],
                                max_tokens=min(request["max_tokens"], max_tokens or 1 << 30),
                                ignore_eos=request["ignore_eos"], **later)
        request_id = f"{prefix}-{index}"
        engine.add_request(request_id, request["prompt"], params)
        lengths[request_id] = len(request["prompt"])
    return lengths


def run_step(engine, recorder: Recorder, device: torch.device, prompt_lens: dict,
             started: set) -> dict | None:
    """One timed engine step; None if it ran no model (a batch still filling up)."""
    recorder.reset()
    synchronize(device)
    start = time.perf_counter()
    outputs = engine.step()
    synchronize(device)
    seconds = time.perf_counter() - start
    if recorder.tokens == 0 and not outputs:
        return None
    first = [o.request_id for o in outputs if o.request_id not in started]
    started.update(first)
    step = {"tokens": recorder.tokens, "rows": recorder.rows, "outputs": len(outputs),
            "prefilled": sum(prompt_lens.get(r, 0) for r in first), "ms": seconds * 1e3}
    step.update({f"{phase}_ms": recorder.seconds[phase] * 1e3 for phase in PHASES})
    return step


def is_decode(step: dict) -> bool:
    """A decode step feeds every row exactly one token and starts no request."""
    return step["prefilled"] == 0 and step["tokens"] == step["rows"] > 0


def summarize(steps: list[dict]) -> dict:
    """Where the tokens and the time went, for prefill steps and for decode steps."""
    summary = {}
    for kind, chosen in (("prefill", [s for s in steps if not is_decode(s)]),
                         ("decode", [s for s in steps if is_decode(s)])):
        times = [s["ms"] for s in chosen]
        summary[kind] = {
            "steps": len(chosen),
            "tokens_computed": sum(s["tokens"] for s in chosen),
            "rows_computed": sum(s["rows"] for s in chosen),
            "tokens_out": sum(s["outputs"] for s in chosen),
            "prompt_tokens": sum(s["prefilled"] for s in chosen),
            "time_ms": sum(times),
            "median_step_ms": statistics.median(times) if times else None,
            "mean_rows": sum(s["rows"] for s in chosen) / len(chosen) if chosen else None,
            "phase_ms": {phase: sum(s[f"{phase}_ms"] for s in chosen) for phase in PHASES},
        }
    decode = summary["decode"]
    decode["idle_rows"] = decode["rows_computed"] - decode["tokens_out"]
    prefill = summary["prefill"]
    prefill["padding_tokens"] = prefill["tokens_computed"] - prefill["prompt_tokens"]
    summary["wall_ms"] = sum(s["ms"] for s in steps)
    return summary


def drain(engine, recorder, device, prompt_lens) -> list[dict]:
    """Step until every queued request has finished; returns the steps that ran the model."""
    steps, started = [], set()
    while engine.has_unfinished_requests():
        step = run_step(engine, recorder, device, prompt_lens, started)
        if step is not None:
            steps.append(step)
    return steps


def profile_decode_step(engine, recorder, device, requests: list[dict], prefix: str) -> dict:
    """Profile the second decode step of the requests with a few output tokens each.

    Returns the parsed trace (see parse_trace). The requests still queued afterwards are
    aborted, so a one-request-at-a-time engine does not run them all."""
    prompt_lens = add_requests(engine, requests, prefix, PROFILE_OUTPUT_LEN)
    started, decode_steps, trace = set(), 0, None
    while engine.has_unfinished_requests() and trace is None:
        if decode_steps == 1:  # the previous step was a decode step: profile this one
            with recorder.profiled() as prof:
                step = run_step(engine, recorder, device, prompt_lens, started)
            if step is not None and is_decode(step):
                trace = parse_trace(prof, step)
            continue
        step = run_step(engine, recorder, device, prompt_lens, started)
        if step is not None:
            decode_steps = decode_steps + 1 if is_decode(step) else 0
    for request_id in prompt_lens:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    if trace is None:
        raise RuntimeError("no decode step followed a decode step: nothing was profiled")
    return trace


def parse_trace(prof, step: dict) -> dict:
    """The profiled step as compact event lists (times in us from the step's start) + totals."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e for e in json.loads(path.read_text())["traceEvents"]
                  if e.get("ph") == "X" and "ts" in e]
    window = next(e for e in events if e.get("cat") == "user_annotation" and e["name"] == "step")
    t0, main_tid = window["ts"], window.get("tid")
    names: dict[str, int] = {}

    def event(e) -> list:
        name = e["name"][:120]
        return [names.setdefault(name, len(names)), round(e["ts"] - t0, 2),
                round(e.get("dur", 0), 2)]

    phases = [[e["name"], round(e["ts"] - t0, 2), round(e.get("dur", 0), 2)] for e in events
              if e.get("cat") == "user_annotation" and e["name"] in PHASES]
    cpu_ops, end = [], -1.0
    for e in sorted((e for e in events if e.get("cat") == "cpu_op" and e.get("tid") == main_tid),
                    key=lambda e: e["ts"]):
        if e["ts"] >= end:  # an op not nested in the previous top-level op
            cpu_ops.append(event(e))
            end = e["ts"] + e.get("dur", 0)
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launches = [e for e in runtime if "Launch" in e["name"]]
    syncs = [e for e in runtime if e["name"] in SYNC_CALLS]
    # Which phase launched each kernel: the launch call and the kernel share a correlation id.
    phase_of_launch = {}
    for e in launches:
        at = e["ts"] - t0
        phase = next((p[0] for p in phases if p[1] <= at <= p[1] + p[2]), "other")
        phase_of_launch[e.get("args", {}).get("correlation")] = phase
    kernels_by_phase = defaultdict(int)
    for e in gpu:
        if e.get("cat") == "kernel":
            correlation = e.get("args", {}).get("correlation")
            kernels_by_phase[phase_of_launch.get(correlation, "other")] += 1
    busy, busy_until = 0.0, float("-inf")
    for e in gpu:  # the union of the GPU's busy intervals
        start, stop = e["ts"], e["ts"] + e.get("dur", 0)
        busy += max(0.0, stop - max(start, busy_until))
        busy_until = max(busy_until, stop)
    phase_ms = defaultdict(float)
    for name, _, dur in phases:
        phase_ms[name] += dur / 1e3
    step_ms = window.get("dur", 0) / 1e3
    summary = {
        "rows": step["rows"],
        "step_ms": step_ms,
        "unprofiled_step_ms": None,  # filled in by the caller from the unprofiled steps
        "kernels": sum(1 for e in gpu if e.get("cat") == "kernel"),
        "memcpys": sum(1 for e in gpu if e.get("cat") != "kernel"),
        "launches": len(launches),
        "cpu_ops": len(cpu_ops),
        "gpu_busy_ms": busy / 1e3,
        "gpu_busy_fraction": busy / 1e3 / step_ms if step_ms else None,
        "host_wait_ms": sum(e.get("dur", 0) for e in syncs) / 1e3,
        "phase_ms": dict(phase_ms),
        "kernels_by_phase": dict(kernels_by_phase),
    }
    gpu_events, sync_events = [event(e) for e in gpu], [event(e) for e in syncs]
    return {
        "summary": summary,
        "names": list(names),  # after every event is named: kernels and syncs too
        "phases": phases,
        "cpu": cpu_ops,
        "gpu": gpu_events,
        "syncs": sync_events,
    }


def measure(llm, requests: list[dict], label: str, max_tokens: int | None = None):
    """Warm up, run the requests step by step, then profile one decode step.

    max_tokens caps every request's output (a short run that still times decode steps).
    Returns (result, timeline)."""
    engine = llm.engine
    device = torch.device(engine.runner.device)
    with Recorder(engine) as recorder:
        drain(engine, recorder, device,
              add_requests(engine, requests[:NUM_WARMUP_REQUESTS], f"{label}-warmup",
                           WARMUP_OUTPUT_LEN))
        start = time.perf_counter()
        steps = drain(engine, recorder, device,
                      add_requests(engine, requests, f"{label}-run", max_tokens))
        result = {"hooked": recorder.hooked, "max_tokens": max_tokens,
                  "run_wall_s": time.perf_counter() - start, "summary": summarize(steps),
                  "steps": {"columns": list(STEP_COLUMNS),
                            "rows": [[round(s[c], 3) if isinstance(s[c], float) else s[c]
                                      for c in STEP_COLUMNS] for s in steps]}}
        timeline = profile_decode_step(engine, recorder, device, requests, f"{label}-profile")
    timeline["summary"]["unprofiled_step_ms"] = result["summary"]["decode"]["median_step_ms"]
    result["decode_step"] = timeline["summary"]
    return result, timeline


def backend_name(llm) -> str | None:
    """The attention backend's class name, for stages that have one."""
    backend = getattr(llm.engine.runner, "backend", None)
    return None if backend is None else type(backend).__name__


def build_llm(args: argparse.Namespace, extra: dict):
    from serve import LLM

    # Each step is timed and counted alone: with overlap scheduling (from stage 7), a step would
    # return the tokens of the one before it, and the next one would run during its timing.
    if "overlap_scheduling" in engine_config_fields():
        extra = {"overlap_scheduling": False, **extra}
    return LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
               max_model_len=args.max_model_len, seed=args.seed, **extra)


def engine_config_fields() -> set[str]:
    from serve.config import EngineConfig

    return {field.name for field in dataclasses.fields(EngineConfig)}


def parse_value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench/probe.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an LLM(...) argument this stage has, e.g. num_pages=4096")
    parser.add_argument("--requests", required=True,
                        help="JSON list of {prompt, max_tokens, temperature, ignore_eos} (and "
                             "optionally logprobs or penalties: LATER_RULES)")
    parser.add_argument("--max-requests", type=int,
                        help="run only the first N requests step by step (a slow stage)")
    parser.add_argument("--compare-attention-backends", action="store_true",
                        help="also profile a decode step with attention_backend=torch, where the "
                             "stage has that setting and uses another backend by default")
    parser.add_argument("--prewarm", action="store_true",
                        help="only build the engine with a small KV pool and generate a few "
                             "tokens (compiles JIT kernels for later runs), then exit")
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument("--timeline-out", help="write the profiled decode step's events here")
    args = parser.parse_args(argv)
    requests = json.loads(Path(args.requests).read_text())
    fields = engine_config_fields()

    if args.prewarm:
        extra = {"num_pages": 256} if "num_pages" in fields else {}
        llm = build_llm(args, extra)
        drain(llm.engine, Recorder(llm.engine), torch.device(llm.engine.runner.device),
              add_requests(llm.engine, requests[:2], "prewarm", 4))
        print("prewarm: done", flush=True)
        return {}

    extra = dict(pair.split("=", 1) for pair in args.engine_arg)
    extra = {key: parse_value(value) for key, value in extra.items()}
    llm = build_llm(args, extra)
    run_requests = requests[:args.max_requests] if args.max_requests else requests
    result, timeline = measure(llm, run_requests, "probe")
    result.update({"kind": "probe", "num_requests": len(run_requests),
                   "num_requests_in_workload": len(requests),
                   "device": str(llm.engine.runner.device),
                   "dtype": str(llm.engine.runner.dtype).removeprefix("torch."),
                   "engine_args": {"model": args.model, "load_format": args.load_format,
                                   "max_model_len": args.max_model_len, **extra},
                   "attention_backend": backend_name(llm), "variants": {}})
    backend = result["attention_backend"]
    if args.compare_attention_backends and backend and "torch" not in backend.lower():
        page_size = getattr(llm.engine.config, "page_size", 16)
        del llm  # free the first engine's KV pool before the second one is built
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        variant_args = {**extra, "attention_backend": "torch"}
        if "num_pages" in fields and "num_pages" not in extra:
            # a pool just big enough: sizing it would run a maximal prefill through torch's SDPA
            variant_args["num_pages"] = sum(
                -(-(len(r["prompt"]) + VARIANT_OUTPUT_LEN) // page_size) + 1 for r in run_requests)
        variant_llm = build_llm(args, variant_args)
        variant, _ = measure(variant_llm, run_requests, "torch", max_tokens=VARIANT_OUTPUT_LEN)
        variant["attention_backend"] = backend_name(variant_llm)
        del variant["steps"]
        result["variants"]["attention_backend=torch"] = variant
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.timeline_out:
        Path(args.timeline_out).write_text(json.dumps(timeline, separators=(",", ":")) + "\n")
    step = result["decode_step"]
    print(f"probe: {len(run_requests)} requests; decode step {step['unprofiled_step_ms']} ms "
          f"unprofiled, {step['kernels']} kernels, GPU busy {step['gpu_busy_ms']:.2f} ms",
          flush=True)
    return result


if __name__ == "__main__":
    # Run as a script from a stage's tree: the tree, not this file's folder, provides `serve`.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
