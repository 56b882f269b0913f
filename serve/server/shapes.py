"""The two response shapes of one generation path: what a finished request answers, and the
chunks a stream sends as each step arrives. Both answer n choices per prompt, choice p * n + i
being prompt p's i-th. Each shape is made for one checked request: a stream's shape remembers
where each choice's text has got to.
"""

from collections.abc import Callable

from pydantic import BaseModel

from serve.engine.input_processor import ChatPrompt, Prompt
from serve.engine.outputs import RequestOutput, TokenLogprobs
from serve.server.errors import APIError
from serve.server.logprobs import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    generated_scored,
    prompt_scored,
    vllm_prompt_logprobs,
)
from serve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    DeltaMessage,
    DeltaToolCall,
    PromptLogprobs,
    ToolCall,
    Usage,
)
from serve.server.structured import ForcedCall
from serve.server.tool_calls import tool_calls


# --8<-- [start:shapes]
class CompletionShape:
    """/v1/completions: n choices per prompt, each its text; with echo, the prompt's text (and
    log-probabilities) first."""

    id_prefix, prompt_field = "cmpl", "prompt"

    def __init__(self, texts: TokenTexts, textless: bool, request: CompletionRequest) -> None:
        # A model without a tokenizer (a dummy benchmark model) has no text: its stream sends
        # one empty chunk per step instead, so that clients can still time tokens.
        self.texts, self.textless, self.echo = texts, textless, bool(request.echo)
        self.num_logprobs, self.num_prompt_logprobs = request.logprobs, request.prompt_logprobs
        self._offsets: dict[int, int] = {}  # choice -> where its next token's text starts

    def prompts(self, request: CompletionRequest) -> list[Prompt]:
        prompts = request.prompts()
        if not prompts:
            raise APIError("prompt must not be empty", param="prompt")
        return prompts

    def response(self, head: dict, outputs: list[RequestOutput], usage: Usage) -> BaseModel:
        choices = [self._choice(i, output, output.text, output.outputs[0].logprobs, first=True)
                   for i, output in enumerate(outputs)]
        return Completion(**head, choices=choices, usage=usage)

    def chunks(self, head: dict, index: int, output: RequestOutput, first: bool) -> list[BaseModel]:
        new_logprobs = output.new_logprobs if self.num_logprobs is not None else []
        if not (output.new_text or output.finished or self.textless or new_logprobs
                or (first and self.echo)):
            return []  # a step whose text is held back (it may start a stop string)
        choice = self._choice(index, output, output.new_text, new_logprobs, first)
        return [CompletionChunk(**head, choices=[choice])]

    def _choice(self, index: int, output: RequestOutput, text: str,
                logprobs: list[TokenLogprobs] | None, first: bool) -> CompletionChoice:
        """Choice `index` with this text and these tokens' log-probabilities: the whole answer,
        or a stream's next piece (`first`: its first, where the echoed prompt goes)."""
        scored = generated_scored(logprobs)
        if first and self.echo:
            text = self.texts.prompt_text(output) + text
            scored = prompt_scored(output) + scored
        choice = CompletionChoice(index=index, text=text,
                                  finish_reason=output.finish_reason if output.finished else None)
        if self.num_logprobs is not None:
            choice.logprobs, self._offsets[index] = completion_logprobs(
                scored, self.num_logprobs, self.texts, self._offsets.get(index, 0))
        if first and self.num_prompt_logprobs is not None:
            choice.prompt_logprobs = vllm_prompt_logprobs(prompt_scored(output),
                                                          self.num_prompt_logprobs, self.texts)
        return choice

    def usage_chunk(self, head: dict, usage: Usage) -> BaseModel:
        return CompletionChunk(**head, choices=[], usage=usage)


class ChatShape:
    """/v1/chat/completions: one conversation, n choices of the assistant's message: text, or
    the tool calls of a request whose tool_choice forced one (`call`)."""

    id_prefix, prompt_field = "chatcmpl", "messages"

    def __init__(self, texts: TokenTexts, request: ChatCompletionRequest) -> None:
        constraint = request.constraint
        self.texts = texts
        self.call: ForcedCall | None = constraint.call if constraint is not None else None
        self.num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        self.num_prompt_logprobs = request.prompt_logprobs

    def prompts(self, request: ChatCompletionRequest) -> list[Prompt]:
        # The chat template is rendered off the event loop, with the tokenizing (AsyncEngine).
        return [ChatPrompt(request.conversation(), request.template_tools())]

    def response(self, head: dict, outputs: list[RequestOutput], usage: Usage) -> BaseModel:
        choices = []
        for i, output in enumerate(outputs):
            calls, finish_reason = self._calls(output)
            message = (ChatMessageOut(content=None, tool_calls=calls) if calls
                       else ChatMessageOut(content=output.text))
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish_reason,
                                      logprobs=self._logprobs(output.outputs[0].logprobs)))
        return ChatCompletion(**head, choices=choices, usage=usage,
                              prompt_logprobs=self._prompt_logprobs(outputs[0]))

    def chunks(self, head: dict, index: int, output: RequestOutput, first: bool) -> list[BaseModel]:
        def chunk(delta: DeltaMessage, finish_reason: str | None = None,
                  logprobs: ChatLogprobs | None = None) -> BaseModel:
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                     logprobs=logprobs)
            return ChatCompletionChunk(**head, choices=[choice])

        found = [chunk(DeltaMessage(role="assistant", content=""))] if first else []  # who speaks
        new_logprobs = output.new_logprobs if self.num_logprobs is not None else []
        if self.call is not None:
            if output.finished:  # (the text is held back until then: it may not be a whole call)
                found += self._call_chunks(chunk, output)
        elif output.new_text or output.finished or new_logprobs:
            finish_reason = output.finish_reason if output.finished else None
            found.append(chunk(DeltaMessage(content=output.new_text), finish_reason,
                               self._logprobs(new_logprobs)))
        return found

    def _call_chunks(self, chunk: Callable[..., BaseModel],
                     output: RequestOutput) -> list[BaseModel]:
        """A finished forced call's last chunks: one delta with every call whole (OpenAI's
        clients assemble a call from any number of deltas, one included), then the finish; or
        the text, when it is not a whole call. Either carries every token's logprobs."""
        calls, finish_reason = self._calls(output)
        logprobs = self._logprobs(output.outputs[0].logprobs)
        if not calls:
            return [chunk(DeltaMessage(content=output.text), finish_reason, logprobs)]
        deltas = [DeltaToolCall(index=i, id=call.id, function=call.function)
                  for i, call in enumerate(calls)]
        return [chunk(DeltaMessage(tool_calls=deltas), logprobs=logprobs),
                chunk(DeltaMessage(), finish_reason)]

    def _calls(self, output: RequestOutput) -> tuple[list[ToolCall] | None, str | None]:
        """A finished output's tool calls (None: it answers text) and its finish_reason."""
        calls = tool_calls(output.text, self.call) if self.call is not None else None
        return calls, "tool_calls" if calls else output.finish_reason

    def _logprobs(self, logprobs: list[TokenLogprobs] | None) -> ChatLogprobs | None:
        if self.num_logprobs is None:
            return None
        return chat_logprobs(logprobs or [], self.num_logprobs, self.texts)

    def _prompt_logprobs(self, output: RequestOutput) -> PromptLogprobs | None:
        if self.num_prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(prompt_scored(output), self.num_prompt_logprobs, self.texts)

    def usage_chunk(self, head: dict, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(**head, choices=[], usage=usage)


Shape = CompletionShape | ChatShape
# --8<-- [end:shapes]
