"""The sampling API real clients use, in the engine: log-probabilities (of sampled and prompt
tokens), penalties and logit bias, n sequences per prompt, max_tokens 0.

The references are plain: the trained demo model run by transformers in float32 on the CPU,
and the penalties written out in torch on its logits, one token at a time."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve import LLM, SamplingParams

DEMO = str(Path(__file__).parent.parent / "bench" / "demo_models" / "pycode-8m")
SOURCE = (Path(__file__).parent.parent / "serve" / "core" / "scheduler.py").read_text()
PROMPTS = [SOURCE[i : i + 300] for i in range(0, 1800, 600)]
# chunked prompts (a 32-token budget) and preemptions (a pool of 40 pages of 4 tokens)
TIGHT = dict(max_num_batched_tokens=32, num_pages=40, page_size=4)


@pytest.fixture(scope="module")
def reference():
    return AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


def generate(prompts, params, model=DEMO, **config):
    llm = LLM(model, device="cpu", dtype="float32", **config)
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()


@torch.inference_mode()
def model_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab]: row i is the model's log-distribution of the token after token_ids[i]."""
    return model(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)


def assert_matches(entry, row: torch.Tensor, token_id: int, k: int) -> None:
    assert entry.token_id == token_id
    assert entry.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
    top = row.topk(k)
    assert [t for t, _ in entry.top] == top.indices.tolist()
    assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


# --- log-probabilities -------------------------------------------------------------------------

def test_logprobs_of_sampled_and_prompt_tokens_are_the_models_own(reference):
    """Greedy and sampled rows, prompts cut into chunks, preemptions, and a prompt repeated (its
    second copy would hit the prefix cache: a cached prefix has no logits, so a request that
    wants its prompt's log-probabilities computes it whole)."""
    prompts = [*PROMPTS, PROMPTS[0]]
    params = [SamplingParams(temperature=0, max_tokens=12, logprobs=3, prompt_logprobs=2),
              SamplingParams(temperature=0.8, seed=4, max_tokens=12, logprobs=0)] * 2
    for output, p in zip(generate(prompts, params, **TIGHT), params, strict=True):
        completion = output.outputs[0]
        rows = model_logprobs(reference, output.prompt_token_ids + completion.token_ids)
        num_prompt = len(output.prompt_token_ids)
        assert len(completion.logprobs) == len(completion.token_ids)
        for i, (entry, token_id) in enumerate(zip(completion.logprobs, completion.token_ids,
                                                  strict=True)):
            assert_matches(entry, rows[num_prompt - 1 + i], token_id, p.logprobs)
        assert completion.cumulative_logprob == pytest.approx(
            sum(e.logprob for e in completion.logprobs))
        if p.prompt_logprobs is None:
            assert output.prompt_logprobs is None
            continue
        assert len(output.prompt_logprobs) == num_prompt and output.prompt_logprobs[0] is None
        for i, entry in enumerate(output.prompt_logprobs[1:], 1):
            assert_matches(entry, rows[i - 1], output.prompt_token_ids[i], p.prompt_logprobs)


def test_max_tokens_zero_computes_the_prompt_alone():
    [output] = generate([PROMPTS[1]], SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert output.finished and output.finish_reason == "length" and output.token_ids == []
    assert len(output.prompt_logprobs) == len(output.prompt_token_ids)


@pytest.mark.parametrize("variant", [
    dict(overlap_scheduling=False), dict(core_process=True),
    dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                             "prompt_lookup_max": 3, "disable_by_batch_size": None}),
], ids=["no-overlap", "core-process", "ngram"])
def test_logprobs_do_not_depend_on_overlap_the_core_process_or_speculation(variant):
    """A verify row's accepted tokens carry the log-probabilities of their own positions."""
    params = [SamplingParams(temperature=0, max_tokens=16, logprobs=2, prompt_logprobs=1),
              SamplingParams(temperature=0.7, seed=9, max_tokens=16, logprobs=1)]
    prompts = PROMPTS[:2]

    def summary(outputs):  # tokens exactly, log-probabilities as numbers
        tokens, numbers = [], []
        for o in outputs:
            entries = o.outputs[0].logprobs + (o.prompt_logprobs or [None])[1:]
            tokens.append((o.token_ids, [e.token_id for e in entries],
                           [[t for t, _ in e.top] for e in entries]))
            numbers += [e.logprob for e in entries] + [v for e in entries for _, v in e.top]
        return tokens, numbers

    # (a core process runs torch with other thread counts: sums in another order)
    tokens, numbers = summary(generate(prompts, params, **variant))
    plain_tokens, plain_numbers = summary(generate(prompts, params))
    assert tokens == plain_tokens and numbers == pytest.approx(plain_numbers, abs=1e-4)


def test_two_ranks_give_the_same_logprobs_penalties_and_sequences(qwen3_dir):
    """Every rank samples (and counts penalized tokens) on its own; rank 0's log-probabilities
    are the ones reported."""
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2,
                             prompt_logprobs=1, repetition_penalty=1.5, logit_bias={7: 3.0}),
              SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True, n=2,
                             presence_penalty=1.0, logprobs=0)]
    prompts = ["abc abc abc abc", "def f(x):\n    return x\n" * 2]

    def summary(outputs):
        return ([c.token_ids for o in outputs for c in o.outputs],
                [e.logprob for o in outputs for c in o.outputs for e in c.logprobs])

    tokens, numbers = summary(generate(prompts, params, qwen3_dir, core_process=True,
                                       tensor_parallel_size=2))
    plain_tokens, plain_numbers = summary(generate(prompts, params, qwen3_dir))
    assert tokens == plain_tokens and numbers == pytest.approx(plain_numbers, abs=1e-4)


# --- penalties and logit bias ------------------------------------------------------------------

def reference_logits(logits: torch.Tensor, prompt: list[int], output: list[int],
                     params: SamplingParams) -> torch.Tensor:
    """One row's logits after its logit bias and penalties, written out plainly."""
    logits = logits.clone()
    for token, bias in (params.logit_bias or {}).items():
        logits[token] += bias
    for token in set(prompt) | set(output):
        if logits[token] > 0:
            logits[token] /= params.repetition_penalty
        else:
            logits[token] *= params.repetition_penalty
    for token in set(output):
        logits[token] -= params.frequency_penalty * output.count(token) \
            + params.presence_penalty
    return logits


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], params: SamplingParams) -> list[int]:
    output = []
    for _ in range(params.max_tokens):
        logits = model(torch.tensor([prompt + output])).logits[0, -1].float()
        output.append(int(reference_logits(logits, prompt, output, params).argmax()))
    return output


def test_penalties_and_bias_equal_a_plain_reference_and_leave_other_rows_alone(reference):
    penalized = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=1.5,
                       frequency_penalty=0.7),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logit_bias={201: 4.0,
                       220: -100.0}, frequency_penalty=-0.5, repetition_penalty=0.8),
    ]
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [*PROMPTS, PROMPTS[0]]
    outputs = generate(prompts, [*penalized, plain], **TIGHT)
    for output, params in zip(outputs, penalized, strict=False):
        assert output.token_ids == reference_greedy(reference, output.prompt_token_ids, params)
    [alone] = generate([PROMPTS[0]], plain)
    assert outputs[3].token_ids == alone.token_ids  # a row without rules: the same tokens
    assert outputs[0].token_ids != alone.token_ids  # (the penalty did change something)


def test_penalized_rows_get_no_drafts_and_keep_their_tokens():
    params = [SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.2),
              SamplingParams(temperature=0.9, seed=1, max_tokens=20, presence_penalty=0.5,
                             logit_bias={201: 2.0})]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": None}
    with_drafts = generate(PROMPTS[:2], params, speculative_config=spec)
    assert [o.token_ids for o in with_drafts] == \
        [o.token_ids for o in generate(PROMPTS[:2], params)]


# --- n sequences -------------------------------------------------------------------------------

def test_n_sequences_differ_repeat_with_a_seed_and_share_the_prompts_pages():
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=10, n=4)
    [first] = generate([PROMPTS[2]], params)
    [again] = generate([PROMPTS[2]], params)
    texts = [c.text for c in first.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]
    assert len(set(texts)) == 4 and texts == [c.text for c in again.outputs]
    # the three later sequences found the prompt's full pages cached by the first
    num_full_pages = (len(first.prompt_token_ids) - 1) // 16 * 16
    assert first.num_cached_tokens == 3 * num_full_pages > 0
    [uncached] = generate([PROMPTS[2]], params, enable_prefix_caching=False)
    assert [c.text for c in uncached.outputs] == texts and uncached.num_cached_tokens == 0


def test_a_grammar_with_penalties_and_logprobs_keeps_its_shape_and_reports_the_raw_model(
        reference):
    """The grammar's mask comes after bias and penalties, and the log-probabilities before all
    of them: a constrained token may be one the raw model finds unlikely."""
    import json

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
              "required": ["name"]}
    params = SamplingParams(temperature=0, max_tokens=40, logprobs=1, repetition_penalty=1.2,
                            structured_outputs={"json": schema})
    [output] = generate(["data = "], params, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": None})
    assert isinstance(json.loads(output.text)["name"], str)
    rows = model_logprobs(reference, output.prompt_token_ids + output.token_ids)
    num_prompt = len(output.prompt_token_ids)
    for i, entry in enumerate(output.outputs[0].logprobs):
        assert_matches(entry, rows[num_prompt - 1 + i], output.token_ids[i], 1)
