"""HTTP that is slow, ambiguous or interrupted: a request head that never ends, a body framed two
ways, a second SIGTERM while the server stops.

Each test runs a real uvicorn server around the tiny random Qwen3 from conftest.py: in a thread
(ServerThread, configured as `python -m serve` configures uvicorn), or as `python -m serve` in a
subprocess for the signal test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from serve.server.app import build_app
from tests.helpers import wait_until
from tests.test_server_lifecycle import free_port, make_engine
from tests.test_server_openai_client import ServerThread

HALF_A_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def server(qwen3_dir):
    with ServerThread(build_app(make_engine(qwen3_dir), model_names="m")) as server:
        yield server


@pytest.fixture
def header_timeout_s(monkeypatch) -> float:
    """A 1 s deadline on request heads, for the connections made while the test runs."""
    monkeypatch.setattr("serve.server.http_protocol.HEADER_TIMEOUT_S", 1.0)
    return 1.0


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends on `sock` until it closes the connection (socket.timeout when
    it does not within the socket's timeout)."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length from a kept-alive connection: its head and body."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(4096)
    head, body = received.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_a_request_head_that_stops_arriving_is_closed(server, header_timeout_s):
    """50 clients send half a request head, then nothing: each connection is closed once the
    header timeout passes (they used to be held open forever), and others are still served."""
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
               for _ in range(50)]
    for sock in sockets:
        sock.sendall(HALF_A_HEAD)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # sends nothing
    started = time.monotonic()
    answers = [read_until_closed(sock) for sock in [*sockets, silent]]
    elapsed = time.monotonic() - started
    for sock in [*sockets, silent]:
        sock.close()
    response = httpx.post(f"http://127.0.0.1:{server.port}/v1/completions",
                          json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert answers == [b""] * 51  # closed without an answer: there is no request to answer
    assert elapsed < header_timeout_s + 3
    assert response.status_code == 200


def test_the_header_timeout_spares_slow_bodies_and_idle_kept_alive_connections(
        server, header_timeout_s):
    """Once a head is complete the header timeout is over: a body may take longer than it (the
    body has its own, longer timeout), and so may the wait for the next request on a kept-alive
    connection (uvicorn's keep-alive timeout); a head sent in pieces within it is served."""
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(HALF_A_HEAD + b"Content-Type: application/json\r\n")
        time.sleep(header_timeout_s / 2)
        sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body))
        time.sleep(header_timeout_s * 1.5)
        sock.sendall(body)
        first = read_response(sock)
        time.sleep(header_timeout_s * 1.5)  # idle between requests: the keep-alive timer's job
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        second = read_response(sock)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert json.loads(first.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"] is not None
    assert second.startswith(b"HTTP/1.1 200 ")


def test_a_body_framed_both_ways_gets_400_and_its_connection_closed(server):
    """Content-Length and Transfer-Encoding together: h11 would go by the chunks, a proxy in
    front may go by the length, and the request after this one is then not the same request to
    both (request smuggling). Refused, before the body is read, and the connection closed."""
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 4\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        answer = read_until_closed(sock)
    head, payload = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head.lower()
    error = json.loads(payload)["error"]
    assert error["type"] == "BadRequestError"
    assert "Content-Length" in error["message"] and "Transfer-Encoding" in error["message"]


@pytest.mark.slow
def test_sigterm_again_and_again_exits_143_never_by_signal(qwen3_dir, tmp_path):
    """SIGTERM, then SIGTERM every 20 ms until the process ends: the first drains, the second
    stops it, and every later one (while uvicorn or the engine stop) changes nothing. The
    process exits 143; it used to be killed by a SIGTERM that met the default handler
    (status -15) about one time in five."""
    port = free_port()
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "serve", "--model", qwen3_dir, "--port", str(port),
             "--device", "cpu", "--log-level", "warning"],
            env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=stderr)
    try:
        assert wait_until(lambda: _healthy(port), timeout=60), "the server did not start"
        deadline = time.monotonic() + 20
        while server.poll() is None and time.monotonic() < deadline:
            server.send_signal(signal.SIGTERM)  # does nothing once the process has ended
            time.sleep(0.02)
        status = server.wait(timeout=5)
    finally:
        server.kill()
    assert status == 128 + signal.SIGTERM, log.read_text()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
