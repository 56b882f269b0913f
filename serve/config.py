"""Engine settings: one dataclass that the CLI, the offline API and the benchmarks all fill."""

from dataclasses import dataclass
from typing import Literal

import torch

from serve.heartbeat import MIN_HEARTBEAT_TIMEOUT_S
from serve.sampling_params import SEED_MAX, SEED_MIN
from serve.spec.config import SpeculativeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --8<-- [start:config]
@dataclass
class EngineConfig:
    """Every engine setting. The server's command line has one flag per field (`--page-size`
    for page_size), with the field's default, and its comment here as the flag's help."""

    model: str  # a local Hugging Face directory, a shipped config name (qwen3-0.6b) or a hub id
    # auto: bfloat16 on CUDA, float32 on CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when there is one
    # dummy: random weights from the config (for benchmarks)
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    # context length (default: the config's max_position_embeddings, or what the KV pool holds
    # if that is less)
    max_model_len: int | None = None
    seed: int = 0  # seeds random weights, and the sampling of requests that bring no seed
    tokenizer: str | None = None  # a tokenizer directory (default: the model's)
    # most requests running at once (an upper bound: free KV pages decide how many fit)
    max_num_seqs: int = 256
    # tokens one step may compute, decodes first, then prompts; a longer prompt is prefilled
    # in chunks over several steps (smaller: shorter stalls for the running requests, slower
    # prefill; milestones/06 measures the choice)
    max_num_batched_tokens: int = 8192
    # launch each step before reading the last one's tokens, so that the device never waits
    # for the host between steps (stops take effect one step late; milestones/07 measures it)
    overlap_scheduling: bool = True
    page_size: int = 16  # tokens per KV page
    # KV pool size in pages (default: measured from free GPU memory; on a CPU, a few
    # full-length sequences)
    num_pages: int | None = None
    gpu_memory_utilization: float = 0.9  # share of the GPU the engine may use, KV pool included
    # auto: flashinfer on CUDA when it is installed, else torch
    attention_backend: Literal["auto", "torch", "flashinfer"] = "auto"
    # run every step eagerly: capture no CUDA graphs (slower decode, faster start-up)
    enforce_eager: bool = False
    # reuse the KV cache of prompt prefixes that earlier requests computed (a radix tree over
    # KV pages)
    enable_prefix_caching: bool = True
    # split the model over this many processes (GPUs, or CPU processes over gloo): each holds
    # 1/N of every layer's heads and MLP columns
    tensor_parallel_size: int = 1
    # seconds without a heartbeat after which the engine core's process, or a tensor-parallel
    # worker, counts as dead (stopped or hung): its requests fail and the server exits
    heartbeat_timeout: float = 10.0
    # speculative decoding, as a dict (JSON on the command line) with vLLM's keys, e.g.
    # {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}; off when None
    speculative_config: SpeculativeConfig | None = None
# --8<-- [end:config]

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        for name in ("tensor_parallel_size", "max_num_seqs", "page_size", "num_pages",
                     "max_model_len", "max_num_batched_tokens"):  # (None: its default)
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.heartbeat_timeout >= MIN_HEARTBEAT_TIMEOUT_S:  # (NaN too)
            raise ValueError(f"heartbeat_timeout must be >= {MIN_HEARTBEAT_TIMEOUT_S:g}, "
                             f"got {self.heartbeat_timeout}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")

    @property
    def num_slots(self) -> int:
        """Rows of the persistent batch: every running request, and one being admitted."""
        return self.max_num_seqs + 1

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
