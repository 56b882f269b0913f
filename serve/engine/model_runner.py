"""Owns the model on its device: loads it, runs a forward pass for a request, returns logits."""

import logging

import torch

from serve.config import EngineConfig
from serve.engine.kv_cache import ContiguousKVCache
from serve.layers.attention import AttentionMetadata
from serve.models.llama import head_dim_of
from serve.models.loader import build_model

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_path: str) -> None:
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.hf_config = hf_config
        self.model = build_model(
            hf_config, model_path, config.load_format, self.dtype, self.device, config.seed
        )
        num_params = sum(p.numel() for p in self.model.parameters())
        logger.info("model: %.1fM parameters, %s on %s", num_params / 1e6, self.dtype, self.device)

    def allocate_kv_cache(self, max_len: int) -> ContiguousKVCache:
        """A request's own cache, big enough for its prompt and every token it may generate."""
        cfg = self.hf_config
        return ContiguousKVCache(
            cfg.num_hidden_layers, max_len, cfg.num_key_value_heads, head_dim_of(cfg),
            self.dtype, self.device,
        )

    @torch.inference_mode()
    def forward(
        self, token_ids: list[int], start_pos: int, kv_cache: ContiguousKVCache
    ) -> torch.Tensor:
        """Feed `token_ids` (which sit at positions start_pos...); return the last one's logits."""
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(start_pos, start_pos + len(token_ids), device=self.device)
        meta = AttentionMetadata.for_step(kv_cache, start_pos, len(token_ids), self.device)
        hidden = self.model(input_ids, positions, meta)  # [num_tokens, hidden_size]
        return self.model.compute_logits(hidden[-1:])  # [1, vocab_size]
