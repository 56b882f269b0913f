"""Chunked prefill: a step computes at most max_num_batched_tokens tokens, decodes first, and a
prompt longer than what is left is prefilled over several steps. The tokens do not change, with
the prefix cache or without, greedy or seeded, and the running requests never stall."""

import pytest
import torch

from serve import LLM, SamplingParams
from serve.core.step_inputs import build_step_inputs, split_step_inputs

PROMPTS = [list(range(100, 100 + n)) for n in (37, 61, 5, 90)]
PROMPTS.append(PROMPTS[1][:40] + [7] * 30)  # shares 40 tokens with the second prompt
PARAMS = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)] * 2
PARAMS.append(SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True))


def generate(model_dir: str, budget: int, prefix_caching: bool, num_pages: int = 256):
    llm = LLM(model_dir, device="cpu", page_size=4, num_pages=num_pages, max_num_seqs=4,
              max_num_batched_tokens=budget, enable_prefix_caching=prefix_caching)
    return llm.generate(PROMPTS, PARAMS, use_tqdm=False), llm.engine


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no_cache", "prefix_cache"])
def test_chunks_change_no_token(qwen3_dir, prefix_caching):
    """A budget of 7 tokens cuts every prompt but one into chunks (90 tokens: 13 of them)."""
    whole, _ = generate(qwen3_dir, 512, prefix_caching)
    chunked, engine = generate(qwen3_dir, 7, prefix_caching)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    if prefix_caching:  # the last prompt found the shared 40 tokens, then ran in chunks
        assert chunked[-1].num_cached_tokens == 40


def test_chunks_change_no_token_on_a_pool_that_preempts(qwen3_dir):
    """30 pages of 4 tokens: requests are preempted, some half prefilled, and come back."""
    whole, _ = generate(qwen3_dir, 512, False, num_pages=30)
    chunked, engine = generate(qwen3_dir, 7, True, num_pages=30)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]


@pytest.mark.parametrize("overlap", [False, True])
def test_running_requests_get_a_token_every_step_while_a_long_prompt_is_chunked(qwen3_dir,
                                                                               overlap):
    llm = LLM(qwen3_dir, device="cpu", page_size=4, num_pages=256, max_num_batched_tokens=16,
              overlap_scheduling=overlap)
    engine = llm.engine
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    engine.add_request("a", [1, 2, 3], params)
    engine.add_request("b", [4, 5], params)
    engine.step()  # both prefilled: from now on they decode
    engine.add_request("long", list(range(200, 400)), SamplingParams(max_tokens=2))
    steps_until_long = 0
    while True:
        outputs = {output.request_id for output in engine.step()}
        assert {"a", "b"} <= outputs  # decodes first: neither waits for the long prompt
        steps_until_long += 1
        if "long" in outputs:
            break
    # 200 prompt tokens, 14 a step (16 minus the two decodes): 15 steps, the last one sampling;
    # with overlap, a step's tokens are reported by the next call
    assert steps_until_long == 15 + overlap


def test_a_budget_smaller_than_the_context_is_accepted(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", max_num_batched_tokens=1, num_pages=64, page_size=4)
    assert llm.engine.max_model_len > 1
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].token_ids) == 3


@pytest.mark.parametrize("chunk_completes", [False, True])
def test_a_split_step_gives_the_logits_of_the_whole(qwen3_dir, chunk_completes):
    """A mixed step (two decode rows, then a prompt chunk) run as two parts, as a GPU runs it to
    keep the decode rows in their CUDA graph, gives the logits of the step run whole."""
    llm = LLM(qwen3_dir, device="cpu", page_size=4, num_pages=64)
    runner = llm.engine.runner
    a, b, c = list(range(10, 19)), list(range(30, 35)), list(range(50, 70))
    tables = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9]]
    runner.forward(build_step_inputs([a[:-1], b[:-1]], [0, 0], tables[:2], 4))  # their context
    chunk = c if chunk_completes else c[:12]
    mixed = build_step_inputs([[a[-1]], [b[-1]], chunk], [8, 4, 0], tables, 4,
                              sampled=[True, True, chunk_completes])
    whole = runner.forward(mixed)
    head, tail = split_step_inputs(mixed, 2)
    assert head.attention.is_decode and not tail.attention.is_decode
    assert (head.num_tokens, tail.num_tokens) == (2, len(chunk))
    parts = torch.cat([runner.forward(head), runner.forward(tail)])
    assert len(parts) == 2 + chunk_completes
    torch.testing.assert_close(parts, whole)
