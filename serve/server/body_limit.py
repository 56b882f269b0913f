"""A limit on the size of a request body: 413 once a body passes it, before it is read whole."""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# 4 MiB holds a full 128k-token context several times over, as text (~4 bytes a token) or as JSON
# token ids (~7 bytes each), while a body too big to be a prompt is refused before it is parsed,
# held in memory or tokenized. A server for longer contexts raises --max-request-bytes.
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


class BodySizeLimit:
    """Pure ASGI middleware: reading a body larger than `max_bytes` raises a 413.

    A body that declares its size (Content-Length) is refused at its first read, before any of
    it arrives; a chunked one (or one that lies about its size) is counted as it arrives. Nothing
    is buffered here. The 413 is an HTTPException because FastAPI, which turns other errors met
    while reading a body into a 400, passes an HTTPException on to the app's error handler.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise self._too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> HTTPException:
        return HTTPException(
            413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
            "(--max-request-bytes)",
        )


def _content_length(scope: Scope) -> int | None:
    """The declared body size, or None when there is none (chunked) or it is not a number."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
