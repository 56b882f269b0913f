"""A process of the engine that dies or stops while nothing runs is noticed within seconds: the
engine core's process (watched by the server) and a tensor-parallel worker (watched by rank 0).
Death shows at once (the process has exited); a stopped process (SIGSTOP) when its heartbeats
have been missing for --heartbeat-timeout seconds. Either way /health answers 503 and the server
exits with status 1, as it does when the core dies mid-stream.
"""

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.core_client import FOLDER_PREFIX, remove_stale_folders
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from serve.server.lifecycle import run_server
from tests.helpers import wait_until
from tests.test_server_lifecycle import _healthy, free_port

HEARTBEAT_TIMEOUT_S = 2.0


def serve_in_thread(engine: AsyncEngine) -> tuple[str, threading.Thread, list[int]]:
    """run_server in a thread (signals are the main thread's: none here); its exit status
    lands in the returned list."""
    port = free_port()
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(run_server(
        build_app(engine, model_names="m"), engine, "127.0.0.1", port, "warning", 5.0)))
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: _healthy(base_url), timeout=30), "the server did not start"
    return base_url, thread, status


def config(model_dir: str, **settings) -> EngineConfig:
    return EngineConfig(model=model_dir, dtype="float32", device="cpu", max_model_len=64,
                        heartbeat_timeout=HEARTBEAT_TIMEOUT_S, **settings)


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_core_that_dies_or_stops_while_idle_ends_the_server(qwen3_dir, how):
    engine = AsyncEngine(LLMEngine(config(qwen3_dir), core_process=True))
    core = engine.engine.core.process
    base_url, thread, status = serve_in_thread(engine)
    try:
        assert httpx.post(f"{base_url}/v1/completions",
                          json={"prompt": "x", "max_tokens": 2}).status_code == 200
        os.kill(core.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        noticed = time.monotonic()
        # killed: seen at the next idle check; stopped: once the heartbeats are overdue
        assert wait_until(lambda: not _healthy(base_url), timeout=HEARTBEAT_TIMEOUT_S + 3)
        if how == "killed":
            assert time.monotonic() - noticed < 2
        thread.join(timeout=20)
        assert status == [1]  # as for a death mid-stream: its supervisor restarts it
        assert core.poll() is not None  # a stopped core was killed, not left behind
    finally:
        if core.poll() is None:
            core.kill()


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_tensor_parallel_worker_that_dies_or_stops_while_idle_ends_the_engine(qwen3_dir, how):
    engine = AsyncEngine(LLMEngine(config(qwen3_dir, tensor_parallel_size=2)))
    engine.start()
    [worker] = engine.engine.runner.workers
    try:
        os.kill(worker.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        assert wait_until(lambda: engine.status == "dead", timeout=HEARTBEAT_TIMEOUT_S + 3)
        assert "tensor parallel rank 1" in str(engine.error)
        engine.shutdown()  # quickly: a failed rank is killed, not asked over the group
        assert worker.poll() is not None
    finally:
        if worker.poll() is None:
            worker.kill()


def test_a_worker_that_dies_under_a_core_process_ends_the_server(qwen3_dir):
    """The production layout: the core process is rank 0; it notices its worker's death while
    idle and exits, and the server notices the core's."""
    engine = AsyncEngine(LLMEngine(config(qwen3_dir, tensor_parallel_size=2), core_process=True))
    base_url, thread, status = serve_in_thread(engine)
    core = engine.engine.core.process
    [worker] = [int(pid) for pid in
                Path(f"/proc/{core.pid}/task/{core.pid}/children").read_text().split()]
    os.kill(worker, signal.SIGKILL)
    assert wait_until(lambda: not _healthy(base_url), timeout=5)
    thread.join(timeout=20)
    assert status == [1] and core.poll() == 1


def test_a_killed_servers_socket_folder_is_removed_by_the_next_server(tmp_path, monkeypatch):
    """A server killed outright (SIGKILL) cannot remove its sockets' folder; the next server
    removes every such folder whose server is gone, and only those."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)  # a pid that no process has now
    stale = tmp_path / f"{FOLDER_PREFIX}{gone}-abc"
    live = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-def"
    other = tmp_path / "nanoserve-something-else"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "input").touch()
    remove_stale_folders()
    assert not stale.exists() and live.exists() and other.exists()
