"""RMSNorm, computed in float32 like the reference implementation so logits match.

The math lives in a plain function; `fused` turns each entry point into one GPU kernel, so the
residual add and the eight torch ops of the norm read and write the activation once. A fused
function calls the plain math, never another fused function: each must trace as one graph.
"""

import torch
from torch import nn

from serve.layers.fused import fused


# --8<-- [start:rms_norm]
def rms_norm_math(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension. Normalized in float32 and rounded to x's
    dtype before the weight multiplies it, as the Hugging Face models do."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_math(x, weight, eps)
# --8<-- [end:rms_norm]


# --8<-- [start:add_rms_norm]
@fused
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add x into the residual stream, then normalize it: returns (normed, new residual).
    Both are new tensors; the inputs are left as they were."""
    residual = x + residual
    return rms_norm_math(residual, weight, eps), residual
# --8<-- [end:add_rms_norm]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the residual stream, then normalize: returns (normed, new residual)."""
        return add_rms_norm(x, residual, self.weight, self.eps)
