"""Telling a process that died or stopped from one that is only busy.

The engine starts processes of its own: the engine core (serve/core/core_process.py) and the
tensor-parallel workers (serve/core/tp_worker.py). Each one beats: a thread of its own writes a
byte to a pipe every HEARTBEAT_INTERVAL_S, whatever its main thread is doing (a long step
releases the GIL to torch, so the beats go on). The process that started it watches two things:
that the process still runs (it may have been killed, or crashed), and that beats still arrive
(a process stopped by SIGSTOP, or frozen, neither exits nor beats). Either failure makes it count
as dead, and its parent fails what depended on it instead of waiting forever.
"""

import logging
import os
import signal
import subprocess
import threading
import time

HEARTBEAT_INTERVAL_S = 0.5
MIN_HEARTBEAT_TIMEOUT_S = 4 * HEARTBEAT_INTERVAL_S  # a few missed beats, not one late thread


def start_heartbeat(fd: int) -> None:
    """Beat on the pipe fd from a daemon thread, for as long as this process lives."""

    def beat() -> None:
        with os.fdopen(fd, "wb", buffering=0) as pipe:
            while True:
                try:
                    pipe.write(b".")  # (blocks while the pipe is full: the watcher is busy)
                except OSError:  # the watcher has gone
                    return
                time.sleep(HEARTBEAT_INTERVAL_S)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def start_child_process(role: str, heartbeat_fd: int) -> None:
    """What the engine core and every tensor-parallel worker do first: leave stopping to their
    parent (a Ctrl-C in a terminal reaches the whole process group: the server drains, which
    needs every rank, then tells the core, which tells the workers), log as `role`, and beat."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("NANOSERVE_CORE_LOG_LEVEL", "INFO"),
                        format=f"%(levelname)s {role} %(name)s: %(message)s")
    start_heartbeat(heartbeat_fd)


class ProcessWatch:
    """A parent's watch over one child process that beats on the pipe whose read end it owns."""

    def __init__(self, process: subprocess.Popen, beats_fd: int, name: str,
                 timeout_s: float) -> None:
        self.process, self.beats_fd, self.name, self.timeout_s = process, beats_fd, name, timeout_s
        os.set_blocking(beats_fd, False)
        self.last_beat: float | None = None  # None until start(): loading is not silence

    def start(self) -> None:
        """The child is up: from now on, silence counts."""
        self.last_beat = time.monotonic()

    def heard(self) -> None:
        """The child just proved it is alive another way (a message of its arrived)."""
        if self.last_beat is not None:
            self.last_beat = time.monotonic()

    def problem(self) -> str | None:
        """Why the child counts as dead (it exited, or has not beaten for timeout_s since
        start()), or None. Two system calls: cheap enough for every idle wait."""
        if (status := self.process.poll()) is not None:
            return f"{self.name} exited with status {status}"
        if self.last_beat is None:
            return None
        try:
            if os.read(self.beats_fd, 1 << 16):  # every beat since the last look
                self.last_beat = time.monotonic()
        except BlockingIOError:  # no beat since then
            pass
        silent_s = time.monotonic() - self.last_beat
        if silent_s > self.timeout_s:
            return (f"{self.name} (pid {self.process.pid}) has not sent a heartbeat for "
                    f"{silent_s:.1f} s: it is stopped or hung")
        return None

    def close(self) -> None:
        """Stop watching (safe to call twice)."""
        if self.beats_fd >= 0:
            os.close(self.beats_fd)
            self.beats_fd = -1

