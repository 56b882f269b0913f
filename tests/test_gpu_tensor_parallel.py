"""On two GPUs: tensor parallelism over NCCL gives the tokens of one GPU, but where bf16
rounding (the all-reduce adds the ranks' partial sums in another order) meets a near-tie.

Skipped without two CUDA devices and FlashInfer; run on a two-GPU machine with `pytest -m gpu`.
"""

import pytest
import torch

from serve import LLM, SamplingParams
from tests.test_gpu_prefix_cache import assert_equal_but_at_ties

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

PROMPTS = ["def main():", "x = 1", "for i in range(10):\n    print(i)\n" * 6, "import os"]
PARAMS = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=5, max_tokens=24, ignore_eos=True)] * 2


def test_two_gpus_give_the_tokens_of_one(gpu_model_dir):
    one = LLM(gpu_model_dir, dtype="bfloat16", num_pages=1024, enable_prefix_caching=False)
    theirs = [o.token_ids for o in one.generate(PROMPTS, PARAMS, use_tqdm=False)]
    two = LLM(gpu_model_dir, dtype="bfloat16", num_pages=1024, tensor_parallel_size=2)
    assert two.engine.runner.graphs is not None  # each rank captured its decode graphs
    ours = [o.token_ids for o in two.generate(PROMPTS, PARAMS, use_tqdm=False)]
    two.shutdown()
    assert_equal_but_at_ties(one, gpu_model_dir, PROMPTS, PARAMS, ours, theirs)
