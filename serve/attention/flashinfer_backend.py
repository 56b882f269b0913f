"""The GPU backend: FlashInfer's kernels read K and V straight from the pool's pages.

FlashInfer splits batched attention into two calls. `plan` runs on the host once per step: it
reads how many query tokens and KV pages each sequence has, decides how to split that work over
the GPU's SMs (long sequences are cut into chunks whose partial results are merged later, in the
workspace buffer), and copies the schedule to the GPU. `run` launches the kernel with that
schedule once per layer: every layer of a step has the same shapes, only its pages differ.

A step where every sequence feeds one token goes to the decode wrapper (a kernel made for one
query row); any other step, prompts and chunks alike, goes to the prefill wrapper with a causal
mask. Both take the pool in FlashInfer's NHD layout: [num_pages, page_size, kv_heads, head_dim].

For CUDA graphs there is one more decode wrapper per captured batch size, in FlashInfer's
CUDA-graph mode: its index arrays live in fixed buffers, which `plan` refills before each replay,
and its kernels are launched with the same grid whatever the sequence lengths. With speculative
decoding, a prefill wrapper in that mode per captured verify batch size does the same for verify
steps (every row 1 + k query tokens, causal).
"""

import torch

from serve.attention.kv_cache import store_kv
from serve.attention.metadata import AttentionMetadata

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended size for the split-KV scratch
MAX_CUDA_CORE_GROUP_SIZE = 4  # above this, decode runs on tensor cores (see __init__)


class FlashInferAttentionBackend:
    name = "flashinfer"
    supports_cuda_graphs = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        import flashinfer  # here, not at the top: the module must import on a CPU-only machine

        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.page_size, self.dtype = page_size, dtype
        # One scratch buffer for both wrappers: a step is a decode or a prefill, or (split) a
        # decode part then a prefill part, run one after the other on one stream.
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        # FlashInfer's CUDA-core decode kernel is compiled only for 1, 2, 3, 4 or 8 query heads
        # per KV head (DISPATCH_GQA_GROUP_SIZE); with use_tensor_cores it runs the prefill kernel
        # on one query row per sequence, which takes any group size and is the faster choice for
        # large groups anyway. So groups 1-4 use CUDA cores and groups 5-8 use tensor cores.
        self.use_tensor_cores = num_heads // num_kv_heads > MAX_CUDA_CORE_GROUP_SIZE
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores)
        self.graph_decode: dict[int, flashinfer.BatchDecodeWithPagedKVCacheWrapper] = {}
        self.graph_verify: dict[int, flashinfer.BatchPrefillWithPagedKVCacheWrapper] = {}
        self.wrapper = self.prefill  # the wrapper planned for the current step
        # A wrapper's plan writes a pinned host buffer and copies it to the device without
        # waiting; before it is planned again, the host waits for that copy to have run (with
        # overlap scheduling the next step is planned while the device may still be behind).
        self._planned: dict[int, torch.cuda.Event] = {}

    # --8<-- [start:graph_wrappers]
    def enable_cuda_graphs(self, batch_sizes: list[int], max_kv_pages: int,
                           verify_sizes: list[int] = ()) -> None:
        """One CUDA-graph decode wrapper per batch size, and a prefill wrapper per verify batch
        size. Their index buffers are shared (the device runs one step at a time) and hold up
        to max_kv_pages page ids."""
        import flashinfer

        device = self.workspace.device
        max_size = max([*batch_sizes, *verify_sizes])
        indptr = torch.zeros(max_size + 1, dtype=torch.int32, device=device)
        indices = torch.zeros(max_kv_pages, dtype=torch.int32, device=device)
        last_page_len = torch.zeros(max_size, dtype=torch.int32, device=device)
        self.graph_decode = {
            size: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True,
                use_tensor_cores=self.use_tensor_cores,
                paged_kv_indptr_buffer=indptr[: size + 1], paged_kv_indices_buffer=indices,
                paged_kv_last_page_len_buffer=last_page_len[:size])
            for size in batch_sizes
        }
        qo_indptr = torch.zeros(max_size + 1, dtype=torch.int32, device=device)
        self.graph_verify = {
            size: flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=qo_indptr[: size + 1],
                paged_kv_indptr_buf=indptr[: size + 1], paged_kv_indices_buf=indices,
                paged_kv_last_page_len_buf=last_page_len[:size])
            for size in verify_sizes
        }
    # --8<-- [end:graph_wrappers]

    # --8<-- [start:plan]
    def plan(self, meta: AttentionMetadata, for_cuda_graph: bool = False) -> None:
        # The planner reads meta's host arrays (see AttentionMetadata) and copies them and its
        # schedule to the GPU itself, asynchronously. sm_scale is FlashInfer's default,
        # head_dim**-0.5, as in the torch backend.
        # with for_cuda_graph, a graph's wrapper for its batch size (the graph was captured
        # reading its buffers)
        if not meta.is_decode:
            self.wrapper = self.graph_verify[meta.num_seqs] if for_cuda_graph else self.prefill
        else:
            self.wrapper = self.graph_decode[meta.num_seqs] if for_cuda_graph else self.decode
        if (last_plan := self._planned.get(id(self.wrapper))) is not None:
            last_plan.synchronize()  # its last plan's copy has run (see __init__)
        sizes = (self.num_heads, self.num_kv_heads, self.head_dim, self.page_size)
        if meta.is_decode:
            self.wrapper.plan(meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, *sizes,
                              q_data_type=self.dtype, kv_data_type=self.dtype)
        else:
            self.wrapper.plan(
                meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, *sizes,
                causal=True,  # new token i of a sequence sees the cache up to its own position
                q_data_type=self.dtype, kv_data_type=self.dtype)
        self._planned[id(self.wrapper)] = planned = torch.cuda.Event()
        planned.record()
    # --8<-- [end:plan]

    # --8<-- [start:forward]
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> torch.Tensor:
        store_kv(*kv_cache, meta.slot_mapping, k, v)
        return self.wrapper.run(q, kv_cache)  # [num_tokens, num_heads, head_dim]
    # --8<-- [end:forward]

