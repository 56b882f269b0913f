"""POST /v1/chat/completions: render the conversation with the chat template, then generate."""

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


def render_chat(request: ChatCompletionRequest, engine: AsyncEngine) -> list[int]:
    """The prompt's token ids: the chat template's text, ending with the assistant's header."""
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(
            "this model has no chat template; use /v1/completions instead", param="messages"
        )
    try:
        # The template already holds every special token, so none are added while tokenizing.
        return tokenizer.apply_chat_template(
            request.conversation(), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except Exception as error:  # the template rejects the conversation (jinja2 raises its own)
        raise APIError(f"cannot apply the chat template: {error}", param="messages") from error


async def create_chat_completion(
    request: ChatCompletionRequest, raw_request: Request, engine: AsyncEngine, model_name: str
) -> Response:
    params = check_request(request, model_name)
    prompt_token_ids = render_chat(request, engine)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = await Generation.start(engine, [prompt_token_ids], params, request_id, "messages")
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
