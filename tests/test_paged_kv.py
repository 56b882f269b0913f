"""Stage 2: the page allocator never loses or shares a page, and a small pool only means
smaller batches, never a crash or a lost request."""

from hypothesis import given, settings
from hypothesis import strategies as st

from serve import LLM, SamplingParams
from serve.engine.page_allocator import PageAllocator, PageTable

PROMPTS = ["def main():", "import os\nimport sys\n\nclass Config(object):", "x",
           "for i in range(10):", "while True:", "return None"]


def check_invariants(allocator: PageAllocator, tables: list[PageTable]) -> None:
    held = [page for table in tables for page in table.pages]
    assert len(held) == len(set(held)), "a page is held twice"
    assert not set(held) & set(allocator.free_pages), "a held page is also free"
    assert len(held) + allocator.num_free_pages == allocator.num_pages  # conserved
    assert allocator.num_reserved == sum(t.num_promised for t in tables)
    assert allocator.num_available_pages >= 0


operations = st.lists(
    st.tuples(st.sampled_from(["admit", "grow", "finish", "abort"]),
              st.integers(0, 10), st.integers(1, 40)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.sampled_from([1, 4, 16]))
def test_pages_are_conserved_and_never_shared(ops, page_size):
    allocator = PageAllocator(num_pages=24, page_size=page_size)
    live: list[tuple[PageTable, int, int]] = []  # table, tokens held, max tokens
    for op, index, amount in ops:
        if op == "admit":
            max_tokens = amount * 3
            table = allocator.reserve(max_tokens)
            if table is None:  # refused only when the promise really does not fit
                assert allocator.pages_for(max_tokens) > allocator.num_available_pages
            else:
                live.append((table, 0, max_tokens))
        elif live:
            slot = index % len(live)
            table, held, max_tokens = live[slot]
            if op == "grow":
                held = min(max_tokens, held + amount)
                table.grow_to(held)  # never fails: the pages were promised at admission
                live[slot] = (table, held, max_tokens)
            else:  # finish and abort give back exactly the same: everything
                table.release()
                table.release()  # a second release is harmless
                live.pop(slot)
        check_invariants(allocator, [t for t, _, _ in live])
    for table, _, _ in live:
        table.release()
    assert allocator.num_free_pages == allocator.num_pages
    assert allocator.num_reserved == 0


def test_small_pool_completes_every_request_in_smaller_batches(qwen3_dir):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    roomy = LLM(qwen3_dir, device="cpu", num_pages=256, page_size=4)
    # 12 pages of 4 tokens: room for two of these requests at a time (about 5 pages each)
    tight = LLM(qwen3_dir, device="cpu", num_pages=12, page_size=4)
    expected = roomy.generate(PROMPTS, params, use_tqdm=False)
    engine = tight.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    finished, batch_sizes = {}, []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if engine.batch is not None and engine.batch.size not in batch_sizes[-1:]:
            batch_sizes.append(engine.batch.size)
        finished.update((o.request_id, o) for o in outputs if o.finished)
    assert sorted(finished) == [str(i) for i in range(len(PROMPTS))]  # none lost
    assert [finished[str(i)].token_ids for i in range(len(PROMPTS))] == [
        o.token_ids for o in expected]
    assert max(batch_sizes) < len(PROMPTS)  # memory, not max_batch_size, limited the batches
    assert engine.allocator.num_free_pages == 12 and engine.allocator.num_reserved == 0


def test_page_size_does_not_change_the_output(qwen3_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = [
        [o.token_ids for o in LLM(qwen3_dir, device="cpu", page_size=size)
         .generate(PROMPTS, params, use_tqdm=False)]
        for size in (1, 16)
    ]
    assert results[0] == results[1]


def test_finished_and_aborted_requests_give_their_pages_back(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", num_pages=64, page_size=4)
    engine = llm.engine
    engine.add_request("short", "x", SamplingParams(max_tokens=2, ignore_eos=True))
    engine.add_request("long", "y", SamplingParams(max_tokens=40, ignore_eos=True))
    engine.add_request("aborted", "z", SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()  # prefill all three
    engine.abort_request("aborted")
    engine.step()  # "short" finishes here
    held = 64 - engine.allocator.num_free_pages
    promised = engine.allocator.num_reserved
    assert held + promised <= engine.allocator.pages_for(41)  # only "long" still holds pages
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.allocator.num_free_pages == 64 and engine.allocator.num_reserved == 0


def test_a_request_larger_than_the_pool_is_refused_up_front(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", num_pages=4, page_size=4)
    try:
        llm.engine.add_request("big", "x", SamplingParams(max_tokens=100))
    except ValueError as error:
        assert "KV pages" in str(error)
    else:
        raise AssertionError("a request that can never fit was accepted")
