"""RMSNorm, in float32 like the reference implementation so logits match. In torch it is eight
kernels, each reading and writing the whole activation; on a GPU one FlashInfer kernel does the
residual add and the norm in one pass (serve/layers/kernels.py)."""

import torch
from torch import nn

from serve.layers import kernels


# --8<-- [start:rms_norm]
def rms_norm_math(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension. Normalized in float32 and rounded to x's
    dtype before the weight multiplies it, as the Hugging Face models do."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., dim], rows may be strided (q's heads inside the merged qkv output)."""
    if kernels.use_flashinfer(x):
        return kernels.flashinfer.norm.rmsnorm(x, weight, eps)  # a new tensor
    return rms_norm_math(x, weight, eps)
# --8<-- [end:rms_norm]


# --8<-- [start:add_rms_norm]
def add_rms_norm_math(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add x into the residual stream, then normalize it: returns (normed, new residual)."""
    residual = x + residual
    return rms_norm_math(residual, weight, eps), residual


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm_math; on a GPU in place, one kernel: residual += x, then x = norm(residual).
    The decoder never reads either input again, so overwriting them costs nothing."""
    if kernels.use_flashinfer(x):
        kernels.flashinfer.norm.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual
    return add_rms_norm_math(x, residual, weight, eps)
# --8<-- [end:add_rms_norm]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps)
