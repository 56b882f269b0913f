"""Owns the model on its device: loads it, runs a batch's forward pass, returns logits."""

import logging

import torch

from serve.config import EngineConfig
from serve.engine.kv_cache import ContiguousKVCache
from serve.engine.static_batch import StaticBatch
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

    def allocate_kv_cache(self, batch_size: int, max_len: int) -> ContiguousKVCache:
        """A batch's own cache: every row gets room for max_len tokens."""
        cfg = self.hf_config
        return ContiguousKVCache(
            cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads,
            head_dim_of(cfg), self.dtype, self.device,
        )

    @torch.inference_mode()
    def forward(self, batch: StaticBatch) -> torch.Tensor:
        """Run the batch's next step; return each row's logits at its last new token."""
        ids, positions, start_slot = batch.next_inputs()
        num_tokens = len(ids) // batch.size  # per row: the padded prompt, or 1
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(positions, dtype=torch.long, device=self.device)
        meta = AttentionMetadata.for_step(batch.kv_cache, start_slot, num_tokens, batch.pad_lens)
        hidden = self.model(input_ids, positions, meta)  # [batch * num_tokens, hidden_size]
        batch.num_slots_used = start_slot + num_tokens
        last = hidden.view(batch.size, num_tokens, -1)[:, -1]  # [batch, hidden_size]
        return self.model.compute_logits(last)  # [batch, vocab_size]
