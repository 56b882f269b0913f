"""AsyncEngine: one engine thread serving many asyncio callers, and every way a request can end.

The engine is the real one on the tiny random Qwen3 from conftest.py (float32, CPU).
"""

import asyncio
import threading
import time
from contextlib import aclosing

import pytest

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.errors import EngineDeadError, PromptTooLongError, RequestFailedError
from serve.engine.llm_engine import LLMEngine
from serve.sampling_params import SamplingParams

MAX_MODEL_LEN = 64
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def engine(qwen3_dir):
    config = EngineConfig(
        model=str(qwen3_dir), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN
    )
    engine = AsyncEngine(LLMEngine(config))
    engine.start()
    yield engine
    engine.shutdown()


def slow_down_and_record_aborts(engine: AsyncEngine, monkeypatch) -> list[str]:
    """Make each step take 10 ms, so a 50-token request cannot finish before the test acts."""
    aborted: list[str] = []
    step, abort_request = engine.engine.step, engine.engine.abort_request

    def slow_step():
        time.sleep(0.01)
        return step()

    def recording_abort(request_id: str, error: str | None = None):
        aborted.append(request_id)
        return abort_request(request_id, error)

    monkeypatch.setattr(engine.engine, "step", slow_step)
    monkeypatch.setattr(engine.engine, "abort_request", recording_abort)
    return aborted


async def run_to_end(engine: AsyncEngine, prompt, params, request_id: str) -> list:
    return [output async for output in engine.generate(prompt, params, request_id)]


async def wait_until_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine still has unfinished requests"
        await asyncio.sleep(0.01)


def test_outputs_stream_until_finished(engine):
    outputs = asyncio.run(run_to_end(engine, "def main():", GREEDY, "a"))
    # one output per step, or fewer where steps came faster than the reader (merged)
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert [t for o in outputs for t in o.new_token_ids] == outputs[-1].token_ids
    assert "".join(o.new_text for o in outputs) == outputs[-1].text
    assert outputs[-1].finish_reason == "length" and len(outputs[-1].token_ids) == 8


def test_concurrent_requests_each_get_their_own_outputs(engine):
    async def both():
        alone = await run_to_end(engine, "import os", GREEDY, "alone")
        together = await asyncio.gather(
            run_to_end(engine, "import os", GREEDY, "x"),
            run_to_end(engine, "class A:", GREEDY, "y"),
        )
        return alone, together

    alone, (x, y) = asyncio.run(both())
    assert {o.request_id for o in x} == {"x"} and {o.request_id for o in y} == {"y"}
    assert x[-1].token_ids == alone[-1].token_ids


def test_refused_prompts_raise_before_any_output(engine):
    async def first_output(prompt, params, request_id):
        return await anext(engine.generate(prompt, params, request_id))

    with pytest.raises(PromptTooLongError) as too_long:
        asyncio.run(first_output([1] * 60, SamplingParams(max_tokens=10), "long"))
    assert "maximum context length is 64 tokens" in str(too_long.value)
    assert "(60 in the prompt, 10 in the completion)" in str(too_long.value)
    with pytest.raises(ValueError):
        asyncio.run(first_output([], GREEDY, "empty"))
    assert not engine.has_unfinished_requests()


def test_a_running_request_id_cannot_be_reused(engine):
    async def twice():
        first = engine.generate("x", SamplingParams(max_tokens=40, ignore_eos=True), "same")
        await anext(first)
        with pytest.raises(ValueError, match="already running"):
            await anext(engine.generate("y", GREEDY, "same"))
        await first.aclose()

    asyncio.run(twice())


def test_closing_the_generator_aborts_the_request(engine, monkeypatch):
    aborted = slow_down_and_record_aborts(engine, monkeypatch)

    async def read_two_then_leave():
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        async with aclosing(engine.generate("for i in", params, "leaver")) as outputs:
            received = 0
            async for output in outputs:
                received += len(output.new_token_ids)
                if received == 2:
                    break
        await wait_until_idle(engine)

    asyncio.run(read_two_then_leave())
    assert aborted == ["leaver"]


def test_cancelling_the_consumer_aborts_the_request(engine, monkeypatch):
    aborted = slow_down_and_record_aborts(engine, monkeypatch)

    async def cancel_mid_stream():
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate("while", params, "cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()  # what a client disconnect does to the HTTP handler
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until_idle(engine)

    asyncio.run(cancel_mid_stream())
    assert aborted == ["cancelled"]


def test_an_idle_loop_sleeps(engine, monkeypatch):
    calls = []
    step = engine.engine.step
    monkeypatch.setattr(engine.engine, "step", lambda: calls.append(1) or step())
    time.sleep(0.2)
    assert calls == []  # no request, no step: the thread waits on its condition
    asyncio.run(run_to_end(engine, "x", GREEDY, "wake"))
    # one step per token; with overlap scheduling, one more reads the last step launched
    assert len(calls) == 8 + engine.engine.config.overlap_scheduling


def test_a_failing_step_fails_every_request_and_the_engine(engine, monkeypatch):
    entered = threading.Event()

    def broken_step():
        entered.wait(timeout=5)  # fail only once both requests are in
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(engine.engine, "step", broken_step)

    async def two_requests():
        tasks = [asyncio.create_task(run_to_end(engine, p, GREEDY, p)) for p in ("a", "b")]
        await asyncio.sleep(0.1)
        entered.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(two_requests(), timeout=10))
    assert all(isinstance(r, EngineDeadError) for r in results)
    assert isinstance(results[0].__cause__, RuntimeError)
    engine._thread.join(timeout=5)  # the requests fail before the dead loop thread has exited
    assert engine.status != "ok"
    with pytest.raises(EngineDeadError):
        asyncio.run(run_to_end(engine, "c", GREEDY, "c"))


def test_shutdown_fails_requests_in_flight(engine, monkeypatch):
    slow_down_and_record_aborts(engine, monkeypatch)

    async def shut_down_mid_stream():
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        outputs = engine.generate("def", params, "orphan")
        await anext(outputs)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in outputs:
                pass

    asyncio.run(asyncio.wait_for(shut_down_mid_stream(), timeout=10))


def test_a_fault_of_one_request_fails_that_request_alone(engine, monkeypatch):
    """A request whose output processing raises (its detokenizer, a stop check) ends with an
    error; the request beside it and the engine go on."""
    processor = engine.engine.output_processor
    process = processor.process

    def failing_for_one(output):
        state = processor.requests[output.request_id]
        if output.request_id == "bad" and len(state.token_ids) == 1:  # its second token
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return process(output)

    monkeypatch.setattr(processor, "process", failing_for_one)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def both():
        return await asyncio.gather(run_to_end(engine, "def f():", params, "bad"),
                                    run_to_end(engine, "def g():", params, "good"),
                                    return_exceptions=True)

    bad, good = asyncio.run(asyncio.wait_for(both(), timeout=30))
    assert isinstance(bad, RequestFailedError) and "UnicodeDecodeError" in str(bad)
    assert len(good[-1].token_ids) == 12 and good[-1].finish_reason == "length"
    assert engine.status == "ok"
    assert engine.engine.allocator.num_used_pages == 0  # the failed request's pages are back


def test_every_token_a_caller_sees_is_already_counted_in_the_stats(engine):
    """Metrics never lag the stream: a step's stats are published before its outputs go out.
    The listener is slow on purpose, so that the other order would show at every step."""
    counted = []

    def slow_listener(stats):
        time.sleep(0.02)
        counted.append(stats.num_generation_tokens)

    engine.add_stats_listener(slow_listener)

    async def tokens_seen_and_counted() -> list[tuple[int, int]]:
        seen, received = [], 0
        async for output in engine.generate("def main():", GREEDY, "a"):
            received += len(output.new_token_ids)
            seen.append((received, sum(counted)))
        return seen

    seen = asyncio.run(tokens_seen_and_counted())
    assert len(seen) == GREEDY.max_tokens
    assert all(num_seen <= num_counted for num_seen, num_counted in seen)


def test_a_request_the_engine_cannot_add_fails_alone(engine, monkeypatch):
    """Whatever adding a request raises (here the OverflowError msgpack raised for a top_k of
    2**64, on its way to a core process), that request fails and the loop goes on serving."""
    add_request = engine.engine.add_request

    def add_or_overflow(request_id, *args, **kwargs):
        if request_id == "bad":
            raise OverflowError("can't serialize ints < -2**63 or > 2**64 - 1")
        return add_request(request_id, *args, **kwargs)

    monkeypatch.setattr(engine.engine, "add_request", add_or_overflow)

    async def both():
        return await asyncio.gather(run_to_end(engine, "x", GREEDY, "bad"),
                                    run_to_end(engine, "y", GREEDY, "good"),
                                    return_exceptions=True)

    bad, good = asyncio.run(asyncio.wait_for(both(), timeout=10))
    assert isinstance(bad, RequestFailedError) and "OverflowError" in str(bad)
    assert good[-1].finish_reason == "length" and engine.status == "ok"
    assert engine.engine.request_ids() == []  # nothing of the bad one stays behind


def test_a_loop_that_dies_admitting_fails_that_request_and_the_ones_queued_behind_it(
        engine, monkeypatch):
    """The engine dies while a request is being added (its core process just exited): that
    request, and those taken with it, fail at once instead of waiting forever."""
    entered, release = threading.Event(), threading.Event()

    def dying_add(*args, **kwargs):
        entered.set()
        release.wait(timeout=5)  # the others queue meanwhile: one batch of commands
        raise EngineDeadError("the engine core process exited with status -9")

    monkeypatch.setattr(engine.engine, "add_request", dying_add)

    async def three_requests():
        tasks = [asyncio.create_task(run_to_end(engine, "a", GREEDY, "a"))]
        await asyncio.to_thread(entered.wait, 5)
        tasks += [asyncio.create_task(run_to_end(engine, p, GREEDY, p)) for p in ("b", "c")]
        await asyncio.sleep(0.2)  # b and c are queued behind a
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(three_requests(), timeout=10))
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert engine.status == "dead"


def test_a_reader_that_falls_behind_gets_the_steps_it_missed_as_one_output(engine):
    """Outputs that arrive while a stream's reader is busy are merged: fewer reads than steps,
    and nothing lost (the new texts and tokens add up to the whole output)."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def slow_reader():
        outputs = []
        async with aclosing(engine.generate([5, 6, 7, 8], params, "slow")) as stream:
            async for output in stream:
                outputs.append(output)
                time.sleep(0.05)  # blocks this event loop: the engine runs on meanwhile
        return outputs

    outputs = asyncio.run(slow_reader())
    last = outputs[-1]
    assert last.finished and len(last.token_ids) == 24
    assert len(outputs) < 24  # steps were merged
    assert [t for o in outputs for t in o.new_token_ids] == last.token_ids
    assert "".join(o.new_text for o in outputs) == last.text
