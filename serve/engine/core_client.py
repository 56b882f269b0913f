"""The server side's handle on an engine core running in a process of its own.

`CoreClient` starts `python -m serve.core.core_process` and offers what the in-process
EngineCore offers (add_request, abort_request, step, take_stats, ...), over two ZeroMQ sockets
carrying serve/messages.py's messages. Its `step()` does not run a step: the core steps on its
own, and this collects the steps that have arrived since the last call, waiting briefly when
none has. If the core process dies, `step()` raises EngineDeadError, which ends every request in
flight and, in the server, the server itself.
"""

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq

from serve.config import EngineConfig
from serve.engine.errors import EngineDeadError, InvalidRequestError
from serve.heartbeat import ProcessWatch
from serve.messages import (
    CoreAbort,
    CoreCommand,
    CoreFailed,
    CoreOutput,
    CoreReady,
    CoreRequest,
    CoreStart,
    CoreStep,
    EngineStats,
    FromCore,
)

logger = logging.getLogger(__name__)

STEP_WAIT_MS = 50  # step() waits this long for the core's next step before it returns empty
FOLDER_PREFIX = "nanoserve-core-"  # then the server's pid: the folder of the two sockets


class CoreClient:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int],
                 start_timeout_s: float = 900.0) -> None:
        remove_stale_folders()
        self._folder = tempfile.TemporaryDirectory(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
        self.context = zmq.Context()
        self.input = self.context.socket(zmq.PUSH)  # to the core
        self.output = self.context.socket(zmq.PULL)  # from the core
        input_address = f"ipc://{Path(self._folder.name) / 'input'}"
        output_address = f"ipc://{Path(self._folder.name) / 'output'}"
        self.input.bind(input_address)
        self.output.bind(output_address)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(FromCore)
        beats, beats_to_core = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serve.core.core_process", input_address, output_address,
             str(beats_to_core)], pass_fds=[beats_to_core])
        os.close(beats_to_core)
        self.watch = ProcessWatch(self.process, beats, "the engine core process",
                                  config.heartbeat_timeout)
        self._dead: str | None = None  # why the core counts as dead, once it does
        self._in_flight: set[str] = set()
        self._stats: EngineStats | None = None  # merged from the steps not yet taken
        try:
            self._send(CoreStart(dataclasses.asdict(config), sorted(eos_token_ids)))
        except EngineDeadError:
            self.shutdown()
            raise RuntimeError("the engine core exited while starting; see its log above") \
                from None
        ready = self._wait_ready(start_timeout_s)
        self.watch.start()
        self.max_model_len, self.vocab_size = ready.max_model_len, ready.vocab_size
        self._state = EngineStats(0, 0, 0, ready.num_pages)  # the core's, as of its last step

    def _wait_ready(self, timeout_s: float) -> CoreReady:
        deadline = time.monotonic() + timeout_s
        while not self.output.poll(STEP_WAIT_MS * 10):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.shutdown()
                raise RuntimeError(f"the engine core did not start (status "
                                   f"{self.process.returncode}); see its log above")
        message = self.decoder.decode(self.output.recv())
        if isinstance(message, CoreFailed):
            self.shutdown()
            kind = ValueError if message.error_type == "ValueError" else RuntimeError
            raise kind(message.message)
        assert isinstance(message, CoreReady), message
        return message

    def _send(self, message) -> None:
        self._send_encoded(self.encoder.encode(message))

    def _send_encoded(self, data: bytes) -> None:
        # A blocking send with no core connected (not yet, or no more) would wait forever: send
        # without blocking, and while there is no room, check that the core is alive.
        while True:
            try:
                self.input.send(data, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                self._raise_if_dead()
                self.input.poll(STEP_WAIT_MS, zmq.POLLOUT)

    def add_request(self, request: CoreRequest) -> None:
        """Queue a request in the core; one that cannot be encoded (a number msgpack cannot
        carry, say) is refused here, as that request's error, before anything is sent."""
        try:
            data = self.encoder.encode(request)
        except (msgspec.EncodeError, OverflowError, TypeError, ValueError) as error:
            raise InvalidRequestError(
                f"the request cannot be passed to the engine core: {error}") from error
        self._send_encoded(data)
        self._in_flight.add(request.request_id)

    def abort_request(self, request_id: str, reason: str = "abort") -> bool:
        if request_id not in self._in_flight:
            return False
        self._in_flight.discard(request_id)
        self._send(CoreAbort(request_id, reason))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._in_flight)

    def step(self) -> list[CoreOutput]:
        """The outputs of every step the core has sent since the last call (after waiting up
        to STEP_WAIT_MS for one); EngineDeadError if the core has died."""
        if not self.output.poll(STEP_WAIT_MS):
            self._raise_if_dead()
            return []
        return self._receive()

    def check_health(self) -> None:
        """Raise EngineDeadError if the core process has exited or stopped beating; else take
        in what it sent meanwhile (an idle core's last snapshot). The server's loop calls this
        while idle, when no step() would notice."""
        self._raise_if_dead()
        self._receive()  # (idle: any output in it is of a request aborted meanwhile)

    def _raise_if_dead(self) -> None:
        if self._dead is None:
            self._dead = self.watch.problem()
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def _receive(self) -> list[CoreOutput]:
        outputs = []
        while self.output.poll(0):
            self.watch.heard()
            message = self.decoder.decode(self.output.recv())
            assert isinstance(message, CoreStep), message
            self._stats = message.stats if self._stats is None else self._stats.then(
                message.stats)
            self._state = message.stats
            for output in message.outputs:
                if output.request_id in self._in_flight:  # else: aborted meanwhile
                    outputs.append(output)
                    if output.finish_reason is not None:
                        self._in_flight.discard(output.request_id)
        return outputs

    def take_stats(self) -> EngineStats:
        """The core's state as of its last step, and everything counted since the last call."""
        stats, self._stats = self._stats, None
        if stats is None:  # no step since: nothing counted, and the state of the last one
            state = self._state
            stats = EngineStats(state.num_running, state.num_waiting, state.num_pages_used,
                                state.num_pages_total, state.num_cached_pages)
        return stats

    def reset_prefix_cache(self) -> bool:
        self._send(CoreCommand("reset_prefix_cache"))
        return True

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the core to exit, and make sure it has (one that counts as dead is killed).
        Safe to call twice."""
        if self.input.closed:
            return
        if self.process.poll() is None:
            try:
                if self._dead is not None:  # stopped or hung: it would not answer
                    raise EngineDeadError(self._dead)
                self._send(CoreCommand("shutdown"))
                self.process.wait(timeout_s)
            except (zmq.ZMQError, EngineDeadError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.input.close(linger=0)
        self.output.close(linger=0)
        self.context.term()
        self.watch.close()
        self._folder.cleanup()


def remove_stale_folders() -> None:
    """Remove the socket folders that servers killed outright (SIGKILL skips every cleanup)
    left behind: those named after a process that no longer exists, and owned by this user."""
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).split("-")[0]
        if pid.isdigit() and not _exists(int(pid)) and folder.stat().st_uid == os.getuid():
            shutil.rmtree(folder, ignore_errors=True)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
