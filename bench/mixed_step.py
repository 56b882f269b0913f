"""What a prompt chunk costs the requests decoding beside it: mixed steps, split or all eager.

    python -m bench.mixed_step --model qwen3-0.6b --load-format dummy --batch-sizes 64 256 \\
        --budgets 1024 2048 4096 8192 16384 --out mixed.json \\
        [--timeline-out timeline.json --timeline-batch 64 --timeline-budget 2048]

For each batch size B, B requests are prefilled and left decoding. Then, for each token budget,
a long prompt (--long-len tokens) arrives and is prefilled in chunks of (budget - B) tokens, each
chunk in one step with the B decode rows; this happens twice:

- split: the engine as it is: the decode rows replay their CUDA graph, the chunk runs eagerly;
- eager: the whole mixed step eagerly (what a mixed step cost before the split).

Every step is timed from the host with the GPU synchronized before and after. The steps between
are pure decode steps (graph replays): their median is the reference a mixed step is compared
with. Batch size 0 measures a chunk alone. With --timeline-out, one split mixed step runs under
torch.profiler and is written in bench/probe.py's timeline format (bench.timeline draws it).
"""

import argparse
import random
import statistics
import time

import torch

from bench import probe
from bench.model_config import parse_engine_args, synchronize
from bench.results import environment, write_result
from bench.step_hook import StepHook
from serve import LLM, SamplingParams

NUM_DECODE_STEPS = 12  # pure decode steps timed before each measurement


class MixedStepBench:
    """One engine, its decode requests, and long prompts pushed through it in chunks."""

    def __init__(self, llm: LLM, long_len: int, decode_prompt_len: int, seed: int = 0) -> None:
        self.llm, self.engine, self.long_len = llm, llm.engine, long_len
        self.decode_prompt_len = decode_prompt_len
        self.runner, self.scheduler = llm.engine.runner, llm.engine.scheduler
        self.random = random.Random(seed)
        self.vocab = llm.engine.hf_config.vocab_size
        self.count = 0

    def prompt(self, length: int) -> list[int]:
        # random tokens: no two prompts share a prefix the cache could find
        return [self.random.randrange(10, self.vocab - 10) for _ in range(length)]

    def add(self, length: int, max_tokens: int) -> str:
        self.count += 1
        request_id = f"mixed-{self.count}"
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(request_id, self.prompt(length), params)
        return request_id

    def timed_step(self) -> tuple[float, list]:
        synchronize()
        start = time.perf_counter()
        outputs = self.engine.step()
        synchronize()
        return (time.perf_counter() - start) * 1e3, outputs

    def start_decodes(self, batch_size: int, max_tokens: int) -> list[str]:
        """Prefill batch_size requests and step until every one of them is decoding."""
        ids = [self.add(self.decode_prompt_len, max_tokens) for _ in range(batch_size)]
        while any(r.num_tokens - r.num_computed_tokens > 1 for r in self.scheduler.running) \
                or self.scheduler.waiting:
            self.engine.step()
        return ids

    def stop(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort_request(request_id)
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def decode_steps(self, count: int = NUM_DECODE_STEPS) -> float:
        return statistics.median(self.timed_step()[0] for _ in range(count))

    def chunked_prefill(self, eager: bool) -> list[float]:
        """Push one long prompt through in chunks; the times of the steps that held a chunk."""
        with StepHook(self.engine) as hook:
            if eager:  # never split: the whole step runs eagerly
                hook.wrap(self.runner, "split_for_graphs", lambda split, inputs: [inputs])
            request_id, times = self.add(self.long_len, 1), []
            while True:
                ms, outputs = self.timed_step()
                times.append(ms)
                if any(o.request_id == request_id for o in outputs):  # its prefill completed
                    return times

    def measure(self, batch_size: int, budget: int, repeats: int) -> dict:
        self.scheduler.max_num_batched_tokens = budget
        chunk = min(budget - batch_size, self.long_len)
        row = {"batch_size": batch_size, "budget": budget, "chunk_tokens": chunk}
        for mode in ("split", "eager"):
            steps, decode = [], []
            for _ in range(repeats):
                decode.append(self.decode_steps() if batch_size else 0.0)
                times = self.chunked_prefill(eager=mode == "eager")
                # the last step holds what is left of the prompt: a full chunk only if it divides
                steps += times[:-1] if len(times) > 1 and self.long_len % chunk else times
            row[mode] = {"mixed_step_ms": statistics.median(steps), "steps": len(steps),
                         "decode_step_ms": statistics.median(decode)}
            added = row[mode]["mixed_step_ms"] - row[mode]["decode_step_ms"]
            row[mode]["added_ms"] = added
            row[mode]["chunk_tokens_per_s"] = chunk / added * 1e3 if added > 0 else None
        row["split_vs_eager"] = row["eager"]["mixed_step_ms"] / row["split"]["mixed_step_ms"]
        print(f"B={batch_size:4d} budget={budget:6d}  decode {row['split']['decode_step_ms']:6.2f}"
              f" ms  mixed split {row['split']['mixed_step_ms']:7.2f} ms  eager "
              f"{row['eager']['mixed_step_ms']:7.2f} ms  ({row['split_vs_eager']:.2f}x)",
              flush=True)
        return row

    def profile_mixed_step(self, budget: int) -> dict:
        """One split mixed step under torch.profiler, as bench/probe.py's timeline JSON."""
        self.scheduler.max_num_batched_tokens = budget
        device = torch.device(self.runner.device)
        request_id = self.add(self.long_len, 1)
        with probe.Recorder(self.engine) as recorder:
            probe.run_step(self.engine, recorder, device, {}, set())  # the first chunk, unprofiled
            with recorder.profiled() as prof:
                step = probe.run_step(self.engine, recorder, device, {}, set())
        timeline = probe.parse_trace(prof, step)
        timeline["summary"].update({"what": "one mixed step", "tokens": step["tokens"],
                                    "budget": budget})
        self.stop([request_id])
        return timeline


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.mixed_step",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[0, 64, 256])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--long-len", type=int, default=8192, help="the long prompt's tokens")
    parser.add_argument("--max-model-len", type=int,
                        help="default: the long prompt plus 2048 (room for the decodes to grow)")
    parser.add_argument("--decode-prompt-len", type=int, default=256,
                        help="the prompt of each decoding request")
    parser.add_argument("--repeats", type=int, default=2, help="long prompts per measurement")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--timeline-out", help="profile one split mixed step, write it here")
    parser.add_argument("--timeline-batch", type=int, default=64)
    parser.add_argument("--timeline-budget", type=int, default=2048)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    extra = parse_engine_args(args.engine_arg)
    max_model_len = args.max_model_len or args.long_len + 2048
    # The engine is built for the largest budget; each measurement lowers the scheduler's. It
    # runs without overlap scheduling: each mixed step is timed alone.
    extra = {"overlap_scheduling": False, **extra}
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_model_len=max_model_len, max_num_batched_tokens=max(args.budgets),
              max_num_seqs=max(max(args.batch_sizes) + 1, 2), **extra)
    bench = MixedStepBench(llm, args.long_len, args.decode_prompt_len)
    decode_tokens = max_model_len - args.decode_prompt_len
    bench.stop(bench.start_decodes(2, 8))  # warm up
    rows = []
    for batch_size in args.batch_sizes:
        decodes = bench.start_decodes(batch_size, decode_tokens)
        for budget in args.budgets:
            if budget > batch_size:
                rows.append(bench.measure(batch_size, budget, args.repeats))
        bench.stop(decodes)
    if args.timeline_out:  # last: the profiler leaves CUPTI attached to the process
        decodes = bench.start_decodes(args.timeline_batch, decode_tokens)
        write_result(args.timeline_out, bench.profile_mixed_step(args.timeline_budget))
        bench.stop(decodes)
    device = str(bench.runner.device)
    result = {"kind": "mixed_step", "env": environment(device),
              "engine_args": {"model": args.model, "load_format": args.load_format,
                              "max_model_len": max_model_len, **extra},
              "long_len": args.long_len, "decode_prompt_len": args.decode_prompt_len,
              "repeats": args.repeats, "cuda_graphs": bench.runner.graphs is not None,
              "rows": rows, "timeline": args.timeline_out}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
