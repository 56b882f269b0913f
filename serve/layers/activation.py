"""The SwiGLU activation: silu(gate) * up, reading both halves of one merged projection."""

import torch
import torch.nn.functional as F

from serve.layers import kernels


# --8<-- [start:silu_and_mul]
def silu_and_mul_math(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate_size] -> [num_tokens, intermediate_size]. On a GPU
    one kernel reads each half once and writes the product; no silu(gate) in between."""
    if kernels.use_flashinfer(gate_up):
        return kernels.flashinfer.activation.silu_and_mul(gate_up)
    return silu_and_mul_math(gate_up)
# --8<-- [end:silu_and_mul]
