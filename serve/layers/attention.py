"""Attention over a batch's contiguous, left-padded KV cache, with PyTorch's SDPA."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serve.engine.kv_cache import ContiguousKVCache


@dataclass
class AttentionMetadata:
    """What every attention layer needs to know about this step; built once per step.

    Every row of the batch feeds the same number of new tokens into the same cache slots
    [start_slot, start_slot + num_tokens): prompts are left-padded so that they all end at the
    same slot, and from then on each decode step adds one slot to every row.
    """

    kv_cache: ContiguousKVCache
    start_slot: int  # first cache slot this step writes
    num_tokens: int  # new tokens per row: the padded prompt length, or 1 when decoding
    mask: torch.Tensor  # [batch, 1, num_tokens, end_slot], True where a query may see a key

    @property
    def end_slot(self) -> int:
        return self.start_slot + self.num_tokens

    # --8<-- [start:mask]
    @classmethod
    def for_step(
        cls, kv_cache: ContiguousKVCache, start_slot: int, num_tokens: int,
        pad_lens: torch.Tensor,
    ) -> "AttentionMetadata":
        """A query in slot q of row b may see keys in slots pad_lens[b] .. q (causal, no pads).

        A padding query would see no key at all, and a softmax over nothing is NaN; so it may
        also see itself. Its output is garbage nobody reads, but finite.
        """
        device = pad_lens.device
        query_slot = torch.arange(start_slot, start_slot + num_tokens, device=device)[:, None]
        key_slot = torch.arange(start_slot + num_tokens, device=device)[None, :]
        causal = key_slot <= query_slot  # [num_tokens, end_slot]
        not_pad = key_slot[None] >= pad_lens[:, None, None]  # [batch, 1, end_slot]
        mask = (causal[None] & not_pad) | (key_slot == query_slot)[None]
        return cls(kv_cache, start_slot, num_tokens, mask.unsqueeze(1))
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
        # q: [batch * num_tokens, num_heads, head_dim]; k, v: [batch * num_tokens, kv_heads, ...]
        start, end, n = meta.start_slot, meta.end_slot, meta.num_tokens
        k_cache, v_cache = meta.kv_cache.k[self.layer_idx], meta.kv_cache.v[self.layer_idx]
        batch = k_cache.shape[0]
        k_cache[:, start:end] = k.view(batch, n, self.num_kv_heads, self.head_dim)
        v_cache[:, start:end] = v.view(batch, n, self.num_kv_heads, self.head_dim)
        # SDPA wants [batch, heads, tokens, head_dim]; enable_gqa lets q heads share a kv head.
        q = q.view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)
        keys, values = k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=meta.mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(1, 2).reshape(batch * n, self.num_heads, self.head_dim)
    # --8<-- [end:attention]
