"""Stage 2's unit of work: a fixed group of requests that prefill together and decode together.

Nothing is padded any more. The batch is ragged: each step feeds every running request's new
tokens back to back, and each request's KV lives in the pages of its own PageTable. A request
that finishes gives its pages back at once and drops out of the next step; but new requests
still wait until the whole batch is done (stage 3 changes that).
"""

from dataclasses import dataclass

import torch

from serve.engine.page_allocator import PageTable
from serve.engine.request import Request, RequestStatus


@dataclass
class Row:
    """One request's part of one step: which tokens it feeds, from which position."""

    request: Request
    page_table: PageTable
    generator: torch.Generator
    token_ids: list[int]  # new tokens: the whole prompt, or the last sampled token
    start_pos: int  # position of token_ids[0]

    @property
    def seq_len(self) -> int:
        """Tokens in this request's KV cache once the step has run."""
        return self.start_pos + len(self.token_ids)


class StaticBatch:
    """The requests of one batch, with their page tables and sampling generators."""

    def __init__(
        self,
        requests: list[Request],
        page_tables: list[PageTable],
        generators: list[torch.Generator],
    ) -> None:
        self.requests, self.page_tables, self.generators = requests, page_tables, generators
        self.is_prefilled = False
        for request in requests:
            request.status = RequestStatus.RUNNING

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.requests)

    # --8<-- [start:rows]
    def next_rows(self) -> list[Row]:
        """The rows of this step: every prompt in the first step, then each unfinished request's
        last token. A finished request is simply not there: no padding, no idle rows."""
        rows = []
        for request, table, generator in zip(
            self.requests, self.page_tables, self.generators, strict=True
        ):
            if request.finished:
                continue
            if not self.is_prefilled:
                rows.append(Row(request, table, generator, request.prompt_token_ids, 0))
            else:
                last = request.output_token_ids[-1]
                rows.append(Row(request, table, generator, [last], request.num_tokens - 1))
        self.is_prefilled = True
        return rows
    # --8<-- [end:rows]

    def release_finished(self) -> None:
        """Give back the pages of every finished request (idempotent)."""
        for request, table in zip(self.requests, self.page_tables, strict=True):
            if request.finished:
                table.release()
