"""CUDA graphs for decode steps: launch a whole forward pass, logits included, with one call.

A decode step of a small model is hundreds of tiny kernels, and launching each one from Python
costs more than running it. A CUDA graph records those launches once, at start-up, and replays
the whole sequence with one `cudaGraphLaunch`. What a graph records is fixed: the kernels, their
launch shapes and the addresses they read and write. So every step copies its inputs into the
same persistent buffers the graph was captured with, and a graph exists only for a few batch
sizes (buckets); a batch runs in the smallest bucket that holds it, padded with rows that write
their K/V to a page no request owns. Prefill steps, whose shapes vary without bound, run eagerly.
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


class CudaGraphRunner:
    """One captured decode graph per bucket, all reading the same persistent input buffers
    (and the attention backend's decode wrapper for that bucket, whose index arrays live in
    fixed buffers too)."""

    def __init__(self, model: nn.Module, backend, batch_sizes: list[int], page_size: int,
                 pad_page: int, device: torch.device) -> None:
        self.model, self.backend = model, backend
        self.batch_sizes, self.page_size, self.pad_page = batch_sizes, page_size, pad_page
        max_size = batch_sizes[-1]
        self.token_ids = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # each graph's logits, [size, vocab]
        self.capture_seconds = 0.0
        self.memory_bytes = 0

    def bucket_for(self, inputs: StepInputs) -> int | None:
        """The bucket a step runs in, or None when it must run eagerly (prefill, or too big)."""
        if not inputs.attention.is_decode:
            return None
        return bucket_for(inputs.attention.num_seqs, self.batch_sizes)

    # --8<-- [start:capture]
    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first: they share one memory pool, and each
        smaller graph fits in the memory the larger ones already reserved."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # as torch.cuda.graph does: cached blocks would blur the count
        free_before, _ = torch.cuda.mem_get_info()
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):
            inputs = self._static_inputs(size)
            self.backend.plan(inputs.attention, for_cuda_graph=True)
            self._forward(inputs)  # warm-up: compiles kernels, sets up cuBLAS, outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(inputs)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.memory_bytes = free_before - torch.cuda.mem_get_info()[0]
        logger.info("CUDA graphs: %d batch sizes (%s) captured in %.1f s, %.0f MiB",
                    len(self.graphs), _describe(self.batch_sizes), self.capture_seconds,
                    self.memory_bytes / 2**20)
    # --8<-- [end:capture]

    # --8<-- [start:replay]
    def replay(self, inputs: StepInputs) -> torch.Tensor:
        """Run a decode step already padded to a bucket (inputs on the device, index arrays
        on the host as the planner wants them); returns every row's logits [bucket, vocab]."""
        size = inputs.num_tokens
        self.token_ids[:size].copy_(inputs.token_ids, non_blocking=True)
        self.positions[:size].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:size].copy_(inputs.attention.slot_mapping, non_blocking=True)
        self.backend.plan(inputs.attention, for_cuda_graph=True)  # this step's pages
        self.graphs[size].replay()
        return self.outputs[size]
    # --8<-- [end:replay]

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        # The LM head inside the graph too: its matmul is one launch fewer outside, and the
        # sampler reads the logits where the graph left them (no gather, no float copy).
        hidden = self.model(inputs.token_ids, inputs.positions, inputs.attention)
        return self.model.compute_logits(hidden)

    def _static_inputs(self, size: int) -> StepInputs:
        """size padding rows, viewing the persistent buffers: what a graph is captured with."""
        pages = torch.full((size,), self.pad_page, dtype=torch.int32)
        self.slot_mapping[:size].fill_(self.pad_page * self.page_size)
        attention = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            kv_indices=pages.to(self.slot_mapping.device),
            qo_indptr=torch.arange(size + 1, dtype=torch.int32),
            kv_indptr=torch.arange(size + 1, dtype=torch.int32),
            kv_last_page_len=torch.ones(size, dtype=torch.int32), page_size=self.page_size,
            is_decode=True)
        sample_indices = torch.arange(size, device=self.token_ids.device)
        return StepInputs(self.token_ids[:size], self.positions[:size], attention,
                          sample_indices, None)


def _describe(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 6 else \
        f"{', '.join(map(str, sizes[:5]))}, ..., {sizes[-1]}"
