"""Stage 1: requests batched together give exactly what they give alone."""

import threading
import time

import openai
import pytest

from serve import LLM, SamplingParams
from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from tests.test_server_openai_client import ServerThread

PROMPTS = ["def main():", "import os\nimport sys\n\nclass Config(object):", "x",
           "for i in range(10):"]


def test_batched_greedy_equals_one_at_a_time(model_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = LLM(model_dir, device="cpu", max_batch_size=1)
    together = LLM(model_dir, device="cpu", max_batch_size=8)
    expected = [o.token_ids for o in alone.generate(PROMPTS, params, use_tqdm=False)]
    got = [o.token_ids for o in together.generate(PROMPTS, params, use_tqdm=False)]
    assert got == expected


def test_mixed_params_in_one_batch_each_give_their_own_result(qwen3_dir):
    mixed = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.2, top_k=20, top_p=0.9, seed=4, max_tokens=30,
                       ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["e"]),
    ]
    alone = LLM(qwen3_dir, device="cpu", max_batch_size=1)
    together = LLM(qwen3_dir, device="cpu", max_batch_size=8)
    expected = [alone.generate([p], [s], use_tqdm=False)[0] for p, s in zip(PROMPTS, mixed,
                                                                         strict=True)]
    got = together.generate(PROMPTS, mixed, use_tqdm=False)
    for want, have in zip(expected, got, strict=True):
        assert have.token_ids == want.token_ids
        assert have.text == want.text
        assert have.finish_reason == want.finish_reason
    assert [len(o.token_ids) for o in got[:3]] == [20, 12, 30]


def test_batches_hold_at_most_max_batch_size_and_run_one_after_another(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", max_batch_size=2)
    engine = llm.engine
    for i in range(5):
        engine.add_request(str(i), PROMPTS[i % 4], SamplingParams(max_tokens=3, ignore_eos=True))
    batch_sizes = []
    while engine.has_unfinished_requests():
        engine.step()
        if engine.batch is not None and engine.batch.size not in batch_sizes[-1:]:
            batch_sizes.append(engine.batch.size)
    assert batch_sizes == [2, 1] or batch_sizes == [2, 2, 1]


def test_batch_wait_collects_requests_that_arrive_close_together(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", max_batch_size=8, batch_wait_ms=200)
    engine = llm.engine
    engine.add_request("a", "x", SamplingParams(max_tokens=2))
    assert engine.step() == []  # the batch waits for company
    engine.add_request("b", "y", SamplingParams(max_tokens=2))
    deadline = time.monotonic() + 5
    while engine.batch is None and time.monotonic() < deadline:
        engine.step()
    assert engine.batch is not None and engine.batch.size == 2


def test_abort_in_a_running_batch_stops_only_that_row(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", max_batch_size=4)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    engine.add_request("keep", "def f():", params)
    engine.add_request("drop", "def g():", params)
    engine.step()  # prefill both
    engine.abort_request("drop")
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == "keep"
            if output.finished:
                finished[output.request_id] = output
    assert len(finished["keep"].token_ids) == 10


@pytest.fixture(scope="module")
def batching_server(qwen3_dir):
    config = EngineConfig(model=qwen3_dir, dtype="float32", device="cpu", max_batch_size=4,
                          batch_wait_ms=20)
    engine = AsyncEngine(LLMEngine(config))
    with ServerThread(build_app(engine, model_name="tiny")) as server:
        yield server, engine


def test_concurrent_clients_all_answered_in_order(batching_server):
    server, _ = batching_server
    base_url = f"http://127.0.0.1:{server.port}/v1"
    results: dict[int, tuple[str, str]] = {}

    def client(i: int) -> None:
        api = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        prompt = PROMPTS[i % 4]
        whole = api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        pieces = [c.choices[0].text for c in api.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
            if c.choices]
        results[i] = (whole.choices[0].text, "".join(pieces))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(10))  # none lost
    for whole, streamed in results.values():
        assert whole == streamed  # chunks arrived complete and in order


def test_disconnect_frees_its_row(batching_server):
    server, engine = batching_server
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none",
                        max_retries=0)
    stream = api.completions.create(model="tiny", prompt="x", max_tokens=400, stream=True,
                                    extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(2), stream, strict=False):
        pass
    stream.close()
    deadline = time.monotonic() + 10
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests()
