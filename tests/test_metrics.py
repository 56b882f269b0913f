"""Memory made visible: GET /metrics and the engine-state log line, on the tiny Qwen3 (CPU)."""

import asyncio
import json
import logging
from collections import deque
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from serve.server.metrics import log_engine_state, log_while_busy
from tests.helpers import wait_until

NUM_PAGES = 64
METRIC_NAMES = {
    "nanoserve_kv_pages_total",
    "nanoserve_kv_pages_used",
    "nanoserve_kv_cache_usage_ratio",
    "nanoserve_requests_running",
    "nanoserve_requests_waiting",
}
# Long enough that the request is still generating when the test scrapes mid-stream: the tiny
# model's context is 512 tokens, and 512 tokens fit in 32 of the pool's 64 pages.
LONG = {"model": "m", "prompt": "def main():", "max_tokens": 480, "ignore_eos": True,
        "stream": True}


@pytest.fixture(scope="module")
def engine(qwen3_dir) -> AsyncEngine:
    config = EngineConfig(model=qwen3_dir, device="cpu", dtype="float32", num_pages=NUM_PAGES)
    return AsyncEngine(LLMEngine(config))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine, model_name="m")) as client:
        yield client


def scrape(client) -> dict[str, float]:
    """Every sample of GET /metrics, by name."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(response.text)
    return {sample.name: sample.value for family in families for sample in family.samples}


def data_lines(response):
    return (line for line in response.iter_lines() if line.startswith("data: {"))


def test_idle_engine(client):
    metrics = scrape(client)
    assert METRIC_NAMES <= metrics.keys()
    assert metrics["nanoserve_kv_pages_total"] == NUM_PAGES
    assert metrics["nanoserve_kv_pages_used"] == 0
    assert metrics["nanoserve_kv_cache_usage_ratio"] == 0
    assert metrics["nanoserve_requests_running"] == 0
    assert metrics["nanoserve_requests_waiting"] == 0


def test_pages_are_used_while_a_request_runs_and_come_back_when_it_finishes(client):
    with client.stream("POST", "/v1/completions", json=LONG) as response:
        assert response.status_code == 200
        chunks = data_lines(response)
        next(chunks), next(chunks)  # the request has been prefilled and is decoding
        running = scrape(client)
        last = [json.loads(line[len("data: "):]) for line in chunks][-1]
    assert last["choices"][0]["finish_reason"] == "length"
    pages_used = running["nanoserve_kv_pages_used"]
    assert pages_used > 0
    assert running["nanoserve_kv_cache_usage_ratio"] == pages_used / NUM_PAGES
    assert running["nanoserve_requests_running"] == 1
    assert running["nanoserve_requests_waiting"] == 0
    # The engine frees a finished request's pages in the step that finishes it, before the
    # last chunk is sent, so they are back by the time the client has read it.
    done = scrape(client)
    assert done["nanoserve_kv_pages_used"] == 0
    assert done["nanoserve_requests_running"] == 0


def test_pages_come_back_when_the_client_goes_away(client):
    with client.stream("POST", "/v1/completions", json=LONG) as response:
        chunks = data_lines(response)  # held: dropping the iterator would close the response
        next(chunks)
        assert scrape(client)["nanoserve_kv_pages_used"] > 0
    # Leaving the stream early aborts the request, which gives its pages back as a finish does.
    assert wait_until(lambda: scrape(client)["nanoserve_kv_pages_used"] == 0)
    assert scrape(client)["nanoserve_requests_running"] == 0


def fake_engine(num_pages: int, num_free_pages: int, num_running: int, num_waiting: int):
    allocator = SimpleNamespace(num_pages=num_pages, num_free_pages=num_free_pages)
    scheduler = SimpleNamespace(waiting=deque(range(num_waiting)))
    return SimpleNamespace(allocator=allocator, scheduler=scheduler, num_running=num_running)


def test_log_engine_state_line(caplog):
    with caplog.at_level(logging.INFO, logger="serve.server.metrics"):
        line = log_engine_state(fake_engine(4096, 4096 - 120, 3, 0))
    assert line == "KV pages 120/4096 used (2.9%), 3 running, 0 waiting"
    assert caplog.messages == [line]
    assert log_engine_state(fake_engine(64, 0, 0, 7)) == (
        "KV pages 64/64 used (100.0%), 0 running, 7 waiting"
    )


def test_state_is_logged_only_while_busy(caplog):
    busy = SimpleNamespace(has_unfinished_requests=lambda: True, engine=fake_engine(8, 6, 1, 0))
    idle = SimpleNamespace(has_unfinished_requests=lambda: False, engine=fake_engine(8, 8, 0, 0))

    async def run_briefly(engine) -> None:
        task = asyncio.create_task(log_while_busy(engine, interval_s=0.01))
        await asyncio.sleep(0.05)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="serve.server.metrics"):
        asyncio.run(run_briefly(idle))
        assert caplog.messages == []
        asyncio.run(run_briefly(busy))
    assert caplog.messages and set(caplog.messages) == {
        "KV pages 2/8 used (25.0%), 1 running, 0 waiting"
    }
