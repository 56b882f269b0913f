"""Speculative decoding with n-gram drafts: the configuration, the proposer, the acceptance rule,
and the engine, whose tokens must equal decoding without drafts in every situation."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from serve import LLM, SamplingParams
from serve.config import EngineConfig
from serve.core.request import Request
from serve.core.sampler import Sampler, SamplingTensors
from serve.core.step_inputs import sampled_offsets
from serve.messages import EngineStats
from serve.server.cli import make_parser
from serve.spec import SpeculativeConfig
from serve.spec.ngram import NgramProposer
from serve.spec.verify import accepted_tokens
from tests.helpers import generate_on_cpu as generate

DEMO = str(Path(__file__).parent.parent / "bench" / "demo_models" / "pycode-8m")
DEMO_DRAFT = str(Path(__file__).parent.parent / "bench" / "demo_models" / "pycode-2m")
# (speculating at any batch size: the tests check tokens, not speed)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2, "disable_by_batch_size": None}
SOURCE = (Path(__file__).parent.parent / "serve" / "core" / "scheduler.py").read_text()
CODE_PROMPTS = [SOURCE[i : i + 400] for i in range(0, 4000, 500)]


# --- configuration ---------------------------------------------------------------------------

def test_config_takes_vllms_keys_and_fills_the_lookup_range_as_vllm_does():
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3,
                                          "prompt_lookup_max": 4})
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (4, 4)
    assert SpeculativeConfig.from_dict({"model": DEMO_DRAFT, "num_speculative_tokens": 2}) \
        == SpeculativeConfig("draft_model", 2, model=DEMO_DRAFT)
    assert SpeculativeConfig.from_dict({"model": "[ngram]", "num_speculative_tokens": 2,
                                        "prompt_lookup_min": 2}).prompt_lookup_max == 2
    assert SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2,
                                        "disable_by_batch_size": None}).disable_by_batch_size \
        is None


@pytest.mark.parametrize("config, words", [
    ({"method": "ngram", "num_speculative_tokens": 4, "k": 1}, "unknown keys ['k']"),
    ({"method": "eagle", "num_speculative_tokens": 4}, "'eagle' is not supported"),
    ({"method": "draft_model", "num_speculative_tokens": 4}, "needs 'model'"),
    ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
    ({"num_speculative_tokens": 4}, "needs 'method'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "must be >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, "must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5,
      "prompt_lookup_max": 3}, "prompt_lookup_min <= prompt_lookup_max"),
])
def test_config_refuses_what_it_cannot_do_by_name(config, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SpeculativeConfig.from_dict(config)


def test_command_line_flag_parses_json_and_reports_bad_json_in_one_line(capsys):
    parser = make_parser()
    args = parser.parse_args(["--model", "m", "--speculative-config",
                              '{"method": "ngram", "num_speculative_tokens": 4}'])
    assert args.speculative_config == SpeculativeConfig("ngram", 4)
    assert parser.parse_args(["--model", "m"]).speculative_config is None
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--model", "m", "--speculative-config", "{ngram}"])
    assert exit_info.value.code == 2
    assert "is not JSON" in capsys.readouterr().err


# --- the proposer ----------------------------------------------------------------------------

def request_of(tokens: list[int], num_prompt: int) -> Request:
    request = Request("r", tokens[:num_prompt], None, 100, 0)
    request.output_token_ids = tokens[num_prompt:]
    return request


def reference_proposal(tokens: list[int], low: int, high: int, k: int) -> list[int]:
    """The rule, by brute force: for the largest n with an earlier occurrence of the last n
    tokens, what followed the first such occurrence."""
    for n in range(min(high, len(tokens)), low - 1, -1):
        tail = tokens[len(tokens) - n :]
        for start in range(len(tokens) - n):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []


def test_ngram_proposes_what_followed_the_first_copy_of_the_longest_tail():
    proposer = NgramProposer(SpeculativeConfig("ngram", 3, prompt_lookup_max=3,
                                               prompt_lookup_min=1))
    # "7 8 9 1" then "7 8 9 2": the tail "7 8 9" first occurred at the start
    assert proposer.propose_one(request_of([7, 8, 9, 1, 5, 7, 8, 9], 4), 3) == [1, 5, 7]
    assert proposer.propose_one(request_of([1, 2, 3, 4], 4), 3) == []  # nothing repeats
    assert proposer.propose_one(request_of([4, 4], 1), 3) == [4]  # at most what exists


@pytest.mark.parametrize("seed", range(20))
def test_ngram_index_grown_step_by_step_agrees_with_brute_force(seed):
    rng = random.Random(seed)
    low = rng.randint(1, 3)
    high = rng.randint(low, 5)
    proposer = NgramProposer(SpeculativeConfig("ngram", 4, prompt_lookup_max=high,
                                               prompt_lookup_min=low))
    tokens = [rng.randrange(4) for _ in range(rng.randint(1, 30))]
    request = request_of(tokens, len(tokens))
    for _ in range(15):  # a few tokens arrive per step; the index catches up incrementally
        assert proposer.propose_one(request, 4) == reference_proposal(
            request.prompt_token_ids + request.output_token_ids, low, high, 4)
        request.output_token_ids += [rng.randrange(4) for _ in range(rng.randint(1, 3))]


# --- acceptance ------------------------------------------------------------------------------

def test_accepted_tokens_keep_matches_then_the_sample_at_the_first_mismatch():
    assert accepted_tokens([5, 6, 7], [5, 6, 9, 1]) == [5, 6, 9]
    assert accepted_tokens([5, 6, 7], [5, 6, 7, 1]) == [5, 6, 7, 1]  # all, and the bonus
    assert accepted_tokens([5, 6, 7], [4, 6, 7, 1]) == [4]
    assert accepted_tokens([], [3]) == [3]


def test_sampled_offsets_are_each_rows_last_positions():
    ends = np.array([4, 10, 12])
    assert sampled_offsets(ends, np.array([1, 0, 1])).tolist() == [4, 12]
    assert sampled_offsets(ends, np.array([3, 0, 2])).tolist() == [2, 3, 4, 11, 12]


def test_verify_keeps_the_targets_distribution_against_an_adversarial_draft():
    """The first token a verify row yields is distributed as the target's p, even when the draft
    is p's least likely token; that draft is accepted with probability p(draft) (speculative
    sampling with a certain draft), and the token after an accepted draft follows p's next
    row. A chi-squared test over 20,000 seeds, on an 8-token vocabulary."""
    vocab, trials = 8, 20_000
    torch.manual_seed(0)
    logits = torch.randn(2, vocab) * 1.5
    p0, p1 = logits.softmax(-1)
    draft = int(p0.argmin())
    sampler = Sampler(vocab, torch.device("cpu"))
    params = SamplingParams(temperature=1.0)
    firsts, accepted_next = np.zeros(vocab), np.zeros(vocab)
    rows = SamplingTensors.build([params] * 2 * trials, [s // 2 for s in range(2 * trials)],
                                 [10, 11] * trials, vocab)
    samples = sampler(logits.repeat(trials, 1), rows).view(trials, 2).tolist()
    for pair in samples:
        kept = accepted_tokens([draft], pair)
        firsts[kept[0]] += 1
        if len(kept) == 2:
            accepted_next[kept[1]] += 1
    for counts, p in ((firsts, p0), (accepted_next, p1)):
        expected = counts.sum() * p.double().numpy()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 24.3  # the 0.001 tail of chi-squared with 7 degrees of freedom
    rate, p = firsts[draft] / trials, float(p0[draft])
    assert abs(rate - p) < 4 * (p * (1 - p) / trials) ** 0.5


# --- the engine: the same tokens as without drafts ---------------------------------------------

def test_demo_model_greedy_and_seeded_equal_decoding_without_drafts_and_drafts_are_accepted():
    params = [SamplingParams(temperature=0, max_tokens=40),
              SamplingParams(temperature=0.7, seed=3, max_tokens=40)] * (len(CODE_PROMPTS) // 2)
    plain, _ = generate(DEMO, CODE_PROMPTS, params)
    spec, stats = generate(DEMO, CODE_PROMPTS, params, speculative_config=NGRAM)
    assert spec == plain
    stats = stats[-1]
    assert stats.spec_num_drafts > 0 and 0 < stats.spec_num_accepted_tokens \
        <= stats.spec_num_draft_tokens
    # the per-position counts: each position's accepted drafts sum to the whole, in order
    assert sum(stats.spec_accepted_per_pos) == stats.spec_num_accepted_tokens
    assert list(stats.spec_accepted_per_pos) == sorted(stats.spec_accepted_per_pos, reverse=True)


def test_prefix_hits_chunks_preemption_and_stops_inside_an_accepted_run():
    """A tiny pool (preemptions), a small step budget (chunked prompts, drafts cut to fit),
    repeated prompts (prefix-cache hits), max_tokens and a stop token and a stop string that
    fall inside runs of accepted drafts: the same tokens, text and finish reasons."""
    prompts = [CODE_PROMPTS[0][:150], CODE_PROMPTS[1][:90], CODE_PROMPTS[2][:120],
               CODE_PROMPTS[0][:150], CODE_PROMPTS[3][:100], CODE_PROMPTS[1][:90]]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=23, ignore_eos=True)] * 3
    config = dict(max_num_batched_tokens=32, num_pages=40, page_size=4)
    plain, _ = generate(DEMO, prompts, params, **config)
    # stops taken from the plain outputs' middles: a stop token, and a stop string
    tokens, text, _ = plain[0]
    params[0] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                               stop_token_ids=[tokens[len(tokens) // 2]])
    params[2] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                               stop=[plain[2][1][10:13]])
    plain, _ = generate(DEMO, prompts, params, **config)
    spec, stats = generate(DEMO, prompts, params, speculative_config=NGRAM, **config)
    assert spec == plain
    assert plain[0][2] == "stop" and plain[2][2] == "stop" and plain[1][2] == "length"
    assert sum(s.num_preemptions for s in stats) > 0
    # drafts were accepted, and rejected (each is a path to get right)
    assert 0 < stats[-1].spec_num_accepted_tokens < stats[-1].spec_num_draft_tokens


def test_no_drafts_while_the_batch_is_larger_than_disable_by_batch_size(qwen3_dir):
    prompts = ["abc abc abc abc"] * 4
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    off = dict(NGRAM, disable_by_batch_size=3)
    _, stats = generate(qwen3_dir, prompts, params, speculative_config=off)
    assert stats[-1].spec_num_drafts == 0
    _, stats = generate(qwen3_dir, prompts, params, speculative_config=dict(off,
                        disable_by_batch_size=4))
    assert stats[-1].spec_num_drafts > 0


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_core_process_and_two_ranks_speculate_with_the_same_tokens(qwen3_dir, method):
    """Rank 0 proposes (the draft model runs there alone); the drafts go to the other rank
    inside the step's token ids, and every rank samples the same tokens (position-keyed noise),
    so they accept the same ones."""
    prompts = ["abc abc abc abc", "def f(x):\n    return x\n" * 2]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=2, max_tokens=16, ignore_eos=True)]
    spec_config = NGRAM if method == "ngram" else {"model": qwen3_dir,
                                                   "num_speculative_tokens": 3,
                                                   "disable_by_batch_size": None}
    plain, _ = generate(qwen3_dir, prompts, params)
    spec, _ = generate(qwen3_dir, prompts, params, speculative_config=spec_config,
                       core_process=True, tensor_parallel_size=2)
    assert spec == plain


def test_stats_snapshots_add_up_by_position():
    a = EngineStats(1, 0, 1, 8, spec_num_drafts=2, spec_num_draft_tokens=5,
                    spec_num_accepted_tokens=3, spec_accepted_per_pos=(2, 1))
    b = EngineStats(1, 0, 1, 8, spec_num_drafts=1, spec_num_draft_tokens=3,
                    spec_num_accepted_tokens=3, spec_accepted_per_pos=(1, 1, 1))
    both = a.then(b)
    assert (both.spec_num_drafts, both.spec_num_draft_tokens, both.spec_num_accepted_tokens,
            both.spec_accepted_per_pos) == (3, 8, 6, (3, 2, 1))


def test_engine_config_takes_the_dict_and_names_a_bad_key(qwen3_dir):
    assert EngineConfig(model=qwen3_dir, speculative_config=NGRAM).speculative_config == \
        SpeculativeConfig("ngram", 4, prompt_lookup_max=4, prompt_lookup_min=2,
                          disable_by_batch_size=None)
    with pytest.raises(ValueError, match="unknown keys"):
        EngineConfig(model=qwen3_dir, speculative_config={"method": "ngram", "x": 1})


# --- a draft model ---------------------------------------------------------------------------

def test_a_draft_model_that_is_the_target_has_every_greedy_draft_accepted():
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain, _ = generate(DEMO, CODE_PROMPTS[:4], params)
    spec, stats = generate(DEMO, CODE_PROMPTS[:4], params, speculative_config={
        "model": DEMO, "num_speculative_tokens": 3, "disable_by_batch_size": None})
    assert spec == plain
    stats = stats[-1]
    assert stats.spec_num_drafts > 0
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens


def test_the_demo_draft_gives_the_targets_tokens_through_chunks_and_preemptions():
    """The trained draft (2M parameters) for the trained target (8M): greedy and seeded requests
    equal decoding without drafts, on a pool small enough to preempt and a step budget small
    enough to cut the draft's first pass over a prompt into chunks; drafts are accepted and
    rejected."""
    prompts = [CODE_PROMPTS[0][:150], CODE_PROMPTS[1][:90], CODE_PROMPTS[2][:120],
               CODE_PROMPTS[0][:150]]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=4, max_tokens=30, ignore_eos=True)] * 2
    config = dict(max_num_batched_tokens=32, num_pages=40, page_size=4)
    plain, _ = generate(DEMO, prompts, params, **config)
    spec, stats = generate(DEMO, prompts, params, **config, speculative_config={
        "model": DEMO_DRAFT, "num_speculative_tokens": 4, "disable_by_batch_size": None})
    assert spec == plain
    assert sum(s.num_preemptions for s in stats) > 0
    assert 0 < stats[-1].spec_num_accepted_tokens < stats[-1].spec_num_draft_tokens


def test_a_draft_with_another_vocabulary_is_refused(qwen3_dir):
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        LLM(DEMO, device="cpu", speculative_config={"model": qwen3_dir,
                                                    "num_speculative_tokens": 2})


def test_the_draft_cache_after_rejections_proposes_what_a_fresh_draft_would():
    """The draft's K/V for drafts the target rejected must not be read again: after steps that
    keep some drafts and replace the next, the draft proposes what one that never saw the
    wrong drafts proposes."""
    from serve.engine.tokenizer import load_tokenizer
    from serve.spec.draft_model import DraftModelProposer

    tokenizer = load_tokenizer(DEMO)
    prompt = tokenizer(CODE_PROMPTS[0][:200], add_special_tokens=False)["input_ids"]
    config = EngineConfig(model=DEMO, device="cpu", page_size=4, max_num_seqs=2)
    spec = SpeculativeConfig("draft_model", 4, model=DEMO_DRAFT)

    def proposer() -> DraftModelProposer:
        return DraftModelProposer(spec, config, 512, len(tokenizer))

    kept, request = proposer(), Request("r", prompt, SamplingParams(), 100, 0)
    rng = random.Random(0)
    for _ in range(6):
        drafts = kept.propose([request], [4])[0]
        twin = Request("t", prompt, SamplingParams(), 100, 0)
        twin.output_token_ids = list(request.output_token_ids)
        assert proposer().propose([twin], [4])[0] == drafts
        # the target keeps some drafts, then a token of its own in place of the next
        num_kept = rng.randrange(len(drafts))
        request.output_token_ids += drafts[:num_kept] + [(drafts[num_kept] + 1) % 100]


def test_the_server_speculates_and_reports_it_in_metrics():
    from fastapi.testclient import TestClient

    from serve.engine.async_engine import AsyncEngine
    from serve.engine.llm_engine import LLMEngine
    from serve.server.app import build_app

    engine = AsyncEngine(LLMEngine(EngineConfig(model=DEMO, device="cpu",
                                                speculative_config=NGRAM)))
    with TestClient(build_app(engine, model_names="demo")) as client:
        body = {"model": "demo", "prompt": CODE_PROMPTS[0], "max_tokens": 32, "temperature": 0}
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 32
        metrics = client.get("/metrics").text
    drafts = [line for line in metrics.splitlines()
              if line.startswith("nanoserve:spec_decode_num_draft_tokens_total")]
    assert drafts and float(drafts[0].split()[-1]) > 0
