"""A decoder layer's small ops on a GPU: torch eager, our fused (torch.compile) one, FlashInfer.

    python -m bench.fused_kernels --out fused-kernels.json

For each op, model shape and number of tokens (bf16), every variant reports:
- `graph_us`: GPU time per call, the median over replays of a CUDA graph of `--calls` calls timed
  with CUDA events. The graph launches everything at once, so this is the kernels' own time.
- `eager_us`: time per call of a plain Python loop of the same calls: launch overhead included.
- `kernels`: CUDA kernels one call launches (torch.profiler).
- `max_abs_diff`: the largest difference from the plain function run in float32 on the same data.
Inputs stay in L2 between calls where they fit, as a layer's activations often do. A variant that
fails (FlashInfer missing, a kernel that rejects a shape) records its error and the bench goes on.
"""

import argparse
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from bench.results import environment, write_result
from serve.layers.activation import silu_and_mul_math
from serve.layers.fused import fused
from serve.layers.norm import add_rms_norm_math, rms_norm_math
from serve.layers.rotary import RotaryEmbedding, qk_norm_rope_math, rope_math

SHAPES = {  # the sizes of one decoder layer
    "qwen3-0.6b": {"hidden": 1024, "heads": 16, "kv_heads": 8, "head_dim": 128,
                   "intermediate": 3072},
    "llama-3.1-8b": {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128,
                     "intermediate": 14336},
}
NUM_TOKENS = (1, 64, 256, 2048)
# Each op's torch code (the layers' reference, "eager"), and the same code under torch.compile
OURS = {"add_rms_norm": add_rms_norm_math, "rms_norm": rms_norm_math,
        "qk_norm_rope": qk_norm_rope_math, "rope": rope_math, "silu_and_mul": silu_and_mul_math}
COMPILED = {op: fused(fn) for op, fn in OURS.items()}
VARIANTS = ("eager", "fused", "flashinfer")
EPS = 1e-6
MAX_POSITIONS = 4096


def make_inputs(op: str, shape: dict, num_tokens: int, device: str) -> tuple:
    """Random bf16 arguments of our function for `op`, laid out as the model passes them: q and k
    are views into one merged qkv projection, the rope tables float32 [MAX_POSITIONS, head_dim]."""
    gen = torch.Generator().manual_seed(num_tokens)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device, torch.bfloat16)

    def norm_weight(size: int) -> nn.Parameter:
        # A Parameter, as in the model: torch.compile treats a Parameter's shape as static, so
        # the hidden size (or head_dim) is a constant in the kernel it generates.
        return nn.Parameter(1 + 0.1 * randn(size), requires_grad=False)

    n, head_dim = num_tokens, shape["head_dim"]
    if op in ("rms_norm", "add_rms_norm"):
        x, weight = randn(n, shape["hidden"]), norm_weight(shape["hidden"])
        return (x, weight, EPS) if op == "rms_norm" else (x, randn(n, shape["hidden"]), weight, EPS)
    if op == "silu_and_mul":
        return (randn(n, 2 * shape["intermediate"]),)
    q_size, kv_size = shape["heads"] * head_dim, shape["kv_heads"] * head_dim
    q, k, _ = randn(n, q_size + 2 * kv_size).split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(n, shape["heads"], head_dim), k.view(n, shape["kv_heads"], head_dim)
    rotary = RotaryEmbedding(head_dim, MAX_POSITIONS, {"rope_type": "default", "rope_theta": 1e6})
    positions = torch.randint(0, MAX_POSITIONS, (n,), generator=gen).to(device)
    tables = rotary.cos.to(device), rotary.sin.to(device)
    if op == "rope":
        return positions, q, k, *tables
    return positions, q, k, norm_weight(head_dim), EPS, norm_weight(head_dim), EPS, *tables


def to_float32(args: tuple) -> tuple:
    """The same arguments with every floating-point tensor in float32 (for the reference)."""
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def cos_sin_cache(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FlashInfer's rope table from ours: [max_positions, head_dim] float32 whose first half is
    cos and second half sin of the head_dim / 2 frequencies (our tables repeat them twice)."""
    half = cos.shape[-1] // 2
    return torch.cat([cos[:, :half], sin[:, :half]], dim=-1).contiguous()


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with t's strides: a view into a merged qkv stays laid out like one."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def flashinfer_call(op: str, flashinfer, args: tuple) -> Callable[[], tuple]:
    """FlashInfer's kernels for `op` on our arguments. fused_add_rmsnorm and the rope rotate in
    place, so they work on copies; the call returns the outputs in our functions' order."""
    if op == "rms_norm":
        x, weight, eps = args
        return lambda: (flashinfer.norm.rmsnorm(x, weight, eps),)
    if op == "add_rms_norm":
        x, residual, weight, eps = strided_copy(args[0]), strided_copy(args[1]), *args[2:]

        def add_norm() -> tuple:
            flashinfer.norm.fused_add_rmsnorm(x, residual, weight, eps)  # residual += x; x = norm
            return x, residual
        return add_norm
    if op == "silu_and_mul":
        return lambda: (flashinfer.activation.silu_and_mul(args[0]),)
    positions, q, k = args[:3]
    cache = cos_sin_cache(*args[-2:])
    head_dim = q.shape[-1]
    if op == "rope":
        q, k = strided_copy(q), strided_copy(k)

    def rotate() -> tuple:
        q_out, k_out = q, k
        if op == "qk_norm_rope":  # rmsnorm takes [tokens, heads, head_dim] with any row strides
            q_out = flashinfer.norm.rmsnorm(q, args[3], args[4])
            k_out = flashinfer.norm.rmsnorm(k, args[5], args[6])
        flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(
            positions, q_out, k_out, head_dim, cache, is_neox=True)  # neox: rotate-half layout
        return q_out, k_out
    return rotate


def ours_call(fn: Callable, args: tuple) -> Callable[[], tuple]:
    return lambda: as_tuple(fn(*args))


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def max_abs_diff(outputs: tuple, reference: tuple) -> float:
    return max((o.float() - r.float()).abs().max().item() for o, r in zip(outputs, reference,
                                                                           strict=True))


def time_us(run: Callable[[], None], calls: int, repeats: int) -> float:
    """Median over `repeats` of the CUDA-event time of run() divided by `calls`, in microseconds."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def kernels_per_call(call: Callable, calls: int = 10) -> tuple[float, dict[str, float]]:
    """How many CUDA kernels (and copies/memsets) one call launches, and which."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(names.values()) / calls, {name: n / calls for name, n in sorted(names.items())}


def measure(call: Callable, calls: int, repeats: int) -> dict:
    """Times and kernel counts of one variant; call() has run once already (compiled, built)."""
    side = torch.cuda.Stream()  # warm up off the capture stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph_us = time_us(graph.replay, calls, repeats)
    del graph

    def loop() -> None:
        for _ in range(calls):
            call()
    eager_us = time_us(loop, calls, repeats)
    kernels, names = kernels_per_call(call)
    return {"graph_us": graph_us, "eager_us": eager_us, "kernels": kernels,
            "kernel_names": names}


def run_case(op: str, shape: dict, num_tokens: int, flashinfer, calls: int, repeats: int) -> dict:
    """Every variant of one op at one size: {variant: measurements or {"error": ...}}."""
    args = make_inputs(op, shape, num_tokens, "cuda")
    reference = as_tuple(OURS[op](*to_float32(args)))
    results = {}
    for variant in VARIANTS:
        try:
            if variant == "flashinfer":
                if isinstance(flashinfer, Exception):
                    raise flashinfer  # recorded below, like any other failure
                call = flashinfer_call(op, flashinfer, args)
            else:
                call = ours_call(COMPILED[op] if variant == "fused" else OURS[op], args)
            diff = max_abs_diff(call(), reference)  # the first call: in place ops see fresh data
            results[variant] = {"max_abs_diff": diff, **measure(call, calls, repeats)}
        except Exception as error:  # one variant failing must not end the bench
            results[variant] = {"error": f"{type(error).__name__}: {error}"}
            torch.cuda.synchronize()
    return results


def summary(variants: dict) -> str:
    """One line per case: graph time / eager-loop time per call, kernels, difference."""
    if "error" in variants:
        return f"ERROR {variants['error']}"
    return "  ".join(
        f"{name} ERROR" if "error" in v else f"{name} {v['graph_us']:.2f}/{v['eager_us']:.2f}us "
        f"k={v['kernels']:g} d={v['max_abs_diff']:.3g}" for name, v in variants.items())


def import_flashinfer() -> ModuleType | Exception:
    """The flashinfer module, or the exception importing it raised."""
    try:
        import flashinfer
        import flashinfer.activation
        import flashinfer.norm
        import flashinfer.rope
        return flashinfer
    except Exception as error:
        return error


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.fused_kernels",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--ops", nargs="+", choices=list(OURS), default=list(OURS))
    parser.add_argument("--num-tokens", type=int, nargs="+", default=list(NUM_TOKENS))
    parser.add_argument("--calls", type=int, default=100, help="calls per CUDA graph / loop")
    parser.add_argument("--repeats", type=int, default=20, help="timings to take the median of")
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.fused_kernels measures GPU kernels and needs a CUDA device; none found")

    flashinfer = import_flashinfer()
    rows = []
    with torch.inference_mode():  # as the model runner calls the layers
        for model in args.models:
            for op in args.ops:
                for num_tokens in args.num_tokens:
                    try:
                        variants = run_case(op, SHAPES[model], num_tokens, flashinfer,
                                            args.calls, args.repeats)
                    except Exception as error:  # e.g. the float32 reference ran out of memory
                        variants = {"error": f"{type(error).__name__}: {error}"}
                    rows.append({"model": model, "op": op, "num_tokens": num_tokens,
                                 "variants": variants})
                    print(f"{model:13s} {op:13s} {num_tokens:5d}  {summary(variants)}",
                          flush=True)
    result = {
        "kind": "fused_kernels",
        "env": environment("cuda"),
        "flashinfer": (f"error: {type(flashinfer).__name__}: {flashinfer}"
                       if isinstance(flashinfer, Exception) else flashinfer.__version__),
        "dtype": "bfloat16", "calls": args.calls, "repeats": args.repeats, "eps": EPS,
        "shapes": {model: SHAPES[model] for model in args.models},
        "rows": rows,
    }
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
