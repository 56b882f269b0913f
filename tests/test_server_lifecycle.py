"""The server under stress: graceful shutdown, engine failure, slow inputs, clients that leave.

Each test runs a real uvicorn server (in a thread, or as `python -m serve` in a subprocess for
the signal test) around the tiny random Qwen3 from conftest.py.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.demo.random_model import build_model_dir
from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.input_processor import InputProcessor
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from serve.server.lifecycle import run_server
from tests.helpers import wait_until
from tests.test_server_openai_client import ServerThread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(base_url: str, name: str, **labels) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def stream_events(base_url: str, body: dict, events: list, first: threading.Event,
                  times: list | None = None) -> None:
    """POST a streamed completion and collect its SSE payloads (the raw JSON dicts), and the
    time each arrived in `times`."""
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True},
                      timeout=60) as response:
        events.append(response.status_code)
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[len("data: "):]))
                if times is not None:
                    times.append(time.monotonic())
                first.set()
            elif line == "data: [DONE]":
                events.append("[DONE]")
    first.set()


def make_engine(model_dir: str, **config) -> AsyncEngine:
    return AsyncEngine(LLMEngine(EngineConfig(model=model_dir, dtype="float32", device="cpu",
                                              **config)))


@pytest.fixture(scope="module")
def long_context_dir(tmp_path_factory, tokenizer) -> str:
    """The tiny Qwen3 with room for 8,192 tokens: a request that runs for many seconds (the
    server streams ~400 tokens a second on an idle 2-core machine, so it outlasts the drain)."""
    return str(build_model_dir(tmp_path_factory.mktemp("long-qwen3"), "qwen3", tokenizer,
                               max_position_embeddings=8192))


# The short request must still run when the two waiters are queued (its 300 tokens take ~0.5 s
# through the server on an idle 2-core machine; 40 tokens, ~60 ms, lost that race on CI) and
# must finish within the drain: 10 s leaves room for a machine ten times slower.
SHORT_MAX_TOKENS = 300
SHUTDOWN_TIMEOUT_S = 10.0


@pytest.mark.slow
def test_sigterm_drains_then_exits_zero(long_context_dir):
    """Two requests run (max_num_seqs=2), two wait. SIGTERM: the waiting ones get 503 at once,
    the short running one finishes, the long one is ended at the deadline with an error event,
    and the process exits 0 soon after --shutdown-timeout."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "serve", "--model", long_context_dir, "--port", str(port),
         "--device", "cpu", "--max-num-seqs", "2", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
         "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert wait_until(lambda: _healthy(base_url), timeout=60), "the server did not start"
        long, short = [], []
        long_started, short_started = threading.Event(), threading.Event()
        threads = [
            threading.Thread(target=stream_events, args=(
                base_url, {"prompt": "def main():", "ignore_eos": True, "max_tokens": None},
                long, long_started)),
            threading.Thread(target=stream_events, args=(
                base_url, {"prompt": "x", "ignore_eos": True, "max_tokens": SHORT_MAX_TOKENS},
                short, short_started)),
        ]
        for thread in threads:
            thread.start()
        assert long_started.wait(30) and short_started.wait(30)
        queued = []

        def queue_one() -> None:
            response = httpx.post(f"{base_url}/v1/completions", timeout=60,
                                  json={"prompt": "y", "max_tokens": 5})
            queued.append((response.status_code, response.json()))

        waiters = [threading.Thread(target=queue_one) for _ in range(2)]
        for thread in waiters:
            thread.start()
        assert wait_until(lambda: metric(base_url, "nanoserve:num_requests_waiting") == 2, 30)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        for thread in waiters:
            thread.join(timeout=10)
        assert [status for status, _ in queued] == [503, 503]  # at once, not after the drain
        assert all("shutting down" in body["error"]["message"] for _, body in queued)
        assert server.wait(timeout=20) == 0
        elapsed = time.monotonic() - signalled
        for thread in threads:
            thread.join(timeout=10)
    finally:
        server.kill()
    assert SHUTDOWN_TIMEOUT_S <= elapsed < SHUTDOWN_TIMEOUT_S + 6
    assert short[-2]["choices"][0]["finish_reason"] == "length"  # finished within the timeout
    assert "error" in long[-2] and "shut down" in long[-2]["error"]["message"]
    assert long[-1] == short[-1] == "[DONE]"


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_cleanly(long_context_dir):
    """The first SIGINT drains; the second stops now: every stream ends with an error event
    and [DONE], and the process exits 130 (it used to abort with status 134)."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "serve", "--model", long_context_dir, "--port", str(port),
         "--device", "cpu", "--shutdown-timeout", "60", "--log-level", "error"],
        env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert wait_until(lambda: _healthy(base_url), timeout=60), "the server did not start"
        streams = [([], threading.Event()) for _ in range(3)]
        threads = [threading.Thread(target=stream_events, args=(
            base_url, {"prompt": f"x{i}", "ignore_eos": True, "max_tokens": None}, *stream))
            for i, stream in enumerate(streams)]
        for thread in threads:
            thread.start()
        assert all(started.wait(30) for _, started in streams)
        server.send_signal(signal.SIGINT)
        time.sleep(0.3)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=20) == 130
        for thread in threads:
            thread.join(timeout=10)
    finally:
        server.kill()
    for events, _ in streams:
        assert "shut down" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    assert "terminate called" not in server.stderr.read()


def core_processes_of(pid: int) -> list[int]:
    """The child processes of pid (Linux): the server's engine core."""
    return [int(child) for child in
            open(f"/proc/{pid}/task/{pid}/children").read().split()]


def test_a_dead_core_ends_the_streams_health_and_the_server(long_context_dir):
    """The engine core runs in a process of its own. If it dies (here: SIGKILL, as the kernel's
    OOM killer would), every stream in flight ends with an error event and [DONE], /health stops
    answering 200 within seconds, and the server exits non-zero for its supervisor to see."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "serve", "--model", long_context_dir, "--port", str(port),
         "--device", "cpu", "--log-level", "error"],
        env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _healthy(base_url), timeout=60), "the server did not start"
        events, started = [], threading.Event()
        thread = threading.Thread(target=stream_events, args=(
            base_url, {"prompt": "def main():", "ignore_eos": True, "max_tokens": None},
            events, started))
        thread.start()
        assert started.wait(30)
        [core] = core_processes_of(server.pid)
        os.kill(core, signal.SIGKILL)
        assert wait_until(lambda: not _healthy(base_url), timeout=5)
        thread.join(timeout=10)
        assert server.wait(timeout=20) != 0
    finally:
        server.kill()
    assert "error" in events[-2] and events[-1] == "[DONE]"


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_engine_failure_fails_requests_and_exits_nonzero(qwen3_dir, monkeypatch):
    engine = make_engine(qwen3_dir)

    def broken_step():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.engine, "step", broken_step)
    port = free_port()
    exit_code = []
    thread = threading.Thread(target=lambda: exit_code.append(run_server(
        build_app(engine, model_names="m"), engine, "127.0.0.1", port, "warning", 5.0)))
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: _healthy(base_url), timeout=30)
    response = httpx.post(f"{base_url}/v1/completions", json={"prompt": "x", "max_tokens": 3},
                          timeout=30)
    assert response.status_code == 503 and response.json()["error"]["message"]
    thread.join(timeout=30)
    assert exit_code == [1]  # a supervisor restarts it; it never sits half-alive
    assert engine.status == "dead"


@pytest.fixture
def server(qwen3_dir):
    engine = make_engine(qwen3_dir, max_num_seqs=1)
    with ServerThread(build_app(engine, model_names="m")) as server:
        yield f"http://127.0.0.1:{server.port}", engine


def test_a_slow_chat_template_does_not_delay_health(server, monkeypatch):
    base_url, engine = server
    render = InputProcessor.render_chat  # patched on the class: each tokenizer thread has a copy

    def slow_render(self, messages):
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # busy in Python, like jinja2 over a huge message
            pass
        return render(self, messages)

    monkeypatch.setattr(InputProcessor, "render_chat", slow_render)
    chat = threading.Thread(target=lambda: httpx.post(
        f"{base_url}/v1/chat/completions", timeout=30,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
    chat.start()
    latencies = []
    for _ in range(10):
        start = time.monotonic()
        assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200
        latencies.append(time.monotonic() - start)
        time.sleep(0.1)
    chat.join(timeout=30)
    assert max(latencies) < 1.0  # on the event loop, /health would wait out the template


def test_slow_tokenizing_does_not_stall_the_streams(server, monkeypatch):
    """A huge prompt takes a while to tokenize (fast tokenizers do it in Rust, with the GIL
    released): the running streams must go on meanwhile, as they could not if the engine's
    thread did the tokenizing."""
    base_url, engine = server
    process = InputProcessor.process

    def slow_process(self, prompt, params):
        time.sleep(1.5)
        return process(self, prompt, params)

    monkeypatch.setattr(InputProcessor, "process", slow_process)
    events, started, times = [], threading.Event(), []
    stream = threading.Thread(target=stream_events, args=(
        base_url, {"prompt": "x", "ignore_eos": True, "max_tokens": 500}, events, started, times))
    stream.start()  # its own tokenizing takes 1.5 s too, before the stream starts
    assert started.wait(10)
    big = threading.Thread(target=lambda: httpx.post(
        f"{base_url}/v1/completions", timeout=30, json={"prompt": "y" * 100, "max_tokens": 2}))
    big.start()
    big.join(timeout=30)
    stream.join(timeout=30)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) < 0.5


def test_a_client_that_leaves_while_queued_costs_no_prefill(server):
    base_url, engine = server
    events, started = [], threading.Event()
    running = threading.Thread(target=stream_events, args=(
        base_url, {"prompt": "def f():", "ignore_eos": True, "max_tokens": 400}, events, started))
    running.start()
    assert started.wait(10)
    prompt_tokens = metric(base_url, "nanoserve:prompt_tokens_total")
    # max_num_seqs=1: this one queues. Send it by hand, then hang up while it waits.
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "a long wait", "max_tokens": 5}), headers={"Content-Type": "application/json"})
    assert wait_until(lambda: metric(base_url, "nanoserve:num_requests_waiting") == 1)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert wait_until(lambda: metric(base_url, "nanoserve:num_requests_waiting") == 0)
    assert wait_until(lambda: metric(base_url, "nanoserve:request_success_total",
                                     finished_reason="abort") == 1)
    running.join(timeout=30)
    # The leaver was never prefilled: only the running request's prompt was counted.
    assert metric(base_url, "nanoserve:prompt_tokens_total") == prompt_tokens
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_an_abort_storm_leaves_no_pages_or_requests_behind(qwen3_dir):
    engine = make_engine(qwen3_dir, num_pages=16, page_size=4, max_model_len=64)
    with ServerThread(build_app(engine, model_names="m")) as server:
        base_url = f"http://127.0.0.1:{server.port}"

        def leave_after_two_chunks(i: int) -> None:
            body = {"prompt": f"x = {i}", "ignore_eos": True, "max_tokens": 50, "stream": True}
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body,
                              timeout=60) as response:
                for n, _ in enumerate(response.iter_lines()):
                    if n >= 3:
                        break  # leaving the block closes the connection mid-stream

        def stay_to_the_end(i: int) -> None:
            body = {"prompt": f"y = {i}", "ignore_eos": True, "max_tokens": 50}
            response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
            finished.append(response.json()["choices"][0]["finish_reason"])

        # Three stayers need 3 x 14 pages of the 16, so the scheduler must preempt
        # whatever else the leavers' timing does; the leavers then abort preempted
        # requests as well as running and waiting ones.
        finished: list[str] = []
        threads = [threading.Thread(target=stay_to_the_end, args=(i,)) for i in range(3)]
        threads += [threading.Thread(target=leave_after_two_chunks, args=(i,)) for i in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert wait_until(lambda: not engine.has_unfinished_requests(), timeout=30)
        assert wait_until(lambda: metric(base_url, "nanoserve_kv_pages_used") == 0)
        assert metric(base_url, "nanoserve:num_requests_running") == 0
        assert metric(base_url, "nanoserve:num_requests_waiting") == 0
        assert metric(base_url, "nanoserve:num_preemptions_total") > 0
        assert finished == ["length"] * 3


def test_a_body_that_stops_arriving_gets_408_and_its_connection_closed(qwen3_dir):
    """100 clients send headers and half a body, then nothing: each gets a 408 and its socket
    is closed once the body timeout passes (they used to be held open forever)."""
    engine = make_engine(qwen3_dir)
    with ServerThread(build_app(engine, model_names="m", body_timeout_s=1.0)) as server:
        sockets = []
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         b'{"prompt": "')
            sockets.append(sock)
        started = time.monotonic()
        answers = []
        for sock in sockets:
            received = b""
            while chunk := sock.recv(4096):  # until the server closes the connection
                received += chunk
            answers.append(received)
            sock.close()
        elapsed = time.monotonic() - started
        # the server still serves everyone else
        response = httpx.post(f"http://127.0.0.1:{server.port}/v1/completions",
                              json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert response.status_code == 200
    assert elapsed < 10
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == \
            "RequestTimeoutError"
