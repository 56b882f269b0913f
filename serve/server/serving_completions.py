"""POST /v1/completions: continue one or several prompts (text or token ids)."""

import logging
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.engine.async_engine import AsyncEngine
from serve.engine.request import RequestOutput
from serve.server.generation import (
    SSE_DONE,
    Generation,
    cancel_on_disconnect,
    sse_event,
    sse_response,
    usage_of,
)
from serve.server.protocol import (
    APIError,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
)
from serve.server.validation import check_request

logger = logging.getLogger(__name__)


async def create_completion(
    request: CompletionRequest, raw_request: Request, engine: AsyncEngine, model_name: str
) -> Response:
    params = check_request(request, model_name)
    prompts = request.prompts()
    if not prompts:
        raise APIError("prompt must not be empty", param="prompt")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    start = Generation.start(engine, prompts, params, request_id, "prompt")
    generation = await cancel_on_disconnect(raw_request, start)  # it may wait in the queue
    head = {"id": request_id, "created": int(time.time()), "model": model_name}
    if request.stream:
        textless = engine.tokenizer is None
        events = _stream_completion(generation, head, request.include_usage, textless)
        return sse_response(events, generation)
    try:
        outputs = await cancel_on_disconnect(raw_request, generation.final_outputs())
    finally:
        await generation.close()
    choices = [
        CompletionChoice(index=i, text=output.text, finish_reason=output.finish_reason)
        for i, output in enumerate(outputs)
    ]
    completion = Completion(**head, choices=choices, usage=usage_of(outputs))
    return JSONResponse(completion.model_dump(mode="json"))


# --8<-- [start:stream]
async def _stream_completion(
    generation: Generation, head: dict, include_usage: bool, textless: bool
) -> AsyncIterator[str]:
    """SSE chunks of new text. A model without a tokenizer (a dummy benchmark model) has no
    text: it sends one empty chunk per step instead, so that clients can still time tokens."""
    last: dict[int, RequestOutput] = {}
    try:
        async for index, output in generation.outputs():
            last[index] = output
            if not (output.new_text or output.finished or textless):
                continue  # a step whose text is held back (it may start a stop string)
            finish_reason = output.finish_reason if output.finished else None
            choice = CompletionChoice(
                index=index, text=output.new_text, finish_reason=finish_reason
            )
            yield sse_event(CompletionChunk(**head, choices=[choice]))
        if include_usage:
            usage = usage_of(list(last.values()))
            yield sse_event(CompletionChunk(**head, choices=[], usage=usage))
    except Exception as error:  # the headers are sent: report it in the stream, as OpenAI does
        logger.exception("completion stream %s failed", head["id"])
        info = ErrorInfo(message=str(error), type="InternalServerError")
        yield sse_event(ErrorResponse(error=info))
    finally:
        await generation.close()  # a client that hung up lands here: abort its prompts
    yield SSE_DONE


# --8<-- [end:stream]
