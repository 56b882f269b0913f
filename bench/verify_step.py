"""The physics that makes speculation pay: a verify step of k + 1 tokens per sequence against a
decode step of one, at the same batch size and context.

    python -m bench.verify_step --model llama-3.1-8b --load-format dummy --batch-sizes 1 8 32 \
        --ks 1 2 4 8 --context-len 1024 --out verify.json

For each batch size B, B sequences of --context-len tokens each (their K/V is whatever the pool
holds: attention reads it all the same) run a decode step (one token each, its CUDA graph where
there is one) and, for each k, a verify step (k + 1 tokens each, every position's logits, as the
engine runs it: eagerly). Each is timed with CUDA events, the median of --repeats after a
warm-up. If a step of k + 1 tokens costs r decode steps and a verify step yields L tokens on
average (the mean acceptance length), speculation speeds decoding up by about L / r.
"""

import argparse
import statistics
import time


def step_ms(runner, inputs, repeats: int) -> float:
    """Median milliseconds of runner.forward(inputs) (CUDA events on a GPU)."""
    import torch

    for _ in range(3):
        runner.forward(inputs)
    times = []
    for _ in range(repeats):
        if runner.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.forward(inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            runner.forward(inputs)
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.verify_step",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from bench.results import environment, write_result
    from serve.config import EngineConfig
    from serve.core.model_runner import ModelRunner
    from serve.core.step_inputs import build_step_inputs
    from serve.models.loader import load_config, resolve_model_path

    max_k, page_size = max(args.ks), 16
    max_model_len = args.context_len + max_k + 1
    pages_per_seq = -(-max_model_len // page_size)
    config = EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                          max_num_seqs=max(args.batch_sizes), max_model_len=max_model_len,
                          num_pages=max(args.batch_sizes) * pages_per_seq, page_size=page_size)
    path = resolve_model_path(args.model)
    runner = ModelRunner(config, load_config(path), path, max_model_len)
    rows = []
    for batch in args.batch_sizes:
        tables = [list(range(i * pages_per_seq, (i + 1) * pages_per_seq)) for i in range(batch)]
        decode = build_step_inputs([[0]] * batch, [args.context_len] * batch, tables, page_size)
        decode_ms = step_ms(runner, decode, args.repeats)
        for k in args.ks:
            verify = build_step_inputs([[0] * (k + 1)] * batch, [args.context_len] * batch,
                                       tables, page_size, sampled=[k + 1] * batch)
            verify_ms = step_ms(runner, verify, args.repeats)
            rows.append({"batch_size": batch, "k": k, "decode_step_ms": decode_ms,
                         "verify_step_ms": verify_ms, "verify_over_decode": verify_ms / decode_ms})
            print(f"batch {batch:3d} k {k}: decode {decode_ms:7.3f} ms, verify {verify_ms:7.3f} ms"
                  f" ({verify_ms / decode_ms:.2f}x)", flush=True)
    result = {"kind": "verify_step", "env": environment(args.device), "model": args.model,
              "load_format": args.load_format, "context_len": args.context_len,
              "graphs": runner.graphs is not None, "repeats": args.repeats, "rows": rows}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
