"""An API key, as `vllm serve --api-key` has: `Authorization: Bearer KEY` or 401, on every path
but /health and /metrics."""

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.server.errors import APIError, error_response

OPEN_PATHS = frozenset({"/health", "/metrics"})  # what a load balancer and Prometheus poll


class APIKeyAuth:
    """Pure ASGI middleware: the 401 comes before the body is read, whatever the path (the API,
    /docs, /redoc, /openapi.json, an unknown one). The scheme may be in any case and followed
    by one or more spaces (RFC 9110 §11.1); the key must match exactly."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"] not in OPEN_PATHS
        if guarded and not self._authorized(scope):
            error = APIError("Incorrect or missing API key: send the header 'Authorization: "
                             "Bearer <key>' with the server's --api-key", 401,
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        sent = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, key = sent.partition(b" ")
        if scheme.lower() != b"bearer":  # the scheme is no secret: an early "no" tells nothing
            return False
        return hmac.compare_digest(key.lstrip(b" "), self.expected)  # constant time: no oracle
