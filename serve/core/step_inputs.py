"""One step's inputs as plain arrays: built on the host from the scheduled sequences with tensor
ops (no Python loop per token), then copied to the device in one transfer."""

from dataclasses import dataclass, fields, replace
from itertools import chain

import torch

from serve.attention.metadata import AttentionMetadata
from serve.core.sampler import SamplingTensors


@dataclass
class PageRows:
    """Each sequence's pages as a row of a block table (PageAllocator.block_table)."""

    table: torch.Tensor  # [rows, max pages] int32
    rows: torch.Tensor  # [num_seqs] int64: each sequence's row


@dataclass
class StepInputs:
    """What the model runner executes: token ids at positions, where their K/V go, which pages
    each sequence attends over, and which rows are sampled with which rules."""

    token_ids: torch.Tensor  # [num_tokens] int64: every sequence's new tokens, back to back
    positions: torch.Tensor  # [num_tokens] int64
    attention: AttentionMetadata
    sample_indices: torch.Tensor  # [num_sampled] int64: token rows whose logits are sampled
    sampling: SamplingTensors | None  # None: return logits, sample nothing (tests, profiling)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# --8<-- [start:build]
def build_step_inputs(
    new_token_ids: list[list[int]],
    num_computed: list[int],
    page_tables: "list[list[int]] | PageRows",
    page_size: int,
    sampling: SamplingTensors | None = None,
    sampled: list[bool] | None = None,
) -> StepInputs:
    """Sequence i feeds new_token_ids[i], which start at position num_computed[i], and its
    tokens live in page_tables[i] (enough pages for all of them; a list, or a row of a block
    table). The last new token of each sequence with sampled[i] (default: every sequence) is
    sampled; a prefill chunk that stops short of its prompt's end is not. Host tensors only:
    `to_device` moves them."""
    query_lens = torch.tensor([len(ids) for ids in new_token_ids], dtype=torch.int64)
    starts = torch.tensor(num_computed, dtype=torch.int64)
    seq_lens = starts + query_lens
    qo_indptr = _indptr(query_lens)
    num_pages = (seq_lens + page_size - 1) // page_size
    kv_indptr = _indptr(num_pages)
    if isinstance(page_tables, PageRows):  # the block table: no Python loop over pages
        rows = page_tables.table[page_tables.rows, : int(num_pages.max())]
        kv_indices = rows[torch.arange(rows.shape[1]) < num_pages[:, None]]
    else:
        kv_indices = torch.tensor(
            list(chain.from_iterable(pages[:n] for pages, n in zip(
                page_tables, num_pages.tolist(), strict=True))), dtype=torch.int32)
    # Per token: which sequence it belongs to, its position, and the slot its K/V go to.
    num_tokens = int(qo_indptr[-1])
    # (output_size: told the total, repeat_interleave skips a pass over query_lens to find it)
    seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), query_lens,
                                           output_size=num_tokens)
    positions = torch.arange(num_tokens) - qo_indptr[:-1][seq_of_token] + starts[seq_of_token]
    page_of_token = kv_indices[kv_indptr[:-1][seq_of_token] + positions // page_size]
    slot_mapping = page_of_token.to(torch.int64) * page_size + positions % page_size
    attention = AttentionMetadata(
        slot_mapping=slot_mapping,
        kv_indices=kv_indices,
        qo_indptr=qo_indptr.to(torch.int32),
        kv_indptr=kv_indptr.to(torch.int32),
        kv_last_page_len=((seq_lens - 1) % page_size + 1).to(torch.int32),
        page_size=page_size,
        is_decode=bool((query_lens == 1).all()),
    )
    return StepInputs(
        token_ids=torch.tensor(list(chain.from_iterable(new_token_ids)), dtype=torch.int64),
        positions=positions,
        attention=attention,
        sample_indices=(qo_indptr[1:] - 1)[torch.tensor(sampled)] if sampled is not None
        else qo_indptr[1:] - 1,
        sampling=sampling,
    )
# --8<-- [end:build]


# --8<-- [start:split]
def split_step_inputs(inputs: StepInputs, num_seqs: int) -> tuple[StepInputs, StepInputs]:
    """The step's first num_seqs sequences and the others, as two steps (host arrays), so that a
    mixed step's decode rows can replay their CUDA graph while its prompt chunks run eagerly.
    Each part's sampled rows keep their order, and the step's sampling rules go with the first
    part: the logits of the two parts, concatenated, line up with them."""
    total = inputs.attention.num_seqs
    return (_part(inputs, 0, num_seqs, inputs.sampling), _part(inputs, num_seqs, total, None))


def _part(inputs: StepInputs, first: int, last: int,
          sampling: SamplingTensors | None) -> StepInputs:
    """Sequences first..last-1 of a step, their token rows and pages renumbered from 0."""
    meta = inputs.attention
    token_start, token_end = int(meta.qo_indptr[first]), int(meta.qo_indptr[last])
    page_start, page_end = int(meta.kv_indptr[first]), int(meta.kv_indptr[last])
    qo_indptr = meta.qo_indptr[first : last + 1] - token_start
    attention = AttentionMetadata(
        slot_mapping=meta.slot_mapping[token_start:token_end],
        kv_indices=meta.kv_indices[page_start:page_end],
        qo_indptr=qo_indptr,
        kv_indptr=meta.kv_indptr[first : last + 1] - page_start,
        kv_last_page_len=meta.kv_last_page_len[first:last],
        page_size=meta.page_size,
        is_decode=bool((qo_indptr.diff() == 1).all()),
    )
    samples = inputs.sample_indices
    mine = samples[(samples >= token_start) & (samples < token_end)] - token_start
    return StepInputs(inputs.token_ids[token_start:token_end],
                      inputs.positions[token_start:token_end], attention, mine, sampling)
# --8<-- [end:split]


def _indptr(counts: torch.Tensor) -> torch.Tensor:
    """[0, c0, c0+c1, ...]: where each sequence's part of a flat array starts."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


class DeviceStaging:
    """Copies a step's host arrays to the device in one transfer, through a pinned buffer.

    Every array is laid out as bytes in one buffer (each at an 8-byte boundary, so it can be
    viewed back as its own dtype); one non-blocking copy moves the whole buffer, and the device
    arrays are views into the copy. The pinned buffer is reused, so before it is written again
    the host waits for the last copy out of it to have run: with overlap scheduling the next
    step's inputs are built while the device may still be behind (a step in two parts uses two
    stagings, so the second never waits for the first).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = torch.empty(0, dtype=torch.uint8)
        self.copied: torch.cuda.Event | None = None  # marks the last copy out of self.host

    def to_device(self, inputs: StepInputs) -> StepInputs:
        if self.device.type == "cpu":
            return inputs  # already where the model runs
        # The indptr and last-page arrays stay on the host: FlashInfer's planner reads them there.
        moving = {"token_ids": inputs.token_ids, "positions": inputs.positions,
                  "sample_indices": inputs.sample_indices,
                  "slot_mapping": inputs.attention.slot_mapping,
                  "kv_indices": inputs.attention.kv_indices}
        if inputs.sampling is not None:
            moving |= {f"sampling.{k}": v for k, v in inputs.sampling.tensors().items()}
        moved = self._copy(moving)
        sampling = inputs.sampling
        if sampling is not None:
            sampling = replace(sampling, **{f.name: moved[f"sampling.{f.name}"]
                                            for f in fields(sampling)
                                            if f"sampling.{f.name}" in moved})
        attention = replace(inputs.attention, slot_mapping=moved["slot_mapping"],
                            kv_indices=moved["kv_indices"])
        return StepInputs(moved["token_ids"], moved["positions"], attention,
                          moved["sample_indices"], sampling)

    def _copy(self, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        offsets, total = {}, 0
        for name, array in arrays.items():
            offsets[name] = total
            total += -(-array.numel() * array.element_size() // 8) * 8
        if self.copied is not None:
            self.copied.synchronize()  # in the usual step, long done
        if self.host.numel() < total:  # grow (pinned allocation is slow: keep the buffer)
            self.host = torch.empty(max(total, 2 * self.host.numel()), dtype=torch.uint8,
                                    pin_memory=True)
        for name, array in arrays.items():
            nbytes = array.numel() * array.element_size()
            start = offsets[name]
            self.host[start : start + nbytes].view(array.dtype).copy_(array.reshape(-1))
        device_buffer = self.host[:total].to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return {name: device_buffer[offsets[name] : offsets[name] + a.numel() * a.element_size()]
                .view(a.dtype).view(a.shape) for name, a in arrays.items()}
