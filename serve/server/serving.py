"""POST /v1/completions and /v1/chat/completions: one generation path, two response shapes
(serve/server/shapes.py)."""

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve.engine.async_engine import AsyncEngine, QueueFullError
from serve.engine.errors import EngineDeadError
from serve.engine.outputs import RequestOutput
from serve.server.errors import APIError
from serve.server.generation import Generation, cancel_on_disconnect
from serve.server.protocol import ErrorResponse, GenerationRequest, PromptTokensDetails, Usage
from serve.server.shapes import Shape
from serve.server.validation import check_request

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    """One server-sent event, the framing OpenAI's streaming clients read."""
    return f"data: {payload.model_dump_json()}\n\n"


def usage_of(outputs: list[RequestOutput], per_prompt: int = 1) -> Usage:
    """Tokens of every sequence generated (best_of's unanswered ones too); each prompt counted
    once, as its first sequence saw it (the others find it cached because that one computed
    it), as OpenAI counts a prompt with n choices."""
    prompts = outputs[::per_prompt]
    prompt_tokens = sum(len(output.prompt_token_ids) for output in prompts)
    completion_tokens = sum(len(output.token_ids) for output in outputs)
    cached_tokens = sum(output.num_cached_tokens for output in prompts)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def likeliest(outputs: list[RequestOutput], per_prompt: int, n: int) -> list[RequestOutput]:
    """best_of: of each prompt's per_prompt sequences, the n with the highest cumulative
    log-probability, the likeliest first."""
    if per_prompt == n:
        return outputs

    def cumulative_logprob(output: RequestOutput) -> float:
        value = output.outputs[0].cumulative_logprob
        return -math.inf if value is None else value

    chosen = []
    for start in range(0, len(outputs), per_prompt):
        group = sorted(outputs[start:start + per_prompt], key=cumulative_logprob, reverse=True)
        chosen += group[:n]
    return chosen


# --8<-- [start:serve]
async def serve_generation(request: GenerationRequest, raw_request: Request, engine: AsyncEngine,
                           model_names: list[str],
                           make_shape: Callable[[GenerationRequest], Shape]) -> Response:
    """Answer one generation request in its shape: check it, submit its prompts, then wait for
    every output, or stream them as they come. Responses name the first of model_names."""
    params = check_request(request, model_names)
    shape = make_shape(request)  # (after the checks: it reads the request's constraint)
    prompts = shape.prompts(request)
    _check_queue(engine)  # (a request that is wrong hears so even from a busy server)
    request_id = f"{shape.id_prefix}-{uuid.uuid4().hex}"
    # where the request wrote what the engine may refuse, for the 400 to name
    fields = {"prompt": shape.prompt_field}
    if request.constraint is not None:
        fields["structured_outputs"] = request.constraint.field
    per_prompt = request.num_sequences
    start = Generation.start(engine, prompts, params, request_id, fields, request.cache_salt,
                             per_prompt)
    generation = await cancel_on_disconnect(raw_request, start)  # it may wait in the queue
    head = {"id": request_id, "created": int(time.time()), "model": model_names[0]}
    if request.stream:
        # If the client hangs up before the first event, Starlette never starts the stream, so
        # its own cleanup would not run; the background task still does (after a disconnect).
        events = _stream(generation, shape, head, request.include_usage, per_prompt)
        return StreamingResponse(events, media_type="text/event-stream",
                                 background=BackgroundTask(generation.close))
    try:
        outputs = await cancel_on_disconnect(raw_request, generation.final_outputs())
    finally:
        await generation.close()
    chosen = likeliest(outputs, per_prompt, request.num_choices)
    response = shape.response(head, chosen, usage_of(outputs, per_prompt))
    return JSONResponse(response.model_dump(mode="json"))


def _check_queue(engine: AsyncEngine) -> None:
    """A 503 with Retry-After while the engine has too many requests waiting already."""
    try:
        engine.check_queue()
    except QueueFullError as error:
        raise APIError(str(error), 503, code="queue_full",
                       headers={"Retry-After": str(error.retry_after_s)}) from error


async def _stream(generation: Generation, shape: Shape, head: dict, include_usage: bool,
                  per_prompt: int) -> AsyncIterator[str]:
    last: dict[int, RequestOutput] = {}
    try:
        async for index, output in generation.outputs():
            for chunk in shape.chunks(head, index, output, first=index not in last):
                yield sse_event(chunk)
            last[index] = output
        if include_usage:
            outputs = [last[index] for index in sorted(last)]
            yield sse_event(shape.usage_chunk(head, usage_of(outputs, per_prompt)))
    except Exception as error:  # the headers are sent: report it in the stream, as OpenAI does
        if isinstance(error, EngineDeadError):  # a shutdown: expected, no traceback needed
            logger.warning("stream %s ended: %s", head["id"], error)
            status = 503
        else:
            logger.exception("stream %s failed", head["id"])
            status = 500
        yield sse_event(ErrorResponse(error=APIError(str(error), status).info))
    finally:
        await generation.close()  # a client that hung up lands here: abort its prompts
    yield SSE_DONE
# --8<-- [end:serve]
