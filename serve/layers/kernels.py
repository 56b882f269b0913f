"""Where FlashInfer's fused kernels stand in for a layer's torch code.

On a CUDA tensor in bf16 or fp16, with flashinfer installed, RMSNorm (with the residual add),
RoPE and SiLU-and-mul each run as one FlashInfer kernel. Everywhere else the layers run the torch
code written beside them, which is also the reference the GPU tests hold these kernels to.

Why FlashInfer and not torch.compile on the same torch code: a compiled function costs several
times more host time per call (its guards and wrappers), which an eager step, a prefill, pays
four times per layer, and its kernels are no faster (bench.fused_kernels compares the two).
"""

import torch

try:
    import flashinfer.activation
    import flashinfer.norm
    import flashinfer.rope
except ImportError:  # a CPU-only install: the torch code runs
    flashinfer = None

FLASHINFER_DTYPES = (torch.bfloat16, torch.float16)


def use_flashinfer(x: torch.Tensor) -> bool:
    return flashinfer is not None and x.is_cuda and x.dtype in FLASHINFER_DTYPES
