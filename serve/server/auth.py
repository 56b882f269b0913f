"""An API key for /v1/*, as `vllm serve --api-key` has: `Authorization: Bearer KEY` or 401."""

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.server.errors import ERROR_TYPES, error_response
from serve.server.protocol import ErrorInfo


class APIKeyAuth:
    """Pure ASGI middleware: a request to /v1/* without the key gets OpenAI's 401 before its
    body is read. /health and /metrics stay open, for load balancers and Prometheus."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_api(scope["path"]) and not self._authorized(scope):
            info = ErrorInfo(message="Incorrect or missing API key: send the header "
                             "'Authorization: Bearer <key>' with the server's --api-key",
                             type=ERROR_TYPES[401], code="invalid_api_key")
            response = error_response(401, info, {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        sent = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(sent, self.expected)  # in constant time: no timing oracle


def _is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")
