"""Limits on a request body: 400 when its length is declared twice over (Content-Length and
Transfer-Encoding), before any of it is read; 413 once it passes a size, before it is read whole;
408 when it has not fully arrived within a time, so a client that stops sending cannot hold a
connection."""

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.server.errors import APIError, error_response

# 4 MiB holds a full 128k-token context several times over, as text (~4 bytes a token) or as JSON
# token ids (~7 bytes each), while a body too big to be a prompt is refused before it is parsed,
# held in memory or tokenized. A server for longer contexts raises --max-request-bytes.
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
# The whole body must arrive within this many seconds of the first read: 4 MiB in 30 s is a
# 140 kB/s link. A client that stops sending (or trickles a byte at a time) gets a 408.
DEFAULT_BODY_TIMEOUT_S = 30.0


class BodyLimits:
    """Pure ASGI middleware. A body that declares its size (Content-Length) is refused at its
    first read, before any of it arrives; a chunked one (or one that lies about its size) is
    counted as it arrives. Nothing is buffered here. The 413 and 408 are HTTPExceptions because
    FastAPI, which turns other errors met while reading a body into a 400, passes an
    HTTPException on to the app's error handler; the 400 is answered here, as the app never
    runs. Once the body is complete, reads are not timed: the app then waits for the client to
    disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _framed_twice(scope):
            # Connection: close, as RFC 9112 §6.3 asks: the body is not read, so where the next
            # request would begin on this connection is unknown.
            error = APIError("the request has both Content-Length and Transfer-Encoding headers; "
                             "send one of them", headers={"Connection": "close"})
            await error_response(error)(scope, receive, send)
            return
        declared = _content_length(scope)
        received = 0
        complete = False
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal received, complete, deadline
            if complete:
                return await receive()
            if declared is not None and declared > self.max_bytes:
                raise self._too_large()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
                raise HTTPException(
                    408, f"the request body did not arrive within {self.timeout_s:g} s",
                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is larger than this server's limit of "
                             f"{self.max_bytes} bytes (--max-request-bytes)")


def _framed_twice(scope: Scope) -> bool:
    """Whether the request declares its body's length both ways. h11 lets Transfer-Encoding win,
    but a proxy in front may have gone by Content-Length: then the two disagree on where this
    body ends and the next request begins, and whatever one of them reads as body the other
    reads as a request of its own (request smuggling, RFC 9112 §6.3 and §11.2)."""
    names = {name for name, _ in scope["headers"]}
    return b"content-length" in names and b"transfer-encoding" in names


def _content_length(scope: Scope) -> int | None:
    """The declared body size, or None when there is none (chunked) or it is not a number."""
    value = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
    return int(value) if value.strip().isdigit() else None
