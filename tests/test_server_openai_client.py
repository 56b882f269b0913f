"""A real server on 127.0.0.1, driven by the official `openai` client with strict validation.

If OpenAI's own client accepts every response (and parses every error), so will the tools built
on it. The engine is the real one on the tiny random Qwen3 from conftest.py (float32, CPU).
"""

import socket
import threading
import time

import openai
import pytest
import uvicorn

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from serve.server.lifecycle import server_config

MODEL = "tiny-qwen3"
CHAT = [{"role": "user", "content": "Write a haiku."}]


class ServerThread:
    """uvicorn serving `app` from a background thread, on a port the OS picked, configured as
    `python -m serve` configures it."""

    def __init__(self, app) -> None:
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose protocol says TCP,
        # and without it every response waits ~40 ms for the client's delayed ACK.
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.bind(("127.0.0.1", 0))  # bound before the start: no race for the port
        self.port = self.socket.getsockname()[1]
        config = server_config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.socket],), daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


@pytest.fixture(scope="module")
def engine(qwen3_dir) -> AsyncEngine:
    config = EngineConfig(model=str(qwen3_dir), dtype="float32", device="cpu")
    return AsyncEngine(LLMEngine(config))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(build_app(engine, model_names=MODEL)) as server:
        yield server


def make_client(server: ServerThread, strict: bool) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=60,
        _strict_response_validation=strict,
    )


@pytest.fixture(scope="module")
def client(server):
    return make_client(server, strict=True)


@pytest.fixture(scope="module")
def lenient_client(server):
    """For streamed completions only: the client checks each chunk against `Completion`, whose
    finish_reason may not be null, yet every chunk but the last has none (OpenAI's too)."""
    return make_client(server, strict=False)


def test_completion(client, lenient_client):
    completion = client.completions.create(
        model=MODEL,
        prompt="def main():",
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 6

    stream = lenient_client.completions.create(
        model=MODEL,
        prompt="def main():",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == completion.usage


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=6, temperature=0, seed=1
    )
    message = reply.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert reply.usage.completion_tokens <= 6

    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_completion_tokens=6,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    # the same counts; the stream may find the first request's prompt cached
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(
        exclude={"prompt_tokens_details"}) == reply.usage.model_dump(
        exclude={"prompt_tokens_details"})


def test_models(client):
    [model] = client.models.list().data
    assert model.id == MODEL and model.owned_by == "nanoserve"


def test_errors_reach_the_client_as_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=CHAT, top_logprobs=2)
    assert refused.value.param == "top_logprobs" and refused.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-9", prompt="x")
    assert unknown.value.code == "model_not_found"


@pytest.fixture
def aborted(engine, monkeypatch) -> list[str]:
    """Slow each step to 10 ms (so 400 tokens take seconds and cannot just finish) and record
    the ids the engine is asked to abort."""
    aborted: list[str] = []
    abort_request, step = engine.engine.abort_request, engine.engine.step

    def recording_abort(request_id: str) -> None:
        aborted.append(request_id)
        abort_request(request_id)

    def slow_step():
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine.engine, "abort_request", recording_abort)
    monkeypatch.setattr(engine.engine, "step", slow_step)
    return aborted


def wait_until_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine kept generating for a closed connection"
        time.sleep(0.01)


def test_closing_a_stream_aborts_the_request(client, engine, aborted):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_completion_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    next(chunks)
    assert engine.has_unfinished_requests()
    stream.close()  # the client hangs up mid-stream
    wait_until_idle(engine)
    assert aborted == [f"{first.id}-0"]


def test_a_client_timeout_aborts_a_non_streamed_request(client, engine, aborted):
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(
            model=MODEL, prompt="import", max_tokens=400, extra_body={"ignore_eos": True}
        )
    wait_until_idle(engine)
    assert len(aborted) == 1 and aborted[0].startswith("cmpl-")
