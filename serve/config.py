"""Engine settings: one dataclass that the CLI, the offline API and the benchmarks all fill."""

from dataclasses import dataclass

import torch

DEFAULT_BATCHED_TOKENS = 32768  # a static batch prefills all its prompts in one step
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
    max_batch_size: int = 256  # an upper bound: free KV pages decide how many fit (stage 2)
    batch_wait_ms: float = 0.0  # how long a batch waits to fill up before it starts
    max_num_batched_tokens: int | None = None  # prompt tokens one prefill may hold
    # (default: max(max_model_len, DEFAULT_BATCHED_TOKENS), see prefill_token_budget)
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pool size; default: measured from free GPU memory
    gpu_memory_utilization: float = 0.9  # share of the GPU the engine may use, pool included
    attention_backend: str = "auto"  # auto | torch | flashinfer

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")

    def prefill_token_budget(self, max_model_len: int) -> int:
        """Prompt tokens one prefill may hold: enough for any one prompt, and for many."""
        return self.max_num_batched_tokens or max(max_model_len, DEFAULT_BATCHED_TOKENS)

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
