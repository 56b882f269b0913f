"""On a GPU: the whole engine gives the same greedy tokens with either attention backend.

Skipped without CUDA and FlashInfer; run on the H100 with `pytest -m gpu`.
"""

import pytest
import torch

from serve import LLM, SamplingParams
from serve.demo_model import build_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = ["def main():", "import os\nimport sys\n", "class A(object):\n    def",
           "for i in range(10):\n    print(i)\n" * 20]


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory, tokenizer) -> str:
    """A small Qwen3 whose head_dim FlashInfer supports (64), with decisive random logits."""
    pytest.importorskip("flashinfer")
    return str(build_model_dir(
        tmp_path_factory.mktemp("gpu-qwen3"), "qwen3", tokenizer, hidden_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
        num_hidden_layers=4,
    ))


@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_tokens_agree_between_backends(gpu_model_dir, page_size):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "flashinfer"):
        llm = LLM(gpu_model_dir, dtype="bfloat16", attention_backend=backend,
                  page_size=page_size, num_pages=4096)
        assert llm.engine.runner.backend.name == backend
        outputs[backend] = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        del llm
    assert outputs["torch"] == outputs["flashinfer"]


def test_auto_picks_flashinfer_on_cuda(gpu_model_dir):
    llm = LLM(gpu_model_dir, dtype="bfloat16", num_pages=256)
    assert llm.engine.runner.backend.name == "flashinfer"
