"""The interface every attention backend implements."""

from typing import Protocol

import torch

from serve.attention.metadata import StepMetadata


class AttentionBackend(Protocol):
    """Attention over the paged KV pool. `plan` runs once per step, `forward` once per layer."""

    name: str

    def plan(self, meta: StepMetadata) -> None:
        """Prepare anything that depends only on the step's shapes (shared by all layers)."""

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: StepMetadata
    ) -> torch.Tensor:
        """Store k, v in the pool, then attend: q [num_tokens, heads, dim] -> same shape."""
