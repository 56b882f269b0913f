"""The reference backend: gather each sequence's pages into one tensor, then PyTorch's SDPA.

Readable and runs anywhere (CPU and CUDA); one SDPA call per sequence, so it is slow for big
batches on a GPU. The FlashInfer backend reads the pages in place instead.
"""

import torch
import torch.nn.functional as F

from serve.attention.kv_cache import store_kv
from serve.attention.metadata import AttentionMetadata


class TorchAttentionBackend:
    name = "torch"
    supports_cuda_graphs = False  # plan() reads the step's lengths on the host, per sequence

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.sequences: list[tuple[int, int, int, int]] = []

    def plan(self, meta: AttentionMetadata, for_cuda_graph: bool = False) -> None:
        # Per sequence, once per step: (first new token, new tokens, first page, cached tokens).
        query_lens = (meta.qo_indptr[1:] - meta.qo_indptr[:-1]).tolist()
        self.sequences = list(zip(meta.qo_indptr[:-1].tolist(), query_lens,
                                  meta.kv_indptr[:-1].tolist(), meta.seq_lens().tolist(),
                                  strict=True))

    # --8<-- [start:forward]
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> torch.Tensor:
        k_pages, v_pages = kv_cache
        store_kv(k_pages, v_pages, meta.slot_mapping, k, v)
        out = torch.empty_like(q)
        page_size = meta.page_size
        for start, query_len, page_start, seq_len in self.sequences:
            # this sequence's pages, sliced from the step's device tensor (no host copy per layer)
            page_ids = meta.kv_indices[page_start : page_start + -(-seq_len // page_size)]
            # [pages, page_size, kv_heads, dim] -> [seq_len, kv_heads, dim] -> [heads, seq, dim]
            keys = k_pages[page_ids].flatten(0, 1)[:seq_len].transpose(0, 1)
            values = v_pages[page_ids].flatten(0, 1)[:seq_len].transpose(0, 1)
            queries = q[start : start + query_len].transpose(0, 1)
            out[start : start + query_len] = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=_causal(query_len, seq_len, q.device),
                scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
            ).transpose(0, 1)
        return out
    # --8<-- [end:forward]


def _causal(query_len: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """The new tokens are the last query_len of seq_len; new token i sees keys up to its own."""
    if query_len == 1:
        return None
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    return torch.arange(seq_len, device=device)[None, :] <= query_pos
