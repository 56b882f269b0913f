"""Offline throughput: one workload through serve.LLM, timed end to end.

    python -m bench.throughput --model qwen3-0.6b --load-format dummy --workload course \\
        --warmup --hf-baseline --out results/throughput.json
"""

import argparse
import gc
import sys
import time
from dataclasses import replace

import torch

from bench.hf_baseline import Requests, benchmark_hf
from bench.model_config import (
    dtype_name,
    parse_engine_args,
    resolve_device,
    resolve_dtype,
    synchronize,
    vocab_size_of,
)
from bench.results import environment, ratio, write_result
from bench.step_log import StepLog
from bench.workloads import add_workload_args, make_requests, workload_from_args
from serve import LLM, RequestOutput, SamplingParams

NUM_WARMUP_REQUESTS = 8  # enough to run prefill and a batched decode once (kernel JIT, caches)
WARMUP_OUTPUT_LEN = 8  # output tokens per warm-up request


def check_output_lengths(outputs: list[RequestOutput], requests: Requests) -> int:
    """Raise unless every request got the output it asked for; returns the total output tokens.

    With ignore_eos a request must produce exactly max_tokens: fewer means the engine stopped
    early, more means it overran, and either makes the throughput number meaningless.
    """
    if len(outputs) != len(requests):
        raise RuntimeError(f"the engine returned {len(outputs)} outputs for {len(requests)} "
                           "requests")
    wrong = []
    for index, (output, (_, params)) in enumerate(zip(outputs, requests, strict=True)):
        produced = len(output.outputs[0].token_ids)
        expected = params.max_tokens
        ok = produced == expected if params.ignore_eos else 1 <= produced <= expected
        if not ok:
            wrong.append(f"request {index}: {produced} tokens, expected {expected}")
    if wrong:
        raise RuntimeError(f"{len(wrong)} of {len(requests)} requests have the wrong output "
                           "length:\n  " + "\n  ".join(wrong[:10]))
    return sum(len(output.outputs[0].token_ids) for output in outputs)


def warmup_requests(requests: Requests) -> Requests:
    return [(prompt, SamplingParams(temperature=params.temperature, max_tokens=WARMUP_OUTPUT_LEN,
                                    ignore_eos=True))
            for prompt, params in requests[:NUM_WARMUP_REQUESTS]]


def run_engine(llm: LLM, requests: Requests) -> tuple[list[RequestOutput], float]:
    """Generate all requests at once; returns the outputs and the wall time in seconds."""
    prompts = [prompt for prompt, _ in requests]
    params = [params for _, params in requests]
    synchronize()
    start = time.perf_counter()
    # A progress bar for people watching, not for logs (it costs nothing per step worth timing).
    outputs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty())
    synchronize()
    return outputs, time.perf_counter() - start


def benchmark_engine(llm: LLM, requests: Requests, warmup: bool) -> dict:
    if warmup:
        warmup = warmup_requests(requests)
        print(f"warmup (not timed): the first {len(warmup)} requests, {WARMUP_OUTPUT_LEN} output "
              "tokens each", flush=True)
        run_engine(llm, warmup)
        # The timed run must not find the warm-up's prompts cached (an engine with a prefix
        # cache has this method; earlier stages have nothing to forget).
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()
    print(f"nanoserve: {len(requests)} requests", flush=True)
    step_log = StepLog.attach(llm.engine)
    preemptions_before = engine_preemptions(llm)
    outputs, wall_time = run_engine(llm, requests)
    num_output_tokens = check_output_lengths(outputs, requests)
    num_input_tokens = sum(len(prompt) for prompt, _ in requests)
    # prompt tokens found in a prefix cache (0 for an engine without one)
    extra = {"num_cached_tokens": sum(getattr(output, "num_cached_tokens", 0)
                                      for output in outputs)}
    if step_log is not None:
        extra["steps"] = step_log.summary()
        extra["num_preemptions"] = engine_preemptions(llm) - preemptions_before
    return {
        "num_requests": len(requests),
        "wall_time_s": wall_time,
        "num_input_tokens": num_input_tokens,
        "num_output_tokens": num_output_tokens,
        "requests_per_s": len(requests) / wall_time,
        "input_tokens_per_s": num_input_tokens / wall_time,
        "output_tokens_per_s": num_output_tokens / wall_time,
        "total_tokens_per_s": (num_input_tokens + num_output_tokens) / wall_time,
        **extra,
    }


def engine_preemptions(llm: LLM) -> int:
    """Requests the engine has preempted so far (0 for an engine that never preempts)."""
    return getattr(getattr(llm.engine, "scheduler", None), "num_preemptions", 0)


def print_table(metrics: dict, hf_metrics: dict | None) -> None:
    rows = [("requests/s", "requests_per_s"), ("input tok/s", "input_tokens_per_s"),
            ("output tok/s", "output_tokens_per_s"), ("total tok/s", "total_tokens_per_s"),
            ("wall time (s)", "wall_time_s")]
    print(f"{'':<15}{'nanoserve':>12}" + (f"{'hf generate':>14}" if hf_metrics else ""))
    for label, key in rows:
        line = f"{label:<15}{metrics[key]:>12.2f}"
        print(line + (f"{hf_metrics[key]:>14.2f}" if hf_metrics else ""))
    print(f"output tokens: {metrics['num_output_tokens']} (every request's length checked)")
    if hf_metrics:
        speedup = ratio(metrics["output_tokens_per_s"], hf_metrics["output_tokens_per_s"])
        print(f"output tok/s vs hf generate: {speedup:.2f}x")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF dir, shipped config name, or hub id")
    parser.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda")
    parser.add_argument("--load-format", default="auto", help="auto|safetensors|dummy")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--warmup", action="store_true",
                        help=f"first run the workload's first {NUM_WARMUP_REQUESTS} requests (or "
                             f"all, if fewer) with {WARMUP_OUTPUT_LEN} output tokens each, "
                             "not timed")
    parser.add_argument("--hf-baseline", action="store_true",
                        help="also time transformers' generate on the same requests")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an LLM(...) argument of a later stage, e.g. max_batch_size=128")
    parser.add_argument("--logprobs", type=int, metavar="K",
                        help="every request asks for its tokens' log-probabilities and the K "
                             "most likely (what a client that scores its outputs costs)")
    parser.add_argument("--out", help="write the result JSON here")
    add_workload_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workload = workload_from_args(args)
    requests = make_requests(workload, vocab_size_of(args.model))
    if args.logprobs is not None:
        requests = [(prompt, replace(params, logprobs=args.logprobs))
                    for prompt, params in requests]
    device = resolve_device(args.device)
    engine_args = {"model": args.model, "dtype": args.dtype, "device": args.device,
                   "load_format": args.load_format, "max_model_len": args.max_model_len,
                   "seed": workload.seed, **parse_engine_args(args.engine_arg)}
    llm = LLM(**engine_args)
    metrics = benchmark_engine(llm, requests, args.warmup)
    # Free the engine before the baseline: later stages reserve most of the GPU for KV cache.
    del llm
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    hf_metrics = None
    if args.hf_baseline:
        hf_metrics = benchmark_hf(args.model, requests, args.dtype, device, args.hf_batch_size,
                                  workload.seed, args.warmup)
    result = {
        "kind": "throughput",
        "env": environment(device),
        "workload": workload.to_dict(),
        "engine_args": {**engine_args, "resolved_device": device,
                        "resolved_dtype": dtype_name(resolve_dtype(args.dtype, device)),
                        "warmup": args.warmup, "logprobs": args.logprobs},
        "metrics": metrics,
        "hf_baseline": hf_metrics,
        "ratio_vs_hf": ratio(metrics["output_tokens_per_s"],
                             hf_metrics["output_tokens_per_s"]) if hf_metrics else None,
    }
    print_table(metrics, hf_metrics)
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
