"""The sampling API on the GPU: log-probabilities from CUDA-graph decode steps and eager prompt
chunks against transformers' own on the same card, penalties and bias beside CUDA graphs and
overlap, and n sequences sharing their prompt's pages."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve import LLM, SamplingParams
from tests.test_sampling_api import DEMO, PROMPTS, reference_greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def generate(prompts, params, **config):
    llm = LLM(DEMO, dtype="float32", num_pages=2048, **config)  # (sized: no memory probe)
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def reference():
    return AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).cuda().eval()


@torch.inference_mode()
def test_logprobs_from_graphs_and_prompt_chunks_are_the_models_own(reference):
    params = [SamplingParams(temperature=0, max_tokens=16, logprobs=4, prompt_logprobs=2),
              SamplingParams(temperature=0.8, seed=2, max_tokens=16, logprobs=1)] * 8
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    for output in generate(prompts, params, max_num_batched_tokens=128):
        ids = output.prompt_token_ids + output.token_ids
        rows = reference(torch.tensor([ids], device="cuda")).logits[0].float().log_softmax(-1)
        num_prompt = len(output.prompt_token_ids)
        for i, entry in enumerate(output.outputs[0].logprobs):
            assert entry.logprob == pytest.approx(rows[num_prompt - 1 + i, entry.token_id].item(),
                                                  abs=2e-3)
        for i, entry in enumerate((output.prompt_logprobs or [None])[1:], 1):
            assert entry.logprob == pytest.approx(rows[i - 1, ids[i]].item(), abs=2e-3)


def test_penalties_beside_graphs_and_overlap_equal_the_reference():
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            repetition_penalty=1.3, presence_penalty=0.5, logit_bias={201: 2.0})
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    batch = [params, plain] * 8
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(batch))]
    overlapped = generate(prompts, batch, overlap_scheduling=True)
    assert [o.token_ids for o in overlapped] == \
        [o.token_ids for o in generate(prompts, batch, overlap_scheduling=False)]
    reference = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    for output in overlapped[:4:2]:  # (float32 on the card and on the CPU: the same argmax)
        assert output.token_ids == reference_greedy(reference, output.prompt_token_ids, params)


def test_n_sequences_share_the_prompts_pages():
    [output] = generate([PROMPTS[2]], SamplingParams(temperature=1.0, seed=3, max_tokens=12, n=4))
    assert len({c.text for c in output.outputs}) == 4 and output.num_cached_tokens > 0
