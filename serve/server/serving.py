"""POST /v1/completions and /v1/chat/completions: one generation path, two response shapes.

Both endpoints check the request, submit its prompts, then either wait for every output or stream
server-sent events. Only the bodies differ: a completion continues prompts (text or token ids)
and answers `choices[i].text`; a chat answers a conversation rendered with the model's chat
template, in `choices[i].message` (or `delta` when streamed), as text or, when its tool_choice
forced a call, as `tool_calls`. Each shape is one small class.
"""

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve.engine.async_engine import AsyncEngine
from serve.engine.errors import EngineDeadError
from serve.engine.input_processor import ChatPrompt, Prompt
from serve.engine.outputs import RequestOutput
from serve.server.generation import Generation, cancel_on_disconnect
from serve.server.protocol import (
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    DeltaMessage,
    DeltaToolCall,
    ErrorInfo,
    ErrorResponse,
    GenerationRequest,
    PromptTokensDetails,
    ToolCall,
    Usage,
)
from serve.server.structured import ForcedCall
from serve.server.tool_calls import tool_calls
from serve.server.validation import check_request

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    """One server-sent event, the framing OpenAI's streaming clients read."""
    return f"data: {payload.model_dump_json()}\n\n"


def usage_of(outputs: list[RequestOutput]) -> Usage:
    prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
    completion_tokens = sum(len(output.token_ids) for output in outputs)
    cached_tokens = sum(output.num_cached_tokens for output in outputs)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


# --8<-- [start:shapes]
class CompletionShape:
    """/v1/completions: one choice per prompt, its text."""

    id_prefix, prompt_field = "cmpl", "prompt"

    def __init__(self, textless: bool) -> None:
        # A model without a tokenizer (a dummy benchmark model) has no text: its stream sends
        # one empty chunk per step instead, so that clients can still time tokens.
        self.textless = textless

    def for_request(self, request: CompletionRequest) -> "CompletionShape":
        return self

    def prompts(self, request: CompletionRequest) -> list[Prompt]:
        prompts = request.prompts()
        if not prompts:
            raise APIError("prompt must not be empty", param="prompt")
        return prompts

    def response(self, head: dict, outputs: list[RequestOutput]) -> BaseModel:
        choices = [CompletionChoice(index=i, text=output.text, finish_reason=output.finish_reason)
                   for i, output in enumerate(outputs)]
        return Completion(**head, choices=choices, usage=usage_of(outputs))

    def chunks(self, head: dict, index: int, output: RequestOutput, first: bool) -> list[BaseModel]:
        if not (output.new_text or output.finished or self.textless):
            return []  # a step whose text is held back (it may start a stop string)
        finish_reason = output.finish_reason if output.finished else None
        choice = CompletionChoice(index=index, text=output.new_text, finish_reason=finish_reason)
        return [CompletionChunk(**head, choices=[choice])]

    def usage_chunk(self, head: dict, usage: Usage) -> BaseModel:
        return CompletionChunk(**head, choices=[], usage=usage)


class ChatShape:
    """/v1/chat/completions: one conversation, the assistant's message: text, or the tool calls
    of a request whose tool_choice forced one (`call`)."""

    id_prefix, prompt_field = "chatcmpl", "messages"

    def __init__(self, call: ForcedCall | None = None) -> None:
        self.call = call

    def for_request(self, request: ChatCompletionRequest) -> "ChatShape":
        """The shape of this (checked) request's answer."""
        constraint = request.constraint
        return ChatShape(constraint.call if constraint is not None else None)

    def prompts(self, request: ChatCompletionRequest) -> list[Prompt]:
        # The chat template is rendered off the event loop, with the tokenizing (AsyncEngine).
        return [ChatPrompt(request.conversation(), request.template_tools())]

    def response(self, head: dict, outputs: list[RequestOutput]) -> BaseModel:
        choices = []
        for i, output in enumerate(outputs):
            calls, finish_reason = self._calls(output)
            message = (ChatMessageOut(content=None, tool_calls=calls) if calls
                       else ChatMessageOut(content=output.text))
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish_reason))
        return ChatCompletion(**head, choices=choices, usage=usage_of(outputs))

    def chunks(self, head: dict, index: int, output: RequestOutput, first: bool) -> list[BaseModel]:
        def chunk(delta: DeltaMessage, finish_reason: str | None = None) -> BaseModel:
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
            return ChatCompletionChunk(**head, choices=[choice])

        found = [chunk(DeltaMessage(role="assistant", content=""))] if first else []  # who speaks
        if self.call is not None:
            if output.finished:  # (the text is held back until then: it may not be a whole call)
                found += self._call_chunks(chunk, output)
        elif output.new_text or output.finished:
            finish_reason = output.finish_reason if output.finished else None
            found.append(chunk(DeltaMessage(content=output.new_text), finish_reason))
        return found

    def _call_chunks(self, chunk: Callable[..., BaseModel],
                     output: RequestOutput) -> list[BaseModel]:
        """A finished forced call's last chunks: one delta with every call whole (OpenAI's
        clients assemble a call from any number of deltas, one included), then the finish; or
        the text, when it is not a whole call."""
        calls, finish_reason = self._calls(output)
        if not calls:
            return [chunk(DeltaMessage(content=output.text), finish_reason)]
        deltas = [DeltaToolCall(index=i, id=call.id, function=call.function)
                  for i, call in enumerate(calls)]
        return [chunk(DeltaMessage(tool_calls=deltas)), chunk(DeltaMessage(), finish_reason)]

    def _calls(self, output: RequestOutput) -> tuple[list[ToolCall] | None, str | None]:
        """A finished output's tool calls (None: it answers text) and its finish_reason."""
        calls = tool_calls(output.text, self.call) if self.call is not None else None
        return calls, "tool_calls" if calls else output.finish_reason

    def usage_chunk(self, head: dict, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(**head, choices=[], usage=usage)


Shape = CompletionShape | ChatShape
# --8<-- [end:shapes]


# --8<-- [start:serve]
async def serve_generation(request: GenerationRequest, raw_request: Request, engine: AsyncEngine,
                           model_names: list[str], shape: Shape) -> Response:
    """Answer one generation request in `shape`: check it, submit its prompts, then wait for
    every output, or stream them as they come. Responses name the first of model_names."""
    params = check_request(request, model_names)
    shape = shape.for_request(request)
    prompts = shape.prompts(request)
    request_id = f"{shape.id_prefix}-{uuid.uuid4().hex}"
    # where the request wrote what the engine may refuse, for the 400 to name
    fields = {"prompt": shape.prompt_field}
    if request.constraint is not None:
        fields["structured_outputs"] = request.constraint.field
    start = Generation.start(engine, prompts, params, request_id, fields, request.cache_salt)
    generation = await cancel_on_disconnect(raw_request, start)  # it may wait in the queue
    head = {"id": request_id, "created": int(time.time()), "model": model_names[0]}
    if request.stream:
        # If the client hangs up before the first event, Starlette never starts the stream, so
        # its own cleanup would not run; the background task still does (after a disconnect).
        events = _stream(generation, shape, head, request.include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 background=BackgroundTask(generation.close))
    try:
        outputs = await cancel_on_disconnect(raw_request, generation.final_outputs())
    finally:
        await generation.close()
    return JSONResponse(shape.response(head, outputs).model_dump(mode="json"))


async def _stream(generation: Generation, shape: Shape, head: dict,
                  include_usage: bool) -> AsyncIterator[str]:
    last: dict[int, RequestOutput] = {}
    try:
        async for index, output in generation.outputs():
            for chunk in shape.chunks(head, index, output, first=index not in last):
                yield sse_event(chunk)
            last[index] = output
        if include_usage:
            yield sse_event(shape.usage_chunk(head, usage_of(list(last.values()))))
    except Exception as error:  # the headers are sent: report it in the stream, as OpenAI does
        if isinstance(error, EngineDeadError):  # a shutdown: expected, no traceback needed
            logger.warning("stream %s ended: %s", head["id"], error)
            info = ErrorInfo(message=str(error), type="ServiceUnavailableError")
        else:
            logger.exception("stream %s failed", head["id"])
            info = ErrorInfo(message=str(error), type="InternalServerError")
        yield sse_event(ErrorResponse(error=info))
    finally:
        await generation.close()  # a client that hung up lands here: abort its prompts
    yield SSE_DONE
# --8<-- [end:serve]
