"""Serve one LLMEngine to many asyncio callers: the engine steps in one background thread.

The engine is not thread-safe, so only the loop thread touches it. Callers talk to that thread
through a command queue (add, abort), and the thread hands each step's outputs back to the
caller's event loop with `call_soon_threadsafe`, one asyncio.Queue per request.
"""

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serve.engine.errors import EngineDeadError
from serve.engine.request import RequestOutput
from serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from serve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Where one request's outputs go: a queue living on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the loop thread; the put itself runs on the caller's loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            pass


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs `LLMEngine.step()` in a background thread and streams each request's outputs."""

    def __init__(self, engine: "LLMEngine") -> None:
        self.engine = engine
        self._commands: deque[_Add | _Abort] = deque()
        self._wakeup = threading.Condition()  # guards _commands, _stopping, _closed, _busy
        self._stopping = False
        self._closed = False  # the loop has exited; no command will ever be read again
        self._streams: dict[str, _Stream] = {}  # touched by the loop thread only
        self._busy = False  # the engine has unfinished requests (written by the loop thread)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what killed the loop, if anything did

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def has_unfinished_requests(self) -> bool:
        """Safe from any thread: the engine's state as of the end of the loop's last iteration."""
        with self._wakeup:
            return self._busy or bool(self._commands)

    def start(self) -> None:
        """Start the loop thread (a second call does nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop thread; requests still in flight fail with EngineDeadError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()

    # --8<-- [start:generate]
    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's RequestOutput after every step that advanced it, until finished.

        A prompt the engine refuses raises here (PromptTooLongError, ValueError) before any
        output. Closing this generator early (the client went away) aborts the request.
        """
        stream = _Stream(asyncio.get_running_loop())
        self._send(_Add(request_id, prompt, params, stream))
        done = False
        try:
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                yield item
        finally:
            if not done:
                self._send(_Abort(request_id), quiet=True)

    # --8<-- [end:generate]

    def _send(self, command: _Add | _Abort, quiet: bool = False) -> None:
        with self._wakeup:
            if self._closed or self._stopping:
                if quiet:
                    return
                raise EngineDeadError("the engine is not running") from self.error
            self._commands.append(command)
            self._wakeup.notify()

    # --8<-- [start:loop]
    def _run(self) -> None:
        try:
            while (commands := self._wait_for_work()) is not None:
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        self._deliver(output)
                busy = self.engine.has_unfinished_requests()
                with self._wakeup:
                    self._busy = busy
        except BaseException as error:
            logger.exception("the engine loop failed; failing every request in flight")
            self.error = error
        finally:
            self._close()

    def _wait_for_work(self) -> list[_Add | _Abort] | None:
        """Sleep until there is a command or a step to run; None means shut down."""
        with self._wakeup:
            while not (self._commands or self._busy or self._stopping):
                self._wakeup.wait()
            if self._stopping:
                return None
            commands = list(self._commands)
            self._commands.clear()
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
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params)
        except Exception as error:  # a bad request is that request's problem, not the loop's
            command.stream.put(error)
            return
        self._streams[command.request_id] = command.stream

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:  # aborted: its caller has gone
            return
        stream.put(output)
        if output.finished:
            del self._streams[output.request_id]

    def _close(self) -> None:
        """Fail every request still waiting, so that no caller hangs on a dead loop."""
        with self._wakeup:
            self._closed = True
            self._busy = False
            pending = [c.stream for c in self._commands if isinstance(c, _Add)]
            self._commands.clear()
        reason = "the engine loop failed" if self.error else "the engine shut down"
        for stream in [*self._streams.values(), *pending]:
            error = EngineDeadError(reason)
            error.__cause__ = self.error
            stream.put(error)
        self._streams.clear()
