"""One step's inputs as plain arrays: gathered on the host from the persistent batch's columns
with numpy indexing (no Python loop per sequence or token), then copied to the device in one
transfer."""

from dataclasses import dataclass, fields, replace
from itertools import chain

import numpy as np
import torch

from serve.attention.metadata import AttentionMetadata
from serve.core.sampler import SamplingTensors


@dataclass
class StepInputs:
    """What the model runner executes: token ids at positions, where their K/V go, which pages
    each sequence attends over, and which rows are sampled with which rules.

    Slots (PersistentBatch): the runner keeps each slot's last sampled token on the device. Token
    rows read_rows take their input from there (slots read_slots) instead of token_ids, so a
    decode row's token never has to reach the host first; the sampled tokens are written back to
    the slots write_slots. All three are None where a step has no slots (tests, profiling).
    """

    token_ids: torch.Tensor  # [num_tokens] int64: every sequence's new tokens, back to back
    positions: torch.Tensor  # [num_tokens] int64
    attention: AttentionMetadata
    sample_indices: torch.Tensor  # [num_sampled] int64: token rows whose logits are sampled
    sampling: SamplingTensors | None  # None: return logits, sample nothing (tests, profiling)
    read_rows: torch.Tensor | None = None  # [num_read] int64
    read_slots: torch.Tensor | None = None  # [num_read] int64
    write_slots: torch.Tensor | None = None  # [num_sampled] int64
    # a grammar constrains some sampled rows: the sampling waits for their token bitmask (the
    # other tensor-parallel ranks are sent it too); host side only
    masked: bool = False
    # prompt log-probabilities: token row prompt_logprob_rows[i] predicts the prompt token
    # prompt_logprob_targets[i]; each with the prompt_logprobs_k most likely (None: no row asks)
    prompt_logprob_rows: torch.Tensor | None = None  # [q] int64
    prompt_logprob_targets: torch.Tensor | None = None  # [q] int64
    prompt_logprobs_k: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# --8<-- [start:build]
def gather_step_inputs(
    token_ids: np.ndarray,
    query_lens: np.ndarray,
    num_computed: np.ndarray,
    block_table: np.ndarray,
    rows: np.ndarray,
    page_size: int,
    num_sampled: np.ndarray | None = None,
    sampling: SamplingTensors | None = None,
) -> StepInputs:
    """Sequence i feeds query_lens[i] tokens of token_ids (back to back), which start at
    position num_computed[i]; its pages are row rows[i] of block_table (enough of them for all
    its tokens). The last num_sampled[i] new tokens of sequence i are sampled (default: the last
    one of every sequence): none for a prefill chunk that stops short of its prompt's end, one
    for a decode, 1 + its drafts for a row that checks drafts. Numpy indexing only, no loop over
    sequences or tokens; host tensors that share the arrays' memory (`to_device` moves them)."""
    seq_lens = num_computed + query_lens
    qo_indptr = _indptr(query_lens)
    num_pages = (seq_lens + page_size - 1) // page_size
    kv_indptr = _indptr(num_pages)
    pages = block_table[rows, : int(num_pages.max())]
    kv_indices = pages[np.arange(pages.shape[1]) < num_pages[:, None]]
    num_tokens = int(qo_indptr[-1])
    if num_tokens == len(query_lens):  # a decode step: one token per sequence
        positions = num_computed.astype(np.int64)
        page_of_token = pages[np.arange(len(rows)), positions // page_size]
    else:  # per token: which sequence it belongs to, then its position and its page
        seq_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
        positions = (np.arange(num_tokens) - qo_indptr[:-1][seq_of_token]
                     + num_computed[seq_of_token])
        page_of_token = kv_indices[kv_indptr[:-1][seq_of_token] + positions // page_size]
    slot_mapping = page_of_token.astype(np.int64) * page_size + positions % page_size
    attention = AttentionMetadata(
        slot_mapping=torch.from_numpy(slot_mapping),
        kv_indices=torch.from_numpy(np.ascontiguousarray(kv_indices, dtype=np.int32)),
        qo_indptr=torch.from_numpy(qo_indptr.astype(np.int32)),
        kv_indptr=torch.from_numpy(kv_indptr.astype(np.int32)),
        kv_last_page_len=torch.from_numpy(((seq_lens - 1) % page_size + 1).astype(np.int32)),
        page_size=page_size,
        is_decode=num_tokens == len(query_lens),
    )
    if num_sampled is None:
        sample_indices = qo_indptr[1:] - 1
    else:
        sample_indices = sampled_offsets(qo_indptr[1:], num_sampled) - 1
    return StepInputs(
        token_ids=torch.from_numpy(token_ids.astype(np.int64, copy=False)),
        positions=torch.from_numpy(positions),
        attention=attention,
        sample_indices=torch.from_numpy(sample_indices),
        sampling=sampling,
    )
# --8<-- [end:build]


def sampled_offsets(ends: np.ndarray, num_sampled: np.ndarray) -> np.ndarray:
    """ends[i] - num_sampled[i] + 1, ..., ends[i] for every sequence i, back to back: the
    last num_sampled[i] of a run that ends at ends[i] (token rows, or positions)."""
    if num_sampled.max(initial=0) <= 1:  # no drafts: a mask is all it takes
        return ends[num_sampled.astype(np.bool_)]
    seq = np.repeat(np.arange(len(num_sampled)), num_sampled)
    first_of_seq = np.repeat(_indptr(num_sampled)[:-1], num_sampled)
    return ends[seq] - num_sampled[seq] + 1 + (np.arange(len(seq)) - first_of_seq)


def build_step_inputs(
    new_token_ids: list[list[int]],
    num_computed: list[int],
    page_tables: list[list[int]],
    page_size: int,
    sampling: SamplingTensors | None = None,
    sampled: list[bool] | None = None,
) -> StepInputs:
    """gather_step_inputs from Python lists (tests, the runner's memory probe): sequence i
    feeds new_token_ids[i] from position num_computed[i], its pages page_tables[i]."""
    width = max(len(pages) for pages in page_tables)
    table = np.zeros((len(page_tables), width), dtype=np.int32)
    for row, pages in enumerate(page_tables):
        table[row, : len(pages)] = pages
    return gather_step_inputs(
        np.fromiter(chain.from_iterable(new_token_ids), dtype=np.int64),
        np.array([len(ids) for ids in new_token_ids], dtype=np.int64),
        np.array(num_computed, dtype=np.int64), table, np.arange(len(page_tables)), page_size,
        None if sampled is None else np.array(sampled, dtype=np.int64), sampling)


# --8<-- [start:split]
def split_step_inputs(inputs: StepInputs, num_seqs: int) -> tuple[StepInputs, StepInputs]:
    """The step's first num_seqs sequences and the others, as two steps (host arrays), so that a
    mixed step's decode rows can replay their CUDA graph while its prompt chunks run eagerly.
    Each part's sampled rows keep their order, and the step's sampling rules (with the slots
    its tokens go to) go with the first part: the logits of the two parts, concatenated, line
    up with them."""
    total = inputs.attention.num_seqs
    return _part(inputs, 0, num_seqs, True), _part(inputs, num_seqs, total, False)


def _part(inputs: StepInputs, first: int, last: int, first_part: bool) -> StepInputs:
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
    read_rows = read_slots = None
    if inputs.read_rows is not None:
        inside = (inputs.read_rows >= token_start) & (inputs.read_rows < token_end)
        read_rows, read_slots = inputs.read_rows[inside] - token_start, inputs.read_slots[inside]
    return StepInputs(inputs.token_ids[token_start:token_end],
                      inputs.positions[token_start:token_end], attention, mine,
                      inputs.sampling if first_part else None, read_rows, read_slots,
                      inputs.write_slots if first_part else None)
# --8<-- [end:split]


def _indptr(counts: np.ndarray) -> np.ndarray:
    """[0, c0, c0+c1, ...]: where each sequence's part of a flat array starts."""
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr


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
        meta, sampling = inputs.attention, inputs.sampling
        step = {f.name: value for f in fields(inputs)
                if isinstance(value := getattr(inputs, f.name), torch.Tensor)}
        rules = sampling.tensors() if sampling is not None else {}
        moved = self._copy({**step, **{f"sampling.{name}": rule for name, rule in rules.items()},
                            "slot_mapping": meta.slot_mapping, "kv_indices": meta.kv_indices})
        if sampling is not None:
            sampling = replace(sampling, **{name: moved[f"sampling.{name}"] for name in rules})
        return replace(inputs, **{name: moved[name] for name in step}, sampling=sampling,
                       attention=replace(meta, slot_mapping=moved["slot_mapping"],
                                         kv_indices=moved["kv_indices"]))

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
