"""The interface every attention backend implements."""

from typing import Protocol

import torch

from serve.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Attention over the paged KV pool. `plan` runs once per step, `forward` once per layer."""

    name: str
    supports_cuda_graphs: bool  # whether a decode step's forward can be captured and replayed

    def plan(self, meta: AttentionMetadata, for_cuda_graph: bool = False) -> None:
        """Prepare anything that depends only on the step's shapes (shared by all layers).
        for_cuda_graph: plan the decode wrapper a captured graph of meta.num_seqs rows reads."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> torch.Tensor:
        """Store k, v into this layer's cache, then attend: q [num_tokens, heads, dim] -> same.
        kv_cache is the layer's (K pages, V pages), each [num_pages, page_size, kv_heads, dim]."""
