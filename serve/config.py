"""Engine settings: one dataclass that the CLI, the offline API and the benchmarks all fill."""

from dataclasses import dataclass

import torch

DEFAULT_BATCHED_TOKENS = 16384  # tokens one step may compute when max_model_len is smaller
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str  # local HF dir, shipped config name ("qwen3-0.6b"), or hub id
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: CUDA when there is one
    load_format: str = "auto"  # auto | safetensors | dummy (random weights from the config)
    max_model_len: int | None = None  # default: the config's max_position_embeddings
    seed: int = 0  # seeds random weights, and the sampling of requests that bring no seed
    tokenizer: str | None = None  # defaults to the model's directory
    max_num_seqs: int = 256  # most requests running at once (free KV pages may allow fewer)
    # Tokens one step may compute, prompts and decodes together. A prompt is prefilled in one
    # step, so this must hold the longest sequence (default: max(max_model_len, 16384)).
    max_num_batched_tokens: int | None = None
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pool size; default: measured from free GPU memory
    gpu_memory_utilization: float = 0.9  # share of the GPU the engine may use, pool included
    attention_backend: str = "auto"  # auto | torch | flashinfer
    enforce_eager: bool = False  # never replay CUDA graphs: every step launches its kernels
    enable_prefix_caching: bool = True  # reuse the KV of prompt prefixes earlier requests computed

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {self.num_pages}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")

    def step_token_budget(self, max_model_len: int) -> int:
        """Tokens one step may compute: the longest sequence must fit, since a prompt (or a
        preempted request's prompt and output) is prefilled in one step."""
        budget = self.max_num_batched_tokens or max(max_model_len, DEFAULT_BATCHED_TOKENS)
        if budget < max_model_len:
            raise ValueError(f"max_num_batched_tokens ({budget}) is smaller than max_model_len "
                             f"({max_model_len}): a prompt is prefilled in one step, so raise "
                             "max_num_batched_tokens or lower max_model_len")
        return budget

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
