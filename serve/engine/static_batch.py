"""Stage 1's unit of work: a fixed group of requests that prefill together and decode together.

Prompts of different lengths are left-padded to the longest, so every row's last prompt token
sits in the same cache slot and every decode step writes one slot for all rows. Rows that finish
early keep their slot (and their compute) until the whole batch is done.
"""

import torch

from serve.engine.kv_cache import ContiguousKVCache
from serve.engine.request import Request, RequestStatus


class StaticBatch:
    """The requests of one batch, their padding, their KV cache and their sampling generators."""

    def __init__(
        self,
        requests: list[Request],
        kv_cache: ContiguousKVCache,
        generators: list[torch.Generator],
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.requests = requests
        self.max_position = max_model_len - 1
        self.kv_cache = kv_cache
        self.generators = generators
        self.prompt_len = max(r.num_prompt_tokens for r in requests)  # padded length
        pads = [self.prompt_len - r.num_prompt_tokens for r in requests]
        self.pad_lens = torch.tensor(pads, device=device)  # [batch]
        self.num_slots_used = 0  # cache slots written so far, the same for every row
        for request in requests:
            request.status = RequestStatus.RUNNING

    @staticmethod
    def max_slots(requests: list[Request], max_model_len: int) -> int:
        """Cache slots the batch can need: the longest prompt plus the most new tokens any row
        may still produce (each row is capped by the model's context)."""
        prompt_len = max(r.num_prompt_tokens for r in requests)
        new_tokens = max(
            min(r.params.max_tokens or max_model_len, max_model_len - r.num_prompt_tokens)
            for r in requests
        )
        return prompt_len + new_tokens

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def is_prefilled(self) -> bool:
        return self.num_slots_used > 0

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.requests)

    # --8<-- [start:next_inputs]
    def next_inputs(self) -> tuple[list[int], list[int], int]:
        """Token ids and positions for every row of this step (flattened), and the first slot.

        Prefill feeds the left-padded prompts; decode feeds each row's last token. A finished
        row still feeds one: static batching cannot shrink the batch, so the row runs for nothing.
        """
        if not self.is_prefilled:
            ids, positions = [], []
            for request in self.requests:
                pad = self.prompt_len - request.num_prompt_tokens
                ids += [0] * pad + request.prompt_token_ids  # pad id 0: any valid id will do
                positions += [0] * pad + list(range(request.num_prompt_tokens))
            return ids, positions, 0
        slot = self.num_slots_used
        ids = [r.output_token_ids[-1] for r in self.requests]
        # A row's position is its slot minus its padding. A finished row's no longer matters, but
        # it must stay inside the RoPE table: clamp it.
        positions = [min(slot - (self.prompt_len - r.num_prompt_tokens), self.max_position)
                     for r in self.requests]
        return ids, positions, slot
    # --8<-- [end:next_inputs]


class BatchStats:
    """Counts the work static batching wastes: padding in prefill, finished rows in decode."""

    def __init__(self) -> None:
        self.prompt_tokens = 0  # real prompt tokens prefilled
        self.padding_tokens = 0  # pad tokens prefilled alongside them
        self.decode_rows = 0  # rows computed in decode steps
        self.idle_decode_rows = 0  # of those, rows whose request had already finished

    def record_step(self, batch: StaticBatch, was_prefill: bool, idle_rows: int) -> None:
        if was_prefill:
            real = sum(r.num_prompt_tokens for r in batch.requests)
            self.prompt_tokens += real
            self.padding_tokens += batch.prompt_len * batch.size - real
        else:
            self.decode_rows += batch.size
            self.idle_decode_rows += idle_rows

    def as_dict(self) -> dict:
        return dict(vars(self))
