"""`fused`: run a small elementwise function as one GPU kernel instead of one per torch op.

`torch.compile` traces the function and generates one Triton kernel that does all of it in
registers; on a CPU the same function runs as plain torch, so the code a reader checks is the
code the GPU runs. The sampler's race uses it (no library kernel draws with our hash noise);
the layers' norms, RoPE and SiLU use FlashInfer's kernels instead (serve/layers/kernels.py).
"""

import functools
from collections.abc import Callable

import torch


def fused(fn: Callable) -> Callable:
    """fn compiled into as few kernels as torch.compile can make when its first argument is a
    CUDA tensor; fn itself otherwise. `dynamic=True` compiles one kernel for every number of
    tokens (sizes 0 and 1 get their own), so a new batch size never triggers a recompile."""
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)  # lazy: compiles at first call

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return compiled(*args, **kwargs) if args[0].is_cuda else fn(*args, **kwargs)

    return run
