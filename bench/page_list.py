"""The host's cost of a step's page list: from Python lists of pages, or from a block table.

    python -m bench.page_list --batch-sizes 64 256 --context-lens 20 1000 2000 --out x.json

build_step_inputs lays out each step's attention metadata on the host, the list of every
sequence's pages included. Built from each request's Python list of pages, that is a loop over
every page of every request, so it grows with how long the requests are; built from a block
table (one int32 row of pages per request, kept up to date as pages are taken), it is a gather
and a mask. Both are timed here on the same decode steps, alternately, and checked to agree.
"""

import argparse
import statistics
import timeit

import torch

from bench.results import environment, write_result
from serve.core.step_inputs import PageRows, build_step_inputs

PAGE_SIZE = 16
REPEATS = 5  # alternations; each times NUMBER builds of each kind
NUMBER = 50


def time_both(batch_size: int, context_len: int) -> dict:
    pages_per_seq = -(-(context_len + 1) // PAGE_SIZE)
    tables = [list(range(i * pages_per_seq, (i + 1) * pages_per_seq)) for i in range(batch_size)]
    block_table = torch.zeros(batch_size + 1, pages_per_seq + 1, dtype=torch.int32)
    for row, pages in enumerate(tables):
        block_table[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    rows = PageRows(block_table, torch.arange(batch_size))
    new_tokens, computed = [[5]] * batch_size, [context_len] * batch_size
    lists = build_step_inputs(new_tokens, computed, tables, PAGE_SIZE)
    table = build_step_inputs(new_tokens, computed, rows, PAGE_SIZE)
    assert torch.equal(lists.attention.kv_indices, table.attention.kv_indices)
    assert torch.equal(lists.attention.slot_mapping, table.attention.slot_mapping)
    list_us, table_us = [], []
    for _ in range(REPEATS):
        list_us.append(1e6 * timeit.timeit(
            lambda: build_step_inputs(new_tokens, computed, tables, PAGE_SIZE),
            number=NUMBER) / NUMBER)
        table_us.append(1e6 * timeit.timeit(
            lambda: build_step_inputs(new_tokens, computed, rows, PAGE_SIZE),
            number=NUMBER) / NUMBER)
    return {"batch_size": batch_size, "context_len": context_len,
            "pages": batch_size * pages_per_seq, "lists_us": statistics.median(list_us),
            "block_table_us": statistics.median(table_us)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.page_list",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--context-lens", type=int, nargs="+", default=[20, 1000, 2000])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the engine's host work runs on a GPU machine
    rows = []
    for batch_size in args.batch_sizes:
        for context_len in args.context_lens:
            row = time_both(batch_size, context_len)
            rows.append(row)
            print(f"{batch_size:4d} sequences of {context_len:5d} tokens: lists "
                  f"{row['lists_us']:7.0f} us, block table {row['block_table_us']:7.0f} us",
                  flush=True)
    result = {"kind": "page_list", "env": environment("cpu"), "page_size": PAGE_SIZE,
              "rows": rows}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
