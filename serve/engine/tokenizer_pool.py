"""Turning prompts into token ids off the event loop, on a few threads, shortest prompt first.

Tokenizing is the one piece of a request's work whose cost grows with what the client sent: a
4 MiB prompt keeps a tokenizer busy for seconds. So it runs on worker threads (fast tokenizers
work in Rust with the GIL released), never on the event loop or the engine's step loop; the
jobs wait in one queue ordered by prompt size, so a short prompt overtakes every long one that
has not started; and a job whose client left before it started is dropped unseen. A long prompt
that is being tokenized cannot be stopped, which is why InputProcessor refuses a prompt that
cannot fit after reading a bounded prefix of it.
"""

import asyncio
import contextlib
import itertools
import queue
import threading
from dataclasses import dataclass, field

from serve.engine.errors import EngineDeadError
from serve.engine.input_processor import ChatPrompt, EngineInput, InputProcessor, Prompt
from serve.sampling_params import SamplingParams

DEFAULT_NUM_WORKERS = 2  # one long prompt in progress never holds up the short ones alone


@dataclass(order=True)
class _Job:
    size: int  # the queue's order: smallest first, then first come
    order: int
    prompt: Prompt = field(compare=False)
    params: SamplingParams = field(compare=False)
    future: asyncio.Future = field(compare=False)


def prompt_size(prompt: Prompt) -> int:
    """Characters (or token ids) the tokenizer will have to read, roughly."""
    if isinstance(prompt, ChatPrompt):
        return sum(len(str(message.get("content") or "")) for message in prompt.messages)
    return len(prompt)


class TokenizerPool:
    """Runs `InputProcessor.process` on worker threads, each with a tokenizer of its own."""

    def __init__(self, processor: InputProcessor, num_workers: int = DEFAULT_NUM_WORKERS):
        self._jobs: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._order = itertools.count()
        self._closed = False
        self._workers = [threading.Thread(target=self._work, args=(processor.copy(),),
                                          daemon=True, name=f"tokenize-{i}")
                         for i in range(num_workers)]
        for worker in self._workers:
            worker.start()

    async def process(self, prompt: Prompt, params: SamplingParams) -> EngineInput:
        """The prompt's EngineInput. Cancelling the caller (the client went away) drops the
        job if no worker has taken it yet."""
        if self._closed:
            raise EngineDeadError("the engine is not running")
        future = asyncio.get_running_loop().create_future()
        self._jobs.put(_Job(prompt_size(prompt), next(self._order), prompt, params, future))
        return await future

    def shutdown(self) -> None:
        """Stop the workers; jobs still queued fail with EngineDeadError. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            _settle(job.future, EngineDeadError("the engine shut down"))
        for _ in self._workers:  # one wake-up each, ahead of anything queued later
            self._jobs.put(_Job(-1, -1, "", SamplingParams(), None))

    def _work(self, processor: InputProcessor) -> None:
        while (job := self._jobs.get()).future is not None:
            if job.future.cancelled():  # its client left while it waited
                continue
            try:
                result = processor.process(job.prompt, job.params)
            except Exception as error:  # a bad prompt is its request's error, not the pool's
                result = error
            _settle(job.future, result)


def _settle(future: asyncio.Future, result: EngineInput | BaseException) -> None:
    """Resolve a caller's future from any thread, on the caller's own event loop."""

    def settle() -> None:
        if future.done():  # cancelled meanwhile
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
        future.get_loop().call_soon_threadsafe(settle)
