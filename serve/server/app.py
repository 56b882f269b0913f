"""The OpenAI-compatible HTTP API: a FastAPI app around one AsyncEngine."""

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from serve.engine.async_engine import AsyncEngine
from serve.engine.errors import EngineDeadError
from serve.server.body_limit import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES, BodyLimits
from serve.server.metrics import ServerMetrics, log_while_busy
from serve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from serve.server.serving_chat import create_chat_completion
from serve.server.serving_completions import create_completion
from serve.server.validation import validation_error_info

_ERROR_TYPES = {
    400: "BadRequestError",
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


# --8<-- [start:build_app]
def build_app(
    engine: AsyncEngine,
    model_name: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The app serving `engine` under `model_name` (default: the engine's model name).

    The app starts the engine's loop thread at startup and stops it at shutdown; an app driven
    without its lifespan (an in-process test client) needs `engine.start()` first. While the
    engine is busy, the app logs its KV pages and requests every 10 s. A request body larger
    than `max_request_bytes` gets a 413, one that has not arrived within `body_timeout_s`
    a 408.
    """
    served_name = model_name or engine.model_name
    created = int(time.time())
    metrics = ServerMetrics()
    engine.add_stats_listener(metrics.record)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        state_logger = asyncio.create_task(log_while_busy(engine))
        yield
        state_logger.cancel()
        engine.shutdown()

    app = FastAPI(title="nanoserve", lifespan=lifespan)
    app.add_middleware(BodyLimits, max_bytes=max_request_bytes, timeout_s=body_timeout_s)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        return health_response(engine)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        card = ModelCard(id=served_name, created=created, max_model_len=engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await create_completion(request, raw_request, engine, served_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await create_chat_completion(request, raw_request, engine, served_name)

    return app


# --8<-- [end:build_app]


# --8<-- [start:health]
def health_response(engine: AsyncEngine) -> JSONResponse:
    """200 while the engine loop runs; 503 saying why once it has failed or stopped, so that a
    load balancer stops sending requests and a supervisor restarts the process."""
    status = engine.status
    if status == "ok":
        return JSONResponse({"status": "ok"})
    if engine.error is not None:
        reason = f"the engine loop failed: {type(engine.error).__name__}: {engine.error}"
        return JSONResponse({"status": "dead", "reason": reason}, status_code=503)
    if status == "draining":
        reason = "the server is shutting down: it finishes running requests, admits no new ones"
        return JSONResponse({"status": "draining", "reason": reason}, status_code=503)
    return JSONResponse({"status": "stopped", "reason": "the engine is not running"},
                        status_code=503)
# --8<-- [end:health]


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> Response:
        return error_response(error.status_code, error.info)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        # FastAPI answers 422; OpenAI answers 400 and names the offending field in `param`.
        return error_response(400, validation_error_info(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> Response:
        error_type = _ERROR_TYPES.get(error.status_code, "APIError")
        info = ErrorInfo(message=str(error.detail), type=error_type)
        return error_response(error.status_code, info, error.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, error: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, error: EngineDeadError) -> Response:
        return error_response(503, ErrorInfo(message=str(error), type="ServiceUnavailableError"))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> Response:
        # Starlette re-raises the error after this answer, so uvicorn logs its traceback.
        info = ErrorInfo(message=f"{type(error).__name__}: {error}", type="InternalServerError")
        return error_response(500, info)
