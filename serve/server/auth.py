"""An API key, as `vllm serve --api-key` has: `Authorization: Bearer KEY` or 401, on every path
but /health and /metrics."""

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.server.errors import ERROR_TYPES, error_response
from serve.server.protocol import ErrorInfo

OPEN_PATHS = frozenset({"/health", "/metrics"})  # what a load balancer and Prometheus poll


class APIKeyAuth:
    """Pure ASGI middleware: a request without the key gets OpenAI's 401 before its body is
    read, whatever its path (the API, /docs, /redoc, /openapi.json, an unknown path), except
    /health and /metrics, which stay open for load balancers and Prometheus. The scheme may be
    in any case and followed by one or more spaces (RFC 9110 §11.1); the key must match exactly.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"] not in OPEN_PATHS
        if guarded and not self._authorized(scope):
            info = ErrorInfo(message="Incorrect or missing API key: send the header "
                             "'Authorization: Bearer <key>' with the server's --api-key",
                             type=ERROR_TYPES[401], code="invalid_api_key")
            response = error_response(401, info, {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        sent = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, key = sent.partition(b" ")
        if scheme.lower() != b"bearer":  # the scheme is no secret: an early "no" tells nothing
            return False
        return hmac.compare_digest(key.lstrip(b" "), self.expected)  # constant time: no oracle
