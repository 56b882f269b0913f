"""Every error leaves in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

import json

from starlette.responses import Response

from serve.server.protocol import ErrorInfo, ErrorResponse

ERROR_TYPES = {  # the error type an HTTP status reads as, as OpenAI's clients name them
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
}


def error_response(status_code: int, info: ErrorInfo,
                   headers: dict[str, str] | None = None) -> Response:
    # ASCII-escaped JSON: a message may quote the client's own text, and a lone surrogate in it
    # ("\ud800", which JSON can spell) cannot be encoded as UTF-8, but escaped it is valid JSON.
    body = json.dumps(ErrorResponse(error=info).model_dump(), ensure_ascii=True)
    return Response(body, status_code=status_code, media_type="application/json",
                    headers=headers)
