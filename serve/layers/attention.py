"""The attention layer: this layer's slice of the KV pool, and the backend that attends over it."""

import torch
from torch import nn

from serve.attention.base import AttentionBackend
from serve.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    """Has no weights. The model runner binds it to the attention backend and to this layer's
    pages of the KV pool once the pool exists (`bind`)."""

    def __init__(self) -> None:
        super().__init__()
        self.backend: AttentionBackend | None = None
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, backend: AttentionBackend, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.backend, self.kv_cache = backend, kv_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        return self.backend.forward(q, k, v, self.kv_cache, meta)
