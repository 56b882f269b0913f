"""The SwiGLU activation: silu(gate) * up, reading both halves of one merged projection."""

import torch
import torch.nn.functional as F

from serve.layers.fused import fused


# --8<-- [start:silu_and_mul]
@fused
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate_size] -> [num_tokens, intermediate_size]. On a GPU
    one kernel reads each half once and writes the product; no silu(gate) in between."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
# --8<-- [end:silu_and_mul]
