"""bench.fused_kernels on a CPU: it imports, builds model-shaped inputs, and calls FlashInfer with
the layouts FlashInfer documents (checked here against a stand-in written from its docstrings)."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench import fused_kernels
from bench.fused_kernels import (
    COMPILED,
    OURS,
    SHAPES,
    as_tuple,
    cos_sin_cache,
    flashinfer_call,
    make_inputs,
    max_abs_diff,
    ours_call,
    to_float32,
)

SMALL = {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 96}


def _rmsnorm(x, weight, eps=1e-6, out=None):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _fused_add_rmsnorm(input, residual, weight, eps=1e-6):
    residual += input  # in place, as FlashInfer's docstring says: residual += input; input = norm
    input.copy_(_rmsnorm(residual, weight, eps))


def _rope_inplace(positions, query, key, head_size, cos_sin_cache, is_neox=True):
    """cos_sin_cache: [max_positions, rotary_dim], cos in the first half, sin in the second."""
    assert is_neox and cos_sin_cache.dtype == torch.float32
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [num_tokens, head_size / 2] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for t in (query, key):
        x = t.view(t.shape[0], -1, head_size).float()
        x1, x2 = x.chunk(2, dim=-1)
        t.view(t.shape[0], -1, head_size).copy_(torch.cat([x1 * cos - x2 * sin,
                                                           x2 * cos + x1 * sin], dim=-1))


FAKE_FLASHINFER = SimpleNamespace(
    norm=SimpleNamespace(rmsnorm=_rmsnorm, fused_add_rmsnorm=_fused_add_rmsnorm),
    activation=SimpleNamespace(silu_and_mul=lambda x: F.silu(x[..., : x.shape[-1] // 2])
                               * x[..., x.shape[-1] // 2:]),
    rope=SimpleNamespace(apply_rope_with_cos_sin_cache_inplace=_rope_inplace),
)


def test_shapes_are_the_models():
    assert SHAPES["qwen3-0.6b"]["hidden"] == 1024 and SHAPES["llama-3.1-8b"]["heads"] == 32


@pytest.mark.parametrize("op", list(OURS))
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_our_variants_match_the_float32_reference_on_cpu(op, num_tokens):
    args = make_inputs(op, SMALL, num_tokens, "cpu")
    reference = as_tuple(OURS[op](*to_float32(args)))
    for fn in (COMPILED[op], OURS[op]):  # fused is the plain function on a CPU
        outputs = ours_call(fn, args)()
        assert [o.shape for o in outputs] == [r.shape for r in reference]
        assert max_abs_diff(outputs, reference) < 0.1  # bf16 roundings of values of about 1-4


def test_rope_inputs_are_views_of_one_merged_projection():
    positions, q, k, cos, sin = make_inputs("rope", SMALL, 5, "cpu")
    assert q.shape == (5, 4, 16) and k.shape == (5, 2, 16)
    assert not q.is_contiguous() and q.stride(0) == (4 + 2 + 2) * 16
    assert cos.dtype == torch.float32 and positions.dtype == torch.int64


def test_cos_sin_cache_is_flashinfers_layout():
    _, _, _, cos, sin = make_inputs("rope", SMALL, 1, "cpu")
    cache = cos_sin_cache(cos, sin)
    assert cache.shape == cos.shape and cache.is_contiguous()
    assert torch.equal(cache[:, :8], cos[:, :8]) and torch.equal(cache[:, 8:], sin[:, :8])


@pytest.mark.parametrize("op", list(OURS))
def test_flashinfer_calls_agree_with_ours_given_its_documented_semantics(op):
    args = make_inputs(op, SMALL, 7, "cpu")
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    ours = as_tuple(OURS[op](*args))
    call = flashinfer_call(op, FAKE_FLASHINFER, args)
    assert max_abs_diff(call(), ours) < 0.1
    for a, b in zip(args, before, strict=True):  # in-place kernels work on copies
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)


def test_main_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        fused_kernels.main([])


def test_main_writes_one_row_per_case_and_keeps_errors(monkeypatch, tmp_path):
    """The loop and the result file, with the GPU measurement stubbed out."""
    measured = {"graph_us": 1.0, "eager_us": 5.0, "kernels": 1.0, "kernel_names": {"k": 1.0},
                "max_abs_diff": 0.01}

    def fake_case(op, shape, num_tokens, flashinfer, calls, repeats):
        if op == "rope" and num_tokens == 64:
            raise RuntimeError("out of memory")
        return {"eager": measured, "fused": measured, "flashinfer": {"error": "ImportError: x"}}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fused_kernels, "run_case", fake_case)
    monkeypatch.setattr(fused_kernels, "import_flashinfer", lambda: ImportError("no flashinfer"))
    monkeypatch.setattr(fused_kernels, "environment", lambda device: {"device": device})
    out = tmp_path / "fused.json"
    result = fused_kernels.main(["--models", "qwen3-0.6b", "--num-tokens", "1", "64",
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert len(result["rows"]) == len(OURS) * 2
    assert result["flashinfer"] == "error: ImportError: no flashinfer"
    failed = [row for row in result["rows"] if "error" in row["variants"]]
    assert [(row["op"], row["num_tokens"]) for row in failed] == [("rope", 64)]
