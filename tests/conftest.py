"""Shared fixtures: one small tokenizer and one tiny random model directory per architecture.

Everything is built once per test session from this machine's Python standard library, so no
test downloads anything. The directories look exactly like Hugging Face checkpoints; each fixture
gives its path as a str, the type EngineConfig.model takes.
"""

import pytest

from bench.demo.random_model import build_model_dir
from bench.demo.tokenizer import corpus_from_stdlib, train_tokenizer

ARCHS = ("qwen3", "qwen2", "llama")
TEST_VOCAB_SIZE = 512
TEST_CORPUS_BYTES = 300_000  # enough for 512 tokens' worth of merges; trains in well under 1 s


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE with ChatML special tokens and a chat template (vocab 512)."""
    return train_tokenizer(corpus_from_stdlib(TEST_CORPUS_BYTES), TEST_VOCAB_SIZE)


def _model_dir(tmp_path_factory: pytest.TempPathFactory, arch: str, tokenizer) -> str:
    return str(build_model_dir(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, tokenizer))


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, tokenizer) -> str:
    """Tiny random Qwen3 (q/k norms, tied embeddings), float32, with the test tokenizer."""
    return _model_dir(tmp_path_factory, "qwen3", tokenizer)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, tokenizer) -> str:
    """Tiny random Qwen2 (q/k/v biases, tied embeddings, no head_dim key), float32."""
    return _model_dir(tmp_path_factory, "qwen2", tokenizer)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> str:
    """Tiny random Llama (llama3 RoPE scaling, separate lm_head), float32."""
    return _model_dir(tmp_path_factory, "llama", tokenizer)


@pytest.fixture(params=ARCHS, ids=ARCHS)
def model_dir(request) -> str:
    """Each of the tiny model directories in turn (test ids: qwen3, qwen2, llama)."""
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.fixture(scope="session")
def gpu_model_dir(tmp_path_factory, tokenizer) -> str:
    """A small Qwen3 whose head_dim FlashInfer supports (64), with decisive random logits, for
    the GPU tests (skipped where flashinfer is not installed)."""
    pytest.importorskip("flashinfer")
    return str(build_model_dir(
        tmp_path_factory.mktemp("gpu-qwen3"), "qwen3", tokenizer, hidden_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
        num_hidden_layers=4,
    ))
