"""How long Python's full garbage collection stops an engine core, before and after
`gc.freeze()`: the question of whether the core freezes what it built at start-up.

    python -m bench.gc_pause --model qwen3-0.6b --load-format dummy --device cpu --out gc.json

A full collection walks every object the collector tracks; after start-up those are mostly the
model's modules and everything the imports created, none of which will ever be garbage.
`gc.freeze()` moves them out of the collector's sight, so later collections walk only what
serving creates. The core's step loop runs whatever collections Python decides to run.
"""

import argparse
import gc
import statistics
import time

from bench.model_config import parse_engine_args
from bench.results import environment, write_result
from serve.config import EngineConfig
from serve.core.engine_core import EngineCore

REPEATS = 5


def full_collection_ms() -> float:
    start = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_pause",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    extra = parse_engine_args(args.engine_arg)
    core = EngineCore(EngineConfig(model=args.model, load_format=args.load_format,
                                   device=args.device, **extra), eos_token_ids=set())
    tracked = len(gc.get_objects())
    before = [full_collection_ms() for _ in range(REPEATS)]
    gc.freeze()
    after = [full_collection_ms() for _ in range(REPEATS)]
    result = {"kind": "gc_pause", "env": environment(str(core.runner.device)),
              "engine_args": {"model": args.model, "load_format": args.load_format, **extra},
              "objects_tracked": tracked, "frozen": gc.get_freeze_count(),
              "full_collection_ms": {"before_freeze": before, "after_freeze": after,
                                     "median_before": statistics.median(before),
                                     "median_after": statistics.median(after)}}
    print(f"{tracked:,} objects tracked; a full collection takes "
          f"{result['full_collection_ms']['median_before']:.1f} ms, "
          f"{result['full_collection_ms']['median_after']:.2f} ms after gc.freeze()")
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
