"""CUDA graphs for decode steps: launch a whole forward pass, logits included, with one call.

A decode step of a small model is hundreds of tiny kernels, and launching each one from Python
costs more than running it. A CUDA graph records those launches once, at start-up, and replays
the whole sequence with one `cudaGraphLaunch`. What a graph records is fixed: the kernels, their
launch shapes and the addresses they read and write. So every step copies its inputs into the
same persistent buffers the graph was captured with, and a graph exists only for a few batch
sizes (buckets); a batch runs in the smallest bucket that holds it, padded with rows that write
their K/V to a page no request owns. Prefill steps, whose shapes vary without bound, run eagerly.

With speculative decoding a second set of graphs runs verify steps: every row feeds the same
number of tokens, 1 + k (its token and k drafts; a row with fewer drafts, a decode row or a short
prompt chunk is padded up to 1 + k), for a few small batch sizes.
"""

import logging
import time
from dataclasses import replace

import torch
from torch import nn

from serve.attention.metadata import AttentionMetadata
from serve.core.step_inputs import StepInputs

logger = logging.getLogger(__name__)


# --8<-- [start:buckets]
def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes that get a graph: 1, 2, 4, 8, then every 16 up to max_num_seqs itself.
    Padding a batch of 17 to 32 wastes 15 rows of matmul, which at these sizes costs almost
    nothing (a decode step reads the weights once whatever the batch); every extra bucket costs
    capture time and a little memory."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def bucket_for(num_seqs: int, batch_sizes: list[int]) -> int | None:
    """The smallest captured batch size that holds num_seqs rows, or None if none does."""
    return next((size for size in batch_sizes if size >= num_seqs), None)
# --8<-- [end:buckets]


# --8<-- [start:pad]
def pad_decode_inputs(inputs: StepInputs, batch_size: int, pad_page: int) -> StepInputs:
    """A decode step's host inputs grown to batch_size rows. Each padding row feeds token 0 at
    position 0 and writes its K/V into pad_page, a page no request owns, and attends over that
    page alone; its output is never sampled (sample_indices keeps the real rows only)."""
    meta = inputs.attention
    num_pad = batch_size - meta.num_seqs
    if num_pad == 0:
        return inputs
    zeros = torch.zeros(num_pad, dtype=torch.int64)
    pad_pages = torch.full((num_pad,), pad_page, dtype=torch.int32)
    last = int(meta.kv_indptr[-1])
    attention = AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, pad_pages.to(torch.int64) * meta.page_size]),
        kv_indices=torch.cat([meta.kv_indices, pad_pages]),
        qo_indptr=torch.arange(batch_size + 1, dtype=torch.int32),
        kv_indptr=torch.cat([meta.kv_indptr,
                             torch.arange(last + 1, last + num_pad + 1, dtype=torch.int32)]),
        kv_last_page_len=torch.cat([meta.kv_last_page_len, torch.ones(num_pad, dtype=torch.int32)]),
        page_size=meta.page_size, is_decode=True)
    return replace(inputs, token_ids=torch.cat([inputs.token_ids, zeros]),
                   positions=torch.cat([inputs.positions, zeros]), attention=attention)
# --8<-- [end:pad]


# --8<-- [start:pad_verify]
def pad_verify_inputs(inputs: StepInputs, batch_size: int, query_len: int,
                      pad_page: int) -> StepInputs:
    """A step whose rows feed at most query_len tokens each, grown to batch_size rows of exactly
    query_len tokens: what a verify graph was captured with. Row i's token j moves to
    i * query_len + j. A padding token sits after its row's real ones: it writes its K/V to
    pad_page, and its row's attention span grows over it (into pad_page where the row's pages
    end), so every real token still sees exactly the keys it saw before (the mask is causal),
    and no padding token's output is sampled."""
    meta = inputs.attention
    query_lens = meta.qo_indptr.diff().long()
    num_seqs, page_size = meta.num_seqs, meta.page_size
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_lens)
    offset = torch.arange(inputs.num_tokens) - meta.qo_indptr[:-1].long()[seq_of_token]
    moved = seq_of_token * query_len + offset  # each real token's index in the padded step
    num_tokens = batch_size * query_len
    token_ids = torch.zeros(num_tokens, dtype=torch.int64)
    token_ids[moved] = inputs.token_ids
    slot_mapping = torch.full((num_tokens,), pad_page * page_size, dtype=torch.int64)
    slot_mapping[moved] = meta.slot_mapping
    # every row ends query_len - its own length tokens later; a padding row is query_len long
    seq_lens = torch.full((batch_size,), query_len, dtype=torch.int32)
    seq_lens[:num_seqs] = meta.seq_lens() + query_len - query_lens
    positions = (seq_lens.long() - query_len).repeat_interleave(query_len) \
        + torch.arange(query_len).repeat(batch_size)
    pages = -(-seq_lens // page_size)
    extra = pages.clone()
    extra[:num_seqs] -= meta.kv_indptr.diff().int()  # pages past a row's own: pad_page
    owner = torch.repeat_interleave(torch.arange(batch_size), extra.long())
    kv_indices = torch.cat([meta.kv_indices.cpu().int(), torch.full((int(extra.sum()),), pad_page,
                                                               dtype=torch.int32)])
    # each row's pages, then its pad pages: sort the pad pages in behind their rows
    row_of_page = torch.cat([torch.repeat_interleave(torch.arange(num_seqs),
                                                     meta.kv_indptr.diff().long()), owner])
    kv_indices = kv_indices[torch.sort(row_of_page, stable=True).indices]
    attention = AttentionMetadata(
        slot_mapping=slot_mapping, kv_indices=kv_indices,
        qo_indptr=torch.arange(batch_size + 1, dtype=torch.int32) * query_len,
        kv_indptr=torch.cat([torch.zeros(1, dtype=torch.int32), pages.cumsum(0).int()]),
        kv_last_page_len=(seq_lens - (pages - 1) * page_size).int(), page_size=page_size,
        is_decode=False)
    read_rows = None if inputs.read_rows is None else moved[inputs.read_rows.cpu()]
    return replace(inputs, token_ids=token_ids, positions=positions, attention=attention,
                   sample_indices=moved[inputs.sample_indices.cpu()], read_rows=read_rows)
# --8<-- [end:pad_verify]


class CudaGraphRunner:
    """One captured graph per shape, all reading the same persistent input buffers (and the
    attention backend's wrapper for that shape, whose index arrays live in fixed buffers too).
    A shape is (rows, tokens per row): (bucket, 1) for decode steps, and (bucket, 1 + k) for
    verify steps when speculative decoding is on (verify_len = 1 + k)."""

    def __init__(self, model: nn.Module, backend, batch_sizes: list[int], page_size: int,
                 pad_page: int, device: torch.device, verify_sizes: list[int] = (),
                 verify_len: int = 0) -> None:
        self.model, self.backend = model, backend
        self.batch_sizes, self.page_size, self.pad_page = batch_sizes, page_size, pad_page
        self.verify_sizes, self.verify_len = list(verify_sizes), verify_len
        max_tokens = max([batch_sizes[-1]] + [size * verify_len for size in self.verify_sizes])
        self.token_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # logits, [rows * tokens, vocab]
        self.capture_seconds = 0.0
        self.memory_bytes = 0

    def bucket_for(self, inputs: StepInputs) -> int | None:
        """The bucket a decode step runs in, or None when it must run eagerly (prefill, or too
        big)."""
        if not inputs.attention.is_decode:
            return None
        return bucket_for(inputs.attention.num_seqs, self.batch_sizes)

    def verify_bucket_for(self, inputs: StepInputs) -> int | None:
        """The bucket a step of rows of at most verify_len tokens runs in (a verify step, with
        any decode rows and short prompt chunks beside its verify rows), or None."""
        meta = inputs.attention
        if meta.is_decode or not self.verify_sizes or inputs.prompt_logprob_rows is not None:
            return None
        if int(meta.qo_indptr.diff().max()) > self.verify_len:
            return None
        return bucket_for(meta.num_seqs, self.verify_sizes)

    # --8<-- [start:capture]
    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per shape, largest first: they share one memory pool, and each
        smaller graph fits in the memory the larger ones already reserved."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # as torch.cuda.graph does: cached blocks would blur the count
        free_before, _ = torch.cuda.mem_get_info()
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        shapes = [(size, 1) for size in self.batch_sizes]
        shapes += [(size, self.verify_len) for size in self.verify_sizes]
        for shape in sorted(shapes, key=lambda shape: shape[0] * shape[1], reverse=True):
            inputs = self._static_inputs(*shape)
            self.backend.plan(inputs.attention, for_cuda_graph=True)
            self._forward(inputs)  # warm-up: compiles kernels, sets up cuBLAS, outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[shape] = self._forward(inputs)
            self.graphs[shape] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.memory_bytes = free_before - torch.cuda.mem_get_info()[0]
        logger.info("CUDA graphs: %d batch sizes (%s)%s captured in %.1f s, %.0f MiB",
                    len(self.batch_sizes), _describe(self.batch_sizes),
                    f", verify steps of {self.verify_len} tokens a row at {len(self.verify_sizes)}"
                    f" ({_describe(self.verify_sizes)})" if self.verify_sizes else "",
                    self.capture_seconds, self.memory_bytes / 2**20)
    # --8<-- [end:capture]

    # --8<-- [start:replay]
    def replay(self, inputs: StepInputs) -> torch.Tensor:
        """Run a step already padded to a captured shape (inputs on the device, index arrays
        on the host as the planner wants them); returns every token row's logits."""
        size = inputs.num_tokens
        self.token_ids[:size].copy_(inputs.token_ids, non_blocking=True)
        self.positions[:size].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:size].copy_(inputs.attention.slot_mapping, non_blocking=True)
        self.backend.plan(inputs.attention, for_cuda_graph=True)  # this step's pages
        shape = (inputs.attention.num_seqs, size // inputs.attention.num_seqs)
        self.graphs[shape].replay()
        return self.outputs[shape]
    # --8<-- [end:replay]

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        # The LM head inside the graph too: its matmul is one launch fewer outside, and the
        # sampler reads the logits where the graph left them (no gather, no float copy).
        hidden = self.model(inputs.token_ids, inputs.positions, inputs.attention)
        return self.model.compute_logits(hidden)

    def _static_inputs(self, rows: int, query_len: int) -> StepInputs:
        """rows padding rows of query_len tokens, viewing the persistent buffers: what a graph
        is captured with."""
        size, pages_per_row = rows * query_len, -(-query_len // self.page_size)
        self.slot_mapping[:size].fill_(self.pad_page * self.page_size)
        attention = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            kv_indices=torch.full((rows * pages_per_row,), self.pad_page, dtype=torch.int32,
                                  device=self.slot_mapping.device),
            qo_indptr=torch.arange(rows + 1, dtype=torch.int32) * query_len,
            kv_indptr=torch.arange(rows + 1, dtype=torch.int32) * pages_per_row,
            kv_last_page_len=torch.full((rows,), query_len - (pages_per_row - 1) * self.page_size,
                                        dtype=torch.int32),
            page_size=self.page_size, is_decode=query_len == 1)
        sample_indices = torch.arange(size, device=self.token_ids.device)
        return StepInputs(self.token_ids[:size], self.positions[:size], attention,
                          sample_indices, None)


def _describe(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 6 else \
        f"{', '.join(map(str, sizes[:5]))}, ..., {sizes[-1]}"
