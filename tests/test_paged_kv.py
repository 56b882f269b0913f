"""The page allocator never loses or shares a page; pages are taken as sequences grow and come
back when requests finish or are aborted; a request that can never fit is refused up front."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve import LLM, SamplingParams
from serve.core.kv.page_allocator import PageAllocator, PageTable
from serve.core.model_runner import largest_step_inputs
from serve.engine.errors import PromptTooLongError

PROMPTS = ["def main():", "import os\nimport sys\n\nclass Config(object):", "x",
           "for i in range(10):", "while True:", "return None"]


def check_invariants(allocator: PageAllocator, tables: list[PageTable]) -> None:
    held = [page for table in tables for page in table.pages]
    assert len(held) == len(set(held)), "a page is held twice"
    assert not set(held) & set(allocator.free_pages), "a held page is also free"
    assert len(held) + allocator.num_free_pages == allocator.num_pages  # conserved
    assert all(allocator.ref_counts[page] == 1 for page in held)  # one holder each
    assert allocator.num_used_pages == len(held) and allocator.num_evictable_pages == 0


operations = st.lists(
    st.tuples(st.sampled_from(["new", "grow", "release"]), st.integers(0, 10),
              st.integers(1, 40)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.sampled_from([1, 4, 16]))
def test_pages_are_conserved_and_never_shared(ops, page_size):
    allocator = PageAllocator(num_pages=24, page_size=page_size)
    live: list[tuple[PageTable, int]] = []  # table, tokens it has slots for
    for op, index, amount in ops:
        if op == "new":
            live.append((allocator.new_table(), 0))
        elif live:
            slot = index % len(live)
            table, tokens = live[slot]
            if op == "grow":
                free_before = allocator.num_free_pages
                if table.grow_to(tokens + amount):
                    live[slot] = (table, tokens + amount)
                    assert len(table.pages) == allocator.num_pages_for(tokens + amount)
                else:  # refused only when the pool really lacks the pages, and took none
                    assert table.num_missing_pages(tokens + amount) > free_before
                    assert allocator.num_free_pages == free_before
            else:  # finish, abort and preemption all give back the same: everything
                table.release()
                table.release()  # a second release is harmless
                live[slot] = (table, 0)
        check_invariants(allocator, [t for t, _ in live])
    for table, _ in live:
        table.release()
    assert allocator.num_free_pages == allocator.num_pages


def test_page_size_does_not_change_the_output(qwen3_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = [
        [o.token_ids for o in LLM(qwen3_dir, device="cpu", page_size=size)
         .generate(PROMPTS, params, use_tqdm=False)]
        for size in (1, 16)
    ]
    assert results[0] == results[1]


def test_pages_grow_on_demand_and_come_back(qwen3_dir):
    # step by step: each step's tokens are read (and pages freed) before the next is scheduled
    llm = LLM(qwen3_dir, device="cpu", num_pages=64, page_size=4, overlap_scheduling=False)
    engine, allocator = llm.engine, llm.engine.allocator
    engine.add_request("short", [5] * 6, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.add_request("long", [6] * 6, SamplingParams(max_tokens=40, ignore_eos=True))
    engine.add_request("aborted", [7] * 6, SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()  # prefill all three: 6 prompt tokens each take 2 pages, nothing more
    assert allocator.num_used_pages == 3 * 2
    engine.abort_request("aborted")
    assert allocator.num_used_pages == 2 * 2
    engine.step()  # "short" finishes here and gives its pages back at once
    assert allocator.num_used_pages == 2  # "long": 7 tokens computed so far, 2 pages
    for _ in range(10):
        engine.step()
    long = engine.scheduler.find("long")
    assert long.num_computed_tokens == 17 and len(long.page_table.pages) == 5
    while engine.has_unfinished_requests():
        engine.step()
    # Nobody holds a page; the full pages of what each computed stay cached: 1 of "short"'s
    # 7 tokens, 1 of "aborted"'s 6, 11 of "long"'s 45.
    assert allocator.num_used_pages == 0
    assert engine.cache.num_cached_pages == allocator.num_evictable_pages == 1 + 1 + 11
    assert allocator.num_free_pages == 64 - 13


def test_a_pool_smaller_than_the_context_lowers_it(qwen3_dir):
    """4 pages of 4 tokens hold 16: with no max_model_len asked for, that becomes the context,
    so a request larger than the pool is refused up front as too long for the model."""
    llm = LLM(qwen3_dir, device="cpu", num_pages=4, page_size=4)
    assert llm.engine.max_model_len == 16
    with pytest.raises(PromptTooLongError) as error:
        llm.engine.add_request("big", [1] * 8, SamplingParams(max_tokens=100))
    assert "maximum context length is 16 tokens" in str(error.value)
    with pytest.raises(PromptTooLongError):
        llm.engine.add_request("huge", [1] * 20, SamplingParams(max_tokens=1))
    out = llm.generate([[1] * 8], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(out[0].token_ids) == 8
    out = llm.generate([[1] * 8], SamplingParams(max_tokens=None, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].token_ids) == 8  # "until the context is full" means the pool's context


def test_a_pool_smaller_than_an_asked_context_is_refused(qwen3_dir):
    with pytest.raises(ValueError, match="max_model_len 64 needs 16 KV pages of 4 tokens and "
                                         "the pool has 4"):
        LLM(qwen3_dir, device="cpu", num_pages=4, page_size=4, max_model_len=64)


def test_the_sizing_step_never_runs_past_max_model_len():
    inputs, num_pages = largest_step_inputs(16384, 2048, page_size=16)
    assert inputs.num_tokens == 16384 and int(inputs.positions.max()) == 2047
    assert num_pages == 16384 // 16
    inputs, num_pages = largest_step_inputs(5000, 2048, page_size=16)
    assert inputs.attention.num_seqs == 3 and inputs.num_tokens == 5000
    assert num_pages == 128 + 128 + 57
