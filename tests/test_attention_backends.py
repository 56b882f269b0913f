"""Attention over the paged pool equals plain causal attention over the same K/V laid out flat.

Every case scatters each sequence over shuffled pages of a pool full of noise, writes the tokens
it had before this step into the pool, then runs one step with only the new tokens:
prefill (all tokens new), chunk (the last few new) or decode (one new).
"""

from dataclasses import replace

import pytest
import torch

from serve.attention import make_backend
from serve.attention.kv_cache import store_kv
from serve.attention.metadata import AttentionMetadata
from serve.attention.torch_backend import TorchAttentionBackend
from serve.core.kv.kv_pool import KVPool
from serve.core.step_inputs import build_step_inputs

LAYER = 1  # not 0, so a backend that ignores `layer` reads the wrong (noise) layer and fails


def _slot(pages: list[int], pos: int, page_size: int) -> int:
    """Where token `pos` of a sequence lives in the pool (page, then offset in it)."""
    return pages[pos // page_size] * page_size + pos % page_size


def make_metadata(
    page_tables: list[list[int]], query_lens: list[int], seq_lens: list[int], page_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """The step's metadata, built exactly as the engine builds it (then moved as the runner
    moves it: the arrays the GPU reads go to the device, the indptr arrays stay on the host)."""
    new_tokens = [[0] * q for q in query_lens]
    cached = [n - q for n, q in zip(seq_lens, query_lens, strict=True)]
    meta = build_step_inputs(new_tokens, cached, page_tables, page_size).attention
    return replace(meta, slot_mapping=meta.slot_mapping.to(device),
                   kv_indices=meta.kv_indices.to(device))


class Step:
    """A random ragged step: its sequences' full K/V, their page tables, and the new tokens' Q."""

    def __init__(self, kind: str, page_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str, max_len: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)

        def randint(low: int, high: int) -> int:  # inclusive
            return int(torch.randint(low, high + 1, (), generator=gen))

        self.seq_lens = [randint(2, max_len) for _ in range(5)] + [1]  # one 1-token sequence too
        if kind == "chunk":
            self.seq_lens[-1] = 2  # a chunk needs cached tokens before it
        if kind == "prefill":
            self.query_lens = self.seq_lens.copy()
        elif kind == "chunk":
            self.query_lens = [randint(1, n - 1) for n in self.seq_lens]
        else:
            self.query_lens = [1] * len(self.seq_lens)
        # Pages are dealt from a shuffled pool with spares, so tables are scattered and some
        # pages belong to nobody; every page starts as noise that must never be attended to.
        num_pages_needed = [-(-n // page_size) for n in self.seq_lens]
        shuffled = torch.randperm(sum(num_pages_needed) + 8, generator=gen).tolist()
        self.page_tables, start = [], 0
        for count in num_pages_needed:
            self.page_tables.append(shuffled[start : start + count])
            start += count
        self.pool = KVPool(2, len(shuffled), page_size, num_kv_heads, head_dim, dtype, device)
        self.pool.k.copy_(torch.randn(self.pool.k.shape, generator=gen))
        self.pool.v.copy_(torch.randn(self.pool.v.shape, generator=gen))

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)

        self.keys = [randn(n, num_kv_heads, head_dim) for n in self.seq_lens]
        self.values = [randn(n, num_kv_heads, head_dim) for n in self.seq_lens]
        self.queries = [randn(q, num_heads, head_dim) for q in self.query_lens]

    def write_cached_tokens(self) -> None:
        """Store the tokens that earlier steps would have written (all but the new ones)."""
        for pages, query_len, seq_len, k, v in zip(self.page_tables, self.query_lens,
                                                   self.seq_lens, self.keys, self.values,
                                                   strict=True):
            cached = seq_len - query_len
            slots = [_slot(pages, pos, self.pool.page_size) for pos in range(cached)]
            slots = torch.tensor(slots, dtype=torch.long, device=k.device)
            store_kv(*self.pool.layer(LAYER), slots, k[:cached], v[:cached])

    def run(self, backend) -> torch.Tensor:
        """One step through `backend`: [num_new_tokens, num_heads, head_dim]."""
        self.write_cached_tokens()
        meta = make_metadata(self.page_tables, self.query_lens, self.seq_lens,
                             self.pool.page_size, self.pool.k.device)
        new_k = torch.cat([k[n - q :] for k, q, n in zip(self.keys, self.query_lens,
                                                         self.seq_lens, strict=True)])
        new_v = torch.cat([v[n - q :] for v, q, n in zip(self.values, self.query_lens,
                                                         self.seq_lens, strict=True)])
        backend.plan(meta)
        return backend.forward(torch.cat(self.queries), new_k, new_v, self.pool.layer(LAYER), meta)

    def reference(self) -> torch.Tensor:
        """Causal attention over the flat, unpaged K/V, in float64."""
        outputs = []
        for q, k, v in zip(self.queries, self.keys, self.values, strict=True):
            q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))  # [heads, len, dim]
            group = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
            scores = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5  # [heads, query_len, seq_len]
            query_len, seq_len = q.shape[1], k.shape[1]
            # new token i sits at position seq_len - query_len + i and sees keys up to there
            mask = torch.ones(query_len, seq_len, dtype=torch.bool).tril(seq_len - query_len)
            scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
            outputs.append((scores.softmax(-1) @ v).transpose(0, 1))
        return torch.cat(outputs)


KINDS = ("prefill", "chunk", "decode")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_torch_backend_matches_flat_attention(kind, page_size, num_heads, num_kv_heads):
    for seed in range(3):
        step = Step(kind, page_size, num_heads, num_kv_heads, head_dim=16, dtype=torch.float32,
                    device="cpu", max_len=40, seed=seed)
        out = step.run(TorchAttentionBackend(num_heads, num_kv_heads, head_dim=16))
        torch.testing.assert_close(out.double(), step.reference(), atol=1e-5, rtol=1e-5)


def test_make_backend_picks_torch_on_cpu():
    args = (4, 2, 16, 16, torch.float32, "cpu")
    assert make_backend("auto", *args).name == "torch"
    assert make_backend("torch", *args).name == "torch"
    with pytest.raises(ValueError, match="nanoserve\\[gpu\\]"):
        make_backend("flashinfer", *args)
    with pytest.raises(ValueError, match="auto, torch, flashinfer"):
        make_backend("flash", *args)


def _flashinfer_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _flashinfer_available(), reason="needs a CUDA device and flashinfer")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim",
    [(16, 8, 128), (32, 8, 128), (28, 4, 128), (8, 1, 64)],
    # Qwen3-0.6B and Llama-3-8B-like decode on CUDA cores (groups 2, 4); groups 7 and 8 on tensor
    # cores, 7 being a size the CUDA-core decode kernel is not compiled for.
    ids=["qwen3-0.6b", "group4", "group7", "group8-dim64"],
)
def test_flashinfer_matches_torch_backend(kind, page_size, num_heads, num_kv_heads, head_dim):
    from serve.attention.flashinfer_backend import FlashInferAttentionBackend

    flashinfer = FlashInferAttentionBackend(
        num_heads, num_kv_heads, head_dim, page_size, torch.bfloat16, torch.device("cuda")
    )
    reference = TorchAttentionBackend(num_heads, num_kv_heads, head_dim)
    for seed in range(2):  # max_len 700: long enough for FlashInfer to split KV across SMs
        step = Step(kind, page_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda",
                    max_len=700, seed=seed)
        # Both runs store the same new K/V into the same slots, so they see the same pool.
        out, expected = step.run(flashinfer).float(), step.run(reference).float()
        relative_error = (out - expected).norm() / expected.norm()
        assert relative_error < 1e-2, f"{kind} seed {seed}: relative error {relative_error:.2e}"
