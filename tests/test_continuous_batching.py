"""Continuous batching: requests join and leave the running batch at every step, batched
requests give exactly what they give alone, and preemption loses nothing."""

import threading

import openai
import pytest

from serve import LLM, SamplingParams
from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from tests.helpers import wait_until
from tests.test_server_openai_client import ServerThread

PROMPTS = ["def main():", "import os\nimport sys\n\nclass Config(object):", "x",
           "for i in range(10):"]
MIXED = [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=1.2, top_k=20, top_p=0.9, seed=4, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["e"]),
]


def test_batched_greedy_equals_one_at_a_time(model_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = LLM(model_dir, device="cpu", max_num_seqs=1)
    together = LLM(model_dir, device="cpu", max_num_seqs=8)
    expected = [o.token_ids for o in alone.generate(PROMPTS, params, use_tqdm=False)]
    got = [o.token_ids for o in together.generate(PROMPTS, params, use_tqdm=False)]
    assert got == expected


def test_mixed_params_in_one_batch_each_give_their_own_result(qwen3_dir):
    alone = LLM(qwen3_dir, device="cpu", max_num_seqs=1)
    together = LLM(qwen3_dir, device="cpu", max_num_seqs=8)
    expected = [alone.generate([p], [s], use_tqdm=False)[0] for p, s in zip(PROMPTS, MIXED,
                                                                         strict=True)]
    got = together.generate(PROMPTS, MIXED, use_tqdm=False)
    for want, have in zip(expected, got, strict=True):
        assert have.token_ids == want.token_ids
        assert have.text == want.text
        assert have.finish_reason == want.finish_reason
    assert [len(o.token_ids) for o in got[:3]] == [20, 12, 30]


def test_a_finished_request_makes_room_at_once(qwen3_dir):
    """max_num_seqs bounds the running batch; a queued request starts the step after a running
    one finishes, not when the whole batch is done. (Step by step: without overlap scheduling,
    each step's tokens are read before the next step is scheduled.)"""
    engine = LLM(qwen3_dir, device="cpu", max_num_seqs=2, overlap_scheduling=False).engine
    lengths = {"a": 2, "b": 8, "c": 3}
    for rid, n in lengths.items():
        engine.add_request(rid, "x = 1", SamplingParams(max_tokens=n, ignore_eos=True))
    running = []
    while engine.has_unfinished_requests():
        engine.step()
        running.append(sorted(r.request_id for r in engine.scheduler.running))
    assert max(len(r) for r in running) == 2
    # "a" finishes at step 2; "c" runs from step 3, beside "b"
    assert running[:4] == [["a", "b"], ["b"], ["b", "c"], ["b", "c"]]


def test_a_late_request_gets_its_first_token_within_two_steps(qwen3_dir):
    engine = LLM(qwen3_dir, device="cpu").engine
    engine.add_request("early", "def f():", SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(5):
        engine.step()
    engine.add_request("late", "class A:", SamplingParams(max_tokens=4, ignore_eos=True))
    first_tokens = [any(o.request_id == "late" for o in engine.step()) for _ in range(2)]
    assert any(first_tokens)
    assert engine.scheduler.find("early") is not None  # still decoding beside it


def test_abort_stops_only_that_request(qwen3_dir):
    engine = LLM(qwen3_dir, device="cpu").engine
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    engine.add_request("keep", "def f():", params)
    engine.add_request("drop", "def g():", params)
    engine.step()  # prefill both
    assert engine.abort_request("drop").finish_reason == "abort"
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == "keep"
            if output.finished:
                finished[output.request_id] = output
    assert len(finished["keep"].token_ids) == 10
    assert engine.allocator.num_used_pages == 0


def generate_with_pool(model_dir: str, num_pages: int, prompts, params):
    llm = LLM(model_dir, device="cpu", num_pages=num_pages, page_size=4)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return outputs, llm.engine.scheduler.num_preemptions, llm.engine.allocator


def test_preemption_changes_no_token(model_dir):
    """16 pages of 4 tokens hold one or two of these requests: the others are preempted and
    recompute. Greedy and seeded requests alike give exactly the tokens of a roomy pool."""
    prompts = PROMPTS * 2
    params = MIXED[:3] * 2 + [SamplingParams(temperature=0.7, top_p=0.8, max_tokens=24,
                                             ignore_eos=True, seed=9)] * 2
    roomy, roomy_preemptions, _ = generate_with_pool(model_dir, 256, prompts, params)
    tight, preemptions, allocator = generate_with_pool(model_dir, 16, prompts, params)
    assert roomy_preemptions == 0 and preemptions >= 3
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert [o.text for o in tight] == [o.text for o in roomy]
    assert allocator.num_used_pages == 0  # every page is free, or cached and evictable
    assert allocator.num_free_pages + allocator.num_evictable_pages == 16


def test_a_preempted_request_streams_nothing_twice(qwen3_dir):
    engine = LLM(qwen3_dir, device="cpu", num_pages=16, page_size=4).engine
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    streamed: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    final = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            streamed[output.request_id] += output.new_token_ids
            if output.finished:
                final[output.request_id] = output.token_ids
    assert engine.scheduler.num_preemptions > 0
    assert streamed == final


@pytest.fixture(scope="module")
def tight_server(qwen3_dir):
    """A server whose pool (16 pages of 4 tokens) forces preemption under 50 requests."""
    config = EngineConfig(model=qwen3_dir, dtype="float32", device="cpu", num_pages=16,
                          page_size=4, max_model_len=64)
    engine = AsyncEngine(LLMEngine(config))
    with ServerThread(build_app(engine, model_names="tiny")) as server:
        yield server, engine


def test_fifty_streams_on_a_tight_pool_all_complete_in_order(tight_server):
    server, engine = tight_server
    base_url = f"http://127.0.0.1:{server.port}/v1"
    results: dict[int, tuple[str, list[str]]] = {}

    def client(i: int) -> None:
        api = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
        prompt, seed = PROMPTS[i % 4], i % 3
        whole = api.completions.create(model="tiny", prompt=prompt, max_tokens=12, seed=seed,
                                       temperature=0.8, extra_body={"ignore_eos": True})
        chunks = [c.choices[0].text for c in api.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, seed=seed, temperature=0.8,
            stream=True, extra_body={"ignore_eos": True}) if c.choices]
        results[i] = (whole.choices[0].text, chunks)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(50))  # none lost
    for whole, chunks in results.values():
        assert "".join(chunks) == whole  # every chunk once, in order
    assert wait_until(lambda: engine.latest_stats.num_pages_used == 0)
    assert engine.engine.scheduler.num_preemptions > 0


def test_disconnect_frees_its_slot(tight_server):
    server, engine = tight_server
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none",
                        max_retries=0)
    stream = api.completions.create(model="tiny", prompt="x", max_tokens=40, stream=True,
                                    extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(2), stream, strict=False):
        pass
    stream.close()
    assert wait_until(lambda: not engine.has_unfinished_requests(), timeout=10)
    assert wait_until(lambda: engine.latest_stats.num_pages_used == 0)
