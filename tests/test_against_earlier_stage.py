"""Stage 2 generates what stage 1 generated: v0.1's own code, exported by `make stage-sources`
into .stages/, runs in a subprocess on the same tiny model, and its tokens must equal ours."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve import LLM, SamplingParams

STAGE_1 = Path(__file__).resolve().parent.parent / ".stages" / "v0.1-static-batching"
PROMPTS = ["def main():", "import os\nimport sys\n\nclass Config(object):", "x",
           "for i in range(10):"]
SCRIPT = """
import json, sys
from serve import LLM, SamplingParams
prompts, model = json.loads(sys.argv[1]), sys.argv[2]
greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True)
outputs = LLM(model, device="cpu").generate(prompts, [greedy, seeded] * 2, use_tqdm=False)
print(json.dumps([o.token_ids for o in outputs]))
"""


@pytest.mark.skipif(not STAGE_1.is_dir(), reason="run `make stage-sources` to export v0.1")
def test_paged_engine_matches_stage_1_token_for_token(model_dir):
    env = {**os.environ, "PYTHONPATH": str(STAGE_1)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(PROMPTS), model_dir],
        cwd=STAGE_1, env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    stage_1 = json.loads(result.stdout.strip().splitlines()[-1])
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True)
    ours = LLM(model_dir, device="cpu", page_size=4).generate(PROMPTS, [greedy, seeded] * 2,
                                                              use_tqdm=False)
    assert [o.token_ids for o in ours] == stage_1
