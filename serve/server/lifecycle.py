"""Running the server until it should stop: a graceful drain on SIGTERM (or Ctrl-C), an
immediate but clean stop on a second signal, and a non-zero exit when the engine itself fails,
so that a supervisor restarts it."""

import logging
import signal
import threading

import uvicorn
from fastapi import FastAPI

from serve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

GRACE_S = 5.0  # after the drain deadline, how long uvicorn still waits for responses to end
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, which on the first signal also tells the engine to drain, and on the
    second stops the engine at once.

    uvicorn's own answer to a second Ctrl-C is a forced exit: it abandons open responses and
    skips the app's shutdown, so the engine's thread is still inside torch when the interpreter
    exits (which can abort the process: "terminate called without an active exception"). Here a
    second signal stops the engine instead: every request still in flight ends with an error
    (a stream gets an error event and [DONE]), so the responses end by themselves, and uvicorn's
    ordinary shutdown, engine included, takes moments.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout_s: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self.stopped_by: int | None = None  # the signal that asked for an immediate stop

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            logger.info("shutting down: no new requests; running ones may finish within %.0f s "
                        "(signal again to stop now)", self.shutdown_timeout_s)
            self.engine.drain(self.shutdown_timeout_s)
            super().handle_exit(sig, frame)  # uvicorn stops accepting, then waits for responses
        elif self.stopped_by is None:
            logger.warning("stopping now: requests still running end with an error")
            self.stopped_by = sig
            self.engine.stop()


# --8<-- [start:run_server]
def run_server(app: FastAPI, engine: AsyncEngine, host: str, port: int, log_level: str,
               shutdown_timeout_s: float) -> int:
    """Serve until a signal (exit status 0 once drained; 128 + the signal's number when a
    second signal stopped it early: 130 for Ctrl-C, 143 for SIGTERM) or an engine failure
    (status 1)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout_s + GRACE_S)
    server = _DrainingServer(config, engine, shutdown_timeout_s)
    engine.on_fatal = lambda error: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it handled once it has shut down, which would end the
    # process with "killed by SIGTERM"; a drained server exits 0 instead, as vLLM's does.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in SIGNALS} \
        if in_main_thread else {}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.shutdown()  # the loop thread has ended before the interpreter begins to
    if engine.error is not None:
        logger.error("the engine failed (%s: %s); exiting with status 1",
                     type(engine.error).__name__, engine.error)
        return 1
    return 0 if server.stopped_by is None else 128 + server.stopped_by
# --8<-- [end:run_server]
