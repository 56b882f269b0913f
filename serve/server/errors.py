"""Every error leaves in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

import json

from starlette.responses import Response

from serve.server.protocol import ErrorInfo, ErrorResponse

ERROR_TYPES = {  # the error type an HTTP status reads as, as OpenAI's clients name them
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
    405: "MethodNotAllowedError", 408: "RequestTimeoutError", 413: "RequestTooLargeError",
    500: "InternalServerError", 503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error the server answers with OpenAI's error body (its type named after the HTTP
    status), that status, and headers, if any (Retry-After)."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.headers = status_code, headers
        self.info = ErrorInfo(message=message, type=ERROR_TYPES.get(status_code, "APIError"),
                              param=param, code=code)


def error_response(error: APIError) -> Response:
    # ASCII-escaped JSON: a message may quote the client's own text, and a lone surrogate in it
    # ("\ud800", which JSON can spell) cannot be encoded as UTF-8, but escaped it is valid JSON.
    body = json.dumps(ErrorResponse(error=error.info).model_dump(), ensure_ascii=True)
    return Response(body, status_code=error.status_code, media_type="application/json",
                    headers=error.headers)
