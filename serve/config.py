"""Engine settings: one dataclass that the CLI, the offline API and the benchmarks all fill."""

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str  # local HF dir, shipped config name ("qwen3-0.6b"), or hub id
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: CUDA when there is one
    load_format: str = "auto"  # auto | safetensors | dummy (random weights from the config)
    max_model_len: int | None = None  # default: the config's max_position_embeddings
    seed: int = 0  # seeds random weights and requests that bring no seed of their own
    tokenizer: str | None = None  # defaults to the model's directory
    max_batch_size: int = 64  # requests that prefill and decode together (stage 1)
    batch_wait_ms: float = 0.0  # how long a batch waits to fill up before it starts

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]
