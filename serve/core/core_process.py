"""The engine core as a program of its own, so that the server's Python never competes with it:

    python -m serve.core.core_process INPUT_ADDRESS OUTPUT_ADDRESS HEARTBEAT_FD

The server side (serve/engine/core_client.py) starts it and talks to it over two ZeroMQ sockets
with serve/messages.py's messages in msgpack: a CoreStart first (the engine's config), then
requests, aborts and commands. The core answers CoreReady once its model and KV pool are up (or
CoreFailed, saying why not), then a CoreStep after every step it runs, and an empty one when it
falls idle. It steps whenever it has unfinished requests and reads what arrived in between, so
neither side ever waits for the other; a thread beats on HEARTBEAT_FD (serve/heartbeat.py). It
exits on a shutdown command; on its own when the process that started it is gone; and with
status 1 when a tensor-parallel worker has died.
"""

import gc
import logging
import os
import sys

import msgspec
import zmq

from serve import messages
from serve.config import EngineConfig
from serve.core.engine_core import EngineCore
from serve.heartbeat import start_child_process

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 500  # how often an idle core checks on the server side and its TP workers


class CoreProcess:
    """The loop around one EngineCore: read messages, step, send what the step produced."""

    def __init__(self, input_address: str, output_address: str) -> None:
        self.context = zmq.Context()
        self.input = self.context.socket(zmq.PULL)
        self.input.connect(input_address)
        self.output = self.context.socket(zmq.PUSH)
        self.output.connect(output_address)
        self.decoder = msgspec.msgpack.Decoder(messages.ToCore)
        self.encoder = msgspec.msgpack.Encoder()
        self.parent = os.getppid()
        self.core: EngineCore | None = None
        self.running = True

    def start(self) -> bool:
        """Build the core from the first message; False (after saying why) if it cannot be."""
        start = self.decoder.decode(self.input.recv())
        assert isinstance(start, messages.CoreStart), start
        try:
            self.core = EngineCore(EngineConfig(**start.config), set(start.eos_token_ids))
        except Exception as error:
            if not isinstance(error, ValueError):  # a config that cannot be served: the
                logger.exception("the engine core could not start")  # server says why
            self.send(messages.CoreFailed(type(error).__name__, str(error)))
            return False
        # Everything built so far (the model, what the imports made) lives as long as the
        # process: frozen, a full collection no longer walks it (milestones/07, bench.gc_pause).
        gc.collect()
        gc.freeze()
        self.send(messages.CoreReady(self.core.max_model_len, self.core.hf_config.vocab_size,
                                     self.core.allocator.num_pages))
        return True

    def send(self, message) -> None:
        self.output.send(self.encoder.encode(message), copy=False)

    # --8<-- [start:run]
    def run(self) -> None:
        core = self.core
        while self.running:
            busy = core.has_unfinished_requests()
            if self.input.poll(0 if busy else IDLE_POLL_MS):
                while self.running and self.input.poll(0):  # everything that arrived
                    self.apply(self.decoder.decode(self.input.recv()))
            if os.getppid() != self.parent:  # (a system call: cheap beside a step)
                logger.warning("the server side is gone; the engine core exits")
                return
            if self.running and core.has_unfinished_requests():
                outputs = core.step()
                self.send(messages.CoreStep(outputs, core.take_stats()))
            elif busy:  # idle now (the last requests were aborted): say so once, for the metrics
                self.send(messages.CoreStep([], core.take_stats()))
            else:
                core.check_health()  # a dead TP worker ends the core (the server sees it)
    # --8<-- [end:run]

    def apply(self, message) -> None:
        core = self.core
        if isinstance(message, messages.CoreRequest):
            try:
                core.add_request(message)
            except Exception as error:  # that request's problem: it fails, the core goes on
                logger.exception("request %s could not be queued", message.request_id)
                failed = messages.CoreOutput(message.request_id, [], "abort",
                                             error=f"{type(error).__name__}: {error}")
                self.send(messages.CoreStep([failed], core.take_stats()))
        elif isinstance(message, messages.CoreAbort):
            core.abort_request(message.request_id, message.reason)
        elif isinstance(message, messages.CoreCommand) and message.name == "reset_prefix_cache":
            core.reset_prefix_cache()
        elif isinstance(message, messages.CoreCommand) and message.name == "shutdown":
            self.running = False
        else:
            raise ValueError(f"the engine core cannot handle {message!r}")

    def close(self) -> None:
        if self.core is not None:
            self.core.shutdown()
        self.input.close(linger=0)
        self.output.close(linger=1000)  # let the last messages go out
        self.context.term()


def main(argv: list[str]) -> int:
    input_address, output_address, heartbeat_fd = argv
    start_child_process("core", int(heartbeat_fd))
    process = CoreProcess(input_address, output_address)
    try:
        if not process.start():
            return 1
        process.run()
        return 0
    except Exception:
        logger.exception("the engine core failed")
        return 1
    finally:
        process.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
