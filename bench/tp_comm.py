"""What tensor parallelism costs a decode step in communication, measured and modelled.

    python -m bench.tp_comm --model llama-3.1-8b --batch-sizes 1 64 --tp-sizes 1 2 \\
        --device cpu --out tp-comm.json

For each model shape, tensor-parallel size and batch size, the model gives the collectives one
decode step makes (two all-reduces per layer of [batch, hidden], one for the embedding, and the
LM head's all-gather of [batch, vocab / tp]) and their bytes. With --tp-sizes including 2 or
more, the tool starts that many processes (gloo on the CPU, NCCL on GPUs) and times each of
those collectives as it is, so that (collectives x their time) is the step's communication.
Beside it, the weights' share of the step at the roofline: weight bytes / tp / bandwidth
(--bandwidth, bytes/s, e.g. the one bench.step_profile measured), the part that shrinks.
"""

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.model_config import load_hf_config
from bench.results import environment, write_result
from serve.models.shapes import head_dim_of

REPEATS = 50


def collectives(config, tp: int, batch: int, element: int) -> list[dict]:
    """The collectives of one decode step of `batch` rows at tensor-parallel size tp."""
    if tp == 1:
        return []
    hidden = batch * config.hidden_size * element
    vocab_shard = -(-config.vocab_size // tp)
    return [
        {"op": "all_reduce", "count": 2 * config.num_hidden_layers + 1, "bytes": hidden,
         "shape": [batch, config.hidden_size]},
        {"op": "all_gather", "count": 1, "bytes": batch * vocab_shard * element * tp,
         "shape": [batch, vocab_shard]},
    ]


def weight_bytes(config, element: int) -> int:
    """The decoder's matrices and the embedding (and a separate LM head), from the config."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = head_dim_of(config)
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * config.intermediate_size
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return (config.num_hidden_layers * per_layer + embeddings) * element


def time_collectives(rank: int, size: int, address: str, device: str, shapes: list,
                     results) -> None:
    """In each of `size` processes: time every (op, shape) REPEATS times; rank 0 reports."""
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=address,
                            rank=rank, world_size=size)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timings = {}
    for op, shape in shapes:
        x = torch.ones(shape, dtype=dtype, device=device)
        parts = [torch.empty_like(x) for _ in range(size)]
        run = (lambda: dist.all_reduce(x)) if op == "all_reduce" else \
            (lambda: dist.all_gather(parts, x))  # noqa: B023 (run is called at once)
        samples = []
        for i in range(REPEATS + 5):
            dist.barrier()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                samples.append(time.perf_counter() - start)
        timings[f"{op} {shape}"] = statistics.median(samples)
    if rank == 0:
        results.put(timings)
    dist.destroy_process_group()


def measure(size: int, device: str, shapes: list) -> dict:
    return run_ranks(time_collectives, size, device, shapes)


def run_ranks(target, size: int, *args):
    """Start `size` processes, each running target(rank, size, address, *args, results) with one
    rendezvous address, and return what one of them puts on `results` (then wait for all)."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=target, args=(rank, size, address, *args, results))
                 for rank in range(size)]
    for process in processes:
        process.start()
    answer = results.get(timeout=600)
    for process in processes:
        process.join()
    return answer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.tp_comm",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model dir or shipped config name")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="memory bandwidth in bytes/s for the weights' roofline share")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    config = load_hf_config(args.model)
    element = 2  # bf16, as the model runs on a GPU
    weights = weight_bytes(config, element)
    rows = []
    for tp in args.tp_sizes:
        ops = {b: collectives(config, tp, b, element) for b in args.batch_sizes}
        shapes = [(o["op"], o["shape"]) for b in args.batch_sizes for o in ops[b]]
        timings = measure(tp, args.device, shapes) if tp > 1 else {}
        for batch in args.batch_sizes:
            comm = sum(o["count"] * timings[f"{o['op']} {o['shape']}"] for o in ops[batch])
            row = {"tp": tp, "batch_size": batch, "collectives": ops[batch],
                   "collective_s": {k: v for k, v in timings.items()},
                   "communication_s": comm,
                   "weights_roofline_s": (weights / tp / args.bandwidth
                                          if args.bandwidth else None)}
            rows.append(row)
            print(f"tp={tp} batch={batch:4d}: {sum(o['count'] for o in ops[batch])} collectives, "
                  f"{1e3 * comm:.3f} ms of communication a step"
                  + (f", weights at the roofline {1e3 * row['weights_roofline_s']:.3f} ms"
                     if args.bandwidth else ""), flush=True)
    result = {"kind": "tp_comm", "env": environment(args.device), "model": args.model,
              "weight_bytes": weights, "bandwidth_bytes_per_s": args.bandwidth,
              "repeats": REPEATS, "rows": rows}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
