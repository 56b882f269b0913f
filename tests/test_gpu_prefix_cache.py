"""On a GPU: prefix caching changes no token on FlashInfer, greedy and seeded, on a roomy pool
and on one so small that cached pages are evicted and requests preempted.

A prefix's K/V computed in an earlier step, or in the same prefill as the tokens after it, go
through differently shaped kernels, so bf16 rounding differs in the last bits; as in
test_gpu_engine, two runs may part at a near-tie, and every divergence must start at one.
Skipped without CUDA and FlashInfer; run on the GPU machine with `pytest -m gpu`.
"""

import pytest
import torch

from serve import LLM, SamplingParams
from serve.core.sampler import MASK32, TOKEN_SALT, exponential_noise, noise_key
from serve.core.step_inputs import build_step_inputs
from serve.engine.tokenizer import load_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TIE = 0.25  # as in test_gpu_engine: bf16 logits closer than this are a near-tie
PAGE_SIZE = 16
MAX_TOKENS = 32
PREFIX = "for i in range(10):\n    print(i)\n" * 8  # many pages, shared by every prompt
PROMPTS = [PREFIX + suffix for suffix in
           ["def main():", "import os\nimport sys\n", "class A(object):\n    def", "x = 1",
            "while True:", "return None", "def main():", "y = [i for i in range(3)]"]]
PARAMS = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)] * 4


def generate(model_dir: str, prefix_caching: bool, num_pages: int) -> tuple[list, LLM]:
    llm = LLM(model_dir, dtype="bfloat16", attention_backend="flashinfer", page_size=PAGE_SIZE,
              num_pages=num_pages, max_num_seqs=4, enable_prefix_caching=prefix_caching)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)], llm


def last_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """The engine's logits after prefilling token_ids as one sequence (float32, [vocab]).
    Only for an idle engine without a cache: it writes pages 0, 1, ..."""
    runner = llm.engine.runner
    pages = list(range(-(-len(token_ids) // runner.page_size)))
    return runner.forward(build_step_inputs([token_ids], [0], [pages], runner.page_size))[0]


def race_scores(logits: torch.Tensor, params: SamplingParams, position: int) -> torch.Tensor:
    """What the sampler takes the argmax of, on the logits' scale: the logits for a greedy
    request; for a seeded one (no filters), logits / T - log(noise), the exponential race."""
    logits = logits.float().cpu()
    if params.greedy:
        return logits
    salted_ids = torch.arange(len(logits), dtype=torch.int64) * TOKEN_SALT & MASK32
    noise = exponential_noise(torch.tensor([noise_key(params.seed, position)]), salted_ids)[0]
    return (logits / params.temperature - noise.log()) * params.temperature


def assert_equal_but_at_ties(reference: LLM, model_dir: str, prompts: list[str],
                             params: list[SamplingParams], ours: list[list[int]],
                             theirs: list[list[int]]) -> None:
    """ours == theirs, but that a request may diverge where its two tokens were a near-tie in
    the reference engine's scores (bf16 rounding decides such a tie either way)."""
    tokenizer = load_tokenizer(model_dir)
    for index, request_params in enumerate(params):
        same = next((i for i, (a, b) in enumerate(zip(ours[index], theirs[index], strict=True))
                     if a != b), len(ours[index]))
        if same == len(ours[index]):
            continue
        prefix = tokenizer.encode(prompts[index]) + theirs[index][:same]
        scores = race_scores(last_logits(reference, prefix), request_params,
                             position=len(prefix))
        gap = abs(scores[ours[index][same]] - scores[theirs[index][same]])
        assert gap < TIE, f"prompt {index} diverged at token {same} with no tie ({gap:.3f})"


@pytest.mark.parametrize("tight", [False, True], ids=["roomy", "tight"])
def test_cached_prefixes_change_no_token_on_flashinfer(gpu_model_dir, tight):
    tokenizer = load_tokenizer(gpu_model_dir)
    prompt_ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    longest = max(len(ids) for ids in prompt_ids) + MAX_TOKENS
    # Room for one request and a few pages: the cache must evict and the scheduler preempt.
    num_pages = -(-longest // PAGE_SIZE) + 3 if tight else 4096
    off, off_llm = generate(gpu_model_dir, False, num_pages)
    on, on_llm = generate(gpu_model_dir, True, num_pages)
    engine = on_llm.engine
    assert engine.cache.num_cached_pages > 0
    if tight:
        assert engine.scheduler.num_preemptions > 0 and engine.cache.num_evicted_pages > 0
    for index, params in enumerate(PARAMS):
        ours, theirs = on[index], off[index]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b),
                    len(ours))
        if same == len(ours):
            continue
        prefix = prompt_ids[index] + theirs[:same]
        scores = race_scores(last_logits(off_llm, prefix), params, position=len(prefix))
        gap = abs(scores[ours[same]] - scores[theirs[same]])
        assert gap < TIE, f"prompt {index} diverged at token {same} with no tie ({gap:.3f})"
