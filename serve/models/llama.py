"""The Llama decoder: embeddings, N x (attention + SwiGLU MLP), a final norm and the LM head.

Qwen2 and Qwen3 are the same network with two switches (qkv bias, q/k norm); their files subclass
this one. Module names follow the Hugging Face checkpoints so weights load by name.
"""

import torch
from torch import nn

from serve.attention.metadata import AttentionMetadata
from serve.layers.activation import silu_and_mul
from serve.layers.attention import Attention
from serve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from serve.layers.linear import ColumnParallelLinear, RowParallelLinear
from serve.layers.norm import RMSNorm
from serve.layers.rotary import RotaryEmbedding, rope_parameters
from serve.models.shapes import ModelShapes
from serve.parallel import TensorParallel


# --8<-- [start:llama_attention]
class LlamaAttention(nn.Module):
    """This rank's heads: q/k/v column-split by heads, o_proj row-split (one all-reduce)."""

    def __init__(self, config, shapes: ModelShapes, rotary: RotaryEmbedding, qkv_bias: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = shapes.num_heads, shapes.num_kv_heads
        self.head_dim = shapes.head_dim
        q_size = config.num_attention_heads * self.head_dim  # all ranks' (the checkpoint's)
        kv_size = config.num_key_value_heads * self.head_dim
        parts = {"q": q_size, "k": kv_size, "v": kv_size}
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, parts, qkv_bias, shapes.tp)
        o_bias = getattr(config, "attention_bias", False)
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, o_bias, shapes.tp)
        if qk_norm:  # Qwen3 normalizes each head of q and k before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotary = rotary
        self.attn = Attention()

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.rotary.norm_and_rotate(positions, q, k, self.q_norm, self.k_norm)
        else:
            q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(out.flatten(1))
# --8<-- [end:llama_attention]


class LlamaMLP(nn.Module):
    """This rank's columns: gate/up column-split, down_proj row-split (one all-reduce)."""

    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        size, bias = config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {"gate": size, "up": size},
                                                 bias, tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


# --8<-- [start:decoder_layer]
class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, shapes: ModelShapes, rotary: RotaryEmbedding,
                 **attn_switches) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, shapes, rotary, **attn_switches)
        self.mlp = LlamaMLP(config, shapes.tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # Pre-norm: the residual stream is carried alongside and added inside the next norm.
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm.add_and_norm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
        return self.mlp(x), residual
# --8<-- [end:decoder_layer]


class LlamaModel(nn.Module):
    def __init__(self, config, shapes: ModelShapes, **attn_switches) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   shapes.tp)
        rotary = RotaryEmbedding(shapes.head_dim, config.max_position_embeddings,
                                 rope_parameters(config))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, shapes, rotary, **attn_switches)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm.add_and_norm(x, residual)
        return x  # [num_tokens, hidden_size]


class LlamaForCausalLM(nn.Module):
    qkv_bias_default = False  # Llama's q/k/v carry a bias only if the config says so
    qk_norm = False

    def __init__(self, config, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.shapes = ModelShapes.of(config, tp)
        qkv_bias = getattr(config, "attention_bias", False) or self.qkv_bias_default
        self.model = LlamaModel(config, self.shapes, qkv_bias=qkv_bias, qk_norm=self.qk_norm)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:  # small models reuse the embedding matrix as the head
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [num_rows, vocab_size] in the model's dtype: the sampler's argmax needs no float copy
        # of the whole vocabulary, and the temperature's division makes float32 rows anyway
        return self.lm_head(hidden)
