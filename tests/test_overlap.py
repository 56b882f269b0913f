"""Overlap scheduling: the engine launches step N+1 before it reads step N's tokens (which feed
step N+1 on the device). Outputs must be exactly those of one step at a time, through
preemption, chunked prefill, the prefix cache and every way a request ends."""

import pytest

from serve import LLM, SamplingParams

PROMPTS = ["def main():", "import os", "x = 1", "class A:\n    pass\n" * 6, "for i in", "y"]


def generate(qwen3_dir, overlap, params, prompts=PROMPTS, eos=None, **config):
    llm = LLM(qwen3_dir, device="cpu", overlap_scheduling=overlap, **config)
    if eos is not None:
        llm.engine.core.eos_token_ids = eos
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.token_ids, o.text, o.finish_reason) for o in outputs], llm


PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9)] + \
    [SamplingParams(temperature=0.9, seed=s, max_tokens=12, ignore_eos=True) for s in (1, 2, 3)]


@pytest.mark.parametrize("config", [
    {},
    {"max_num_batched_tokens": 8},  # prompts in chunks beside decodes
    {"num_pages": 24, "page_size": 4, "max_num_batched_tokens": 16},  # preemptions
    {"enable_prefix_caching": False},
], ids=["roomy", "chunked", "tight", "no-cache"])
def test_overlap_changes_no_token(qwen3_dir, config):
    ours, llm = generate(qwen3_dir, True, PARAMS, **config)
    theirs, _ = generate(qwen3_dir, False, PARAMS, **config)
    assert ours == theirs
    assert llm.engine.core.overlap
    assert llm.engine.allocator.num_used_pages == 0  # nothing held after the run
    if "num_pages" in config:
        assert llm.engine.scheduler.num_preemptions > 0


def test_requests_that_end_early_end_alike(qwen3_dir):
    """EOS, a stop token and a stop string end a request at step N, while step N+1, with a row
    for it, is already launched: that row's token is dropped."""
    greedy = SamplingParams(temperature=0, max_tokens=16)
    full, _ = generate(qwen3_dir, False, SamplingParams(temperature=0, max_tokens=16,
                                                          ignore_eos=True))
    eos = {full[0][0][4], full[2][0][2]}  # tokens the first and third requests produce
    stop_id = full[1][0][3]
    params = [greedy, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id]),
              greedy, SamplingParams(temperature=0, max_tokens=16, stop=[full[3][1][2:5]]),
              greedy, greedy]
    ours, _ = generate(qwen3_dir, True, params, eos=eos)
    theirs, _ = generate(qwen3_dir, False, params, eos=eos)
    assert ours == theirs
    assert [reason for _, _, reason in ours][:4] == ["stop"] * 4


def test_a_step_is_launched_before_the_last_one_is_read(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", overlap_scheduling=True)
    runner, calls = llm.engine.runner, []
    launch, collect = runner.execute_model, runner.collect

    def traced_launch(*args, **kwargs):
        calls.append("launch")
        return launch(*args, **kwargs)

    def traced_collect(*args, **kwargs):
        calls.append("collect")
        return collect(*args, **kwargs)

    runner.execute_model, runner.collect = traced_launch, traced_collect
    llm.generate(["def main():"], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    # the prefill and three decode steps: each launch after the first comes before the
    # previous step's tokens are read
    assert calls[:5] == ["launch", "launch", "collect", "launch", "collect"]
