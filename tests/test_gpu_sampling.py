"""On a GPU: the compiled exponential race and FlashInfer's sort-free top-k/top-p against the CPU
reference, seeded draws that ignore their batch, the drawn frequencies, and no host sync.

Skipped without CUDA (and without FlashInfer where it is needed); run with `pytest -m gpu`.
"""

import dataclasses
import unittest.mock

import pytest
import torch

from serve import SamplingParams
from serve.core.sampler import (
    Sampler,
    SamplingTensors,
    _mix32,
    exponential_noise,
    exponential_race,
    filtered_probs,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
VOCAB = 151_936  # Qwen's: FlashInfer's top-k splits a row this long over several thread blocks


def on_cuda(rows: SamplingTensors) -> SamplingTensors:
    return dataclasses.replace(rows, **{k: v.to(CUDA) for k, v in rows.tensors().items()})


def build(params: list[SamplingParams], seeds: list[int], positions: list[int],
          vocab: int) -> SamplingTensors:
    return on_cuda(SamplingTensors.build(params, seeds, positions, vocab))


def test_compiled_hash_is_bit_exact():
    """The int64 shifts, xors, multiplies and masks of the hash give the CPU's bits under
    inductor (a wrong bit here would change nearly every draw)."""
    x = torch.randint(0, 2**32, (4, 50_257), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(_mix32, dynamic=True, fullgraph=True)
    assert torch.equal(compiled(x.to(CUDA)).cpu(), _mix32(x))


@pytest.mark.parametrize(("num_rows", "vocab"), [(64, VOCAB), (5, 50_257)])
def test_compiled_race_draws_what_the_cpu_draws(num_rows, vocab):
    """The hash is exact, but the GPU's log and division may round differently from the CPU's
    (by an ulp or two, about 1e-7 of a score). So the rows compared are those whose winning
    score beats the runner-up by 1e-4 of itself: no rounding can change their argmax, and a
    mismatch there is a real bug. (The gap between the top two scores is about Exp(1)-distributed
    relative to the winner's, so only about one row in 10,000 is set aside.)"""
    generator = torch.Generator().manual_seed(1)
    probs = (torch.randn(2 * num_rows, vocab, generator=generator) * 2).softmax(dim=-1)
    keys = torch.randint(0, 2**32, (2 * num_rows,), generator=generator)
    salted_ids = Sampler(vocab, CPU).salted_ids
    top_two = (probs / exponential_noise(keys, salted_ids)).topk(2, dim=-1).values
    decisive = (top_two[:, 1] < top_two[:, 0] * (1 - 1e-4)).nonzero().flatten()[:num_rows]
    assert len(decisive) == num_rows, "the construction should leave enough decisive rows"
    probs, keys = probs[decisive], keys[decisive]
    on_cpu = exponential_race(probs, keys, salted_ids)
    on_gpu = exponential_race(probs.to(CUDA), keys.to(CUDA), salted_ids.to(CUDA))
    assert on_gpu.cpu().tolist() == on_cpu.tolist()


def distinct_logits(num_rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of the same distinct values, each row in its own random order: the top 1,000 are 0.01
    apart (where every top-p boundary below falls), the rest 20 / vocab apart down to -30.
    Neighbouring probabilities differ by 1e-4 of themselves or more, far above float32 rounding,
    and none underflows to 0: which tokens a filter keeps has one answer on any device."""
    return sorted_values(vocab)[torch.stack([torch.randperm(vocab, generator=generator)
                                             for _ in range(num_rows)])]


def sorted_values(vocab: int) -> torch.Tensor:
    rank = torch.arange(vocab, dtype=torch.float64)
    return torch.where(rank < 1000, -0.01 * rank, -10.0 - 20.0 * (rank - 1000) / vocab).float()


def top_p_keeping(count: int, top_k: int, vocab: int) -> float:
    """A top_p halfway between the mass of the top count-1 and the top count tokens (after
    top_k), so top-p keeps exactly count tokens with a margin no rounding can cross."""
    mass = sorted_values(vocab)[:top_k].double().softmax(dim=-1).cumsum(dim=0)
    below = mass[count - 2].item() if count > 1 else 0.0
    return (below + mass[count - 1].item()) / 2


def test_flashinfer_keeps_what_the_sorting_reference_keeps():
    pytest.importorskip("flashinfer")
    v = VOCAB
    cases = [  # (params, how many tokens they keep)
        (SamplingParams(top_p=top_p_keeping(1, v, v)), 1),
        (SamplingParams(top_k=20), 20),
        (SamplingParams(top_k=5000), 5000),  # a threshold among the tail, in another block
        (SamplingParams(top_k=100, top_p=top_p_keeping(40, 100, v)), 40),
        (SamplingParams(top_p=top_p_keeping(300, v, v)), 300),
        (SamplingParams(top_k=1), 1),
        (SamplingParams(top_k=500, min_p=0.05), 300),  # keeps p >= 0.05 p_max: e**(-0.01 i)
        (SamplingParams(), v),
        (SamplingParams(top_k=v - 1), v - 1),
        (SamplingParams(top_p=1e-6), 1),
        (SamplingParams(temperature=0.7, top_k=50), 50),
    ]
    params = [p for p, _ in cases]
    logits = distinct_logits(len(cases), v, torch.Generator().manual_seed(2))
    rows = SamplingTensors.build(params, list(range(len(cases))), [0] * len(cases), v)
    reference = filtered_probs(logits, rows)
    ours = filtered_probs(logits.to(CUDA), on_cuda(rows)).cpu()
    assert (reference > 0).sum(dim=-1).tolist() == [count for _, count in cases]
    assert torch.equal(ours > 0, reference > 0)
    torch.testing.assert_close(ours / ours.sum(dim=-1, keepdim=True),
                               reference / reference.sum(dim=-1, keepdim=True), atol=1e-5, rtol=0)


def test_a_seeded_request_draws_the_same_alone_and_in_a_batch():
    """A filtered and an unfiltered request, each alone and then among rows with other rules:
    FlashInfer's filters decide only which tokens stay, so every row's weights, and with them
    its draws, are the same whatever shares its batch."""
    pytest.importorskip("flashinfer")
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    logits = logits.to(CUDA)
    filtered = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1234)
    plain = SamplingParams(temperature=1.0, seed=99)
    others = [SamplingParams(temperature=1.3, top_k=5), SamplingParams(temperature=0),
              SamplingParams(temperature=0.5, top_p=0.5, min_p=0.1)]
    sampler = Sampler(VOCAB, CUDA)
    alone, together = [], []
    for position in range(100, 132):
        alone.append([
            sampler(logits[1:2], build([filtered], [1234], [position], VOCAB)).item(),
            sampler(logits[3:4], build([plain], [99], [position], VOCAB)).item(),
        ])
        batch = build([others[0], filtered, others[1], plain, others[2]], [1, 1234, 2, 99, 3],
                      [position, position, 7, position, 8], VOCAB)
        tokens = sampler(logits, batch).tolist()
        together.append([tokens[1], tokens[3]])
    assert alone == together
    assert len({token for token, _ in alone}) > 1  # the draws do move with the position


@pytest.mark.parametrize(
    ("params", "support"),
    [
        (SamplingParams(temperature=0.9, top_k=6, top_p=0.8), 4),  # top-p: 0.79 short, 0.89 over
        (SamplingParams(temperature=1.2, top_p=0.9, min_p=0.2), 5),  # min-p: 0.26 in, 0.19 out
    ],
)
def test_draws_follow_the_filtered_distribution(params, support):
    """40,000 draws, each with its own seed, land on each kept token about as often as the
    reference's filtered distribution says (0.015 is six standard deviations or more), and
    never on a token the filters drop."""
    pytest.importorskip("flashinfer")
    vocab, draws = 1024, 40_000
    logits = torch.full((1, vocab), -10.0)
    logits[0, :8] = torch.tensor([2.0, 1.6, 1.2, 0.8, 0.4, 0.0, -0.4, -0.8])
    expected = filtered_probs(logits, SamplingTensors.build([params], [0], [0], vocab))[0]
    expected = expected / expected.sum()
    assert (expected > 0).sum().item() == support
    rows = build([params] * draws, list(range(draws)), [0] * draws, vocab)
    picks = Sampler(vocab, CUDA)(logits.to(CUDA).expand(draws, vocab).contiguous(), rows)
    frequencies = torch.bincount(picks.cpu(), minlength=vocab) / draws
    assert frequencies[expected == 0].sum().item() == 0.0
    assert (frequencies - expected).abs().max().item() < 0.015


def test_sampling_never_waits_for_the_gpu():
    """The sampler queues its work and returns: no .item(), no data-dependent shape, nothing
    that makes the host wait (the engine's one sync is on the returned token ids)."""
    pytest.importorskip("flashinfer")
    params = [SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05),
              SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0),
              SamplingParams(temperature=1.1, top_k=3), SamplingParams(min_p=0.2)]
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(4))
    logits = logits.to(CUDA)
    rows = build(params, [1, 2, 3, 4, 5], [10, 20, 30, 40, 50], VOCAB)
    sampler = Sampler(VOCAB, CUDA)
    sampler(logits, rows)  # compiles the race and loads FlashInfer's kernels, which may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sampler(logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tokens.shape == (len(params),) and tokens.is_cuda


def test_a_warmed_up_sampler_never_compiles_again():
    """Sampler.warm_up compiles the race as steps call it (under inference mode, for one row
    and for many): no later batch size may compile again. Warmed up in the wrong grad mode, a
    one-row step once waited 127 ms for the compiler (milestones/04/probe-h100-677a5a4a-...)."""
    torch._dynamo.reset()  # forget what earlier tests compiled
    sampler = Sampler(VOCAB, CUDA)
    sampler.warm_up()
    with torch.inference_mode(), \
            unittest.mock.patch.object(torch._dynamo.config, "error_on_recompile", True):
        for num_rows in (64, 5, 2, 1):
            params = [SamplingParams(temperature=0.6)] * num_rows
            rows = build(params, list(range(num_rows)), [7] * num_rows, VOCAB)
            logits = torch.randn(num_rows, VOCAB, device=CUDA)
            assert sampler(logits, rows).shape == (num_rows,)
