"""The GPU backend: FlashInfer's kernels read K and V straight from the pool's pages.

FlashInfer splits batched attention into two calls. `plan` runs on the host once per step: it
reads how many query tokens and KV pages each sequence has, decides how to split that work over
the GPU's SMs (long sequences are cut into chunks whose partial results are merged later, in the
workspace buffer), and copies the schedule to the GPU. `run` launches the kernel with that
schedule once per layer: every layer of a step has the same shapes, only its pages differ.

A step where every sequence feeds one token goes to the decode wrapper (a kernel made for one
query row); any other step, prompts and chunks alike, goes to the prefill wrapper with a causal
mask. Both take the pool in FlashInfer's NHD layout: [num_pages, page_size, kv_heads, head_dim].
"""

import torch

from serve.attention.kv_cache import store_kv
from serve.attention.metadata import AttentionMetadata

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended size for the split-KV scratch
MAX_CUDA_CORE_GROUP_SIZE = 4  # above this, decode runs on tensor cores (see __init__)


class FlashInferAttentionBackend:
    name = "flashinfer"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        import flashinfer  # here, not at the top: the module must import on a CPU-only machine

        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.page_size, self.dtype = page_size, dtype
        # One scratch buffer for both wrappers: a step is either a decode or a prefill, never both.
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
        # FlashInfer's CUDA-core decode kernel is compiled only for 1, 2, 3, 4 or 8 query heads
        # per KV head (DISPATCH_GQA_GROUP_SIZE); with use_tensor_cores it runs the prefill kernel
        # on one query row per sequence, which takes any group size and is the faster choice for
        # large groups anyway. So groups 1-4 use CUDA cores and groups 5-8 use tensor cores.
        group_size = num_heads // num_kv_heads
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, kv_layout="NHD", use_tensor_cores=group_size > MAX_CUDA_CORE_GROUP_SIZE
        )
        self.wrapper = self.prefill  # the wrapper planned for the current step

    # --8<-- [start:plan]
    def plan(self, meta: AttentionMetadata) -> None:
        # FlashInfer's plan builds its schedule on the host, so it reads the indptr and
        # last-page-length arrays there: meta keeps them on the host, and plan never waits for
        # the GPU. It copies them and its schedule to the GPU itself (asynchronously).
        # kv_indices is only read on the GPU, so it is a device tensor.
        # sm_scale is left at FlashInfer's default, head_dim**-0.5, as in the torch backend.
        if meta.is_decode:
            self.decode.plan(
                meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len,
                self.num_heads, self.num_kv_heads, self.head_dim, self.page_size,
                q_data_type=self.dtype, kv_data_type=self.dtype,
            )
            self.wrapper = self.decode
        else:
            self.prefill.plan(
                meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len,
                self.num_heads, self.num_kv_heads, self.head_dim, self.page_size,
                causal=True,  # new token i of a sequence sees the cache up to its own position
                q_data_type=self.dtype, kv_data_type=self.dtype,
            )
            self.wrapper = self.prefill
    # --8<-- [end:plan]

    # --8<-- [start:forward]
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        store_kv(*kv_cache, meta.slot_mapping, k, v)
        return self.wrapper.run(q, kv_cache)  # [num_tokens, num_heads, head_dim]
    # --8<-- [end:forward]

