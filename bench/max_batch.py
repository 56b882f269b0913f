"""How many requests fit in the same KV memory: contiguous per-batch cache (stage 1) vs pages.

    python -m bench.max_batch --model qwen3-0.6b --kv-gib 4 --workload nano-vllm

Requests are taken in workload order, as a FIFO scheduler takes them. Stage 1 reserves, for every
row of a batch, room for the longest prompt plus the largest max_tokens in the batch; that is
arithmetic. For pages we run the real Scheduler and PageAllocator (no model needed): how many
requests its first step admits from the same queue is the answer. (Stage 2's scheduler promised
each request pages for its prompt plus max_tokens; from stage 3 on, admission takes the prompt's
pages only and later steps take more or preempt, so this counts requests running at once at the
start, not at the peak.)
"""

import argparse

import torch

from bench.model_config import load_hf_config
from bench.results import environment, write_result
from bench.workloads import add_workload_args, make_requests, workload_from_args
from serve.core.kv.kv_pool import KVPool
from serve.core.kv.page_allocator import PageAllocator
from serve.core.request import Request
from serve.core.scheduler import Scheduler
from serve.models.shapes import head_dim_of


def contiguous_max_batch(lengths: list[tuple[int, int]], budget_tokens: int) -> int:
    """Largest B such that the first B requests fit one contiguous, left-padded batch."""
    best = 0
    for size in range(1, len(lengths) + 1):
        rows = lengths[:size]
        slots = max(i for i, _ in rows) + max(o for _, o in rows)
        if size * slots > budget_tokens:
            break
        best = size
    return best


def paged_max_batch(lengths: list[tuple[int, int]], num_pages: int, page_size: int) -> int:
    """The first batch the real scheduler admits with a pool of num_pages pages."""
    from serve.sampling_params import SamplingParams

    allocator = PageAllocator(num_pages, page_size)
    scheduler = Scheduler(allocator, max_num_seqs=1 << 20, max_num_batched_tokens=1 << 30)
    for n, (prompt_len, output_len) in enumerate(lengths):
        scheduler.add(Request(str(n), [0] * prompt_len, SamplingParams(max_tokens=output_len),
                              max_tokens=output_len, sampling_seed=0))
    return len(scheduler.schedule().scheduled)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.max_batch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--kv-gib", type=float, default=4.0, help="KV memory both designs get")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--out")
    add_workload_args(parser)
    args = parser.parse_args(argv)
    workload = workload_from_args(args)
    cfg = load_hf_config(args.model)
    requests = make_requests(workload, cfg.vocab_size)
    lengths = [(len(prompt), params.max_tokens) for prompt, params in requests]
    page_bytes = KVPool.bytes_per_page(cfg.num_hidden_layers, args.page_size,
                                       cfg.num_key_value_heads, head_dim_of(cfg), torch.bfloat16)
    num_pages = int(args.kv_gib * 2**30 // page_bytes)
    contiguous = contiguous_max_batch(lengths, num_pages * args.page_size)
    paged = paged_max_batch(lengths, num_pages, args.page_size)
    result = {"kind": "max_batch", "env": environment("cpu"), "workload": workload.to_dict(),
              "model": args.model, "kv_gib": args.kv_gib, "page_size": args.page_size,
              "num_pages": num_pages, "contiguous_max_batch": contiguous,
              "paged_max_batch": paged, "ratio": paged / contiguous if contiguous else None}
    print(f"{args.kv_gib} GiB of KV ({num_pages} pages of {args.page_size} tokens), "
          f"{workload.name} lengths: contiguous batch {contiguous}, paged batch {paged} "
          f"({paged / max(contiguous, 1):.2f}x)")
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
