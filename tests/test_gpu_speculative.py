"""Speculative decoding on the GPU: verify rows (k + 1 query tokens) run beside the decode
graphs, and the tokens equal decoding without drafts, greedy and seeded."""

from pathlib import Path

import pytest
import torch

from serve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEMO = str(Path(__file__).parent.parent / "bench" / "demo_models" / "pycode-8m")
DEMO_DRAFT = str(Path(__file__).parent.parent / "bench" / "demo_models" / "pycode-2m")
SOURCE = (Path(__file__).parent.parent / "serve" / "core" / "scheduler.py").read_text()
PROMPTS = [SOURCE[i : i + 400] for i in range(0, 4000, 500)]


def tokens(**config) -> list[list[int]]:
    llm = LLM(DEMO, gpu_memory_utilization=0.3, **config)
    params = [SamplingParams(temperature=0, max_tokens=48),
              SamplingParams(temperature=0.7, seed=1, max_tokens=48)] * (len(PROMPTS) // 2)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
     "prompt_lookup_min": 2},
    {"model": DEMO_DRAFT, "num_speculative_tokens": 3},
], ids=["ngram", "draft_model"])
def test_speculation_on_the_gpu_gives_the_tokens_of_plain_decoding(spec):
    assert tokens(speculative_config=spec) == tokens(overlap_scheduling=False)
