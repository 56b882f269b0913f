"""What every attention layer needs to know about one step: plain arrays, built once per step."""

from dataclasses import dataclass

import torch


# --8<-- [start:metadata]
@dataclass
class AttentionMetadata:
    """A ragged batch in FlashInfer's layout (CSR: an indptr array marks where each sequence's
    part of a flat array starts). Sequence i feeds new tokens qo_indptr[i]:qo_indptr[i+1] of the
    flattened input, and after this step its KV lives in pages
    kv_indices[kv_indptr[i]:kv_indptr[i+1]], the last of which holds kv_last_page_len[i] tokens.

    The GPU reads slot_mapping and kv_indices; the indptr arrays stay on the host, where
    FlashInfer's planner reads them (a device copy would make it wait for the GPU).
    """

    slot_mapping: torch.Tensor  # [num_tokens] device int64: pool slot of each new token's K/V
    kv_indices: torch.Tensor  # [total pages] device int32: every sequence's pages, in order
    qo_indptr: torch.Tensor  # [num_seqs + 1] host int32
    kv_indptr: torch.Tensor  # [num_seqs + 1] host int32
    kv_last_page_len: torch.Tensor  # [num_seqs] host int32
    page_size: int
    is_decode: bool  # every sequence feeds exactly one token (a faster kernel exists for that)
# --8<-- [end:metadata]

    @property
    def num_seqs(self) -> int:
        return len(self.kv_last_page_len)

    def seq_lens(self) -> torch.Tensor:
        """[num_seqs] host: tokens in each sequence's cache after this step."""
        num_pages = self.kv_indptr[1:] - self.kv_indptr[:-1]
        return (num_pages - 1) * self.page_size + self.kv_last_page_len
