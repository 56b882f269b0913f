"""Hostile and extreme request bodies, one regression test per defect found: every invalid field
named at once, numbers the sampler cannot represent, a body too large, a response shape that
strict OpenAI schemas accept. The engine is the real one on the tiny random Qwen3 (CPU)."""

import json

import openai.types as oai
import openai.types.chat as oai_chat
import pytest
from fastapi.testclient import TestClient

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from serve.server.app import build_app
from serve.server.body_limit import DEFAULT_MAX_REQUEST_BYTES
from serve.server.fields import MAX_PROMPTS

MODEL = "tiny-qwen3"
CHAT = [{"role": "user", "content": "Say hello."}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def engine(qwen3_dir) -> AsyncEngine:
    config = EngineConfig(model=str(qwen3_dir), dtype="float32", device="cpu", max_model_len=64)
    return AsyncEngine(LLMEngine(config))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine, model_names=MODEL)) as client:
        yield client


def post_raw(client, body: str | bytes, endpoint: str = "completions"):
    """POST a body exactly as given: JSON's NaN and Infinity literals, or not JSON at all."""
    return client.post(f"/v1/{endpoint}", content=body, headers=JSON)


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def tokens_of(client, **body) -> str:
    body = {"prompt": "def main():", "max_tokens": 8, "ignore_eos": True, **body}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def still_serves(client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    tokens_of(client, max_tokens=2)


# -- numbers at and past the edges ----------------------------------------------------------------


@pytest.mark.parametrize("top_k", [2**63, 2**64, 10**30], ids=["2^63", "2^64", "10^30"])
def test_a_top_k_past_the_vocabulary_is_400_and_the_engine_lives(client, top_k):
    # 2**63 overflowed torch.tensor in the sampler and ended the engine loop for good; 2**64
    # cannot even be sent to a core process (msgpack): a top_k is bounded by the vocabulary.
    body = f'{{"prompt": "hi", "max_tokens": 4, "top_k": {top_k}, "seed": 3}}'
    error = post_raw(client, body).json()["error"]
    assert error["param"] == "top_k" and "vocabulary" in error["message"]
    still_serves(client)


def test_a_top_k_of_the_whole_vocabulary_keeps_every_token(client, engine):
    vocab_size = engine.engine.hf_config.vocab_size
    all_tokens = tokens_of(client, seed=3, max_tokens=4, prompt="hi")
    assert tokens_of(client, seed=3, max_tokens=4, prompt="hi", top_k=vocab_size) == all_tokens


@pytest.mark.parametrize(
    "fields",
    [{"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 1e-6}, {"top_k": 1}],
    ids=["temperature-1e-300", "top_p-1e-300", "temperature-below-eps", "top_k-1"],
)
def test_tiny_temperature_or_top_p_act_greedy(client, fields):
    # Both made NaN probabilities, and the request stopped after one token.
    greedy = tokens_of(client, temperature=0)
    assert tokens_of(client, **{"temperature": 1.0, "seed": 1, **fields}) == greedy


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty"])
def test_nan_and_infinity_are_refused_by_name(client, field, literal):
    error = error_of(post_raw(client, f'{{"prompt": "hi", "{field}": {literal}}}'))
    assert error["param"] == field
    assert error["message"] == (
        f"{field} should be a finite number (not NaN or Infinity), got {literal}"
    )


@pytest.mark.parametrize("literal", ["NaN", "1e30", "1.5", "true"])
def test_non_integers_are_refused_where_an_integer_belongs(client, literal):
    error = error_of(post_raw(client, f'{{"prompt": [1, {literal}]}}'))
    assert error["param"] == "prompt"


def test_out_of_range_seed_is_refused(client):
    error = error_of(post_raw(client, '{"prompt": "hi", "seed": 9223372036854775808}'))
    assert error["message"] == "seed should be <= 9223372036854775807, got 9223372036854775808"


# -- every invalid field, each with its rule ------------------------------------------------------


def test_every_invalid_field_is_named_with_its_rule(client):
    body = ('{"prompt": [-1, 5], "temperature": NaN, "top_p": 0, "max_tokens": -1, "stop": 5, '
            '"stop_token_ids": [-2], "stream": "maybe"}')
    error = error_of(post_raw(client, body))
    assert error["param"] == "temperature" and error["code"] == "invalid_value"
    assert error["message"].split("; ") == [  # in the order the fields are declared
        "temperature should be a finite number (not NaN or Infinity), got NaN",
        "top_p should be > 0, got 0",
        "stop should be a string or an array of strings, got 5",
        "stream should be a valid boolean, got \"maybe\"",
        "stop_token_ids[0] should be >= 0, got -2",
        "prompt[0] should be >= 0, got -1",
        "max_tokens should be >= 0, got -1",
    ]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([3, -1], "prompt[1] should be >= 0, got -1"),
        ([[1, 2], [-5]], "prompt[1][0] should be >= 0, got -5"),
        (["a", 5], "prompt[1] should be a valid string, got 5"),
        ([True], "prompt should be a string, an array of strings, an array of token ids or "
                 "an array of token-id arrays"),
        ({"text": "hi"}, "prompt should be a string, an array of strings, an array of token ids "
                         "or an array of token-id arrays"),
        ("\ud800", "prompt should be valid Unicode (it holds a lone surrogate at index 0), "
                   'got "\\ud800"'),
    ],
)
def test_prompt_errors_say_what_is_wrong(client, prompt, message):
    # A union used to report each branch's complaint: token id -1 "should be a valid string".
    error = error_of(post_raw(client, json.dumps({"prompt": prompt})))
    assert (error["param"], error["message"]) == ("prompt", message)


def test_nested_errors_name_their_path(client):
    messages = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": 5}]
    error = error_of(client.post("/v1/chat/completions", json={"messages": messages}))
    assert error["param"] == "messages"
    assert error["message"].startswith("messages[1].role should be 'system', 'developer'")
    assert "messages[1].content should be a string or an array of content parts, got 5" in (
        error["message"]
    )


def test_many_errors_are_summed_up(client):
    error = error_of(client.post("/v1/completions", json={"prompt": [-1] * 50}))
    problems = error["message"].split("; ")
    assert len(problems) == 11 and problems[-1] == "and 40 more"


def test_several_unsupported_fields_are_named_together(client):
    structured = {"json_object": True, "whitespace_pattern": " "}
    body = {"prompt": "x", "suffix": "}", "structured_outputs": structured}
    error = error_of(client.post("/v1/completions", json=body))
    assert error["param"] == "structured_outputs" and error["code"] == "unsupported_parameter"
    assert error["message"] == ("structured_outputs.whitespace_pattern is not supported yet; "
                                "suffix is not supported yet")


@pytest.mark.parametrize(
    "headers, body, message",
    [
        (JSON, b'{"prompt": ', "request body is not valid JSON: Expecting value at character 11"),
        (JSON, b"[1, 2]", "request body should be a JSON object"),
        (JSON, b"", "request body is required"),
        ({"content-type": "text/plain"}, b'{"prompt": "hi"}',
         "request body should be JSON, sent as Content-Type: application/json"),
    ],
)
def test_bodies_that_are_not_a_json_object(client, headers, body, message):
    response = client.post("/v1/completions", content=body, headers=headers)
    assert error_of(response) == {
        "message": message, "type": "BadRequestError", "param": None, "code": "invalid_value",
    }


# -- bounds on stop strings, stop ids and prompts -------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"stop": ["a"] * (MAX_STOP_STRINGS + 1)},
         f"stop should have at most {MAX_STOP_STRINGS} items, not {MAX_STOP_STRINGS + 1}"),
        ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)},
         f"stop should have at most {MAX_STOP_STRING_CHARS} characters"),
        ({"stop": ["ok", "x" * (MAX_STOP_STRING_CHARS + 1)]},
         f"stop[1] should have at most {MAX_STOP_STRING_CHARS} characters"),
        ({"stop": ""}, 'stop should have at least 1 character, got ""'),
        ({"stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)},
         f"stop_token_ids should have at most {MAX_STOP_TOKEN_IDS} items, "
         f"not {MAX_STOP_TOKEN_IDS + 1}"),
        ({"prompt": ["a"] * (MAX_PROMPTS + 1)},
         f"prompt should have at most {MAX_PROMPTS} items, not {MAX_PROMPTS + 1}"),
    ],
    ids=["stop-count", "stop-length", "stop-item-length", "empty-stop", "stop-ids", "prompts"],
)
def test_stop_and_prompt_lists_are_bounded(client, fields, message):
    error = error_of(client.post("/v1/completions", json={"prompt": "x", **fields}))
    assert (error["param"], error["message"]) == (next(iter(fields)), message)


def test_stop_strings_at_the_bounds_are_accepted(client):
    stop = ["never-appears"] * (MAX_STOP_STRINGS - 1) + ["z" * MAX_STOP_STRING_CHARS]
    body = {"prompt": "x", "max_tokens": 2, "stop": stop, "stop_token_ids": [0] * 1024}
    assert client.post("/v1/completions", json=body).status_code == 200


# -- body size ------------------------------------------------------------------------------------


def ten_mb_body() -> bytes:
    return json.dumps({"model": MODEL, "prompt": "x" * 10_000_000, "max_tokens": 1}).encode()


def test_a_10_mb_body_gets_413(client):
    error = error_of(post_raw(client, ten_mb_body()), status=413)
    assert error["type"] == "RequestTooLargeError"
    assert f"limit of {DEFAULT_MAX_REQUEST_BYTES} bytes" in error["message"]
    still_serves(client)


def test_a_chunked_body_is_counted_as_it_arrives(client):
    body = ten_mb_body()
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))  # no Content-Length
    error = error_of(client.post("/v1/chat/completions", content=chunks, headers=JSON), 413)
    assert error["type"] == "RequestTooLargeError"


def test_the_limit_is_configurable(engine):
    # Not `with`: running this app's lifespan would stop the engine the other tests share.
    small = TestClient(build_app(engine, model_names=MODEL, max_request_bytes=100))
    assert small.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).is_success
    error = error_of(small.post("/v1/completions", json={"prompt": "x" * 100}), status=413)
    assert "limit of 100 bytes" in error["message"]


# -- responses: /health, and shapes strict OpenAI schemas accept ----------------------------------


def test_health_says_ok_or_why_not(client, engine, monkeypatch):
    assert client.get("/health").json() == {"status": "ok"}
    monkeypatch.setattr(engine, "error", RuntimeError("CUDA error: an illegal memory access"))
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json() == {
        "status": "dead",
        "reason": "the engine loop failed: RuntimeError: CUDA error: an illegal memory access",
    }


def test_chat_response_and_chunks_match_openais_models(client):
    body = {"messages": CHAT, "max_tokens": 4, "ignore_eos": True}
    reply = client.post("/v1/chat/completions", json=body).json()
    message = reply["choices"][0]["message"]
    assert "refusal" in message and message["refusal"] is None  # OpenAI's schema requires it
    oai_chat.ChatCompletion.model_validate(reply, strict=True)

    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        oai_chat.ChatCompletionChunk.model_validate(json.loads(event), strict=True)


def test_completion_response_matches_openais_model(client):
    reply = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).json()
    oai.Completion.model_validate(reply, strict=True)


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("max_tokens", True, "should be a valid integer"),
        ("max_tokens", "5", "should be a valid integer"),
        ("max_tokens", 5.0, "should be a valid integer"),
        ("temperature", True, "should be a valid number"),
        ("temperature", "0.5", "should be a valid number"),
        ("seed", "1", "should be a valid integer"),
        ("top_k", False, "should be a valid integer"),
        ("stream", "true", "should be a valid boolean"),
        ("ignore_eos", 1, "should be a valid boolean"),
    ],
)
def test_numbers_and_flags_are_not_coerced(client, endpoint, field, value, rule):
    """OpenAI answers 400 to "max_tokens": true or "5"; pydantic's lax mode read them as 1, 5."""
    body = {"prompt": "x"} if endpoint == "completions" else {"messages": CHAT}
    error = error_of(client.post(f"/v1/{endpoint}", json={**body, field: value}))
    assert error["param"] == field and error["message"].startswith(f"{field} {rule}")


def test_an_integer_is_still_a_valid_float(client):
    assert tokens_of(client, temperature=0, top_p=1, max_tokens=2)
