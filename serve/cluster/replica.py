"""One replica: the engine and the HTTP app of `nanoserve`, answering requests that the ingress
relays to it over a Ray Serve handle.

The replica runs the very app that `nanoserve` serves (serve/server/app.py): the ingress hands it
each HTTP request whole, and the replica feeds it to the app as an ASGI call and streams back
what the app sends, so every endpoint, check, error and stream behaves as on one server.
"""

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import ray.serve
from ray.actor import ActorHandle

from serve.cluster.metrics import REPORT_INTERVAL_S
from serve.server.app import build_app
from serve.server.cli import make_engine

logger = logging.getLogger(__name__)

REPLICA_HEADER = b"x-nanoserve-replica"  # on every response: which replica answered


@dataclass
class RelayedRequest:
    """An HTTP request as the ingress received it, and the page keys it is routed by."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    page_keys: list[int] = field(default_factory=list)  # read by PrefixAwareRouter


class Replica:
    """A Ray Serve deployment: one AsyncEngine (its core in a process of its own, as in
    `nanoserve`), and its app."""

    # (async: Ray Serve awaits it on the replica's event loop, where the reporting task runs)
    async def __init__(self, args: argparse.Namespace, board: ActorHandle) -> None:
        self.engine = make_engine(args)
        # no API key here: the ingress checks it before a request reaches any replica
        self.app = build_app(self.engine, args.served_model_name, args.max_request_bytes)
        # A failed engine ends the process, as it ends `nanoserve`: Ray Serve replaces the
        # replica at once (a failing health check takes three periods), and the ingress ends
        # the replica's requests with an error.
        self.engine.on_fatal = lambda error: os._exit(1)
        self.engine.start()
        self.name = ray.serve.get_replica_context().replica_id.unique_id
        self._reporter = asyncio.create_task(self._report(board))  # (held: tasks are weak)

    # --8<-- [start:relay]
    async def relay(self, request: RelayedRequest) -> AsyncIterator[list[dict]]:
        """Run the request through the app; yield the ASGI messages it sends (the response's
        start, then its body in pieces), several at a time when they come faster than they are
        taken. Cancelled (the client went away), the app sees the client disconnect."""
        sent: asyncio.Queue[dict | None] = asyncio.Queue()
        body = [{"type": "http.request", "body": request.body, "more_body": False}]
        gone = asyncio.Event()

        async def receive() -> dict:
            if body:
                return body.pop()
            await gone.wait()  # what the app's disconnect watch waits for
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (REPLICA_HEADER, self.name.encode())]
            sent.put_nowait(message)

        async def run() -> None:
            try:
                await self.app(_scope(request), receive, send)
            except Exception:  # the app has answered 500 already; the traceback goes to the log
                logger.exception("%s %s failed", request.method, request.path)
            finally:
                sent.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while True:
                messages = [await sent.get()]
                while not sent.empty():  # all that is there, in one message of Ray's
                    messages.append(sent.get_nowait())
                if messages[-1] is None:  # the app has returned
                    if len(messages) > 1:
                        yield messages[:-1]
                    return
                yield messages
        finally:
            gone.set()
            await task
    # --8<-- [end:relay]

    def check_health(self) -> None:
        """Ray Serve calls this every few seconds; raising makes it replace the replica."""
        if self.engine.status != "ok":
            raise RuntimeError(f"the engine is {self.engine.status}: {self.engine.error}")

    def __del__(self) -> None:  # Ray Serve's graceful stop of the replica
        if hasattr(self, "engine"):
            self.engine.shutdown()

    async def _report(self, board: ActorHandle) -> None:
        """Send the app's /metrics to the board every REPORT_INTERVAL_S."""
        while True:
            text = b"".join([message.get("body", b"")
                             async for messages in self.relay(RelayedRequest("GET", "/metrics"))
                             for message in messages])
            board.put.remote(self.name, text.decode())
            await asyncio.sleep(REPORT_INTERVAL_S)


def _scope(request: RelayedRequest) -> dict:
    """The ASGI scope of the relayed request, as a server would give it to the app."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path,
            "raw_path": request.path.encode(), "root_path": "",
            "query_string": request.query_string, "headers": request.headers,
            "client": None, "server": None}
