"""The OpenAI-compatible HTTP API: a FastAPI app around one AsyncEngine."""

import asyncio
import functools
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from serve.engine.async_engine import AsyncEngine
from serve.engine.errors import EngineDeadError
from serve.server.auth import APIKeyAuth
from serve.server.body_limit import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES, BodyLimits
from serve.server.errors import APIError, error_response
from serve.server.logprobs import TokenTexts
from serve.server.metrics import ServerMetrics, log_while_busy
from serve.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from serve.server.serving import serve_generation
from serve.server.shapes import ChatShape, CompletionShape
from serve.server.validation import validation_error


# --8<-- [start:build_app]
def build_app(engine: AsyncEngine, model_names: str | Sequence[str] | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
              api_key: str | None = None) -> FastAPI:
    """The app serving `engine` under `model_names` (default: the engine's model name): clients
    may send any of them, and responses carry the first.

    The app starts the engine's loop thread at startup and stops it at shutdown; an app driven
    without its lifespan (an in-process test client) needs `engine.start()` first. While the
    engine is busy, the app logs its KV pages and requests every 10 s. `max_request_bytes` and
    `body_timeout_s` bound a request's body (BodyLimits); with an `api_key`, every request but
    those to /health and /metrics must carry it (APIKeyAuth).
    """
    served_names = [model_names] if isinstance(model_names, str) else list(model_names or [])
    served_names = served_names or [engine.model_name]
    texts = TokenTexts(engine.tokenizer)
    completion_shape = functools.partial(CompletionShape, texts, engine.tokenizer is None)
    chat_shape = functools.partial(ChatShape, texts)
    created = int(time.time())
    metrics = ServerMetrics()
    engine.add_stats_listener(metrics.record)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        state_logger = asyncio.create_task(log_while_busy(engine, metrics))
        yield
        state_logger.cancel()
        engine.shutdown()

    app = FastAPI(title="nanoserve", lifespan=lifespan)
    # The last added runs first. The key is checked before any body is read (BodyLimits reads
    # nothing itself), but after a body framed two ways is refused: a stranger's request is
    # the very one that must not leave the connection where a proxy and this server disagree.
    if api_key:
        app.add_middleware(APIKeyAuth, api_key=api_key)
    app.add_middleware(BodyLimits, max_bytes=max_request_bytes, timeout_s=body_timeout_s)
    _add_error_handlers(app)

    # HEAD is the probe some load balancers send. Two routes, not one for both methods, which
    # would give both the same OpenAPI operation id.
    @app.get("/health")
    @app.head("/health")
    async def health() -> JSONResponse:
        return health_response(engine)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        cards = [ModelCard(id=name, created=created, max_model_len=engine.max_model_len)
                 for name in served_names]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await serve_generation(request, raw_request, engine, served_names,
                                      completion_shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await serve_generation(request, raw_request, engine, served_names, chat_shape)

    return app
# --8<-- [end:build_app]


# --8<-- [start:health]
def health_response(engine: AsyncEngine) -> JSONResponse:
    """200 while the engine loop runs; 503 saying why once it has failed or stopped, so that a
    load balancer stops sending requests and a supervisor restarts the process."""
    status, error = engine.status, engine.error
    if status == "ok":
        return JSONResponse({"status": "ok"})
    if error is not None:
        status, reason = "dead", f"the engine loop failed: {type(error).__name__}: {error}"
    elif status == "draining":
        reason = "the server is shutting down: it finishes running requests, admits no new ones"
    else:
        status, reason = "stopped", "the engine is not running"
    return JSONResponse({"status": status, "reason": reason}, status_code=503)
# --8<-- [end:health]


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape, as an APIError (serve/server/errors.py)."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> Response:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> Response:
        # FastAPI answers 422; OpenAI answers 400 and names the offending field in `param`.
        return error_response(validation_error(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> Response:
        return error_response(APIError(str(error.detail), error.status_code,
                                       headers=error.headers))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, error: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, error: EngineDeadError) -> Response:
        return error_response(APIError(str(error), 503))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> Response:
        # Starlette re-raises the error after this answer, so uvicorn logs its traceback.
        return error_response(APIError(f"{type(error).__name__}: {error}", 500))
