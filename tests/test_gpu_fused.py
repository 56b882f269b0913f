"""On a GPU: every fused layer function gives what its plain torch math gives, and FlashInfer's
kernels for the same ops agree with ours.

The reference is the same function run on the CPU in float32 on the same bf16 data, so the only
differences are bf16 roundings: of the output (half a unit in the last place, 2**-9 relative) and,
in the norms and the rope, of an intermediate the compiled kernel may keep in float32 instead.
Values here are at most about 5, so 0.05 absolute is a few roundings; a wrong rotation, a wrong
half or a missing weight is off by about 1. Skipped without CUDA; run with `pytest -m gpu`.
"""

import pytest
import torch

from bench.fused_kernels import cos_sin_cache
from serve.layers.activation import silu_and_mul
from serve.layers.norm import add_rms_norm, rms_norm
from serve.layers.rotary import RotaryEmbedding, qk_norm_rope, rope

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NUM_TOKENS = [1, 2, 37, 256]
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 16, 8, 128, 1024, 3072  # Qwen3-0.6B
EPS = 1e-6
TOL = {"atol": 5e-2, "rtol": 2e-2}


def randn(*size: int, seed: int) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed)).to("cuda",
                                                                                torch.bfloat16)


def qkv_views(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the model passes them: views into one merged qkv projection."""
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    qkv = randn(num_tokens, q_size + 2 * kv_size, seed=num_tokens)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(num_tokens, HEADS, HEAD_DIM), k.view(num_tokens, KV_HEADS, HEAD_DIM)


def rope_args(num_tokens: int) -> tuple:
    rotary = RotaryEmbedding(HEAD_DIM, 4096, {"rope_type": "default", "rope_theta": 1e6}).cuda()
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda")
    return positions, *qkv_views(num_tokens), rotary.cos, rotary.sin


def check_against_cpu_float32(fn, *args) -> tuple:
    """fn on CUDA vs fn's plain math on the CPU in float32; inputs must come back untouched."""
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got = fn(*args)
    got = got if isinstance(got, tuple) else (got,)
    cpu = [a.cpu().float() if isinstance(a, torch.Tensor) and a.is_floating_point()
           else a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    expected = fn.__wrapped__(*cpu)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for g, e in zip(got, expected, strict=True):
        assert g.is_cuda and g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float().cpu(), e, **TOL)
    for a, b in zip(args, before, strict=True):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b), "an input was modified"
    return got


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm(num_tokens):
    weight = 1 + 0.1 * randn(HIDDEN, seed=1)
    check_against_cpu_float32(rms_norm, randn(num_tokens, HIDDEN, seed=num_tokens), weight, EPS)
    view = randn(num_tokens, 2 * HIDDEN, seed=num_tokens)[:, HIDDEN:]  # rows with gaps between
    check_against_cpu_float32(rms_norm, view, weight, EPS)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_add_rms_norm(num_tokens):
    x, residual = randn(num_tokens, HIDDEN, seed=num_tokens), randn(num_tokens, HIDDEN, seed=2)
    check_against_cpu_float32(add_rms_norm, x, residual, 1 + 0.1 * randn(HIDDEN, seed=1), EPS)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rope(num_tokens):
    check_against_cpu_float32(rope, *rope_args(num_tokens))


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_qk_norm_rope(num_tokens):
    positions, q, k, cos, sin = rope_args(num_tokens)
    q_weight, k_weight = 1 + 0.1 * randn(HEAD_DIM, seed=3), 1 + 0.1 * randn(HEAD_DIM, seed=4)
    check_against_cpu_float32(qk_norm_rope, positions, q, k, q_weight, EPS, k_weight, EPS, cos, sin)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul(num_tokens):
    check_against_cpu_float32(silu_and_mul, randn(num_tokens, 2 * INTERMEDIATE, seed=num_tokens))
    merged = randn(num_tokens, 3 * INTERMEDIATE, seed=5)[:, INTERMEDIATE:]  # a view with gaps
    check_against_cpu_float32(silu_and_mul, merged)


def test_new_batch_sizes_do_not_recompile(monkeypatch):
    """dynamic=True: one graph for one token, one for every other count."""
    weight = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    for num_tokens in (1, 37):
        rms_norm(randn(num_tokens, HIDDEN, seed=0), weight, EPS)
        rope(*rope_args(num_tokens))
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for num_tokens in (2, 256, 2048):
        rms_norm(randn(num_tokens, HIDDEN, seed=0), weight, EPS)
        rope(*rope_args(num_tokens))


# FlashInfer computes the norm's output as float32 x / rms * weight rounded once; ours rounds the
# normalized x to bf16 before the bf16 weight multiplies it (as Hugging Face does). The two agree
# to a few bf16 roundings, which is what we check.
@pytest.mark.parametrize("num_tokens", [1, 37, 256])
def test_flashinfer_norms_and_activation_agree_with_ours(num_tokens):
    flashinfer = pytest.importorskip("flashinfer")  # imports its norm, activation, rope modules

    x, residual = randn(num_tokens, HIDDEN, seed=num_tokens), randn(num_tokens, HIDDEN, seed=2)
    weight = 1 + 0.1 * randn(HIDDEN, seed=1)
    torch.testing.assert_close(flashinfer.norm.rmsnorm(x, weight, EPS), rms_norm(x, weight, EPS),
                               **TOL)
    normed, new_residual = add_rms_norm(x, residual, weight, EPS)
    x_inplace, residual_inplace = x.clone(), residual.clone()
    flashinfer.norm.fused_add_rmsnorm(x_inplace, residual_inplace, weight, EPS)
    torch.testing.assert_close(residual_inplace, new_residual, **TOL)
    torch.testing.assert_close(x_inplace, normed, **TOL)
    gate_up = randn(num_tokens, 2 * INTERMEDIATE, seed=num_tokens)
    torch.testing.assert_close(flashinfer.activation.silu_and_mul(gate_up), silu_and_mul(gate_up),
                               **TOL)


@pytest.mark.parametrize("num_tokens", [1, 37])
def test_flashinfer_rope_with_our_tables_agrees_with_ours(num_tokens):
    """bench.fused_kernels hands FlashInfer our cos/sin tables as its cos_sin_cache."""
    flashinfer = pytest.importorskip("flashinfer")

    positions, q, k, cos, sin = rope_args(num_tokens)
    q_ours, k_ours = rope(positions, q, k, cos, sin)
    q_fi, k_fi = q.contiguous(), k.contiguous()
    flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(
        positions, q_fi, k_fi, HEAD_DIM, cos_sin_cache(cos, sin), is_neox=True)
    torch.testing.assert_close(q_fi, q_ours, **TOL)
    torch.testing.assert_close(k_fi, k_ours, **TOL)
