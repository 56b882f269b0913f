"""The OpenAI-compatible HTTP API, driven in-process through FastAPI's TestClient.

The engine is the real one, on the tiny random Qwen3 from conftest.py (float32, CPU): its text
is noise, so the tests compare the API's answers with each other and with the tokenizer's counts.
"""

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from serve.server.cli import api_key_of, make_parser
from tests.helpers import wait_until

MAX_MODEL_LEN = 64
MODEL = "tiny-qwen3"
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def engine(qwen3_dir) -> AsyncEngine:
    config = EngineConfig(
        model=str(qwen3_dir), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN
    )
    return AsyncEngine(LLMEngine(config))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine, model_names=MODEL)) as client:  # runs the app's lifespan
        yield client


def complete(client, **body):
    response = client.post("/v1/completions", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def chat(client, **body):
    response = client.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(response) -> list[dict]:
    """The JSON payloads of an SSE body, after checking its framing and the final [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    assert all(block.startswith("data: ") for block in blocks[:-1])
    return [json.loads(block[len("data: ") :]) for block in blocks[:-2]]


def num_prompt_tokens(engine, prompt: str) -> int:
    return len(engine.tokenizer.encode(prompt))


def num_chat_tokens(engine, messages) -> int:
    ids = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return len(ids)


# -- /v1/completions ---------------------------------------------------------------------------


def test_completion_shape_and_usage(client, engine):
    body = complete(client, prompt="def main():", max_tokens=5, temperature=0, ignore_eos=True)
    assert body["id"].startswith("cmpl-") and len(body["id"]) == len("cmpl-") + 32
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None and isinstance(choice["text"], str)
    prompt_tokens = num_prompt_tokens(engine, "def main():")
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
        "prompt_tokens_details": {"cached_tokens": 0},  # short prompts: no whole page cached
    }


def test_completion_max_tokens_defaults_to_16(client):
    body = complete(client, prompt="import os", ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 16


def test_token_id_prompt_matches_text_prompt(client, engine):
    ids = engine.tokenizer.encode("class A:")
    by_text = complete(client, prompt="class A:", max_tokens=8, temperature=0, ignore_eos=True)
    by_ids = complete(client, prompt=ids, max_tokens=8, temperature=0, ignore_eos=True)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("as_ids", [False, True], ids=["texts", "id-lists"])
def test_several_prompts_give_one_choice_each(client, engine, as_ids):
    texts = ["def f(x):", "import sys", "x = 1"]
    prompts = [engine.tokenizer.encode(t) for t in texts] if as_ids else texts
    body = complete(client, prompt=prompts, max_tokens=4, temperature=0, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for text, choice in zip(texts, body["choices"], strict=True):
        alone = complete(client, prompt=text, max_tokens=4, temperature=0, ignore_eos=True)
        assert choice["text"] == alone["choices"][0]["text"]
    prompt_tokens = sum(num_prompt_tokens(engine, t) for t in texts)
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 12


def test_completion_stream_adds_up_to_the_whole(client):
    body = dict(prompt="for i in", max_tokens=10, temperature=0, ignore_eos=True)
    whole = complete(client, **body)["choices"][0]
    events = sse_events(client.post("/v1/completions", json={**body, "stream": True}))
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events)
    assert len({e["id"] for e in events}) == 1
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    reasons = [e["choices"][0]["finish_reason"] for e in events]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}


def test_completion_stream_of_several_prompts(client):
    body = dict(prompt=["a", "b"], max_tokens=3, temperature=0, ignore_eos=True, stream=True)
    events = sse_events(client.post("/v1/completions", json=body))
    finished = [e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]


def test_completion_stream_include_usage(client, engine):
    body = dict(prompt="while True:", max_tokens=6, ignore_eos=True, stream=True)
    body["stream_options"] = {"include_usage": True}
    events = sse_events(client.post("/v1/completions", json=body))
    *chunks, last = events
    assert all("usage" not in e for e in chunks)
    assert last["choices"] == []
    prompt_tokens = num_prompt_tokens(engine, "while True:")
    assert last["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
        "prompt_tokens_details": {"cached_tokens": 0},  # short prompts: no whole page cached
    }


def test_sampling_fields_reach_the_engine(client):
    base = dict(prompt="return", max_tokens=12, ignore_eos=True)
    greedy = complete(client, temperature=0, **base)["choices"][0]["text"]
    stop = greedy.strip()[2:4]
    cut = complete(client, temperature=0, stop=stop, **base)["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == greedy[: greedy.find(stop)]
    seeded = [complete(client, temperature=1, seed=5, **base)["choices"][0] for _ in range(2)]
    assert seeded[0]["text"] == seeded[1]["text"]


# -- /v1/chat/completions ----------------------------------------------------------------------


def test_chat_shape_and_usage(client, engine):
    body = chat(client, messages=CHAT, max_completion_tokens=5, ignore_eos=True)
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt_tokens = num_chat_tokens(engine, CHAT)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
        "prompt_tokens_details": {"cached_tokens": 0},  # short prompts: no whole page cached
    }
    legacy = chat(client, messages=CHAT, max_tokens=3, ignore_eos=True)  # the older name
    assert legacy["usage"]["completion_tokens"] == 3


def test_chat_without_max_tokens_fills_the_context(client):
    body = chat(client, messages=CHAT, ignore_eos=True)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == MAX_MODEL_LEN


def test_chat_accepts_text_parts_and_a_text_response_format(client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
    ]
    body = chat(client, messages=messages, max_tokens=2, response_format={"type": "text"})
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_chat_stream(client):
    body = dict(messages=CHAT, max_tokens=8, temperature=0, ignore_eos=True)
    whole = chat(client, **body)["choices"][0]["message"]["content"]
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    first, *rest = events
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == whole
    assert all("role" not in e["choices"][0]["delta"] for e in rest)
    reasons = [e["choices"][0]["finish_reason"] for e in events]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}


def test_chat_stream_include_usage(client, engine):
    body = dict(messages=CHAT, max_tokens=4, ignore_eos=True, stream=True)
    body["stream_options"] = {"include_usage": True}
    *chunks, last = sse_events(client.post("/v1/chat/completions", json=body))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    assert last["usage"]["prompt_tokens"] == num_chat_tokens(engine, CHAT)
    assert last["usage"]["completion_tokens"] == 4


# -- the rest of the API -----------------------------------------------------------------------


def test_models_and_health(client, engine):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "nanoserve"
    assert client.get("/health").status_code == 200


def test_model_may_be_omitted_and_extra_fields_are_ignored(client):
    extras = {"guided_json": {"type": "object"}, "metadata": {"a": "b"}, "store": False}
    body = {"prompt": "x", "max_tokens": 2, **extras}
    assert client.post("/v1/completions", json=body).status_code == 200
    body = {"messages": CHAT, "max_tokens": 2, "user": "u1", "parallel_tool_calls": False}
    assert client.post("/v1/chat/completions", json={**body, **extras}).status_code == 200


# -- errors: OpenAI's body, status 400 (404 for a model we do not serve), the field in `param` -----


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


UNSUPPORTED = [
    ("completions", {"suffix": "}"}, "suffix"),
    ("chat/completions", {"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("endpoint, fields, param", UNSUPPORTED)
def test_unsupported_fields_are_refused_by_name(client, endpoint, fields, param):
    body = {"prompt": "x"} if endpoint == "completions" else {"messages": CHAT}
    error = error_of(client.post(f"/v1/{endpoint}", json={**body, **fields}))
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert error["message"].endswith("is not supported yet") and param in error["message"]


OUT_OF_RANGE = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stream": "yes please"}, "stream"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [-3, 4]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),  # out of the vocabulary: the engine refuses it
    ({"prompt": ""}, "prompt"),
]


@pytest.mark.parametrize("fields, param", OUT_OF_RANGE)
def test_bad_completion_fields_are_400_naming_the_field(client, fields, param):
    error = error_of(client.post("/v1/completions", json={"prompt": "x", **fields}))
    assert error["param"] == param and error["type"] == "BadRequestError"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"content": "hi"}]}, "messages"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"top_logprobs": 50}, "top_logprobs"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_chat_fields_are_400_naming_the_field(client, fields, param):
    error = error_of(client.post("/v1/chat/completions", json={"messages": CHAT, **fields}))
    assert error["param"] == param


def test_missing_prompt_or_messages_and_bad_json(client):
    assert error_of(client.post("/v1/completions", json={"max_tokens": 2}))["param"] == "prompt"
    assert error_of(client.post("/v1/chat/completions", json={}))["param"] == "messages"
    headers = {"content-type": "application/json"}
    bad_json = client.post("/v1/completions", content=b'{"prompt": ', headers=headers)
    assert error_of(bad_json)["param"] is None


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_unknown_model_is_404(client, endpoint):
    body = {"model": "gpt-9", "prompt": "x", "messages": CHAT}
    error = error_of(client.post(f"/v1/{endpoint}", json=body), status=404)
    assert error["type"] == "NotFoundError" and error["code"] == "model_not_found"
    assert error["param"] == "model" and "gpt-9" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_too_long(client, engine, stream):
    prompt = "x = 1\n" * 40
    prompt_tokens = num_prompt_tokens(engine, prompt)
    assert prompt_tokens + 16 > MAX_MODEL_LEN
    body = {"prompt": prompt, "stream": stream}
    error = error_of(client.post("/v1/completions", json=body))
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    assert f"{prompt_tokens} in the prompt" in error["message"]


def test_prompt_plus_max_tokens_too_long_in_chat(client, engine):
    prompt_tokens = num_chat_tokens(engine, CHAT)
    body = {"messages": CHAT, "max_tokens": MAX_MODEL_LEN - prompt_tokens + 1, "stream": True}
    error = error_of(client.post("/v1/chat/completions", json=body))
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"({prompt_tokens} in the prompt" in error["message"]


def test_one_bad_prompt_fails_the_whole_request(client, engine):
    body = {"prompt": ["fine", "x = 1\n" * 40], "max_tokens": 4}
    assert error_of(client.post("/v1/completions", json=body))["code"] == "context_length_exceeded"
    assert wait_until(lambda: not engine.has_unfinished_requests())  # nothing left running


def test_unknown_route_uses_the_error_body_too(client):
    assert error_of(client.get("/v1/nothing-here"), status=404)["type"] == "NotFoundError"


def test_chat_needs_a_chat_template(qwen3_dir, tmp_path):
    model_dir = shutil.copytree(qwen3_dir, tmp_path / "no-template")
    for name in ("chat_template.jinja", "chat_template.json"):
        (model_dir / name).unlink(missing_ok=True)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with TestClient(build_app(fresh_engine(str(model_dir)), model_names=MODEL)) as client:
        error = error_of(client.post("/v1/chat/completions", json={"messages": CHAT}))
    assert error["param"] == "messages" and "no chat template" in error["message"]


def test_cli_defaults_are_safe():
    args = make_parser().parse_args(["--model", "qwen3-0.6b"])
    assert (args.host, args.port, args.served_model_name) == ("127.0.0.1", 8000, None)


def test_a_small_pool_lowers_the_context_and_says_so(qwen3_dir):
    """--num-pages 16 --page-size 4 holds 64 tokens: /v1/models reports 64, and a chat request
    without max_tokens (OpenAI's default) fills that context instead of failing with 400."""
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(qwen3_dir), device="cpu",
                                                num_pages=16, page_size=4)))
    with TestClient(build_app(engine, model_names=MODEL)) as client:
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 64
        answer = chat(client, messages=CHAT, ignore_eos=True)
    usage = answer["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 64


def fresh_engine(qwen3_dir) -> AsyncEngine:
    """An engine of its own, for a test whose app's lifespan shuts it down at the end."""
    config = EngineConfig(model=qwen3_dir, device="cpu", max_model_len=MAX_MODEL_LEN)
    return AsyncEngine(LLMEngine(config))


@pytest.fixture(scope="module")
def keyed_client(qwen3_dir):
    """A client of an app that requires the API key "sekret"."""
    app = build_app(fresh_engine(qwen3_dir), model_names=MODEL, api_key="sekret")
    with TestClient(app) as client:
        yield client


def test_an_api_key_guards_every_path_but_health_and_metrics(keyed_client):
    client = keyed_client
    guarded = [("GET", "/v1/models"), ("POST", "/v1/completions"),
               ("POST", "/v1/chat/completions"), ("GET", "/docs"), ("GET", "/redoc"),
               ("GET", "/openapi.json"), ("GET", "/nowhere")]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        for method, path in guarded:
            response = client.request(method, path, headers=headers,
                                      json={"prompt": "x", "max_tokens": 1})
            error = error_of(response, 401)
            assert error["type"] == "AuthenticationError"
            assert error["code"] == "invalid_api_key"
    good = {"Authorization": "Bearer sekret"}
    for path in ["/v1/models", "/docs", "/redoc", "/openapi.json"]:
        assert client.get(path, headers=good).status_code == 200, path
    response = client.post("/v1/completions", headers=good, json={"prompt": "x", "max_tokens": 1})
    assert response.status_code == 200, response.text
    assert client.get("/health").status_code == 200
    assert client.head("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_the_bearer_scheme_is_case_insensitive_and_the_key_is_not(keyed_client):
    """RFC 9110 §11.1: the scheme is a case-insensitive token, and one or more spaces follow it."""
    for authorization in ["bearer sekret", "BEARER sekret", "Bearer   sekret"]:
        response = keyed_client.get("/v1/models", headers={"Authorization": authorization})
        assert response.status_code == 200, authorization
    wrong = ["Bearer SEKRET", "Bearer sekret2", "Bearersekret", "Bearer", "Basic sekret"]
    for authorization in wrong:
        response = keyed_client.get("/v1/models", headers={"Authorization": authorization})
        assert response.status_code == 401, authorization


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    args = make_parser().parse_args(["--model", "m"])
    monkeypatch.setenv("NANOSERVE_API_KEY", "from-env")
    assert api_key_of(args) == "from-env"
    assert api_key_of(make_parser().parse_args(["--model", "m", "--api-key", "k"])) == "k"
    monkeypatch.delenv("NANOSERVE_API_KEY")
    assert api_key_of(args) is None


def test_health_answers_head_with_gets_status(client, engine, monkeypatch):
    """Some load balancers probe with HEAD; a server under uvicorn sends it no body."""
    assert client.head("/health").status_code == 200
    monkeypatch.setattr(engine, "error", RuntimeError("the loop died"))
    assert client.head("/health").status_code == 503


def test_served_model_names_hide_the_path(qwen3_dir):
    """--served-model-name a b: clients may send either name, every response carries the first,
    and the model's directory appears nowhere."""
    args = make_parser().parse_args(["--model", qwen3_dir, "--served-model-name", "a", "b"])
    app = build_app(fresh_engine(qwen3_dir), model_names=args.served_model_name)
    with TestClient(app) as client:
        models = client.get("/v1/models").json()
        assert [card["id"] for card in models["data"]] == ["a", "b"]
        for name in ("a", "b", None):
            body = {"prompt": "x", "max_tokens": 2, **({"model": name} if name else {})}
            response = client.post("/v1/completions", json=body)
            assert response.json()["model"] == "a"
            assert qwen3_dir not in response.text
        error = error_of(client.post("/v1/completions", json={"model": qwen3_dir,
                                                              "prompt": "x"}), 404)
        assert error["code"] == "model_not_found" and "serves `a`" in error["message"]
