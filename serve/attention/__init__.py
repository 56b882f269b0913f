"""Attention backends over the paged KV pool, and the one function that picks one."""

import logging

import torch

from serve.attention.base import AttentionBackend
from serve.attention.torch_backend import TorchAttentionBackend

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "flashinfer")


def make_backend(name: str, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> AttentionBackend:
    """`auto` is FlashInfer on a CUDA device where the package imports, else the torch backend."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    missing = _why_not_flashinfer(device) if name != "torch" else None
    if missing and name == "flashinfer":
        raise ValueError(f"the flashinfer attention backend needs {missing}; on a CUDA machine "
                         "run `pip install nanoserve[gpu]`, or pass --attention-backend torch")
    if name == "torch" or missing:
        logger.info("attention backend: torch (%s)",
                    f"auto: FlashInfer needs {missing}" if missing else "as asked")
        return TorchAttentionBackend(num_heads, num_kv_heads, head_dim)

    from serve.attention.flashinfer_backend import FlashInferAttentionBackend

    logger.info("attention backend: flashinfer (%s)",
                "as asked" if name == "flashinfer" else "auto: a CUDA device, flashinfer installed")
    return FlashInferAttentionBackend(num_heads, num_kv_heads, head_dim, page_size, dtype, device)


def _why_not_flashinfer(device: torch.device) -> str | None:
    """What FlashInfer lacks here, in words, or None when it can run."""
    if device.type != "cuda":
        return f"a CUDA device (this is {device.type})"
    try:
        import flashinfer  # noqa: F401
    except ImportError as error:
        return f"the flashinfer package ({error})"
    return None
