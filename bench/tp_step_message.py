"""What it costs rank 0 to give the other tensor-parallel ranks one step, three ways.

    python -m bench.tp_step_message --rows 1 64 256 --out tp-step-message.json

Every step, before any rank can run it, rank 0 sends the step over a gloo group
(broadcast_object_list: pickle, send, unpickle). Measured for a decode step of N rows whose
sequences hold 100-1024 tokens (16-token pages), each way:

- `torch`: the step's arrays as torch tensors, pickled as they are (the engine up to v0.8);
- `numpy`: the same arrays as numpy arrays (StepMessage now);
- `changes`: only what a rank could not work out itself if it kept its own copy of the
  persistent batch: each row's slot, new-token count, computed count, sampled and read flags,
  plus the block-table pages that changed this step (one page per 16 steps per row, on
  average); each rank would then gather the step's arrays itself (gather_step_inputs, timed
  here as `gather_ms`), and keep a copy of every slot's rules and block table row.

Each way: bytes, pickle and unpickle time on this machine, and the broadcast's time between
two processes on it (gloo, CPU), medians over --repeats.
"""

import argparse
import os
import pickle
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from bench.results import environment, write_result
from bench.tp_comm import run_ranks
from serve.core.batch import PersistentBatch
from serve.core.parallel_runner import StepMessage
from serve.core.step_inputs import gather_step_inputs
from serve.sampling_params import SamplingParams

PAGE_SIZE = 16
VOCAB = 151_936  # Qwen3's


def decode_step(rows: int, seed: int = 0):
    """A decode step of `rows` rows and what it would take to describe only its changes."""
    rng = np.random.default_rng(seed)
    computed = rng.integers(100, 1024, rows)
    pages_per_row = 1024 // PAGE_SIZE + 1
    table = np.arange((rows + 1) * pages_per_row, dtype=np.int32).reshape(rows + 1, -1)
    slots = np.arange(rows)
    batch = PersistentBatch(rows + 1, VOCAB)
    for slot in slots:
        batch.admit(int(slot), SamplingParams(temperature=0.6, top_p=0.95), int(slot))

    def gather():
        inputs = gather_step_inputs(np.zeros(rows, np.int64), np.ones(rows, np.int64), computed,
                                    table, slots, PAGE_SIZE, np.ones(rows, np.bool_),
                                    batch.sampling(slots, computed + 1))
        inputs.read_rows = inputs.read_slots = inputs.write_slots = torch.from_numpy(slots)
        return inputs

    crossing = slots[computed % PAGE_SIZE == 0]  # rows whose new token opens a page
    changes = {"slots": slots, "query_lens": np.ones(rows, np.int64), "computed": computed,
               "sampled": np.ones(rows, np.bool_), "read": np.ones(rows, np.bool_),
               "page_slots": crossing, "page_index": computed[crossing] // PAGE_SIZE,
               "pages": table[crossing, computed[crossing] // PAGE_SIZE]}
    return gather, changes


class TorchMessage:
    """The step's tensors pickled as tensors (StepMessage without its __getstate__)."""

    def __init__(self, inputs) -> None:
        self.inputs = inputs


def messages(rows: int) -> tuple[dict, float]:
    """The three messages for one step, and the time a rank takes to gather it (ms)."""
    gather, changes = decode_step(rows)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        inputs = gather()
        times.append(time.perf_counter() - start)

    return ({"torch": TorchMessage(inputs), "numpy": StepMessage(inputs), "changes": changes},
            statistics.median(times) * 1e3)


def pickle_ms(message, repeats: int) -> tuple[int, float, float]:
    dumps, loads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        blob = pickle.dumps(message)
        dumps.append(time.perf_counter() - start)
        start = time.perf_counter()
        pickle.loads(blob)
        loads.append(time.perf_counter() - start)
    return len(blob), statistics.median(dumps) * 1e3, statistics.median(loads) * 1e3


def _broadcast_worker(rank: int, size: int, address: str, rows_list: list[int], repeats: int,
                      out) -> None:
    dist.init_process_group("gloo", init_method=address, rank=rank,
                            world_size=size)
    results = {}
    for rows in rows_list:
        built, _ = messages(rows)
        for way, message in built.items():
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                box = [message if rank == 0 else None]
                dist.broadcast_object_list(box, src=0)
                times.append(time.perf_counter() - start)
            results[(rows, way)] = statistics.median(times) * 1e3
    if rank == 1:
        out.put(results)
    dist.destroy_process_group()


def broadcast_ms(rows_list: list[int], repeats: int) -> dict:
    """Rank 1's time from a barrier to holding the unpickled message, per (rows, way)."""
    return run_ranks(_broadcast_worker, 2, rows_list, repeats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.tp_step_message",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    broadcast = broadcast_ms(args.rows, args.repeats)
    rows_out = []
    for rows in args.rows:
        built, gather = messages(rows)
        for way, message in built.items():
            size, dump, load = pickle_ms(message, args.repeats)
            row = {"rows": rows, "way": way, "bytes": size, "pickle_ms": dump,
                   "unpickle_ms": load, "broadcast_ms": broadcast[(rows, way)],
                   "gather_ms": gather if way == "changes" else 0.0}
            rows_out.append(row)
            print(f"{rows:4d} rows  {way:8s} {size:8,d} B  pickle {dump:.3f} ms  unpickle "
                  f"{load:.3f} ms  broadcast {row['broadcast_ms']:.3f} ms  gather "
                  f"{row['gather_ms']:.3f} ms", flush=True)
    result = {"kind": "tp_step_message", "env": environment("cpu"), "page_size": PAGE_SIZE,
              "repeats": args.repeats, "rows": rows_out}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
