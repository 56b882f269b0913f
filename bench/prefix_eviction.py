"""What one prefix-cache eviction costs the host, with the cache holding many leaves.

    python -m bench.prefix_eviction --leaves 500 5000 20000 --out eviction.json
    python -m bench.prefix_eviction --tree .stages/v0.8-tensor-parallel ...  (an older stage)

A busy server's pool is full of cached pages, so every page a step takes may first have to be
evicted: the cost of `RadixCache.evict(1)` is on the critical path of such steps. The cache is
filled with N leaves of two pages each (distinct prompts, held by nobody), then, repeatedly,
one page is evicted and one more prompt is cached (so the number of leaves stays N); the median
eviction time is reported per N. Pure host work: no model, any machine. With --tree the
allocator and cache are the ones of another checkout (a stage's exported tree), for a
before/after in one run.
"""

import argparse
import statistics
import sys
import time


def eviction_ms(num_leaves: int, repeats: int, page_size: int = 16) -> float:
    from serve.core.kv.page_allocator import PageAllocator
    from serve.core.kv.radix_cache import RadixCache

    allocator = PageAllocator(2 * num_leaves + 8, page_size)
    cache = RadixCache(allocator)
    allocator.evictor = cache
    count = 0

    def cache_one_prompt() -> None:
        nonlocal count
        # two pages whose first tokens differ from every other prompt's: a leaf of its own
        token_ids = [count % 50_000, count // 50_000] + [7] * (2 * page_size - 2)
        count += 1
        table = allocator.new_table()
        _, pages = cache.match(token_ids)
        table.adopt(pages)
        assert table.grow_to(len(token_ids))
        table.swap_prefix(cache.insert(token_ids, table.pages[:2]))
        table.release()  # held by nobody now: evictable

    for _ in range(num_leaves):
        cache_one_prompt()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cache.evict(1)
        times.append(time.perf_counter() - start)
        cache_one_prompt()
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_eviction",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[500, 5000, 20000])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--tree", help="time the serve/ of this checkout instead")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from bench.results import environment, write_result  # this checkout's (it imports no serve)

    if args.tree:  # serve from there (nothing has imported it yet)
        sys.path.insert(0, args.tree)

    rows = []
    for leaves in args.leaves:
        ms = eviction_ms(leaves, args.repeats)
        rows.append({"leaves": leaves, "evict_one_ms": ms})
        print(f"{leaves:6d} leaves: evict(1) median {ms:.4f} ms", flush=True)
    result = {"kind": "prefix_eviction", "env": environment("cpu"), "tree": args.tree,
              "repeats": args.repeats, "rows": rows}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
