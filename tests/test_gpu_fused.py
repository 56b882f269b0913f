"""On a GPU: each layer's FlashInfer kernel gives what the layer's torch code gives.

The reference is the torch code run on the CPU in float32 on the same bf16 data, so the only
differences are bf16 roundings: of the output (half a unit in the last place, 2**-9 relative) and
of intermediates the kernel keeps in float32. Values here are at most about 5, so 0.05 absolute
is a few roundings; a wrong rotation, a wrong half or a missing weight is off by about 1.
Skipped without CUDA and FlashInfer; run with `pytest -m gpu`.
"""

import pytest
import torch

from serve.layers import kernels
from serve.layers.activation import silu_and_mul, silu_and_mul_math
from serve.layers.norm import RMSNorm, add_rms_norm, add_rms_norm_math, rms_norm, rms_norm_math
from serve.layers.rotary import RotaryEmbedding, qk_norm_rope_math, rope_math

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(kernels.flashinfer is None, reason="needs flashinfer"),
]

NUM_TOKENS = [1, 2, 37, 256]
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 16, 8, 128, 1024, 3072  # Qwen3-0.6B
EPS = 1e-6
TOL = {"atol": 5e-2, "rtol": 2e-2}


def randn(*size: int, seed: int) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed)).to("cuda",
                                                                                torch.bfloat16)


def on_cpu_float32(args) -> list:
    return [a.detach().cpu().float() if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a.cpu() if isinstance(a, torch.Tensor) else a for a in args]


def check(got, reference_fn, *args) -> None:
    """got (from the GPU path, called on args before this) vs reference_fn on the CPU."""
    got = got if isinstance(got, tuple) else (got,)
    expected = reference_fn(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for g, e in zip(got, expected, strict=True):
        assert g.is_cuda and g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float().cpu(), e, **TOL)


def qkv_views(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the model passes them: views into one merged qkv projection."""
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    qkv = randn(num_tokens, q_size + 2 * kv_size, seed=num_tokens)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(num_tokens, HEADS, HEAD_DIM), k.view(num_tokens, KV_HEADS, HEAD_DIM)


def rotary() -> RotaryEmbedding:
    return RotaryEmbedding(HEAD_DIM, 4096, {"rope_type": "default", "rope_theta": 1e6}).cuda()


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm(num_tokens):
    weight = 1 + 0.1 * randn(HIDDEN, seed=1)
    x = randn(num_tokens, HIDDEN, seed=num_tokens)
    check(rms_norm(x, weight, EPS), rms_norm_math, *on_cpu_float32([x, weight, EPS]))
    view = randn(num_tokens, 2 * HIDDEN, seed=num_tokens)[:, HIDDEN:]  # rows with gaps between
    check(rms_norm(view, weight, EPS), rms_norm_math, *on_cpu_float32([view, weight, EPS]))
    q, _ = qkv_views(num_tokens)  # Qwen3's per-head norm: 3-D, strided rows
    head_weight = 1 + 0.1 * randn(HEAD_DIM, seed=3)
    check(rms_norm(q, head_weight, EPS), rms_norm_math, *on_cpu_float32([q, head_weight, EPS]))


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_add_rms_norm_in_place(num_tokens):
    x, residual = randn(num_tokens, HIDDEN, seed=num_tokens), randn(num_tokens, HIDDEN, seed=2)
    weight = 1 + 0.1 * randn(HIDDEN, seed=1)
    reference_args = on_cpu_float32([x, residual, weight, EPS])
    normed, new_residual = add_rms_norm(x, residual, weight, EPS)
    assert normed.data_ptr() == x.data_ptr() and new_residual.data_ptr() == residual.data_ptr()
    check((normed, new_residual), add_rms_norm_math, *reference_args)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rope_rotates_the_qkv_views_in_place(num_tokens):
    rope = rotary()
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda")
    q, k = qkv_views(num_tokens)
    reference_args = on_cpu_float32([positions, q, k, rope.cos, rope.sin])
    q_out, k_out = rope(positions, q, k)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    check((q_out, k_out), rope_math, *reference_args)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_qk_norm_and_rope(num_tokens):
    rope = rotary()
    q_norm, k_norm = RMSNorm(HEAD_DIM, EPS).cuda(), RMSNorm(HEAD_DIM, EPS).cuda()
    with torch.no_grad():
        q_norm.weight.copy_(1 + 0.1 * randn(HEAD_DIM, seed=3))
        k_norm.weight.copy_(1 + 0.1 * randn(HEAD_DIM, seed=4))
    q_norm, k_norm = q_norm.to(torch.bfloat16), k_norm.to(torch.bfloat16)
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda")
    q, k = qkv_views(num_tokens)
    reference_args = on_cpu_float32([positions, q, k, q_norm.weight, EPS, k_norm.weight, EPS,
                                     rope.cos, rope.sin])
    with torch.no_grad():
        got = rope.norm_and_rotate(positions, q, k, q_norm, k_norm)
    check(got, qk_norm_rope_math, *reference_args)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul(num_tokens):
    gate_up = randn(num_tokens, 2 * INTERMEDIATE, seed=num_tokens)
    check(silu_and_mul(gate_up), silu_and_mul_math, *on_cpu_float32([gate_up]))


def test_float32_on_cuda_runs_the_torch_code():
    x = torch.randn(4, HIDDEN, device="cuda")
    assert not kernels.use_flashinfer(x)
    torch.testing.assert_close(rms_norm(x, torch.ones(HIDDEN, device="cuda"), EPS),
                               rms_norm_math(x, torch.ones(HIDDEN, device="cuda"), EPS))
