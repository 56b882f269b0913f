"""Owns the model on its device: loads it, sizes the KV pool, runs a step's forward pass."""

import logging

import torch

from serve.attention import make_backend
from serve.attention.metadata import StepMetadata
from serve.config import EngineConfig
from serve.engine.kv_pool import KVPool
from serve.engine.page_allocator import PageAllocator
from serve.engine.request import Request
from serve.engine.static_batch import Row
from serve.models.llama import head_dim_of
from serve.models.loader import build_model
from serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

CPU_KV_POOL_BYTES = 1 << 30  # on a CPU, without --num-pages: at most 1 GiB of KV pool


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_path: str, max_model_len: int):
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.hf_config = hf_config
        self.model = build_model(
            hf_config, model_path, config.load_format, self.dtype, self.device, config.seed
        )
        num_params = sum(p.numel() for p in self.model.parameters())
        logger.info("model: %.1fM parameters, %s on %s", num_params / 1e6, self.dtype, self.device)
        cfg = hf_config
        self.page_size = config.page_size
        self.backend = make_backend(
            config.attention_backend, cfg.num_attention_heads, cfg.num_key_value_heads,
            head_dim_of(cfg), self.page_size, self.dtype, self.device,
        )
        num_pages = config.num_pages or self._num_pages_that_fit(config, max_model_len)
        self.kv_pool = self._make_pool(num_pages)
        logger.info("KV pool: %s", self.kv_pool.describe())

    def _make_pool(self, num_pages: int) -> KVPool:
        cfg = self.hf_config
        return KVPool(cfg.num_hidden_layers, num_pages, self.page_size, cfg.num_key_value_heads,
                      head_dim_of(cfg), self.dtype, self.device)

    def _bytes_per_page(self) -> int:
        cfg = self.hf_config
        return KVPool.bytes_per_page(cfg.num_hidden_layers, self.page_size,
                                     cfg.num_key_value_heads, head_dim_of(cfg), self.dtype)

    # --8<-- [start:pool_size]
    def _num_pages_that_fit(self, config: EngineConfig, max_model_len: int) -> int:
        """As many pages as the memory left after the weights and the largest step's activations.

        On a GPU we measure: run the biggest prefill the engine will ever run (one long sequence
        of max_num_batched_tokens tokens) and read the peak allocation; the pool gets what is
        left of gpu_memory_utilization x the card. On a CPU there is nothing to measure against,
        so the pool holds a few full-length sequences, within CPU_KV_POOL_BYTES.
        """
        pages_per_seq = -(-max_model_len // self.page_size)
        if self.device.type != "cuda":
            return max(pages_per_seq, min(4 * pages_per_seq,
                                          CPU_KV_POOL_BYTES // self._bytes_per_page()))
        num_tokens = config.prefill_token_budget(max_model_len)
        scratch = self._make_pool(-(-num_tokens // self.page_size))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.forward([_profile_row(num_tokens, self.page_size)], scratch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - scratch.num_bytes
        del scratch
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info()
        budget = config.gpu_memory_utilization * total - peak
        if budget < pages_per_seq * self._bytes_per_page():
            raise ValueError(f"after the weights and activations ({peak / 2**30:.1f} GiB) there is "
                             "no room for one full-length sequence's KV pages: lower "
                             "--max-model-len or raise --gpu-memory-utilization")
        return int(budget // self._bytes_per_page())
    # --8<-- [end:pool_size]

    # --8<-- [start:forward]
    @torch.inference_mode()
    def forward(self, rows: list[Row], kv_pool: KVPool | None = None) -> torch.Tensor:
        """Run one step for these rows; return each row's logits at its last new token."""
        kv_pool = kv_pool or self.kv_pool
        token_ids, positions = [], []
        for row in rows:
            row.page_table.grow_to(row.seq_len)  # take pages as the sequence grows
            token_ids += row.token_ids
            positions += range(row.start_pos, row.seq_len)
        meta = StepMetadata.build(
            kv_pool, self.backend,
            page_tables=[row.page_table.pages_for(row.seq_len) for row in rows],
            query_lens=[len(row.token_ids) for row in rows],
            seq_lens=[row.seq_len for row in rows],
        )
        self.backend.plan(meta)  # once per step, shared by every layer
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, meta)  # [num_tokens, hidden_size]
        return self.model.compute_logits(hidden[meta.last_token_index])  # [rows, vocab_size]
    # --8<-- [end:forward]


def _profile_row(num_tokens: int, page_size: int) -> Row:
    """A throwaway row of num_tokens tokens over pages 0, 1, 2, ... of a scratch pool."""
    allocator = PageAllocator(num_pages=-(-num_tokens // page_size), page_size=page_size)
    table = allocator.reserve(num_tokens)
    request = Request("profile", [0] * num_tokens, SamplingParams())
    return Row(request, table, None, request.prompt_token_ids, 0)
