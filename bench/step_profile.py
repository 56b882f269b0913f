"""Where one engine step's time goes: prefill time, decode step time, and the memory roofline.

    python -m bench.step_profile --model qwen3-0.6b --load-format dummy \\
        --batch-sizes 1 8 32 --input-len 256 --output-len 128 --out profile.json

For each batch size, B identical-length requests go in together; the first step that produces
tokens for all of them is the prefill, every later step is a decode step. A decode step must at
least read every weight once and every cached K/V once, so (weight bytes + KV bytes) / bandwidth
is the fastest it could possibly run; we report how close each step comes to that floor.
"""

import argparse
import statistics
import time

import torch

from bench.model_config import parse_engine_args, synchronize
from bench.results import environment, gpu_state, write_result
from serve import LLM, SamplingParams
from serve.models.shapes import head_dim_of


def measure_copy_bandwidth(device: str, num_bytes: int = 1 << 30) -> float | None:
    """Device memory bandwidth in bytes/s, counting bytes read plus bytes written by a copy."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()  # give the gigabyte back: the engine sized its pool without it
    return num_bytes / statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter: what one forward pass reads at least once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * hf_config.num_key_value_heads * head_dim_of(hf_config) * element
    return per_layer * hf_config.num_hidden_layers


def profile_batch(llm: LLM, batch_size: int, input_len: int, output_len: int) -> dict:
    """Run one batch to the end, timing every engine step.

    A step's time is the interval between two returns of `engine.step()`, with no
    synchronization inside the loop: a step returns once its tokens are on the host, so the
    interval is the period at which steps finish. With overlap scheduling that period is what
    the device takes per step when the host keeps up; a synchronize around each step would
    take the overlap away."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i in range(batch_size):
        prompt = [(i * 7919 + j * 31) % 1000 + 10 for j in range(input_len)]
        engine.add_request(f"profile-{batch_size}-{i}", prompt, params)
    step_times, tokens_per_step = [], []
    synchronize()
    begin = last = time.perf_counter()
    first_token_s = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
        tokens = sum(len(o.new_token_ids) for o in outputs)
        tokens_per_step.append(tokens)
        if first_token_s is None and tokens:
            first_token_s = now - begin
    # Decode steps: those that advanced the whole batch by one token each, after the prefill(s).
    decode = [t for t, n in zip(step_times, tokens_per_step, strict=True) if n == batch_size]
    decode = decode[1:] if len(decode) > 1 else decode  # the first full step includes prefill
    if not decode:  # the engine never ran all rows in one step (e.g. they did not fit one batch)
        return None
    return {"decode_step_s": statistics.median(decode), "first_token_s": first_token_s,
            "total_s": last - begin}


def count_decode_kernels(llm: LLM) -> tuple[int, int] | None:
    """One decode step of a single request: (GPU kernels run, launch calls the host made).

    The two differ once the step replays a CUDA graph: its kernels still run one by one on the
    GPU, but the host launches them all with one cudaGraphLaunch.
    """
    if llm.engine.runner.device.type != "cuda":
        return None
    engine = llm.engine
    engine.add_request("kernels", list(range(10, 74)), SamplingParams(max_tokens=3,
                                                                      ignore_eos=True))
    engine.step()  # prefill
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        engine.step()
        synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(1 for e in events if e.name.startswith(LAUNCH_CALLS))
    return kernels, launches


# CUDA runtime and driver calls that start work on the GPU (kernels, graphs, copies, memsets)
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cuGraphLaunch",
                "cudaMemcpyAsync", "cudaMemsetAsync")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.step_profile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra LLM(...) argument of a later stage, e.g. max_batch_size=64")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    extra = parse_engine_args(args.engine_arg)
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_model_len=args.max_model_len, **extra)
    runner = llm.engine.runner
    device = str(runner.device)
    bandwidth = measure_copy_bandwidth(device)
    weights = weight_bytes(runner.model)
    kv_per_token = kv_bytes_per_token(llm.engine.hf_config, runner.dtype)
    profile_batch(llm, 1, 16, 4)  # warm up kernels and allocator
    rows = []
    for batch_size in args.batch_sizes:
        timing = profile_batch(llm, batch_size, args.input_len, args.output_len)
        if timing is None:
            print(f"bs={batch_size:4d}  never ran as one batch (memory or prefill budget): skipped")
            continue
        # mean context length over the decode steps: the prompt plus half the output
        mean_context = args.input_len + args.output_len / 2
        floor_bytes = weights + batch_size * mean_context * kv_per_token
        row = {
            "batch_size": batch_size,
            "decode_step_ms": timing["decode_step_s"] * 1e3,
            "decode_tokens_per_s": batch_size / timing["decode_step_s"],
            "first_step_ms": timing["first_token_s"] * 1e3,
            "total_s": timing["total_s"],
            "bytes_per_decode_step": floor_bytes,
            "roofline_step_ms": floor_bytes / bandwidth * 1e3 if bandwidth else None,
            "gpu_state": gpu_state() if bandwidth else None,  # clocks right after the batch
        }
        row["roofline_fraction"] = (row["roofline_step_ms"] / row["decode_step_ms"]
                                    if bandwidth else None)
        rows.append(row)
        print(f"bs={batch_size:4d}  decode step {row['decode_step_ms']:8.2f} ms  "
              f"{row['decode_tokens_per_s']:9.1f} tok/s  first step {row['first_step_ms']:8.1f} ms"
              + (f"  roofline {row['roofline_step_ms']:.3f} ms "
                 f"({100 * row['roofline_fraction']:.1f}%)" if bandwidth else ""))
    # Counted last, so that nothing the profiler leaves behind (CUPTI stays attached to the
    # process) can touch the timings above.
    counts = count_decode_kernels(llm)
    kernels, launches = counts if counts is not None else (None, None)
    if counts is not None:
        print(f"one decode step (batch 1): {kernels} GPU kernels, {launches} launch calls")
    graphs = runner.graphs if getattr(runner, "graphs", None) is not None else None
    cuda_graphs = graphs and {"batch_sizes": graphs.batch_sizes,
                              "capture_s": graphs.capture_seconds,
                              "memory_bytes": graphs.memory_bytes}
    result = {"kind": "step_profile", "env": environment(device),
              "workload": {"input_len": args.input_len, "output_len": args.output_len},
              "engine_args": {"model": args.model, "load_format": args.load_format, **extra},
              "bandwidth_bytes_per_s": bandwidth, "weight_bytes": weights,
              "kv_bytes_per_token": kv_per_token, "decode_kernels_bs1": kernels,
              "decode_launches_bs1": launches, "cuda_graphs": cuda_graphs, "rows": rows,
              "allocator_retries": (torch.cuda.memory_stats().get("num_alloc_retries")
                                    if device.startswith("cuda") else None)}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
