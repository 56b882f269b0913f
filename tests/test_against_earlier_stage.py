"""Continuous batching generates what stage 2's static batches generated: v0.2's own code,
exported by `make stage-sources` into .stages/, runs in a subprocess on the same tiny model, and
its greedy tokens must equal ours.

Only greedy decoding is compared: stage 3 keys its sampling noise by (seed, position), so that a
preempted request draws the same tokens again, where stage 2 drew from a per-request generator;
a seeded request samples from the same distribution but not the same stream.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve import LLM, SamplingParams

STAGE_2 = Path(__file__).resolve().parent.parent / ".stages" / "v0.2-paged-kv"
PROMPTS = ["def main():", "import os\nimport sys\n\nclass Config(object):", "x",
           "for i in range(10):"]
SCRIPT = """
import json, sys
from serve import LLM, SamplingParams
prompts, model = json.loads(sys.argv[1]), sys.argv[2]
greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
outputs = LLM(model, device="cpu", page_size=4).generate(prompts, greedy, use_tqdm=False)
print(json.dumps([o.token_ids for o in outputs]))
"""


@pytest.mark.skipif(not STAGE_2.is_dir(), reason="run `make stage-sources` to export v0.2")
def test_continuous_batching_matches_stage_2_token_for_token(model_dir):
    env = {**os.environ, "PYTHONPATH": str(STAGE_2)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(PROMPTS), model_dir],
        cwd=STAGE_2, env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    stage_2 = json.loads(result.stdout.strip().splitlines()[-1])
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    # A pool so small that requests are preempted: still the same tokens.
    llm = LLM(model_dir, device="cpu", page_size=4, num_pages=16)
    ours = llm.generate(PROMPTS, greedy, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in ours] == stage_2


STAGE_8 = STAGE_2.parent / "v0.8-tensor-parallel"
STAGE_8_SCRIPT = """
import json, sys
from serve import LLM, SamplingParams
prompts, model, params, configs = (json.loads(a) for a in sys.argv[1:])
params = [SamplingParams(**p) for p in params]
outputs = [LLM(model, device="cpu", **config).generate(prompts, params, use_tqdm=False)
           for config in configs]
print(json.dumps([[o.token_ids for o in run] for run in outputs]))
"""


@pytest.mark.skipif(not STAGE_8.is_dir(), reason="run `make stage-sources` to export v0.8")
def test_the_persistent_batch_matches_stage_8_token_for_token(qwen3_dir):
    """Stage 9 changes how a step's inputs are built and where tokens wait between steps, not
    what is computed: greedy and seeded requests give v0.8's tokens, with and without overlap,
    with prompts cut into chunks and requests preempted on the way."""
    params = [{"temperature": 0, "max_tokens": 24, "ignore_eos": True},
              {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 5, "max_tokens": 24,
               "ignore_eos": True}] * 2
    configs = [{"page_size": 4, "num_pages": 24, "max_num_batched_tokens": 16,
                "overlap_scheduling": overlap} for overlap in (False, True)]
    result = subprocess.run(
        [sys.executable, "-c", STAGE_8_SCRIPT, json.dumps(PROMPTS), json.dumps(qwen3_dir),
         json.dumps(params), json.dumps(configs)],
        cwd=STAGE_8, env={**os.environ, "PYTHONPATH": str(STAGE_8)}, capture_output=True,
        text=True, timeout=300, check=True)
    stage_8 = json.loads(result.stdout.strip().splitlines()[-1])
    for config, theirs in zip(configs, stage_8, strict=True):
        llm = LLM(qwen3_dir, device="cpu", **config)
        ours = llm.generate(PROMPTS, [SamplingParams(**p) for p in params], use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
        assert [o.token_ids for o in ours] == theirs
