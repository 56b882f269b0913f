"""Structured output in the engine: every constrained output matches its constraint, and a
constraint changes nothing else (the unconstrained requests beside it, overlap, speculation,
preemption, the core process and two ranks give the same tokens)."""

import json
from pathlib import Path

import jsonschema
import pytest

from serve import LLM, SamplingParams
from serve.structured import StructuredOutputsParams
from serve.structured.grammar import build_grammar
from tests.helpers import generate_on_cpu

DEMO = str(Path(__file__).parent.parent / "bench" / "demo_models" / "pycode-8m")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0,
                                              "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "shade": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["color", "shade"]},
    {"type": "object", "properties": {"point": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}},
     "required": ["id"]},
    {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 3,
                                               "items": {"enum": ["a", "b", "c"]}}},
     "required": ["tags"]},
    {"type": "string", "maxLength": 16},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99},
                                      "note": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["n", "note"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"k": {"type": "string", "maxLength": 5},
                                         "v": {"type": "integer"}},
        "required": ["k", "v"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"kind": {"const": "point"},
                                      "x": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["kind", "x"]},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string",
                                                                     "maxLength": 8}},
     "required": ["a"]},
]
PROMPTS = ["def config():\n    return ", "data = ", "# the answer\nresult = ", "x = json.loads('"]


def generate(prompts, params, model: str = DEMO, **config) -> list:
    return generate_on_cpu(model, prompts, params, **config)[0]


def test_two_hundred_seeded_requests_over_a_dozen_schemas_all_parse_and_validate():
    prompts, params, schemas = [], [], []
    for i in range(200):
        schema = SCHEMAS[i % len(SCHEMAS)]
        prompts.append(PROMPTS[i % len(PROMPTS)])
        params.append(SamplingParams(temperature=0.9, seed=i, max_tokens=160,
                                     structured_outputs={"json": schema}))
        schemas.append(schema)
    outputs = generate(prompts, params, max_num_seqs=64)
    for (_, text, reason), schema in zip(outputs, schemas, strict=True):
        assert reason == "stop", (reason, text)  # the grammar ended it, not max_tokens
        jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_and_choice_match():
    constraints = [{"json_object": True}, {"regex": r"[a-z]{3}-\d{2}"},
                   {"choice": ["yes", "no", "maybe"]}, {"grammar": 'root ::= "x" [0-9] [0-9]? "y"'}]
    params = [SamplingParams(temperature=0.9, seed=seed, max_tokens=80,
                             structured_outputs=constraint)
              for constraint in constraints for seed in range(5)]
    outputs = generate(["value = "] * len(params), params)
    texts = [text for _, text, _ in outputs]
    for text in texts[:5]:
        assert isinstance(json.loads(text), dict)
    import re
    assert all(re.fullmatch(r"[a-z]{3}-\d{2}", t) for t in texts[5:10])
    assert all(t in ("yes", "no", "maybe") for t in texts[10:15])
    assert all(re.fullmatch(r"x[0-9]{1,2}y", t) for t in texts[15:20])


def test_a_grammar_cut_by_max_tokens_says_length():
    params = SamplingParams(temperature=0, max_tokens=3,
                            structured_outputs={"json": SCHEMAS[0]})
    [(tokens, _, reason)] = generate(["data = "], [params])
    assert reason == "length" and len(tokens) == 3


def test_constrained_requests_change_nothing_for_the_others_and_run_the_same_every_way():
    """Unconstrained requests beside constrained ones give the tokens they give alone; and the
    whole batch gives the same tokens with overlap on and off, with n-gram speculation, on a
    pool small enough to preempt with prefix hits (the same prompt twice), in the core process
    with two ranks."""
    free = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)]
    constrained = [SamplingParams(temperature=0.8, seed=i, max_tokens=60,
                                  structured_outputs={"json": SCHEMAS[i]}) for i in range(4)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[3]]
    params = [free[0], constrained[0], constrained[1], free[1], constrained[2], constrained[3]]
    config = dict(num_pages=48, page_size=4, max_num_batched_tokens=32)
    alone = generate([prompts[0], prompts[3]], free, **config)
    plain = generate(prompts, params, overlap_scheduling=False, **config)
    assert [plain[0], plain[3]] == alone
    for output, schema_index in ((plain[1], 0), (plain[2], 1), (plain[4], 2), (plain[5], 3)):
        jsonschema.validate(json.loads(output[1]), SCHEMAS[schema_index])
    assert generate(prompts, params, overlap_scheduling=True, **config) == plain
    assert generate(prompts, params, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1, "disable_by_batch_size": None}, **config) == plain


def test_the_core_process_and_two_ranks_mask_alike(qwen3_dir):
    """Rank 0 fills the masks and sends them to the other rank with the step, so both sample
    the same tokens (a random model: its outputs still match their constraints)."""
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=40,
                             structured_outputs={"json": SCHEMAS[i]}) for i in range(3)]
    params.append(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    prompts = ["a = ", "b = ", "a = ", "c = "]
    plain = generate(prompts, params, model=qwen3_dir, overlap_scheduling=False)
    assert generate(prompts, params, model=qwen3_dir, core_process=True,
                    tensor_parallel_size=2) == plain
    for (_, text, reason), schema in zip(plain[:3], SCHEMAS, strict=False):
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("constraint, words", [
    ({"regex": "a(b"}, "structured_outputs.regex: Regex parsing error"),
    ({"json": {"type": "objectx"}}, "structured_outputs.json: Unsupported type"),
    ({"grammar": "root ::= foo"}, "structured_outputs.grammar: EBNF parser error"),
])
def test_a_constraint_that_does_not_parse_is_named(constraint, words):
    with pytest.raises(ValueError, match=words):
        build_grammar(StructuredOutputsParams(**constraint))


@pytest.mark.parametrize("constraint, words", [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["b"]}, "exactly one"),
    ({"choice": []}, "1 to 1024 non-empty strings"),
    ({"regex": ""}, "non-empty string"),
    ({"json": 5}, "a JSON schema"),
])
def test_structured_outputs_params_refuse_what_is_not_one_constraint(constraint, words):
    with pytest.raises(ValueError, match=words):
        StructuredOutputsParams(**constraint)


def test_a_slow_grammar_delays_nobody_and_one_past_the_time_limit_fails(monkeypatch):
    """While a grammar compiles, its request waits beside the queue and the others run; a
    grammar that takes longer than the limit ends its request with an error."""
    import time

    from serve.structured import manager

    llm = LLM(DEMO, device="cpu")
    llm.generate(["x = "], SamplingParams(max_tokens=2, structured_outputs={"regex": "[0-9]"}),
                 use_tqdm=False)  # the grammar manager exists now
    grammars = llm.engine.core.grammars
    compile_grammar = grammars.compiler.compile_grammar
    monkeypatch.setattr(grammars.compiler, "compile_grammar",
                        lambda grammar: time.sleep(0.5) or compile_grammar(grammar))
    engine = llm.engine
    engine.add_request("slow", "x = ", SamplingParams(max_tokens=4,
                                                      structured_outputs={"regex": "[a-z]+"}))
    engine.add_request("free", "y = ", SamplingParams(max_tokens=4, ignore_eos=True))
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["free", "slow"]

    monkeypatch.setattr(manager, "COMPILE_TIMEOUT_S", 0.1)
    engine.add_request("late", "x = ", SamplingParams(max_tokens=4,
                                                      structured_outputs={"regex": "[a-y]+"}))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].finished and "did not compile in 0.1 s" in (outputs[-1].error or "")
    assert outputs[-1].error_param == "structured_outputs"  # the request's own fault: a 400
