"""The sampling API real clients use: logprobs and top_logprobs, n choices (and best_of), echo,
penalties and logit_bias, and the queue limit's 503, on a real server driven by the official
`openai` client (strict, wherever its schema allows what OpenAI itself sends) and by raw HTTP.

The engine is the real one on the tiny random Qwen3 from conftest.py (float32, CPU): its text
is noise, so the tests compare answers with each other, with the tokenizer, and with the
engine's own log-probabilities.
"""

import asyncio
import json
import math
import re
import threading

import httpx
import openai
import pytest

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine, QueueFullError
from serve.engine.errors import InvalidRequestError
from serve.engine.llm_engine import LLMEngine
from serve.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from serve.server.app import build_app
from serve.server.cli import make_parser
from tests.helpers import wait_until
from tests.test_server_openai_client import ServerThread, make_client

MODEL = "tiny-qwen3"
MAX_MODEL_LEN = 128
PROMPT = "def main():"
CHAT = [{"role": "user", "content": "Write a haiku."}]


@pytest.fixture(scope="module")
def engine(qwen3_dir) -> AsyncEngine:
    config = EngineConfig(model=str(qwen3_dir), dtype="float32", device="cpu",
                          max_model_len=MAX_MODEL_LEN)
    return AsyncEngine(LLMEngine(config))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(build_app(engine, model_names=MODEL)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return make_client(server, strict=True)


@pytest.fixture(scope="module")
def lenient_client(server) -> openai.OpenAI:
    """For what OpenAI's generated schema is stricter than OpenAI's own answers: a streamed
    completion's unfinished chunks (finish_reason null), and an echoed prompt's first token
    (token_logprobs and top_logprobs null)."""
    return make_client(server, strict=False)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as http:
        yield http


def post(http, endpoint: str, **body) -> dict:
    response = http.post(f"/v1/{endpoint}", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def sse_events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    blocks = response.text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    return [json.loads(block[len("data: "):]) for block in blocks[:-2]]


def token_ids(engine: AsyncEngine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def check_completion_logprobs(logprobs, num_top: int, text: str | None = None) -> None:
    """One entry per token in each list; each token's own logprob among its top_logprobs, which
    hold at most num_top + 1; offsets that advance by each token's text."""
    tokens, offsets = logprobs.tokens, logprobs.text_offset
    assert len(tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert len(offsets) == len(tokens)
    for token, logprob, top in zip(tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                                   strict=True):
        if logprob is None:
            continue
        assert logprob <= 0 and len(top) <= num_top + 1 and token in top
        if "\ufffd" not in top:  # (pieces of one character all read "\ufffd")
            assert top[token] == logprob
    assert all(later - earlier == len(token) for earlier, later, token
               in zip(offsets[:-1], offsets[1:], tokens[:-1], strict=True))
    if text is not None and "\ufffd" not in "".join(tokens):
        assert "".join(tokens) == text


# -- logprobs -------------------------------------------------------------------------------------


def test_completion_logprobs_parse_into_openai_types(client):
    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True})
    [choice] = completion.choices
    check_completion_logprobs(choice.logprobs, 3, choice.text)
    assert len(choice.logprobs.tokens) == completion.usage.completion_tokens == 6
    assert choice.logprobs.text_offset[0] == 0
    # greedy: each token is the likeliest of the model's raw distribution
    for logprob, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs,
                            strict=True):
        assert logprob == pytest.approx(max(top.values()))


def test_logprobs_0_gives_each_token_its_own_alone(http):
    body = post(http, "completions", prompt=PROMPT, max_tokens=4, logprobs=0, seed=7,
                ignore_eos=True)
    logprobs = body["choices"][0]["logprobs"]
    assert [list(top) for top in logprobs["top_logprobs"]] == [[t] for t in logprobs["tokens"]]


def test_a_streamed_completion_has_the_same_logprobs(http, lenient_client):
    request = dict(prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    whole = post(http, "completions", **request, ignore_eos=True)["choices"][0]["logprobs"]
    stream = lenient_client.completions.create(model=MODEL, stream=True, **request,
                                               extra_body={"ignore_eos": True})
    pieces = [chunk.choices[0].logprobs for chunk in stream if chunk.choices]
    joined = {key: [item for piece in pieces if piece for item in getattr(piece, key)]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined["tokens"] == whole["tokens"]
    assert joined["text_offset"] == whole["text_offset"]  # counted on across chunks
    assert joined["token_logprobs"] == pytest.approx(whole["token_logprobs"])


def test_chat_logprobs_parse_into_openai_types(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=5, temperature=0, logprobs=True,
        top_logprobs=3, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True)
        assert entry.logprob == pytest.approx(top[0])  # greedy
    assert reply.choices[0].logprobs.refusal is None
    plain = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=2, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)
    without = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=2)
    assert without.choices[0].logprobs is None


def test_streamed_chat_logprobs_match_the_whole_answer(client):
    request = dict(model=MODEL, messages=CHAT, max_completion_tokens=6, temperature=0,
                   logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**request).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**request, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole])


def test_prompt_logprobs_in_vllm_shape(http, engine):
    body = post(http, "completions", prompt=PROMPT, max_tokens=1, prompt_logprobs=2)
    prompt_logprobs = body["choices"][0]["prompt_logprobs"]
    ids = token_ids(engine, PROMPT)
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for token_id, entry in zip(ids[1:], prompt_logprobs[1:], strict=True):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        ranks = sorted(e["rank"] for e in entry.values() if e["rank"] is not None)
        assert ranks == [1, 2]
    chat = post(http, "chat/completions", messages=CHAT, max_tokens=1, prompt_logprobs=0)
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) > 1
    assert "prompt_logprobs" not in post(http, "chat/completions", messages=CHAT, max_tokens=1)


# -- echo -----------------------------------------------------------------------------------------


def test_echo_with_max_tokens_0_scores_the_prompt(lenient_client, engine):
    """What lm-evaluation-harness's local-completions sends to score a text: echo, logprobs 1,
    max_tokens 0; one logprob per prompt token, the first null (nothing predicts it)."""
    completion = lenient_client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    [choice] = completion.choices
    ids = token_ids(engine, PROMPT)
    assert choice.text == PROMPT and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp is not None for lp in logprobs.token_logprobs[1:])
    check_completion_logprobs(logprobs, 1, PROMPT)
    assert completion.usage.completion_tokens == 0
    assert completion.usage.prompt_tokens == len(ids)


def test_an_echoed_prompt_scores_a_token_as_its_generation_did(http, engine):
    """The log-probability a token got when it was generated is the one it gets read back as
    the prompt's last token (echo, max_tokens 0): both are the model's raw distribution, the
    same positions. The token is forced by logit_bias, which the raw numbers do not see."""
    ids = token_ids(engine, PROMPT)
    forced = token_ids(engine, " x")[0]
    generated = post(http, "completions", prompt=ids, max_tokens=1, logprobs=0, temperature=0,
                     logit_bias={str(forced): 100})["choices"][0]["logprobs"]
    assert generated["tokens"] == [engine.tokenizer.decode([forced])]
    scored = post(http, "completions", prompt=ids + [forced], max_tokens=0, echo=True,
                  logprobs=0)["choices"][0]["logprobs"]
    assert len(scored["tokens"]) == len(ids) + 1
    assert scored["token_logprobs"][-1] == pytest.approx(generated["token_logprobs"][0],
                                                         abs=1e-4)


def test_echo_then_the_generated_tokens(http, engine):
    ids = token_ids(engine, PROMPT)
    choice = post(http, "completions", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1,
                  temperature=0, ignore_eos=True)["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith(PROMPT) and len(logprobs["tokens"]) == len(ids) + 2
    assert logprobs["text_offset"][len(ids)] == len(PROMPT)  # the prompt's text comes first


def test_echo_of_several_token_id_prompts_lm_eval_style(http, engine):
    prompts = [token_ids(engine, text) for text in ("import os", "class A:", "x = 1")]
    body = post(http, "completions", prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                temperature=0)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice, ids in zip(body["choices"], prompts, strict=True):
        assert choice["text"] == engine.tokenizer.decode(ids)
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
        assert choice["logprobs"]["token_logprobs"][0] is None
    assert body["usage"]["completion_tokens"] == 0


def test_echo_without_logprobs_and_streamed(http):
    body = post(http, "completions", prompt=PROMPT, max_tokens=3, echo=True, seed=1)
    assert body["choices"][0]["text"].startswith(PROMPT)
    assert body["choices"][0]["logprobs"] is None
    events = sse_events(http.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 3, "echo": True, "seed": 1, "stream": True,
        "logprobs": 0}))
    first = events[0]["choices"][0]
    assert first["text"].startswith(PROMPT) and first["logprobs"]["token_logprobs"][0] is None
    assert "".join(e["choices"][0]["text"] for e in events) == body["choices"][0]["text"]


# -- n and best_of --------------------------------------------------------------------------------


def test_n_choices_differ_and_count_the_prompt_once(client, engine):
    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, n=4, max_tokens=8, seed=11,
        extra_body={"ignore_eos": True})
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert len({c.text for c in completion.choices}) > 1
    assert completion.usage.prompt_tokens == len(token_ids(engine, PROMPT))
    assert completion.usage.completion_tokens == 4 * 8


def test_choice_i_samples_as_a_request_seeded_seed_plus_i(http):
    request = dict(prompt=PROMPT, max_tokens=6, ignore_eos=True)
    choices = post(http, "completions", **request, n=3, seed=100)["choices"]
    again = post(http, "completions", **request, n=3, seed=100)["choices"]
    assert [c["text"] for c in choices] == [c["text"] for c in again]
    for i, choice in enumerate(choices):
        alone = post(http, "completions", **request, seed=100 + i)["choices"][0]
        assert alone["text"] == choice["text"]


def test_several_prompts_with_n_index_prompt_major(http):
    prompts = ["import os", "class A:"]
    body = post(http, "completions", prompt=prompts, n=2, max_tokens=2, echo=True, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for choice in body["choices"]:
        assert choice["text"].startswith(prompts[choice["index"] // 2])


def test_streamed_n_choices_each_start_and_finish(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, n=3, max_completion_tokens=4, seed=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role]
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(roles) == sorted(finished) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == 3 * 4


def metric(http, name: str) -> float:
    text = http.get("/metrics").text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE).group(1))


def test_the_n_choices_of_a_prompt_share_its_computed_pages(http, engine):
    """The first choice computes the prompt; the others wait for it (prefill_after) and find
    its whole pages in the prefix cache, instead of computing n copies side by side."""
    prompt = "def fresh_prompt_for_the_prefix_cache(alpha, beta, gamma):\n    return " * 2
    num_tokens = len(token_ids(engine, prompt))
    whole_pages = num_tokens // engine.engine.config.page_size * engine.engine.config.page_size
    assert whole_pages >= 16
    hits = metric(http, "nanoserve:prefix_cache_hits_total")
    body = post(http, "completions", prompt=prompt, n=4, max_tokens=2, seed=1)
    assert body["usage"]["prompt_tokens"] == num_tokens
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # a fresh prompt
    assert wait_until(lambda: metric(http, "nanoserve:prefix_cache_hits_total")
                      >= hits + 3 * whole_pages)


def test_best_of_answers_the_likeliest_sequences(http):
    request = dict(prompt=PROMPT, max_tokens=5, seed=21, ignore_eos=True)
    candidates = post(http, "completions", **request, n=4, logprobs=0)
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in candidates["choices"]]
    best = post(http, "completions", **request, best_of=4, n=2)
    ranked = sorted(range(4), key=lambda i: sums[i], reverse=True)
    assert [c["text"] for c in best["choices"]] == [
        candidates["choices"][i]["text"] for i in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"])  # not asked for
    assert best["usage"]["completion_tokens"] == 4 * 5  # every sequence generated


def test_forced_tool_calls_with_n_and_logprobs(client):
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
        "additionalProperties": False}}}
    request = dict(model=MODEL, messages=CHAT, tools=[tool], n=2, seed=4, logprobs=True,
                   max_completion_tokens=32,
                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    reply = client.chat.completions.create(**request)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        assert choice.logprobs.content  # the call's tokens
    assert sum(len(c.logprobs.content) for c in reply.choices) == reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(**request, stream=True))
    streamed = {index: [e.token for chunk in chunks if chunk.choices
                        and chunk.choices[0].index == index and chunk.choices[0].logprobs
                        for e in chunk.choices[0].logprobs.content] for index in (0, 1)}
    assert streamed == {c.index: [e.token for e in c.logprobs.content] for c in reply.choices}


# -- penalties and logit_bias ---------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens(http, engine):
    ids = token_ids(engine, PROMPT)
    forced = token_ids(engine, " x")[0]
    body = post(http, "completions", prompt=ids, max_tokens=4, temperature=0,
                logit_bias={str(forced): 100}, logprobs=0, ignore_eos=True)
    assert body["choices"][0]["logprobs"]["tokens"] == [engine.tokenizer.decode([forced])] * 4
    # the greedy next token: the likeliest at the prompt's end (vLLM's rank 1)
    scored = post(http, "completions", prompt=ids + [0], max_tokens=0, prompt_logprobs=1)
    [greedy] = [int(t) for t, e in scored["choices"][0]["prompt_logprobs"][-1].items()
                if e["rank"] == 1]
    top = post(http, "completions", prompt=ids, max_tokens=1, temperature=0,
               logprobs=0)["choices"][0]["logprobs"]["token_logprobs"][0]
    banned = post(http, "completions", prompt=ids, max_tokens=1, temperature=0,
                  logit_bias={str(greedy): -100}, logprobs=0)["choices"][0]["logprobs"]
    assert banned["token_logprobs"][0] < top  # the next likeliest, its raw logprob


def test_penalties_are_served(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=4, presence_penalty=1.5,
        frequency_penalty=-0.5, extra_body={"repetition_penalty": 1.3})
    assert reply.usage.completion_tokens <= 4


# -- hostile values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint, fields, param, message",
    [
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs",
         "top_logprobs should be <= 20, got 21"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs",
         "top_logprobs needs logprobs: true"),
        ("completions", {"logprobs": 21}, "logprobs", "logprobs should be <= 20, got 21"),
        ("completions", {"prompt_logprobs": 21}, "prompt_logprobs",
         "prompt_logprobs should be <= 20, got 21"),
        ("completions", {"n": 10000}, "n", "n should be <= 128, got 10000"),
        ("completions", {"prompt": ["a"] * 32, "n": 128}, "n",
         "prompts x n must be at most 2048 sequences per request, got 4096"),
        ("chat/completions", {"n": 0}, "n", "n should be >= 1, got 0"),
        ("completions", {"best_of": 2, "n": 3}, "best_of",
         "best_of must be >= n, got best_of 2 and n 3"),
        ("completions", {"best_of": 3, "stream": True}, "best_of",
         "best_of > n cannot be streamed: send stream false"),
        ("completions", {"logit_bias": {"abc": 1}}, "logit_bias",
         'logit_bias should map token ids (integers, written as strings) to biases, got the '
         'key "abc"'),
        ("completions", {"logit_bias": {"-5": 1}}, "logit_bias", None),
        ("chat/completions", {"logit_bias": {"5": 101}}, "logit_bias",
         "logit_bias.5 should be <= 100, got 101"),
        ("completions", {"logit_bias": {str(i): 1 for i in range(10_000)}}, "logit_bias",
         f"logit_bias should have at most {MAX_LOGIT_BIAS} entries, got 10000"),
        ("completions", {"logit_bias": {"99999": 1}}, "logit_bias",
         "logit_bias token ids must be in [0, 512)"),
        ("completions", {"repetition_penalty": 0}, "repetition_penalty",
         "repetition_penalty should be > 0, got 0"),
        ("chat/completions", {"frequency_penalty": -2.5}, "frequency_penalty",
         "frequency_penalty should be >= -2, got -2.5"),
    ],
)
def test_hostile_values_are_400s_naming_the_field(http, endpoint, fields, param, message):
    body = {"prompt": PROMPT} if endpoint == "completions" else {"messages": CHAT}
    error = error_of(http.post(f"/v1/{endpoint}", json={**body, "max_tokens": 2, **fields}))
    assert error["param"] == param and error["type"] == "BadRequestError"
    if message is not None:
        assert error["message"] == message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field, place", [
    ("logit_bias", lambda x: f'{{"5": {x}}}'), ("presence_penalty", str),
    ("repetition_penalty", str),
])
def test_nan_and_infinity_are_refused_by_name(http, field, place, literal):
    body = f'{{"prompt": "hi", "max_tokens": 1, "{field}": {place(literal)}}}'
    response = http.post("/v1/completions", content=body,
                         headers={"content-type": "application/json"})
    error = error_of(response)
    assert error["param"] == field and "finite number" in error["message"]


def test_the_official_client_reads_the_refusals(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=PROMPT, logprobs=21)
    assert refused.value.param == "logprobs"


# -- the queue limit ------------------------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(engine, http, client, monkeypatch):
    monkeypatch.setattr(engine, "max_queued_requests", 1)
    step = engine.engine.step
    release = threading.Event()

    def held_step():  # nothing gets its first token until the test lets it
        release.wait(timeout=30)
        return step()

    monkeypatch.setattr(engine.engine, "step", held_step)
    waiter = threading.Thread(target=post, args=(http, "completions"),
                              kwargs={"prompt": PROMPT, "max_tokens": 2})
    waiter.start()
    try:
        assert wait_until(lambda: engine.num_waiting == 1)
        response = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        error = error_of(response, status=503)
        assert error["type"] == "ServiceUnavailableError" and error["code"] == "queue_full"
        assert response.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"] == "1"
    finally:
        release.set()
        waiter.join(timeout=30)
    assert wait_until(lambda: engine.num_waiting == 0)
    post(http, "completions", prompt=PROMPT, max_tokens=2)  # served again


def test_the_waiting_count_covers_every_way_a_request_ends(engine, http):
    """Counted from generate() (or process()) to the first output: it returns to 0 after
    served, refused, aborted and fanned-out requests alike."""
    async def scenario() -> list[int]:
        seen = []
        params = SamplingParams(max_tokens=3)
        engine_input = await engine.process(PROMPT, params)
        seen.append(engine.num_waiting)  # process() has let go
        gen = engine.generate(engine_input, None, "count-served")
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0)
        seen.append(engine.num_waiting)  # submitted, no output yet
        await first
        seen.append(engine.num_waiting)  # its first output: no longer waiting
        await gen.aclose()
        with pytest.raises(InvalidRequestError):
            await anext(engine.generate("", params, "count-refused"))
        seen.append(engine.num_waiting)
        aborted = engine.generate(PROMPT, params, "count-aborted")
        task = asyncio.ensure_future(anext(aborted))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await aborted.aclose()
        seen.append(engine.num_waiting)
        return seen

    assert asyncio.run(scenario()) == [0, 1, 0, 0, 0]
    post(http, "completions", prompt=PROMPT, n=3, max_tokens=2)
    error_of(http.post("/v1/completions", json={"prompt": [10**6], "n": 2}))
    assert engine.num_waiting == 0


def test_check_queue_refuses_only_at_the_limit(engine, monkeypatch):
    monkeypatch.setattr(engine, "max_queued_requests", None)
    engine.check_queue()
    monkeypatch.setattr(engine, "max_queued_requests", 1)
    engine.check_queue()  # nothing waits
    monkeypatch.setattr(engine, "_num_waiting", 1)
    with pytest.raises(QueueFullError) as full:
        engine.check_queue()
    assert full.value.retry_after_s == 1 and "--max-queued-requests 1" in str(full.value)


def test_the_queue_limit_flag(capsys):
    args = make_parser().parse_args(["--model", "m", "--max-queued-requests", "64"])
    assert args.max_queued_requests == 64
    assert make_parser().parse_args(["--model", "m"]).max_queued_requests is None
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--model", "m", "--max-queued-requests", "0"])
    assert "--max-queued-requests: must be >= 1, got 0" in capsys.readouterr().err
    assert "Retry-After" in make_parser().format_help()


def test_logprob_numbers_are_json_finite(http):
    # JSON has no -Infinity: the floor stands in for a token the model rules out entirely
    body = post(http, "completions", prompt=PROMPT, max_tokens=2, logprobs=20, seed=3)
    for top in body["choices"][0]["logprobs"]["top_logprobs"]:
        assert len(top) <= 21 and all(math.isfinite(v) and v >= -9999 for v in top.values())
