"""The model's HF config, device and dtype, found exactly the way the engine finds them.

The benchmarks need the config (for the vocabulary size, and to build the HF baseline) without
building the engine, so they call the engine's own resolvers rather than keep a second copy.
"""

import torch
from transformers import PretrainedConfig

from serve.config import EngineConfig
from serve.models.loader import load_config, resolve_model_path


def resolve_config_path(model: str) -> str:
    """A local dir as given, a shipped name ("qwen3-0.6b") to its .json, a hub id downloaded."""
    return resolve_model_path(model)


def load_hf_config(model: str) -> PretrainedConfig:
    return load_config(resolve_config_path(model))


def vocab_size_of(model: str) -> int:
    # get_text_config() is the config itself for text-only models, the language part otherwise.
    return load_hf_config(model).get_text_config().vocab_size


def resolve_device(device: str) -> str:
    """'auto' means cuda when there is a GPU, else cpu."""
    return str(EngineConfig(model="", device=device).torch_device())


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' means bf16 on a GPU and fp32 on a CPU."""
    return EngineConfig(model="", dtype=dtype, device=device).torch_dtype()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize() -> None:
    """Wait for queued GPU work, so a clock read after it measures the work, not the launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def parse_engine_args(pairs: list[str]) -> dict:
    """`--engine-arg KEY=VALUE` flags as LLM(...) keyword arguments (numbers become numbers,
    true/false become booleans).

    They carry a later stage's own settings (max_batch_size=128) through a CLI that every
    stage shares."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--engine-arg wants KEY=VALUE, got {pair!r}")
        if value.lower() in ("true", "false"):  # enforce_eager=false must not be truthy
            parsed[key] = value.lower() == "true"
            continue
        for convert in (int, float):
            try:
                parsed[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            parsed[key] = value
    return parsed
