"""Serve one LLMEngine to many asyncio callers: the engine steps in one background thread.

The engine is not thread-safe, so only the loop thread touches it. Callers talk to that thread
through a command queue (add, abort), and the thread hands each step's outputs back to the
caller's event loop with one `call_soon_threadsafe` per step. Prompts are tokenized on worker
threads of their own (TokenizerPool), so that neither the callers' event loop nor the engine's
steps wait for a long prompt or a slow chat template. While idle, the thread wakes every
IDLE_CHECK_S to check that the engine's processes are alive and to publish their state; a
failure of the engine ends every request at once, and the loop.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serve.engine.errors import (
    EngineDeadError,
    EngineShuttingDownError,
    InvalidRequestError,
    RequestFailedError,
)
from serve.engine.input_processor import EngineInput, Prompt
from serve.engine.outputs import RequestOutput
from serve.engine.tokenizer_pool import TokenizerPool
from serve.messages import EngineStats
from serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from serve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

IDLE_CHECK_S = 0.5  # how often an idle loop checks the engine's health and publishes its state
# What a refusal for a full queue tells the client to wait: a queue moves on by a batch every
# few steps, and a client that is refused again backs off further on its own.
RETRY_AFTER_S = 1


class QueueFullError(RuntimeError):
    """max_queued_requests requests already wait for their first output: try again later."""

    retry_after_s = RETRY_AFTER_S


@dataclass
class _Stream:
    """Where one request's outputs go, on the caller's event loop. Outputs that arrive while the
    caller has not read the last one yet are merged into it (RequestOutput.merged, vLLM's output
    collector): a stream that falls behind catches up in one read instead of one per step."""

    loop: asyncio.AbstractEventLoop
    pending: deque = field(default_factory=deque)  # RequestOutput or an exception, in order
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the loop thread; the item arrives on the caller's loop."""
        _send_to_loop(self.loop, [(self, item)])

    def receive(self, item: RequestOutput | BaseException) -> None:
        """On the caller's loop."""
        last = self.pending[-1] if self.pending else None
        if isinstance(last, RequestOutput) and isinstance(item, RequestOutput):
            self.pending[-1] = last.merged(item)
        else:
            self.pending.append(item)
        self.ready.set()

    async def get(self) -> RequestOutput | BaseException:
        while not self.pending:
            self.ready.clear()
            await self.ready.wait()
        return self.pending.popleft()


def _send_to_loop(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Hand (stream, item) pairs to the streams' event loop with one wake-up of it."""
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
        loop.call_soon_threadsafe(_receive_all, items)


def _receive_all(items: list) -> None:
    for stream, item in items:
        stream.receive(item)


@dataclass
class _Add:
    request_id: str
    engine_input: EngineInput
    arrival_time: float
    cache_salt: str | None
    stream: _Stream
    prefill_after: str | None = None  # a request of the same prompt, added earlier


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs `LLMEngine.step()` in a background thread and streams each request's outputs."""

    def __init__(self, engine: "LLMEngine", max_queued_requests: int | None = None) -> None:
        self.engine = engine
        # what the server reads of the engine (its state is the loop thread's alone)
        self.tokenizer, self.model_name = engine.tokenizer, engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.max_queued_requests = max_queued_requests  # None: no limit (see check_queue)
        self._num_waiting = 0  # requests with no output yet (guarded by _waiting_lock)
        self._waiting_lock = threading.Lock()
        self._commands: deque[_Add | _Abort] = deque()
        self._wakeup = threading.Condition()  # guards the command queue and the flags below
        self._stopping = False  # shutdown(): stop now
        self._drain_deadline: float | None = None  # drain(): finish what runs, until then
        self._closed = False  # the loop has exited; no command will ever be read again
        self._busy = False  # the engine has unfinished requests (written by the loop thread)
        self._streams: dict[str, _Stream] = {}  # touched by the loop thread only
        self._taken: deque[_Add | _Abort] = deque()  # commands taken, not yet applied (ditto)
        self._thread: threading.Thread | None = None
        self._tokenizers = TokenizerPool(engine.input_processor)
        self._stats_listeners: list[Callable[[EngineStats], None]] = []
        self.latest_stats: EngineStats | None = None  # each step's, before its outputs go out
        self.error: BaseException | None = None  # what killed the loop, if anything did
        self.on_fatal: Callable[[BaseException], None] | None = None  # called when it died

    @property
    def status(self) -> str:
        """ok, draining (shutting down gracefully), or dead (stopped, or failed: see error)."""
        if self.error is not None or self._closed or self._stopping or self._thread is None:
            return "dead"
        return "draining" if self._drain_deadline is not None else "ok"

    def has_unfinished_requests(self) -> bool:
        """Safe from any thread: the engine's state as of the end of the loop's last iteration."""
        with self._wakeup:
            return self._busy or bool(self._commands)

    @property
    def num_waiting(self) -> int:
        """Requests that have no output yet: being tokenized, queued, or computing their
        prompt. Counted from the call of generate() (or process()) to the first output."""
        return self._num_waiting

    def check_queue(self) -> None:
        """Raise QueueFullError while max_queued_requests requests (or more) are waiting."""
        limit = self.max_queued_requests
        if limit is not None and self._num_waiting >= limit:
            raise QueueFullError(f"the server is busy: {self._num_waiting} requests are waiting "
                                 f"(--max-queued-requests {limit}); retry later")

    def add_stats_listener(self, listener: Callable[[EngineStats], None]) -> None:
        """Call listener(stats) on the loop thread after every iteration (metrics, logs)."""
        self._stats_listeners.append(listener)

    def start(self) -> None:
        """Start the loop thread (a second call does nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    def drain(self, timeout_s: float) -> None:
        """Shut down gracefully: admit nothing new, end queued requests that never started
        now, let running ones finish for up to timeout_s, then end the rest with an error."""
        with self._wakeup:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + timeout_s
            self._wakeup.notify()

    def stop(self) -> None:
        """Tell the loop thread to stop now, without waiting for it: requests still in flight
        fail with EngineDeadError (safe to call from a signal handler)."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()

    def shutdown(self) -> None:
        """Stop the loop thread now and wait for it to end (a second call does nothing more)."""
        self.stop()
        if self._thread is not None:
            self._thread.join()
        self._tokenizers.shutdown()
        self.engine.shutdown()

    # --8<-- [start:generate]
    async def process(self, prompt: Prompt, params: SamplingParams) -> EngineInput:
        """Tokenize and check a prompt off the event loop, once, for generate() to take as
        several requests (the n choices of one prompt). Counted as waiting while it runs."""
        self._check_admitting()
        with _WaitingCount(self):
            return await self._tokenizers.process(prompt, params)

    async def generate(self, prompt: Prompt | EngineInput, params: SamplingParams | None,
                       request_id: str, arrival_time: float | None = None,
                       cache_salt: str | None = None,
                       prefill_after: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's RequestOutput after every step that advanced it, until finished.
        An EngineInput (from process()) is queued as is, with its own params. With a cache_salt
        it shares cached prompt prefixes only with requests of that salt; with prefill_after
        (a request of the same prompt, generated earlier) it waits until that one has computed
        the prompt, and then finds it in the prefix cache.

        A prompt the engine refuses raises here (InvalidRequestError) before any output; a
        request that fails later raises RequestFailedError. Closing this generator early (the
        client went away) aborts the request, also while it still waits in the queue.
        """
        arrival_time = arrival_time or time.monotonic()
        self._check_admitting()  # refuse before tokenizing for nothing
        with _WaitingCount(self) as waiting:
            engine_input = (prompt if isinstance(prompt, EngineInput)
                            else await self._tokenizers.process(prompt, params))
            stream = _Stream(asyncio.get_running_loop())
            self._send(_Add(request_id, engine_input, arrival_time, cache_salt, stream,
                            prefill_after))
            done = False
            try:
                while not done:
                    item = await stream.get()
                    waiting.release()
                    if isinstance(item, BaseException):
                        done = True
                        raise item
                    done = item.finished
                    yield item
            finally:
                if not done:
                    self._send(_Abort(request_id))
    # --8<-- [end:generate]

    def _check_admitting(self) -> None:
        with self._wakeup:
            if self._drain_deadline is not None:
                raise EngineShuttingDownError("the server is shutting down")
            if self._closed or self._stopping:
                raise EngineDeadError("the engine is not running") from self.error

    def _send(self, command: _Add | _Abort) -> None:
        with self._wakeup:
            if isinstance(command, _Add):
                self._check_admitting()
            elif self._closed:
                return  # nothing left to abort
            self._commands.append(command)
            self._wakeup.notify()

    # --8<-- [start:loop]
    def _run(self) -> None:
        try:
            self._publish(self.engine.take_stats())  # readers see the idle state at once
            while (commands := self._wait_for_work()) is not None:
                self._taken = commands
                while commands:
                    self._apply(commands.popleft())
                if self._drain_deadline is not None:
                    self._end_for_shutdown()
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                else:  # idle: no step would notice a dead process
                    self.engine.check_health()
                    outputs = []
                # Stats first: a client that has a token finds it counted in the metrics.
                self._publish(self.engine.take_stats())
                self._deliver(outputs)
                busy = self.engine.has_unfinished_requests()
                with self._wakeup:
                    self._busy = busy
        except BaseException as error:  # the engine itself failed (a CUDA error, say)
            logger.exception("the engine loop failed; failing every request in flight")
            self.error = error
        finally:
            self._close()
        if self.error is not None and self.on_fatal is not None:
            self.on_fatal(self.error)

    def _wait_for_work(self) -> deque[_Add | _Abort] | None:
        """Sleep until there is a command or a step to run, or IDLE_CHECK_S has passed (then
        with no commands: time for a health check); None means stop."""
        with self._wakeup:
            if not (self._commands or self._busy or self._stopping
                    or self._drain_deadline is not None):
                self._wakeup.wait(IDLE_CHECK_S)
            drained = self._drain_deadline is not None and not (self._busy or self._commands)
            if self._stopping or drained:
                return None
            commands, self._commands = self._commands, deque()
            return commands
    # --8<-- [end:loop]

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._streams.pop(command.request_id, None)
            return
        if command.request_id in self._streams:
            command.stream.put(ValueError(f"request id {command.request_id!r} is already running"))
            return
        # Registered first: if adding it kills the loop, _close fails it with the rest.
        self._streams[command.request_id] = command.stream
        try:
            self.engine.add_request(command.request_id, command.engine_input,
                                    arrival_time=command.arrival_time,
                                    cache_salt=command.cache_salt,
                                    prefill_after=command.prefill_after)
        except EngineDeadError:
            raise
        except Exception as error:  # a request the engine cannot take fails alone
            del self._streams[command.request_id]
            if not isinstance(error, ValueError):  # not a refusal: a fault, worth a traceback
                logger.exception("request %s could not be added", command.request_id)
                error = RequestFailedError(f"{type(error).__name__}: {error}")
            command.stream.put(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their streams: one call into each caller's event loop per step,
        not one per request (each such call wakes that loop up)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted: its caller has gone
                continue
            item = output if output.error is None else (
                InvalidRequestError(output.error, output.error_param) if output.error_param
                else RequestFailedError(output.error))
            by_loop.setdefault(stream.loop, []).append((stream, item))
            if output.finished:
                del self._streams[output.request_id]
        for loop, items in by_loop.items():
            _send_to_loop(loop, items)

    def _end_for_shutdown(self) -> None:
        """While draining: queued requests that never started end now; past the deadline,
        everything still running ends too."""
        if time.monotonic() >= self._drain_deadline:
            ending = self.engine.request_ids()
            reason = "the server shut down before this request finished"
        else:
            ending = self.engine.request_ids(started=False)
            reason = "the server is shutting down; this request had not started"
        for request_id in ending:
            self.engine.abort_request(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(EngineShuttingDownError(reason))

    def _publish(self, stats: EngineStats) -> None:
        self.latest_stats = stats
        for listener in self._stats_listeners:
            try:
                listener(stats)
            except Exception:  # metrics must never take the engine down
                logger.exception("a stats listener failed")

    def _close(self) -> None:
        """Fail every request still in flight, so that no caller hangs on a stopped loop."""
        with self._wakeup:
            self._closed = True
            self._busy = False
            pending = [c.stream for c in (*self._taken, *self._commands) if isinstance(c, _Add)]
            self._commands.clear()
            self._taken.clear()
        reason = "the engine loop failed" if self.error else "the engine shut down"
        for stream in [*self._streams.values(), *pending]:
            error = EngineDeadError(reason)
            error.__cause__ = self.error
            stream.put(error)
        self._streams.clear()


class _WaitingCount:
    """One request counted in AsyncEngine.num_waiting, from entering the `with` until
    release() or the end of the `with`, whichever comes first."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine, self._counted = engine, False

    def __enter__(self) -> "_WaitingCount":
        with self._engine._waiting_lock:
            self._engine._num_waiting += 1
        self._counted = True
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._counted:
            self._counted = False
            with self._engine._waiting_lock:
                self._engine._num_waiting -= 1
