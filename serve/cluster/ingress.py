"""The cluster's HTTP entry point: a Ray Serve ingress that relays each request to a replica.

It parses nothing but what routing needs. For a completion or a chat completion it tokenizes the
prompt as the engine will (same tokenizer, same chat template) and hashes its pages; the rest of
the request goes to the replica untouched, whose app checks it and answers. It also checks the
API key, bounds the body, and serves the cluster's merged /metrics.
"""

import argparse
import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.cluster.metrics import merged
from serve.cluster.replica import RelayedRequest
from serve.cluster.router import page_keys
from serve.engine.input_processor import ChatPrompt, InputProcessor
from serve.engine.tokenizer import load_tokenizer
from serve.engine.tokenizer_pool import TokenizerPool
from serve.models.loader import load_config, resolve_model_path
from serve.sampling_params import SamplingParams
from serve.server.auth import APIKeyAuth
from serve.server.body_limit import DEFAULT_BODY_TIMEOUT_S, BodyLimits
from serve.server.errors import APIError, error_response
from serve.server.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from serve.server.serving import SSE_DONE, sse_event

logger = logging.getLogger(__name__)

PROMPT_REQUESTS = {"/v1/completions": CompletionRequest,
                   "/v1/chat/completions": ChatCompletionRequest}


class Ingress:
    """A Ray Serve deployment (one replica): the HTTP app in front of the replicas."""

    def __init__(self, replicas: DeploymentHandle, board: ActorHandle,
                 args: argparse.Namespace, api_key: str | None) -> None:
        self.replicas = replicas.options(method_name="relay", stream=True)
        self.board, self.args, self.api_key = board, args, api_key
        path = resolve_model_path(args.model)
        config = load_config(path)
        processor = InputProcessor(load_tokenizer(args.tokenizer or path), config.vocab_size,
                                   args.max_model_len or config.max_position_embeddings)
        self.tokenizers = TokenizerPool(processor, num_workers=1)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """Ray Serve's hook: the ASGI app this ingress serves."""
        app = Router([Route("/metrics", self.metrics, methods=["GET"])], default=self.relay)
        if self.api_key:  # as in `nanoserve`: checked before the body is read
            app = APIKeyAuth(app, api_key=self.api_key)
        return BodyLimits(app, max_bytes=self.args.max_request_bytes,
                          timeout_s=DEFAULT_BODY_TIMEOUT_S)

    async def metrics(self, _: Request) -> Response:
        return Response(merged(await self.board.fresh.remote()), media_type=CONTENT_TYPE_LATEST)

    # --8<-- [start:relay]
    async def relay(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the request to the replica the router picks, and its answer to the client. A
        replica that fails before answering makes a 503; one that fails mid-stream ends the
        stream with an error event, as a single server's engine failure does."""
        try:
            body = await Request(scope, receive).body()
        except HTTPException as error:  # BodyLimits: too large, or too slow to arrive
            await error_response(APIError(str(error.detail), error.status_code,
                                          headers=error.headers))(scope, receive, send)
            return
        except ClientDisconnect:
            return
        request = RelayedRequest(scope["method"], scope["path"], scope["query_string"],
                                 scope["headers"], body, await self._page_keys(scope["path"], body))
        stream = self.replicas.remote(request)
        started = False
        try:
            async for messages in stream:
                for message in messages:
                    started = started or message["type"] == "http.response.start"
                    await send(message)
        except asyncio.CancelledError:  # the client went away: so does the replica's work
            stream.cancel()
            raise
        except Exception as error:  # the replica died (RayActorError), or its call failed
            logger.warning("%s %s: the replica failed: %r", scope["method"], scope["path"], error)
            failure = APIError(f"the replica serving this request failed "
                               f"({type(error).__name__}); retry it", 503)
            if not started:
                await error_response(failure)(scope, receive, send)
            else:  # only a stream is answered in several messages: end it as serving.py does
                event = sse_event(ErrorResponse(error=failure.info)) + SSE_DONE
                await send({"type": "http.response.body", "body": event.encode(),
                            "more_body": False})
    # --8<-- [end:relay]

    async def _page_keys(self, path: str, body: bytes) -> list[int]:
        """The page keys of the request's (first) prompt, tokenized as the engine will; none
        for anything else, or for a request the replica will refuse (it says why)."""
        kind = PROMPT_REQUESTS.get(path)
        if kind is None:
            return []
        try:
            request = kind.model_validate_json(body)
            prompt = (request.prompts()[0] if isinstance(request, CompletionRequest)
                      else ChatPrompt(request.conversation(), request.template_tools()))
            engine_input = await self.tokenizers.process(prompt, SamplingParams(max_tokens=1))
        except Exception:
            return []
        return page_keys(engine_input.prompt_token_ids, self.args.page_size, request.cache_salt)

