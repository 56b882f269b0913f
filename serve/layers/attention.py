"""Attention over one request's contiguous KV cache, with PyTorch's scaled_dot_product_attention."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serve.engine.kv_cache import ContiguousKVCache


@dataclass
class AttentionMetadata:
    """What every attention layer needs to know about this step; built once per step."""

    kv_cache: ContiguousKVCache
    start_pos: int  # how many tokens of this request are already in the cache
    num_tokens: int  # how many new tokens this step feeds (the prompt, or 1 when decoding)
    mask: torch.Tensor | None  # [num_tokens, end_pos], True where a query may see a key

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens

    @classmethod
    # --8<-- [start:mask]
    def for_step(
        cls, kv_cache: ContiguousKVCache, start_pos: int, num_tokens: int, device: torch.device
    ) -> "AttentionMetadata":
        """New token i sits at position start+i and may see cached positions 0..start+i."""
        mask = None  # a single new token sees the whole cache
        if num_tokens > 1:
            query_pos = torch.arange(start_pos, start_pos + num_tokens, device=device)
            key_pos = torch.arange(start_pos + num_tokens, device=device)
            mask = key_pos[None, :] <= query_pos[:, None]
        return cls(kv_cache, start_pos, num_tokens, mask)
    # --8<-- [end:mask]


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5

    # --8<-- [start:attention]
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        start, end = meta.start_pos, meta.end_pos
        k_cache, v_cache = meta.kv_cache.k[self.layer_idx], meta.kv_cache.v[self.layer_idx]
        k_cache[start:end] = k
        v_cache[start:end] = v
        # SDPA wants [heads, tokens, head_dim]; enable_gqa lets several q heads share one kv head.
        q, keys, values = (t.transpose(0, 1) for t in (q, k_cache[:end], v_cache[:end]))
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=meta.mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(0, 1)  # [num_tokens, num_heads, head_dim]
    # --8<-- [end:attention]
