"""Running the server until it should stop: a graceful drain on SIGTERM (or Ctrl-C), a clean
stop on a second signal, a non-zero exit when the engine fails (for a supervisor to restart)."""

import logging
import signal
import threading

import uvicorn
from fastapi import FastAPI

from serve.engine.async_engine import AsyncEngine
from serve.server.http_protocol import HeaderTimeoutProtocol

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
            # uvicorn stops accepting, then waits for responses. Not super().handle_exit: that
            # records the signal, which uvicorn raises again once it has shut down, so the
            # process would end "killed by SIGTERM" rather than exit 0 as a drained one should.
            self.should_exit = True
        elif self.stopped_by is None:
            logger.warning("stopping now: requests still running end with an error")
            self.stopped_by = sig
            self.engine.stop()


def server_config(app: FastAPI, **settings) -> uvicorn.Config:
    """The uvicorn.Config a nanoserve server runs `app` with: uvicorn.Config's own `settings`,
    and the HTTP protocol that closes a connection whose request head does not arrive."""
    return uvicorn.Config(app, http=HeaderTimeoutProtocol, **settings)


# --8<-- [start:run_server]
def run_server(app: FastAPI, engine: AsyncEngine, host: str, port: int, log_level: str,
               shutdown_timeout_s: float) -> int:
    """Serve until a signal (exit status 0 once drained; 128 + the signal's number when a
    second signal stopped it early: 130 for Ctrl-C, 143 for SIGTERM) or an engine failure
    (status 1). Called from the main thread, it answers SIGINT and SIGTERM itself, and on its
    return leaves them ignored: what remains is for its caller to exit with that status."""
    config = server_config(app, host=host, port=port, log_level=log_level,
                           timeout_graceful_shutdown=shutdown_timeout_s + GRACE_S)
    server = _DrainingServer(config, engine, shutdown_timeout_s)
    engine.on_fatal = lambda error: setattr(server, "should_exit", True)
    # The server's handler answers SIGINT and SIGTERM from before uvicorn starts (uvicorn
    # installs the same one, and puts it back when it ends) until the engine has stopped, so no
    # signal is lost and a second one at any point means "stop now". Only the main thread may.
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        _handle_signals(server.handle_exit)
    try:
        server.run()
    finally:
        engine.shutdown()  # the loop thread has ended before the interpreter begins to
        if in_main_thread:
            # The exit status is decided, but the interpreter still has to exit (with torch,
            # long enough for another signal): under SIG_DFL, one would kill the process.
            _handle_signals(signal.SIG_IGN)
    if engine.error is not None:
        logger.error("the engine failed (%s: %s); exiting with status 1",
                     type(engine.error).__name__, engine.error)
        return 1
    return 0 if server.stopped_by is None else 128 + server.stopped_by
# --8<-- [end:run_server]


def _handle_signals(handler) -> None:
    """Make `handler` what SIGINT and SIGTERM do (a function, or signal.SIG_IGN)."""
    for sig in SIGNALS:
        signal.signal(sig, handler)
