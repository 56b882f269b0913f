"""POST /v1/chat/completions: answer a conversation rendered with the model's chat template."""

import logging
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.engine.async_engine import AsyncEngine
from serve.engine.input_processor import ChatPrompt
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
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageOut,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
)
from serve.server.validation import check_request

logger = logging.getLogger(__name__)


async def create_chat_completion(
    request: ChatCompletionRequest, raw_request: Request, engine: AsyncEngine, model_name: str
) -> Response:
    params = check_request(request, model_name)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    # The chat template is rendered off the event loop, with the tokenizing (AsyncEngine).
    prompt = ChatPrompt(request.conversation())
    start = Generation.start(engine, [prompt], params, request_id, "messages")
    generation = await cancel_on_disconnect(raw_request, start)  # it may wait in the queue
    head = {"id": request_id, "created": int(time.time()), "model": model_name}
    if request.stream:
        return sse_response(_stream_chat(generation, head, request.include_usage), generation)
    try:
        outputs = await cancel_on_disconnect(raw_request, generation.final_outputs())
    finally:
        await generation.close()
    choices = [
        ChatChoice(
            index=i,
            message=ChatMessageOut(content=output.text),
            finish_reason=output.finish_reason,
        )
        for i, output in enumerate(outputs)
    ]
    completion = ChatCompletion(**head, choices=choices, usage=usage_of(outputs))
    return JSONResponse(completion.model_dump(mode="json"))


# --8<-- [start:stream]
async def _stream_chat(
    generation: Generation, head: dict, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(index: int, delta: DeltaMessage, finish_reason: str | None = None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
        return sse_event(ChatCompletionChunk(**head, choices=[choice]))

    last: dict[int, RequestOutput] = {}
    try:
        async for index, output in generation.outputs():
            if index not in last:  # a choice's first chunk says who speaks, as OpenAI's does
                yield chunk(index, DeltaMessage(role="assistant", content=""))
            last[index] = output
            if not (output.new_text or output.finished):
                continue  # a step whose text is held back (it may start a stop string)
            finish_reason = output.finish_reason if output.finished else None
            yield chunk(index, DeltaMessage(content=output.new_text), finish_reason)
        if include_usage:
            usage = usage_of(list(last.values()))
            yield sse_event(ChatCompletionChunk(**head, choices=[], usage=usage))
    except Exception as error:  # the headers are sent: report it in the stream, as OpenAI does
        logger.exception("chat stream %s failed", head["id"])
        info = ErrorInfo(message=str(error), type="InternalServerError")
        yield sse_event(ErrorResponse(error=info))
    finally:
        await generation.close()  # a client that hung up lands here: abort its prompts
    yield SSE_DONE


# --8<-- [end:stream]
