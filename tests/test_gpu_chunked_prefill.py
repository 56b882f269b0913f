"""On a GPU: chunked prefill on FlashInfer with CUDA graphs. A mixed step (decodes and a prompt
chunk) runs in two parts, the decode rows replaying their graph; the tokens are those of an
eager engine with the whole prompts in one step, but where bf16 rounding meets a near-tie.

Skipped without CUDA and FlashInfer; run on the GPU machine with `pytest -m gpu`.
"""

import pytest
import torch

from serve import LLM, SamplingParams
from tests.test_gpu_prefix_cache import assert_equal_but_at_ties

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LONG = "for i in range(10):\n    print(i)\n" * 12  # several chunks of 32 tokens
PROMPTS = ["def main():", "x = 1", LONG + "def f():", "import os", LONG + "class A:"]
PARAMS = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True)] * 2
PARAMS.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))


def test_mixed_steps_replay_their_decode_graph_and_change_no_token(gpu_model_dir):
    eager = LLM(gpu_model_dir, dtype="bfloat16", enforce_eager=True, num_pages=1024,
                max_num_batched_tokens=16384, enable_prefix_caching=False)
    chunked = LLM(gpu_model_dir, dtype="bfloat16", num_pages=1024, max_num_seqs=8,
                  max_num_batched_tokens=32)
    runner = chunked.engine.runner
    replays, split_steps = [], []
    replay, split = runner.graphs.replay, runner.split_for_graphs

    def counting_split(inputs):
        parts = split(inputs)
        split_steps.append(len(parts) == 2)
        return parts

    def counting_replay(inputs):
        replays.append(inputs.num_tokens)
        return replay(inputs)

    runner.split_for_graphs, runner.graphs.replay = counting_split, counting_replay
    theirs = [o.token_ids for o in eager.generate(PROMPTS, PARAMS, use_tqdm=False)]
    ours = [o.token_ids for o in chunked.generate(PROMPTS, PARAMS, use_tqdm=False)]
    assert any(split_steps), "no step mixed decodes with a prompt chunk"
    assert len(replays) >= sum(split_steps)  # every split step replayed its decode part
    assert_equal_but_at_ties(eager, gpu_model_dir, PROMPTS, PARAMS, ours, theirs)
