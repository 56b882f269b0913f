"""Qwen3 (dense): Llama with an RMSNorm on every head of q and k, applied before RoPE."""

from serve.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
