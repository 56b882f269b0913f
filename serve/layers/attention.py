"""The attention layer: hands q, k, v to the step's attention backend, which owns the KV pool."""

import torch
from torch import nn

from serve.attention.metadata import StepMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: StepMetadata
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        return meta.backend.forward(self.layer_idx, q, k, v, meta)
