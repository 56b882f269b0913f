"""GET /metrics and the engine-state log line, on the tiny Qwen3 (CPU): every metric comes from
the snapshots the engine publishes after each step."""

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.messages import EngineStats, FinishedRequestStats
from serve.server.app import build_app
from serve.server.metrics import ServerMetrics, log_engine_state, log_while_busy
from tests.helpers import wait_until

NUM_PAGES = 64
METRIC_NAMES = {
    "nanoserve_kv_pages_total",
    "nanoserve_kv_pages_used",
    "nanoserve:kv_cache_usage_perc",
    "nanoserve:num_requests_running",
    "nanoserve:num_requests_waiting",
    "nanoserve:num_preemptions_total",
    "nanoserve:prompt_tokens_total",
    "nanoserve:generation_tokens_total",
    "nanoserve:time_to_first_token_seconds_count",
    "nanoserve:inter_token_latency_seconds_count",
    "nanoserve:e2e_request_latency_seconds_count",
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
    with TestClient(build_app(engine, model_names="m")) as client:
        client.app_engine = engine
        yield client


def scrape(client) -> dict[str, float]:
    """Every sample of GET /metrics, by name."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(response.text)
    samples = {}
    for family in families:
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                              if k != "le")
            if "le" not in sample.labels:  # histogram buckets are checked through _count
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def data_lines(response):
    return (line for line in response.iter_lines() if line.startswith("data: {"))


def test_idle_engine(client):
    metrics = scrape(client)
    assert METRIC_NAMES <= metrics.keys()
    assert metrics["nanoserve_kv_pages_total"] == NUM_PAGES
    assert metrics["nanoserve_kv_pages_used"] == 0
    assert metrics["nanoserve:kv_cache_usage_perc"] == 0
    assert metrics["nanoserve:num_requests_running"] == 0
    assert metrics["nanoserve:num_requests_waiting"] == 0


def test_pages_are_used_while_a_request_runs_and_come_back_when_it_finishes(client):
    before = scrape(client)
    with client.stream("POST", "/v1/completions", json=LONG) as response:
        assert response.status_code == 200
        chunks = data_lines(response)
        next(chunks), next(chunks)  # the request has been prefilled and is decoding
        running = scrape(client)
        last = [json.loads(line[len("data: "):]) for line in chunks][-1]
    assert last["choices"][0]["finish_reason"] == "length"
    pages_used = running["nanoserve_kv_pages_used"]
    assert pages_used > 0
    assert running["nanoserve:kv_cache_usage_perc"] == pages_used / NUM_PAGES
    assert running["nanoserve:num_requests_running"] == 1
    assert running["nanoserve:num_requests_waiting"] == 0
    # The engine frees a finished request's pages in the step that finishes it, and publishes
    # its snapshot before it hands out the next commands; give it that moment.
    assert wait_until(lambda: scrape(client)["nanoserve_kv_pages_used"] == 0)
    done = scrape(client)
    assert done["nanoserve:num_requests_running"] == 0

    def grew(name: str) -> float:
        return done.get(name, 0) - before.get(name, 0)

    assert grew("nanoserve:generation_tokens_total") == 480
    assert grew("nanoserve:prompt_tokens_total") == num_prompt_tokens(client)
    assert grew("nanoserve:time_to_first_token_seconds_count") == 1
    assert grew("nanoserve:inter_token_latency_seconds_count") == 479
    assert grew("nanoserve:request_success_total{finished_reason=length}") == 1
    assert grew("nanoserve:e2e_request_latency_seconds_count") == 1


def num_prompt_tokens(client) -> int:
    return len(client.app_engine.tokenizer.encode("def main():"))


@pytest.fixture(scope="module")
def core_process_client(qwen3_dir):
    config = EngineConfig(model=qwen3_dir, device="cpu", dtype="float32", num_pages=NUM_PAGES)
    with TestClient(build_app(AsyncEngine(LLMEngine(config, core_process=True)),
                              model_names="m")) as client:
        yield client


@pytest.mark.parametrize("where", ["core-in-thread", "core-process"])
def test_pages_come_back_when_the_client_goes_away(request, where):
    """With the core in a process of its own too: when the last request ends by an abort, no
    step follows to carry the core's state, so the core sends it once it is idle (the gauges
    used to keep the busy state forever)."""
    client = request.getfixturevalue("client" if where == "core-in-thread"
                                     else "core_process_client")
    with client.stream("POST", "/v1/completions", json=LONG) as response:
        chunks = data_lines(response)  # held: dropping the iterator would close the response
        next(chunks)
        assert scrape(client)["nanoserve_kv_pages_used"] > 0
    # Leaving the stream early aborts the request, which gives its pages back as a finish does.
    assert wait_until(lambda: scrape(client)["nanoserve_kv_pages_used"] == 0)
    metrics = scrape(client)
    assert metrics["nanoserve:num_requests_running"] == 0
    assert metrics["nanoserve:request_success_total{finished_reason=abort}"] >= 1


def snapshot(num_pages: int, num_used: int, num_running: int, num_waiting: int) -> EngineStats:
    return EngineStats(num_running, num_waiting, num_used, num_pages)


def test_log_engine_state_line(caplog):
    with caplog.at_level(logging.INFO, logger="serve.server.metrics"):
        line = log_engine_state(snapshot(4096, 120, 3, 0))
    assert line == "KV pages 120/4096 used (2.9%), 3 running, 0 waiting"
    assert caplog.messages == [line]
    assert log_engine_state(snapshot(64, 64, 0, 7)) == (
        "KV pages 64/64 used (100.0%), 0 running, 7 waiting"
    )


def test_state_is_logged_only_while_busy(caplog):
    busy = SimpleNamespace(latest_stats=snapshot(8, 2, 1, 0))
    idle = SimpleNamespace(latest_stats=snapshot(8, 0, 0, 0))

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


def test_counters_add_up_snapshots():
    metrics = ServerMetrics()
    finished = FinishedRequestStats("stop", 2.0, 10, 5)
    metrics.record(EngineStats(1, 2, 3, 8, num_preemptions=2, num_prompt_tokens=10,
                               num_generation_tokens=4, time_to_first_token_s=(0.5,),
                               inter_token_latency_s=(0.1, 0.2), finished=(finished,)))
    metrics.record(EngineStats(0, 0, 0, 8, num_preemptions=1, num_generation_tokens=1))
    value = metrics.registry.get_sample_value
    assert value("nanoserve:num_preemptions_total") == 3
    assert value("nanoserve:generation_tokens_total") == 5
    assert value("nanoserve:prompt_tokens_total") == 10
    assert value("nanoserve:request_success_total", {"finished_reason": "stop"}) == 1
    assert value("nanoserve:inter_token_latency_seconds_count") == 2
    assert value("nanoserve:e2e_request_latency_seconds_sum") == 2.0
    assert value("nanoserve:num_requests_running") == 0  # gauges hold the latest snapshot


def test_speculative_decoding_counters_and_the_log_lines_acceptance():
    metrics = ServerMetrics()
    stats = EngineStats(1, 0, 2, 8, spec_num_drafts=4, spec_num_draft_tokens=12,
                        spec_num_accepted_tokens=6, spec_accepted_per_pos=(3, 2, 1))
    metrics.record(stats)
    metrics.record(stats)
    samples = {sample.name + "".join(f"{{{v}}}" for v in sample.labels.values()): sample.value
               for family in metrics.registry.collect() for sample in family.samples}
    assert samples["nanoserve:spec_decode_num_drafts_total"] == 8
    assert samples["nanoserve:spec_decode_num_draft_tokens_total"] == 24
    assert samples["nanoserve:spec_decode_num_accepted_tokens_total"] == 12
    assert [samples[f"nanoserve:spec_decode_num_accepted_tokens_per_pos_total{{{p}}}"]
            for p in range(3)] == [6, 4, 2]
    # the log line: since the last line, 1 + accepted / verify rows tokens per row
    assert metrics.take_acceptance() == "mean acceptance length 2.50, 12/24 drafts accepted (50.0%)"
    assert metrics.take_acceptance() is None
    assert log_engine_state(snapshot(8, 2, 1, 0), "mean acceptance length 2.50") == (
        "KV pages 2/8 used (25.0%), 1 running, 0 waiting, mean acceptance length 2.50")
