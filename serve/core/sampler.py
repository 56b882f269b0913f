"""Turn each sampled row's logits into the next token, per its request's SamplingParams.

Why hashed noise: the randomness is a pure function of (request seed, position, token id). A
counter-based hash gives every candidate token its own Exp(1) noise, and argmax(p / noise) draws
from p (the exponential race, a form of the Gumbel-max trick). So a request samples the same
tokens whichever requests share its batch, however many steps ran before, and after a preemption
that made it recompute: there is no generator state to advance, copy or capture in a CUDA graph.

Why one kernel: written as torch ops, the hash, the log, the division and the argmax are about
fifteen kernels, each reading and writing a [rows, vocab] int64 tensor. `exponential_race` is
compiled by `fused` into one reduction that makes each token's noise in registers and keeps only
the running best per row.

Why no sort on the GPU: top-k and top-p only need one threshold per row. FlashInfer finds it by
radix select (top-k) and pivot search (top-p), a few passes over the row instead of sorting it.
The filter decides which tokens stay; the race draws from the softmax's own values of those
tokens (it needs no normalization), so a row's weights do not depend on its batch company.
On the CPU a sort-based filter is the readable reference the GPU path is tested against.
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

from serve.layers.fused import fused
from serve.sampling_params import SamplingParams

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
TOKEN_SALT = 0x9E3779B1  # spreads neighbouring token ids over all 32 bits before mixing


def _splitmix64(x: int) -> int:
    """A 64-bit integer hash (SplitMix64's finalizer), on the host."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def seed_hash(seed: int) -> int:
    """The seed's half of every key of its request (written once per request: PersistentBatch)."""
    return _splitmix64(seed & MASK64)


def noise_key(seed: int, position: int) -> int:
    """The 32-bit key of the noise that samples the token at `position` of a seeded request."""
    return _splitmix64(seed_hash(seed) ^ position) & MASK32


def noise_keys(seed_hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """noise_key for many rows at once: [rows] int64 from each row's seed_hash (uint64) and the
    position it samples; SplitMix64 in numpy's uint64, whose products wrap as the hash wants."""
    x = seed_hashes ^ positions.astype(np.uint64)
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((x ^ (x >> np.uint64(31))) & np.uint64(MASK32)).astype(np.int64)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, elementwise on int64 tensors holding values below 2**32
    (each product stays below 2**59, so int64 never overflows)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def exponential_noise(keys: torch.Tensor, salted_ids: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] float32 Exp(1) noise: row r, token t gets a hash of (keys[r], t)."""
    bits = _mix32(keys[:, None] ^ salted_ids[None, :])
    uniform = ((bits >> 8).float() + 0.5) * 2.0**-24  # 24 bits, inside (0, 1) but for one:
    # float32 rounds (2**24 - 1) + 0.5 up to 2**24, a uniform of 1 and a noise of 0, and p / 0
    # is inf (NaN where p = 0, which argmax picks): a filtered token would win the race
    return -torch.log(uniform.clamp(max=1.0 - 2.0**-24))


# --8<-- [start:race]
@fused
def exponential_race(weights: torch.Tensor, keys: torch.Tensor,
                     salted_ids: torch.Tensor) -> torch.Tensor:
    """Token ids [rows], row r drawn with probability proportional to weights[r] (>= 0): the
    token whose weight, divided by its own noise, is largest. On the GPU this compiles to one
    kernel: the [rows, vocab] noise is never written to memory."""
    return (weights / exponential_noise(keys, salted_ids)).argmax(dim=-1)
# --8<-- [end:race]


@dataclass
class SamplingTensors:
    """Every sampled row's rules as tensors, gathered on the host once per step."""

    temperature: torch.Tensor  # [rows] float32 (1 for greedy rows, which ignore it)
    top_k: torch.Tensor  # [rows] int32 (FlashInfer's type), the vocabulary size where off
    top_p: torch.Tensor  # [rows] float32
    min_p: torch.Tensor  # [rows] float32
    is_greedy: torch.Tensor  # [rows] bool
    noise_keys: torch.Tensor  # [rows] int64: noise_key(seed, position) per row
    all_greedy: bool  # host flags that let the sampler skip work nobody asked for
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    # Rules few rows use, None where no row of the step does (PersistentBatch.sampling):
    logprobs_k: int = -1  # the most top log-probabilities a row asked for; -1: none asked
    # penalized rows (serve/core/penalties.py): [p] row index, its slot, its three penalties
    penalty_rows: torch.Tensor | None = None
    penalty_slots: torch.Tensor | None = None
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    # logit bias: bias_values[i] is added to row bias_rows[i]'s token bias_token_ids[i]
    bias_rows: torch.Tensor | None = None
    bias_token_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    # penalized requests admitted this step: their slots, and their tokens (slot, id) pairs
    reset_slots: torch.Tensor | None = None
    prompt_token_slots: torch.Tensor | None = None
    prompt_token_ids: torch.Tensor | None = None
    output_token_slots: torch.Tensor | None = None
    output_token_ids: torch.Tensor | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], positions: list[int],
              vocab: int) -> "SamplingTensors":
        """positions[r]: the position of the token row r samples (its sequence's length). The
        engine gathers the same columns from its persistent batch instead (PersistentBatch)."""
        from serve.core.batch import PersistentBatch

        batch = PersistentBatch(len(params), vocab)
        for slot, (p, seed) in enumerate(zip(params, seeds, strict=True)):
            batch.admit(slot, p, seed)
        return batch.sampling(np.arange(len(params)), np.asarray(positions, dtype=np.int64))

    @classmethod
    def from_arrays(cls, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                    min_p: np.ndarray, greedy: np.ndarray, keys: np.ndarray,
                    vocab: int) -> "SamplingTensors":
        """One row per sampled token, each column a numpy array (shared, not copied)."""
        return cls(torch.from_numpy(temperature), torch.from_numpy(top_k), torch.from_numpy(top_p),
                   torch.from_numpy(min_p), torch.from_numpy(greedy), torch.from_numpy(keys),
                   all_greedy=bool(greedy.all()),
                   any_top_k=bool(len(top_k)) and int(top_k.min()) < vocab,
                   any_top_p=bool(len(top_p)) and float(top_p.min()) < 1.0,
                   any_min_p=bool(len(min_p)) and float(min_p.max()) > 0.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field that is set (what moves to the device)."""
        return {f.name: value for f in fields(self)
                if isinstance(value := getattr(self, f.name), torch.Tensor)}


class Sampler:
    """Greedy, temperature, top-k, top-p and min-p, with position-keyed noise."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
        self.salted_ids = ids * TOKEN_SALT & MASK32  # [vocab], computed once

    # --8<-- [start:warm_up]
    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the race now, for one row and for many (torch.compile makes one kernel for
        each), so that the first request that samples does not wait seconds for the compiler.
        Under inference mode, as the runner samples: a compile made in another grad mode fails
        its guards there and compiles again, in the middle of a step."""
        for rows in (1, 2):
            weights = torch.ones(rows, len(self.salted_ids), device=self.salted_ids.device)
            keys = torch.zeros(rows, dtype=torch.int64, device=self.salted_ids.device)
            exponential_race(weights, keys, self.salted_ids)
    # --8<-- [end:warm_up]

    # --8<-- [start:sample]
    def __call__(self, logits: torch.Tensor, rows: SamplingTensors) -> torch.Tensor:
        # logits: [rows, vocab] in the model's dtype -> token ids [rows]
        greedy = logits.argmax(dim=-1)
        if rows.all_greedy:
            return greedy
        weights = filtered_probs(logits, rows)
        sampled = exponential_race(weights, rows.noise_keys, self.salted_ids)
        return torch.where(rows.is_greedy, greedy, sampled)
    # --8<-- [end:sample]


def filtered_probs(logits: torch.Tensor, rows: SamplingTensors) -> torch.Tensor:
    """Weights [rows, vocab] proportional to each row's distribution at its temperature with
    top-k, top-p and min-p applied (in that order), zero outside the tokens they keep."""
    logits = logits / rows.temperature[:, None]
    if logits.is_cuda:
        probs = logits.softmax(dim=-1)
        if rows.any_top_k or rows.any_top_p:
            probs = _top_k_top_p_without_sort(probs, rows)
    else:
        if rows.any_top_k or rows.any_top_p:
            logits = _top_k_top_p(logits, rows.top_k, rows.top_p)
        probs = logits.softmax(dim=-1)
    if rows.any_min_p:
        top = probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < rows.min_p[:, None] * top, 0.0)
    return probs


def _top_k_top_p_without_sort(probs: torch.Tensor, rows: SamplingTensors) -> torch.Tensor:
    """probs with the tokens outside each row's top k, then outside the smallest set covering
    top_p of what is left, set to 0: FlashInfer's threshold searches (CUDA only). Rows whose
    top_k is the vocabulary and whose top_p is 1 keep every token."""
    from flashinfer.sampling import top_k_renorm_probs, top_p_renorm_probs  # CUDA-only package

    kept = probs
    if rows.any_top_k:
        kept = top_k_renorm_probs(kept, rows.top_k)
    if rows.any_top_p:
        kept = top_p_renorm_probs(kept, rows.top_p)  # top-p needs top-k's renormalized mass
    # Only the support is taken from FlashInfer. Its renormalized values rescale every row, even
    # one that filters nothing, by a sum whose last bit depends on the order of atomic adds; the
    # softmax's own values keep each row's draw the same whatever its batch.
    return probs.masked_fill(kept == 0, 0.0)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits outside each row's top k, or outside the smallest set covering top_p, become -inf.
    The most likely token always stays, so no row is left with nothing to sample."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # drop a token once the tokens ranked above it already cover top_p; top_p == 1 keeps all
    # (a float32 cumsum can reach 1.0 before the tail does)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0) & (rank > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)
