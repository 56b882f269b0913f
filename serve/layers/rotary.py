"""Rotary position embedding (RoPE), with Llama 3's frequency scaling. In torch, rotating q and k
is some thirty small kernels; on a GPU one FlashInfer kernel rotates both in place
(serve/layers/kernels.py)."""

import math

import torch
from torch import nn

from serve.layers import kernels
from serve.layers.norm import RMSNorm, rms_norm, rms_norm_math


def rope_parameters(config) -> dict:
    """The config's RoPE settings as one dict, whichever transformers version wrote it."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)  # transformers 4.x kept scaling apart
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: slow down low frequencies by `factor`, keep high ones, blend in between."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position; cos/sin are computed once for every position up front."""

    def __init__(self, head_dim: int, max_positions: int, params: dict) -> None:
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, llama3)")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (params["rope_theta"] ** exponents)
        if rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, params)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # [max_positions, head_dim]: the two halves share frequencies (rotate-half layout)
        self.register_buffer("cos", torch.cat([freqs, freqs], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([freqs, freqs], -1).sin(), persistent=False)
        # FlashInfer's table: [max_positions, head_dim], cos of each frequency, then its sin
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], -1),
                             persistent=False)

    # --8<-- [start:forward]
    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim], both
        possibly views of the merged qkv output. On a GPU they are rotated in place."""
        if kernels.use_flashinfer(q):
            kernels.flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(
                positions, q.flatten(1), k.flatten(1), q.shape[-1], self.cos_sin_cache,
                is_neox=True)  # "neox": the rotate-half layout, as in rotate_math
            return q, k
        return rope_math(positions, q, k, self.cos, self.sin)

    def norm_and_rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        q_norm: RMSNorm, k_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm every head of q and k (q_norm, k_norm: RMSNorm over head_dim), then rotate:
        on a GPU three kernels, two norms and one rotation of both. (The norms are called as
        functions: an eager step makes this call in every layer, and a module call costs more.)"""
        q = rms_norm(q, q_norm.weight, q_norm.eps)
        return self(positions, q, rms_norm(k, k_norm.weight, k_norm.eps))
    # --8<-- [end:forward]


def rotate_math(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x rotated in float32 (rotate-half layout), rounded back to x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


# --8<-- [start:rope]
def rope_math(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
              sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by each token's position, as new tensors (q and k may be views)."""
    cos = cos_cache[positions].unsqueeze(1)  # [num_tokens, 1, head_dim]: one row per token
    sin = sin_cache[positions].unsqueeze(1)
    return rotate_math(q, cos, sin), rotate_math(k, cos, sin)
# --8<-- [end:rope]


# --8<-- [start:qk_norm_rope]
def qk_norm_rope_math(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      q_weight: torch.Tensor, q_eps: float, k_weight: torch.Tensor, k_eps: float,
                      cos_cache: torch.Tensor, sin_cache: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3: every head of q and k normalized over head_dim, then rotated, as new tensors (the
    reference the GPU's kernels are tested against)."""
    return rope_math(positions, rms_norm_math(q, q_weight, q_eps),
                     rms_norm_math(k, k_weight, k_eps), cos_cache, sin_cache)
# --8<-- [end:qk_norm_rope]
