"""Stage 0's KV cache: one contiguous block per request, sized for its longest possible length."""

import torch


# --8<-- [start:kv_cache]
class ContiguousKVCache:
    """K and V of every layer for one request: [num_layers, max_len, num_kv_heads, head_dim] each.

    The whole block is reserved when the request starts, even though most of it stays empty for
    most of the request's life. That waste is what the paged KV cache of stage 2 removes.
    """

    def __init__(
        self,
        num_layers: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, max_len, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
# --8<-- [end:kv_cache]

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
