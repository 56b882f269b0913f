"""What every attention layer needs to know about one step, built once per step."""

from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serve.attention.base import AttentionBackend
    from serve.engine.kv_pool import KVPool


# --8<-- [start:metadata]
@dataclass
class StepMetadata:
    """A ragged batch in FlashInfer's layout: sequence i feeds new tokens
    qo_indptr[i]:qo_indptr[i+1] of the flattened input, and after this step its KV lives in pages
    kv_indices[kv_indptr[i]:kv_indptr[i+1]], the last of which holds kv_last_page_len[i] tokens.

    The GPU reads slots, kv_indices and last_token_index; the indptr arrays stay on the host,
    where FlashInfer's planner reads them (a device copy would make it wait for the GPU).
    """

    kv_pool: "KVPool"
    backend: "AttentionBackend"
    slots: torch.Tensor  # [num_tokens] device: pool slot each new token's K/V is written to
    kv_indices: torch.Tensor  # [total pages] device int32: every sequence's pages, in order
    last_token_index: torch.Tensor  # [num_seqs] device: each sequence's last new token
    qo_indptr: torch.Tensor  # [num_seqs + 1] host int32
    kv_indptr: torch.Tensor  # [num_seqs + 1] host int32
    kv_last_page_len: torch.Tensor  # [num_seqs] host int32
    query_lens: list[int]  # new tokens per sequence
    seq_lens: list[int]  # tokens in the KV cache per sequence after this step
    page_tables: list[list[int]]  # the pages each sequence uses after this step

    @classmethod
    def build(
        cls,
        kv_pool: "KVPool",
        backend: "AttentionBackend",
        page_tables: list[list[int]],
        query_lens: list[int],
        seq_lens: list[int],
    ) -> "StepMetadata":
        """From each sequence's pages and lengths; the new tokens are each sequence's last."""
        device, page_size = kv_pool.k.device, kv_pool.page_size
        slots = [
            pages[pos // page_size] * page_size + pos % page_size  # page, then offset in it
            for pages, query_len, seq_len in zip(page_tables, query_lens, seq_lens, strict=True)
            for pos in range(seq_len - query_len, seq_len)
        ]
        qo_indptr = [0, *accumulate(query_lens)]

        def host(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32)

        return cls(
            kv_pool=kv_pool, backend=backend,
            slots=torch.tensor(slots, device=device),
            kv_indices=torch.tensor([p for pages in page_tables for p in pages],
                                    dtype=torch.int32, device=device),
            last_token_index=torch.tensor(qo_indptr[1:], device=device) - 1,
            qo_indptr=host(qo_indptr),
            kv_indptr=host([0, *accumulate(len(pages) for pages in page_tables)]),
            kv_last_page_len=host([(n - 1) % page_size + 1 for n in seq_lens]),
            query_lens=query_lens, seq_lens=seq_lens, page_tables=page_tables,
        )
    # --8<-- [end:metadata]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence feeds exactly one token (FlashInfer has a faster kernel for that)."""
        return all(n == 1 for n in self.query_lens)
