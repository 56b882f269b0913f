"""A scheduled step as the runner's inputs: one pass over its requests, then numpy gathers
from the persistent batch (serve/core/batch.py), and the bookkeeping that moves each request on
by the step."""

from dataclasses import dataclass

import numpy as np
import torch

from serve.core.batch import PersistentBatch
from serve.core.kv.page_allocator import PageAllocator
from serve.core.request import Request
from serve.core.scheduler import ScheduledRequest
from serve.core.step_inputs import StepInputs, gather_step_inputs, sampled_offsets

PENDING = -1  # an output token sampled by a step in flight, not yet seen by the host
NO_DRAFTS: list[int] = []  # (never written to: shared by every row without drafts)


@dataclass
class PreparedStep:
    """A step's inputs, and what the engine needs to read its tokens back."""

    inputs: StepInputs
    rows: list[tuple[Request, int]]  # per sampled request: (request, index of its PENDING mark)
    drafts: list[list[int]] | None  # per sampled request, the drafts it checks; None: none does
    # the sampled rows a grammar constrains: (row, request, the drafts before it in its row)
    grammar_rows: list[tuple[int, Request, list[int]]]
    # requests whose prompt log-probabilities the step computes, and how many, in row order
    prompt_rows: list[tuple[Request, int]]


# --8<-- [start:step_inputs]
def prepare_step(scheduled: list[ScheduledRequest], batch: PersistentBatch,
                 allocator: PageAllocator) -> PreparedStep:
    """The step's arrays from the persistent batch, and which request each sampled row
    belongs to. One pass over the scheduled requests reads what changes every step (slot,
    progress, tokens the host must send) and moves each request on by the step (its computed
    tokens, a PENDING mark for the token it samples); numpy indexing does the rest. A request
    just admitted writes its sampling rules into its slot first."""
    num_rows = len(scheduled)
    slots = np.empty(num_rows, dtype=np.int64)
    query_lens = np.empty(num_rows, dtype=np.int64)
    computed = np.empty(num_rows, dtype=np.int64)
    num_sampled = np.zeros(num_rows, dtype=np.int64)
    read = np.zeros(num_rows, dtype=np.bool_)
    host_tokens, rows, drafts, grammar_rows = [], [], [], []
    prompt_rows, prompt_targets, prompt_indices = [], [], []
    num_sampled_rows = num_token_rows = 0
    for i, item in enumerate(scheduled):
        request, num_new = item.request, item.num_new_tokens
        slot = slots[i] = request.page_table.row
        if item.admitted:
            batch.admit(slot, request.params, request.sampling_seed)
            if request.params.penalized:
                batch.admit_history(slot, request.prompt_token_ids, request.output_token_ids)
        if request.prompt_logprobs is not None:  # (not yet reported: see Request)
            _prompt_logprob_rows(request, num_new, num_token_rows, prompt_rows,
                                 prompt_indices, prompt_targets)
        num_token_rows += num_new
        query_lens[i] = num_new
        start = computed[i] = request.num_computed_tokens
        if request.token_in_slot:  # a decode row: its token waits in its slot on the device
            read[i] = True
            host_tokens.append(0)
        else:
            host_tokens.extend(request.token_ids_between(start, start + num_new))
        request.num_computed_tokens = start + num_new
        if item.completes:
            request.output_token_ids.append(PENDING)
            rows.append((request, len(request.output_token_ids) - 1))
            num_drafts = item.num_drafts
            if num_drafts:  # a verify row: its drafts follow its token, every position samples
                row_drafts = request.draft_token_ids
                host_tokens.extend(row_drafts)
                request.draft_token_ids = []
                # which of its samples is its next token only the host knows, after the step
                request.token_in_slot = False
            else:
                row_drafts = NO_DRAFTS
                request.token_in_slot = True  # the step leaves it in the request's slot
            num_sampled[i] = 1 + num_drafts
            drafts.append(row_drafts)
            if request.grammar is not None:  # each sampled position after its drafts
                grammar_rows += [(num_sampled_rows + j, request, row_drafts[:j])
                                 for j in range(1 + num_drafts)]
            num_sampled_rows += 1 + num_drafts
    sampled_slots = np.repeat(slots, num_sampled)
    inputs = gather_step_inputs(
        np.array(host_tokens, dtype=np.int64), query_lens, computed,
        allocator.block_table, slots, allocator.page_size, num_sampled,
        batch.sampling(sampled_slots, sampled_offsets(computed + query_lens, num_sampled)))
    read_rows = (np.cumsum(query_lens) - query_lens)[read]  # a read row's first token
    inputs.read_rows, inputs.read_slots = torch.from_numpy(read_rows), torch.from_numpy(slots[read])
    inputs.write_slots = torch.from_numpy(sampled_slots)
    inputs.masked = bool(grammar_rows)
    if prompt_rows:
        inputs.prompt_logprob_rows = torch.from_numpy(np.concatenate(prompt_indices))
        inputs.prompt_logprob_targets = torch.tensor(prompt_targets, dtype=torch.int64)
        inputs.prompt_logprobs_k = max(r.params.prompt_logprobs for r, _ in prompt_rows)
    return PreparedStep(inputs, rows, drafts if len(sampled_slots) > len(rows) else None,
                        grammar_rows, prompt_rows)
# --8<-- [end:step_inputs]


# --8<-- [start:prompt_logprob_rows]
def _prompt_logprob_rows(request: Request, num_new: int, first_row: int,
                         prompt_rows: list, indices: list, targets: list) -> None:
    """The token rows of this step's chunk of a prompt that predict a later prompt token (a
    position's logits predict the next token) and have not been computed before (a request
    preempted mid-prompt recomputes from its start, and skips what it already has)."""
    computed = request.num_computed_tokens
    start = max(computed, request.num_prompt_logprobs)
    end = min(computed + num_new, request.num_prompt_tokens - 1)
    if end > start:
        indices.append(np.arange(start, end) - computed + first_row)
        targets += request.prompt_token_ids[start + 1 : end + 1]
        prompt_rows.append((request, end - start))
        request.num_prompt_logprobs = end
# --8<-- [end:prompt_logprob_rows]
