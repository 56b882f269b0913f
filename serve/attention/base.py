"""The interface every attention backend implements."""

from typing import Protocol

import torch

from serve.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Attention over the paged KV pool. `plan` runs once per step, `forward` once per layer."""

    name: str

    def plan(self, meta: AttentionMetadata) -> None:
        """Prepare anything that depends only on the step's shapes (shared by all layers)."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Store k, v into this layer's cache, then attend: q [num_tokens, heads, dim] -> same.

        kv_cache is the layer's (K pages, V pages), each [num_pages, page_size, kv_heads, dim].
        """
