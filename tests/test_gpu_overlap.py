"""On a GPU: overlap scheduling (step N+1 launched before step N's tokens are read, which reach
it on the device) with FlashInfer and CUDA graphs gives the tokens of one step at a time.

Skipped without CUDA and FlashInfer; run on the GPU machine with `pytest -m gpu`.
"""

import pytest
import torch

from serve import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LONG = "for i in range(10):\n    print(i)\n" * 12
PROMPTS = ["def main():", "x = 1", LONG + "def f():", "import os", LONG + "class A:"] * 4
PARAMS = [SamplingParams(temperature=0, max_tokens=24 + i, ignore_eos=True) for i in range(10)] + \
    [SamplingParams(temperature=0.8, seed=i, max_tokens=30, ignore_eos=True) for i in range(10)]


@pytest.mark.parametrize("budget", [16384, 64])
def test_overlap_changes_no_token_on_the_gpu(gpu_model_dir, budget):
    # ignore_eos: every request ends at max_tokens, which both engines see coming, so both run
    # the same batches step for step (an EOS would give the overlapped one an extra row)
    outputs = {}
    for overlap in (False, True):
        llm = LLM(gpu_model_dir, dtype="bfloat16", num_pages=2048, max_num_seqs=16,
                  max_num_batched_tokens=budget, overlap_scheduling=overlap)
        outputs[overlap] = [o.token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
        assert llm.engine.allocator.num_used_pages == 0
        del llm
        torch.cuda.empty_cache()
    assert outputs[True] == outputs[False]
