"""Sampling rules: seeds, top-k/top-p/min-p, and every way a request stops."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from serve import LLM, SamplingParams
from serve.core.sampler import (
    Sampler,
    SamplingTensors,
    exponential_noise,
    exponential_race,
    filtered_probs,
    noise_key,
    noise_keys,
    seed_hash,
)
from serve.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SAMPLING_EPS


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(qwen3_dir, device="cpu", dtype="float32")


def generate_one(llm, prompt, **params):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def test_same_seed_same_tokens_and_different_seeds_differ(llm):
    params = dict(temperature=1.0, max_tokens=24, ignore_eos=True)
    first = generate_one(llm, "def main():", seed=7, **params)
    again = generate_one(llm, "def main():", seed=7, **params)
    other = generate_one(llm, "def main():", seed=8, **params)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_seeded_request_ignores_what_ran_before(llm):
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["import os"], params, use_tqdm=False)[0]
    unseeded = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    llm.generate(["x = 1", "y = 2"], unseeded, use_tqdm=False)  # moves the shared generator
    after = llm.generate(["import os"], params, use_tqdm=False)[0]
    assert alone.token_ids == after.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = generate_one(llm, "class A:", temperature=0, max_tokens=16, ignore_eos=True)
    top_k = generate_one(
        llm, "class A:", temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True, seed=1
    )
    top_p = generate_one(
        llm, "class A:", temperature=1.5, top_p=1e-6, max_tokens=16, ignore_eos=True, seed=2
    )
    assert greedy.token_ids == top_k.token_ids == top_p.token_ids


def sample_support(logits: list[float], draws: int = 400, **params) -> set[int]:
    """Which token ids the sampler ever picks for fixed logits (one seed per draw)."""
    sampler = Sampler(len(logits), torch.device("cpu"))
    rows = torch.tensor([logits] * draws)
    ps = [SamplingParams(temperature=1.0, **params)] * draws
    tensors = SamplingTensors.build(ps, seeds=list(range(draws)), positions=[0] * draws,
                                    vocab=len(logits))
    return set(sampler(rows, tensors).tolist())


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()


@pytest.mark.parametrize(
    ("params", "support"),
    [
        ({}, {0, 1, 2, 3}),
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.7}, {0, 1}),  # 0.5 alone is short of 0.7; 0.5 + 0.3 covers it
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"min_p": 0.2}, {0, 1, 2}),  # keeps p >= 0.2 * 0.5 = 0.1
        ({"min_p": 0.7}, {0}),
    ],
)
def test_filters_keep_exactly_the_allowed_tokens(params, support):
    assert sample_support(PROBS, **params) == support


def test_max_tokens_ends_with_length(llm):
    out = generate_one(llm, "for i in", temperature=0, max_tokens=7, ignore_eos=True)
    assert len(out.token_ids) == 7
    assert out.finish_reason == "length"


def test_stop_string_is_cut_from_the_text(llm):
    full = generate_one(llm, "def f(x):", temperature=0, max_tokens=40, ignore_eos=True)
    text = full.text
    assert len(text) > 12, "the tiny model should produce some text"
    stop = text[8:11]
    first = text.find(stop)
    out = generate_one(
        llm,
        "def f(x):",
        temperature=0,
        max_tokens=40,
        ignore_eos=True,
        stop=["never-appears", stop],
    )
    assert out.finish_reason == "stop"
    assert out.text == text[:first]
    assert stop not in out.text


def test_streamed_text_never_shows_a_stop_string(llm):
    full = generate_one(llm, "while True:", temperature=0, max_tokens=40, ignore_eos=True)
    stop = full.text[10:14]
    engine = llm.engine
    engine.add_request(
        "s",
        "while True:",
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
    )
    pieces, last = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            pieces.append(output.new_text)
            last = output
    assert "".join(pieces) == last.text == full.text[: full.text.find(stop)]


def test_stop_token_id_ends_the_request(llm):
    full = generate_one(llm, "if x:", temperature=0, max_tokens=20, ignore_eos=True)
    stop_id = full.token_ids[4]
    first = full.token_ids.index(stop_id)
    out = generate_one(llm, "if x:", temperature=0, max_tokens=20, stop_token_ids=[stop_id])
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop"


def test_eos_stops_unless_ignored(llm):
    full = generate_one(llm, "return", temperature=0, max_tokens=12, ignore_eos=True)
    eos = full.token_ids[3]
    first = full.token_ids.index(eos)
    core = llm.engine.core
    saved, core.eos_token_ids = core.eos_token_ids, {eos}  # pretend this token is the model's EOS
    try:
        stopped = generate_one(llm, "return", temperature=0, max_tokens=12)
        ignored = generate_one(llm, "return", temperature=0, max_tokens=12, ignore_eos=True)
    finally:
        core.eos_token_ids = saved
    assert stopped.token_ids == full.token_ids[: first + 1]
    assert stopped.finish_reason == "stop"
    assert ignored.token_ids == full.token_ids and ignored.finish_reason == "length"


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -2},
        {"min_p": 1.5},
        {"max_tokens": -1},
        {"stop": [""]},
        {"n": 0},
        {"presence_penalty": float("nan")},
        {"repetition_penalty": 0.0},
        {"logit_bias": {1: 101.0}},
        {"logprobs": 21},
        {"prompt_logprobs": -1},
    ],
)
def test_bad_params_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": float("nan")},
        {"min_p": float("nan")},
        {"seed": 2**63},
        {"stop": ["x"] * (MAX_STOP_STRINGS + 1)},
        {"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]},
        {"stop_token_ids": [-1]},
    ],
)
def test_values_the_sampler_cannot_use_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_every_bad_field_is_named_at_once():
    with pytest.raises(ValueError) as error:
        SamplingParams(temperature=-1, top_k=-5, max_tokens=-1)
    assert [line.split(" ")[0] for line in str(error.value).split("; ")] == [
        "temperature", "top_k", "max_tokens"
    ]


def test_huge_top_k_is_accepted():
    assert SamplingParams(top_k=2**70).top_k == 2**70  # the sampler clamps it to the vocabulary


def test_greedy_below_the_sampling_epsilon():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=SAMPLING_EPS / 10).greedy
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy


def test_extreme_values_give_finite_probabilities_and_keep_the_top_token():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]] * 4)
    params = [
        SamplingParams(top_p=1e-300),  # rounds to 0.0 in float32
        SamplingParams(temperature=1e-300),  # greedy: its row must not turn NaN
        SamplingParams(top_k=2**63),  # past int64 once it reaches a tensor
        SamplingParams(temperature=SAMPLING_EPS, top_k=2, min_p=1.0),
    ]
    rows = SamplingTensors.build(params, [0, 1, 2, 3], [0, 0, 0, 0], vocab=4)
    probs = filtered_probs(logits, rows)
    assert torch.isfinite(probs).all()
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.allclose(probs[2], logits[2].softmax(-1))
    assert probs[3].argmax().item() == 1
    tokens = Sampler(4, torch.device("cpu"))(logits, rows)
    assert tokens[:2].tolist() == [1, 1] and tokens[3].item() == 1


def filter_one(logits: torch.Tensor, **params) -> torch.Tensor:
    vocab = logits.shape[-1]
    rows = SamplingTensors.build([SamplingParams(**params)], [0], [0], vocab)
    return filtered_probs(logits, rows)


def test_top_p_one_keeps_the_whole_tail():
    # a long, steep distribution: float32 cumsum reaches 1.0 well before the last token
    logits = torch.linspace(20, -20, 50_000)[None, :]
    probs = filter_one(logits, temperature=1.0, top_p=1.0, top_k=10)
    assert (probs > 0).sum().item() == 10
    probs = filter_one(logits, temperature=1.0, top_p=1.0, min_p=1e-30)
    assert (probs > 0).sum().item() == (logits.softmax(-1) > 0).sum().item()


def test_tiny_top_p_keeps_the_most_likely_token():
    # 1e-300 is 0.0 in float32: the top token must stay anyway, never a row of NaN
    logits = torch.tensor([[0.1, 2.0, 0.5]])
    probs = filter_one(logits, temperature=1.0, top_p=1e-300)
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_huge_top_k_is_the_whole_vocabulary():
    rows = SamplingTensors.build([SamplingParams(top_k=2**63)], [0], [0], vocab=3)
    assert rows.top_k.tolist() == [3] and not rows.any_top_k


def test_draws_follow_the_distribution():
    """The position-keyed noise is unbiased: 4,000 rows, each with its own (seed, position),
    pick each token about as often as its probability says."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = 4000
    tensors = SamplingTensors.build([SamplingParams(temperature=1.0)] * draws,
                                    seeds=[7] * draws, positions=list(range(draws)), vocab=4)
    picks = Sampler(4, torch.device("cpu"))(probs.log().repeat(draws, 1), tensors)
    frequencies = torch.bincount(picks, minlength=4) / draws
    assert (frequencies - probs).abs().max().item() < 0.03  # about 4 standard deviations


def test_noise_depends_on_seed_and_position_only():
    """Row order and batch company change nothing: the same (seed, position) draws the same."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(50, torch.device("cpu"))
    params = [SamplingParams(temperature=1.0)] * 3
    together = sampler(logits, SamplingTensors.build(params, [1, 2, 3], [10, 20, 30], 50))
    reversed_rows = sampler(logits.flip(0), SamplingTensors.build(params, [3, 2, 1],
                                                                 [30, 20, 10], 50))
    alone = sampler(logits[1:2], SamplingTensors.build(params[:1], [2], [20], 50))
    assert together.tolist() == reversed_rows.flip(0).tolist()
    assert together[1].item() == alone.item()


def test_a_bad_prompt_leaves_the_llm_usable(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", [10**9]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # the good prompt was taken back
    out = llm.generate(["next"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].token_ids) == 2


def test_the_smallest_noise_never_lets_a_filtered_token_win():
    """At seed 0, position 2990, token 3277's hash is the largest there is; float32 once rounded
    its uniform up to 1, its noise to 0 and its score to inf (NaN where filtered away), so it
    won whatever its probability. It is just another unlikely token now."""
    vocab, token = 4096, 3277
    logits = torch.zeros(2, vocab)
    logits[:, 0] = 30.0  # token 0 carries all but about 1e-13 of each token's mass
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=1)]
    rows = SamplingTensors.build(params, seeds=[0, 0], positions=[2990, 2990], vocab=vocab)
    sampler = Sampler(vocab, torch.device("cpu"))
    noise = exponential_noise(rows.noise_keys, sampler.salted_ids)
    assert noise[0].argmin().item() == token and 0 < noise[0, token].item() < 1e-7
    assert sampler(logits, rows).tolist() == [0, 0]


def test_the_race_traces_as_one_graph():
    """What lets torch.compile fuse the race into one GPU kernel: no Python branch on tensor
    values, no graph break (fullgraph=True would raise). Traced here without compiling."""
    probs = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)).softmax(-1)
    keys = torch.tensor([noise_key(seed, 5) for seed in (1, 2, 3)])
    salted_ids = Sampler(1000, torch.device("cpu")).salted_ids
    traced = torch.compile(exponential_race.__wrapped__, dynamic=True, fullgraph=True,
                           backend="eager")
    expected = (probs / exponential_noise(keys, salted_ids)).argmax(dim=-1)
    assert traced(probs, keys, salted_ids).tolist() == expected.tolist()
    assert exponential_race(probs, keys, salted_ids).tolist() == expected.tolist()


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**20)), min_size=1,
                max_size=20))
def test_the_batchs_noise_keys_are_the_per_row_keys(rows):
    """The persistent batch hashes every row's key at once, in numpy's wrapping uint64: the same
    keys as the scalar reference, so a request samples what it sampled before."""
    seeds, positions = zip(*rows, strict=True)
    hashes = np.array([seed_hash(seed) for seed in seeds], dtype=np.uint64)
    keys = noise_keys(hashes, np.array(positions, dtype=np.int64))
    assert keys.tolist() == [noise_key(s, p) for s, p in rows]
