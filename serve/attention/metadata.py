"""What every attention layer needs to know about one step, built once per step."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serve.attention.base import AttentionBackend
    from serve.engine.kv_pool import KVPool


@dataclass
class StepMetadata:
    """A ragged batch: sequence i feeds new tokens qo_indptr[i]:qo_indptr[i+1] of the flattened
    input, and after this step its KV lives in pages kv_indices[kv_indptr[i]:kv_indptr[i+1]],
    the last of which holds kv_last_page_len[i] tokens. (FlashInfer's names and layout.)"""

    kv_pool: "KVPool"
    backend: "AttentionBackend"
    slots: torch.Tensor  # [num_tokens] pool slot each new token's K/V is written to
    qo_indptr: torch.Tensor  # [num_seqs + 1] int32
    kv_indptr: torch.Tensor  # [num_seqs + 1] int32
    kv_indices: torch.Tensor  # [total pages] int32
    kv_last_page_len: torch.Tensor  # [num_seqs] int32
    query_lens: list[int]  # host copies, so the torch backend never waits on the GPU
    seq_lens: list[int]  # tokens in the KV cache per sequence after this step
    page_tables: list[list[int]]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence feeds exactly one token (FlashInfer has a faster kernel for that)."""
        return all(n == 1 for n in self.query_lens)
