"""The OpenAI API's request and response bodies, as pydantic models.

Requests accept unknown fields and ignore them (as vLLM does), but a known field set to something we
cannot do yet (suffix, functions, ...) is refused by name rather than silently ignored.
Numbers must be finite: JSON has no NaN, yet Python's parser reads `NaN` and `Infinity`.
The fields that constrain the output (response_format, structured_outputs, tools) are
serve/server/structured.py's.
"""

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WrapValidator

from serve.engine.errors import InvalidRequestError
from serve.engine.input_processor import prompt_list
from serve.sampling_params import MAX_LOGPROBS, MAX_N, SEED_MAX, SEED_MIN, SamplingParams
from serve.server.fields import (
    MAX_PROMPTS,
    LogitBias,
    Prompt,
    ReportOneBranch,
    RequestModel,
    Stop,
    StopTokenIds,
    Text,
)
from serve.server.structured import (
    Constraint,
    ResponseFormat,
    StructuredOutputs,
    Tool,
    ToolChoice,
    response_format_constraint,
    structured_outputs_constraint,
    tools_constraint,
)


def _is_none(value: Any) -> bool:
    return value is None


# --8<-- [start:requests]
class StreamOptions(RequestModel):
    include_usage: bool = False  # send one last chunk with `choices: []` and the usage


class GenerationRequest(RequestModel):
    """Fields that /v1/completions and /v1/chat/completions share."""

    model: Text | None = None  # OpenAI requires it; we default to the one model we serve
    # None: OpenAI's default, 1.0; below SAMPLING_EPS: greedy
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=1, ge=1, le=MAX_N)  # choices per prompt
    stop: Stop = None  # at most MAX_STOP_STRINGS, each at most MAX_STOP_STRING_CHARS long
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: LogitBias | None = None  # {"token id": bias}; ids in the vocabulary: the engine
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(default=None, ge=-1)  # at most the vocabulary: InputProcessor
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)  # 1: off
    # the prompt tokens' log-probabilities, and this many most likely tokens' at each position
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    ignore_eos: bool = False
    stop_token_ids: StopTokenIds | None = None
    # share cached prompt prefixes only with requests that send the same salt (see RadixCache)
    cache_salt: Text | None = Field(default=None, min_length=1)
    # what the output must match: OpenAI's field, or vLLM's extra (not both)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, what) for every field set to something we cannot do yet."""
        given = self.structured_outputs  # vLLM's other options (whitespace_pattern, ...)
        extra = given.model_extra if given is not None else None
        return [("structured_outputs", f"structured_outputs.{name}")
                for name, value in (extra or {}).items() if value not in (None, False)]

    def conflicts(self) -> list[tuple[str, str]]:
        """(field, why) for every field whose value the others rule out."""
        return []

    @property
    def num_choices(self) -> int:
        """Choices answered per prompt."""
        return self.n or 1

    @property
    def num_sequences(self) -> int:
        """Sequences generated per prompt (best_of may generate more than it answers)."""
        return self.num_choices

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @functools.cached_property
    def constraint(self) -> Constraint | None:
        """What the output must match, from the one field that says it; None: free text.
        Raises InvalidRequestError naming the field."""
        found = [constraint for constraint in self._constraints() if constraint is not None]
        if len(found) > 1:
            raise InvalidRequestError(f"{found[0].param} and {found[1].param} both constrain "
                                      "the output: send one of them", found[1].param)
        return found[0] if found else None

    def _constraints(self) -> list[Constraint | None]:
        return [response_format_constraint(self.response_format),
                structured_outputs_constraint(self.structured_outputs)]

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None) -> SamplingParams:
        """Translate to the engine's SamplingParams (raises ValueError naming a bad field)."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            structured_outputs=self.constraint.params if self.constraint is not None else None,
            n=self.num_choices,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=self.logit_bias or None,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: continue one prompt, or several (n choices each)."""

    prompt: Prompt
    # OpenAI's default; None: fill the context; 0: no tokens, only the prompt (with echo, its
    # text and log-probabilities: how evaluation harnesses score a text)
    max_tokens: int | None = Field(default=16, ge=0)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)  # answer the n likeliest of these
    # each token's log-probability and this many most likely tokens' (OpenAI's legacy shape)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False  # the prompt comes first in the text (and the logprobs)
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.suffix:
            found.append(("suffix", "suffix"))
        return found

    def conflicts(self) -> list[tuple[str, str]]:
        found = super().conflicts()
        if self.best_of is not None and self.best_of < self.num_choices:
            found.append(("best_of", f"best_of must be >= n, got best_of {self.best_of} and "
                                     f"n {self.num_choices}"))
        elif self.stream and self.num_sequences > self.num_choices:
            # (as OpenAI: the likeliest sequences are known only once every one has finished)
            found.append(("best_of", "best_of > n cannot be streamed: send stream false"))
        num_sequences = len(self.prompts()) * self.num_sequences
        if num_sequences > MAX_PROMPTS:  # each one is an engine request, as a prompt is
            field = "best_of" if self.best_of else "n"
            found.append((field, f"prompts x {field} must be at most {MAX_PROMPTS} sequences "
                                 f"per request, got {num_sequences}"))
        return found

    @property
    def num_sequences(self) -> int:
        return self.best_of or self.num_choices

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: a string or a list of token ids each."""
        return prompt_list(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        logprobs = self.logprobs
        if logprobs is None and self.num_sequences > self.num_choices:
            logprobs = 0  # best_of ranks sequences by their log-probability
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:  # the echoed prompt's logprobs come first
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        return self._sampling_params(self.max_tokens, logprobs, prompt_logprobs)


class ContentPart(RequestModel):
    type: str
    text: Text | None = None


Content = Annotated[Text | list[ContentPart] | None, WrapValidator(ReportOneBranch(
    "a string or an array of content parts", {"string": Text, "array": list[ContentPart]}))]


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Content = None
    name: Text | None = None

    def text(self) -> str:
        """The content as one string (text parts are joined by newlines, as vLLM does)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text or "" for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions: answer a conversation rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # deprecated name of the one below
    max_completion_tokens: int | None = Field(default=None, ge=1)  # None: fill the context
    logprobs: bool | None = False  # each output token's log-probability
    # and this many most likely tokens' at its position (needs logprobs true)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None  # functions the model may call
    # None: OpenAI's default, "auto" with tools; "none", "auto" (both: the answer is text, see
    # tools_constraint), "required" (one call or more) or a named function (a call of it)
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None  # False: "required" makes exactly one call
    functions: list[dict[str, Any]] | None = None  # the deprecated tools

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.functions:
            found.append(("functions", "functions (send tools instead)"))
        parts = [part for message in self.messages if isinstance(message.content, list)
                 for part in message.content]
        return found + [("messages", f"content parts of type {part.type!r}")
                        for part in parts if part.type != "text"]

    def conflicts(self) -> list[tuple[str, str]]:
        found = super().conflicts()
        if self.top_logprobs is not None and not self.logprobs:
            found.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        return found

    def _constraints(self) -> list[Constraint | None]:
        tools = tools_constraint(self.tools, self.tool_choice, self.parallel_tool_calls)
        return [*super()._constraints(), tools]

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template reads them (OpenAI's JSON), under any tool_choice:
        a model that knows its tools may still mention them in text (vLLM passes them too)."""
        if not self.tools:
            return None
        return [tool.model_dump(mode="json", by_alias=True, exclude_none=True)
                for tool in self.tools]

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the plain dicts a chat template expects."""
        messages = []
        for message in self.messages:
            entry = {"role": message.role, "content": message.text()}
            if message.name is not None:
                entry["name"] = message.name
            messages.append(entry)
        return messages

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs)
# --8<-- [end:requests]


# --8<-- [start:responses]
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens found in the prefix cache, whose KV was not computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape, one entry per token in each list: its text, its log-probability,
    the most likely tokens' ({text: logprob}, the token's own included), and where its text
    starts in the choice's text. An echoed prompt's first token has no log-probability (nothing
    predicts it): null in token_logprobs and in top_logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's shape of one token's log-probability in `prompt_logprobs`."""

    logprob: float
    rank: int | None  # 1: the most likely token; None: not among the most likely asked for
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, {"token id": PromptLogprob} for the token and the
# most likely tokens at its position; null for the first token
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none)  # vLLM's


class _Response(BaseModel):
    """The fields every response body starts with."""

    id: str
    object: str
    created: int
    model: str


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_is_none)


class CompletionChunk(Completion):
    """One server-sent event of a streamed completion (OpenAI reuses the Completion shape)."""


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str  # "call_" and random hex: the client quotes it in the tool message that answers it
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ToolCall):
    index: int  # which call of the message: a client assembles each call's deltas by it


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is tool calls
    refusal: None = None  # always sent: OpenAI's schema requires the field (null here)
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=_is_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's text as UTF-8


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at its position, the likeliest first


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None  # always sent, as OpenAI does (null here)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none)  # vLLM's


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_is_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoserve"
    max_model_len: int | None = None  # a vLLM extra


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
# --8<-- [end:responses]

