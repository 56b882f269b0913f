"""Stages 0-1's KV cache: one contiguous block per batch, sized for its longest possible row."""

import torch


# --8<-- [start:kv_cache]
class ContiguousKVCache:
    """K and V of every layer for one batch: [num_layers, batch, max_len, kv_heads, head_dim] each.

    The whole block is reserved when the batch starts: every row gets room for the longest prompt
    plus the largest max_tokens in the batch, even a row that will stop after three tokens. That
    waste is what the paged KV cache of stage 2 removes.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
# --8<-- [end:kv_cache]
