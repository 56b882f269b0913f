"""Structured output on the GPU: constrained outputs validate beside unconstrained ones, and
overlap scheduling changes no token (the mask of a step is filled once the step in flight is
read, while the device runs the forward pass)."""

import json

import pytest
import torch

from serve import LLM, SamplingParams
from tests.test_structured_output import DEMO, PROMPTS, SCHEMAS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def outputs(**config) -> list:
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=160,
                             structured_outputs={"json": SCHEMAS[i % len(SCHEMAS)]})
              for i in range(48)]
    params += [SamplingParams(temperature=0.8, seed=i, max_tokens=48, ignore_eos=True)
               for i in range(16)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    llm = LLM(DEMO, num_pages=4096, **config)  # (sized: no probe of what an earlier engine holds)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_constrained_outputs_validate_and_overlap_changes_no_token():
    jsonschema = pytest.importorskip("jsonschema")
    overlapped = outputs(overlap_scheduling=True)
    for i, output in enumerate(overlapped[:48]):
        jsonschema.validate(json.loads(output.text), SCHEMAS[i % len(SCHEMAS)])
    plain = outputs(overlap_scheduling=False)
    assert [o.token_ids for o in overlapped] == [o.token_ids for o in plain]
