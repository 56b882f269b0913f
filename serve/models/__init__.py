"""The model registry: config.json's `architectures` name -> our implementation."""

from torch import nn

from serve.models.llama import LlamaForCausalLM
from serve.models.qwen2 import Qwen2ForCausalLM
from serve.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # same network; sliding window is not used
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class_for(config) -> type[nn.Module]:
    """Pick our class for a HF config, or say which architectures we do support."""
    architectures = getattr(config, "architectures", None)
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"unsupported architecture {architectures}; "
                     f"nanoserve supports: {', '.join(sorted(MODEL_REGISTRY))}")
