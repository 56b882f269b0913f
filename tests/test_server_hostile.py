"""A hostile client, generated: whatever body arrives, the server answers it without a 5xx,
every refusal is in OpenAI's error shape, and the next ordinary request still succeeds.

The bodies mix valid and invalid fields: numbers past int64 and float64, NaN and Infinity (as
raw JSON literals), deep nesting, unicode (lone surrogates included), strings near and past a
lowered body limit, bodies that are not JSON, and content types that are not JSON's. The engine
is the real one on the tiny random Qwen3 with a short context, so any request that is accepted
finishes in a few steps.
"""

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from tests.test_server_openai_client import ServerThread

MODEL = "tiny-qwen3"
MAX_MODEL_LEN = 24  # an accepted request generates at most this many tokens
BODY_LIMIT = 32 * 1024
ENDPOINTS = ["/v1/completions", "/v1/chat/completions"]
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "min_p", "n", "best_of", "seed", "stop", "stop_token_ids", "stream",
    "stream_options", "ignore_eos", "logprobs", "top_logprobs", "echo", "suffix", "user",
    "presence_penalty", "frequency_penalty", "logit_bias", "tools", "tool_choice",
    "response_format",
]

# -- values ---------------------------------------------------------------------------------------

extreme_ints = st.sampled_from(
    [0, 1, -1, 2, 255, 511, 512, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
)
extreme_floats = st.sampled_from(
    [float("nan"), float("inf"), float("-inf"), 1e-300, 5e-324, -0.0, 1e308, 0.5, 2.0000001, 1e-5]
)
strings = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "𝕏" * 50, "<|im_end|>", "null"]),
    st.integers(0, BODY_LIMIT + 4096).map(lambda n: "x" * n),  # near and past the body limit
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), extreme_ints, st.floats(), extreme_floats, strings
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "wizard"])},
        optional={"content": st.one_of(strings, json_values), "name": strings},
    ),
    max_size=3,
)
small_strings = st.text(max_size=8)
# A value for each known field that has a fair chance to pass validation (some do not).
plausible = {
    "model": st.sampled_from([MODEL, "gpt-4o"]),
    "prompt": st.one_of(
        strings, st.lists(small_strings, max_size=3), st.lists(st.integers(-1, 600), max_size=6)
    ),
    "messages": messages,
    "max_tokens": st.integers(0, 4),
    "max_completion_tokens": st.integers(0, 4),
    "temperature": st.one_of(st.floats(0, 2), extreme_floats),
    "top_p": st.one_of(st.floats(0, 1), extreme_floats),
    "top_k": st.one_of(st.integers(-2, 600), extreme_ints),
    "min_p": st.floats(0, 1),
    "n": st.integers(0, 2),
    "best_of": st.integers(0, 2),
    "seed": st.one_of(st.integers(-(2**63), 2**63 - 1), extreme_ints),
    "stop": st.one_of(small_strings, st.lists(small_strings, max_size=40)),
    "stop_token_ids": st.lists(st.one_of(st.integers(0, 600), extreme_ints), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "logprobs": st.sampled_from([None, False, 0, True]),
    "top_logprobs": st.sampled_from([None, 0, 21]),
    "echo": st.booleans(),
    "suffix": st.sampled_from([None, "", "}"]),
    "user": strings,
    "presence_penalty": st.sampled_from([0, 0.0, 0.5, 3]),
    "frequency_penalty": st.sampled_from([0, -2, 2.5]),
    "logit_bias": st.sampled_from([None, {}, {"5": 1}, {"5": float("nan")}]),
    "tools": st.sampled_from([None, [], [{"type": "function"}]]),
    "tool_choice": st.sampled_from([None, "none", "auto", 5]),
    "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}, []]),
}


mostly = st.sampled_from([True, True, True, False])  # (Hypothesis favours the first item)


@st.composite
def bodies(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=8), max_size=7, unique=True))
    body = {}
    for key in keys:  # mostly a plausible value, else any JSON value at all
        plausible_value = key in plausible and draw(mostly)
        body[key] = draw(plausible[key] if plausible_value else json_values)
    if draw(mostly):  # a usable prompt, so that more requests get further
        body.setdefault("prompt", "def f(x):")
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return body


@st.composite
def raw_requests(draw) -> tuple[str, bytes, dict[str, str]]:
    """(endpoint, body bytes, headers)."""
    endpoint = draw(st.sampled_from(ENDPOINTS))
    text = json.dumps(draw(bodies()), allow_nan=True)  # NaN, Infinity: not JSON, yet parsed
    shape = draw(st.sampled_from(["json"] * 12 + ["deep", "deep", "truncated", "binary"]))
    if shape == "deep":  # nesting past Python's recursion limit, as a field the API ignores
        depth = draw(st.sampled_from([100, 5000]))
        text = text[:-1] + ("," if text != "{}" else "") + f'"deep": {"[" * depth}{"]" * depth}}}'
    body = text.encode("utf-8", "surrogatepass")  # a lone surrogate as raw (invalid) UTF-8 too
    if shape == "truncated":
        body = body[: draw(st.integers(0, len(body)))]
    elif shape == "binary":
        body = draw(st.binary(max_size=64))
    content_type = draw(st.sampled_from(
        ["application/json"] * 12
        + ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1",
           None]
    ))
    return endpoint, body, {} if content_type is None else {"content-type": content_type}


# -- the property ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(qwen3_dir):
    config = EngineConfig(model=str(qwen3_dir), dtype="float32", device="cpu",
                          max_model_len=MAX_MODEL_LEN)
    app = build_app(AsyncEngine(LLMEngine(config)), model_names=MODEL, max_request_bytes=BODY_LIMIT)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def check_answer(response) -> None:
    assert response.status_code < 500, response.text[:2000]
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
        events = [json.loads(block[len("data: "):]) for block in response.text.split("\n\n")
                  if block.startswith("data: {")]
        # (not a search for '"error"' in the text: the model may well write the word)
        assert not any("error" in event for event in events), response.text[:2000]
    else:
        assert response.json()["choices"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=raw_requests())
def test_no_body_breaks_the_server(client, request):
    endpoint, body, headers = request
    response = client.post(endpoint, content=body, headers=headers)
    event(f"status {response.status_code}")  # pytest --hypothesis-show-statistics: what got where
    check_answer(response)
    ordinary = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert ordinary.status_code == 200, ordinary.text


# -- every number, at its limits, through the process boundary ------------------------------------

BOUNDARY_NUMBERS = [2**31, -(2**31), 2**53, -(2**53), 2**63, -(2**63), 2**64, 1e29,
                    float("nan"), float("inf"), float("-inf"), -0.0]
SHARED_NUMBERS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed",
                  "presence_penalty", "frequency_penalty"]
NUMERIC_FIELDS = {  # endpoint -> {field: how a number goes in it}
    "/v1/completions": {
        **{name: lambda x: x for name in [*SHARED_NUMBERS, "best_of", "logprobs"]},
        "prompt": lambda x: [x], "stop_token_ids": lambda x: [x],
        "logit_bias": lambda x: {"5": x},
    },
    "/v1/chat/completions": {
        **{name: lambda x: x
           for name in [*SHARED_NUMBERS, "max_completion_tokens", "top_logprobs"]},
        "stop_token_ids": lambda x: [x], "logit_bias": lambda x: {"5": x},
    },
}
ORDINARY = {"/v1/completions": {"prompt": "def f(x):", "max_tokens": 2},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 2}}


@pytest.fixture(scope="module")
def core_process_client(qwen3_dir):
    """The server as it runs in production: uvicorn, and the engine core in a process of its
    own. (A request that hangs fails at the client's timeout.)"""
    config = EngineConfig(model=str(qwen3_dir), dtype="float32", device="cpu",
                          max_model_len=MAX_MODEL_LEN)
    app = build_app(AsyncEngine(LLMEngine(config, core_process=True)), model_names=MODEL)
    with ServerThread(app) as server, \
            httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
        yield client


def test_no_number_at_its_limits_breaks_a_server_with_a_core_process(core_process_client):
    """Every numeric field of both endpoints at every boundary value, one at a time: each is
    served or refused with a 400 naming a field, and the server goes on serving (a top_k of
    2**64 once killed the whole server: msgpack cannot encode it for the core)."""
    client = core_process_client
    for endpoint, fields in NUMERIC_FIELDS.items():
        for name, place in fields.items():
            for number in BOUNDARY_NUMBERS:
                body = json.dumps({**ORDINARY[endpoint], name: place(number)}, allow_nan=True)
                response = client.post(endpoint, content=body,
                                       headers={"content-type": "application/json"})
                check_answer(response)
                assert response.status_code in (200, 400), (name, number, response.text)
                if response.status_code == 400:
                    assert response.json()["error"]["param"], (name, number, response.text)
    assert client.get("/health").json() == {"status": "ok"}
    for endpoint, body in ORDINARY.items():
        assert client.post(endpoint, json=body).status_code == 200
