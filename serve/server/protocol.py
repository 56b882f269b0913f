"""The OpenAI API's request and response bodies, as pydantic models.

Requests accept unknown fields and ignore them (as vLLM does), but a known field set to something we
cannot do yet (n > 1, logprobs, tools, ...) is refused by name rather than silently ignored.
Numbers must be finite: JSON has no NaN, yet Python's parser reads `NaN` and `Infinity`.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WrapValidator

from serve.sampling_params import SEED_MAX, SEED_MIN, SamplingParams
from serve.server.fields import Prompt, ReportOneBranch, Stop, StopTokenIds, Text

# Strict: a number must be a JSON number and a flag a JSON boolean ("5" and true are not a
# max_tokens, true is not a temperature), as OpenAI answers; an integer is a valid float.
REQUEST_CONFIG = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


def _is_none(value: Any) -> bool:
    return value is None


# --8<-- [start:requests]
class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG

    include_usage: bool = False  # send one last chunk with `choices: []` and the usage


class GenerationRequest(BaseModel):
    """Fields that /v1/completions and /v1/chat/completions share."""

    model_config = REQUEST_CONFIG

    model: Text | None = None  # OpenAI requires it; we default to the one model we serve
    # None: OpenAI's default, 1.0; below SAMPLING_EPS: greedy
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=1, ge=1)
    stop: Stop = None  # at most MAX_STOP_STRINGS, each at most MAX_STOP_STRING_CHARS long
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(default=None, ge=-1)  # at most the vocabulary: InputProcessor
    min_p: float | None = Field(default=None, ge=0, le=1)
    ignore_eos: bool = False
    stop_token_ids: StopTokenIds | None = None
    # share cached prompt prefixes only with requests that send the same salt (see RadixCache)
    cache_salt: Text | None = Field(default=None, min_length=1)

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, what) for every field set to something we cannot do yet."""
        found = []
        if self.n is not None and self.n > 1:
            found.append(("n", "n > 1"))
        if self.presence_penalty:
            found.append(("presence_penalty", "presence_penalty"))
        if self.frequency_penalty:
            found.append(("frequency_penalty", "frequency_penalty"))
        if self.logit_bias:
            found.append(("logit_bias", "logit_bias"))
        return found

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None) -> SamplingParams:
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
        )


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: continue one prompt, or several (one choice each)."""

    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default; None: fill the context
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool | None = False
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.best_of is not None and self.best_of > 1:
            found.append(("best_of", "best_of > 1"))
        if self.logprobs is not None:
            found.append(("logprobs", "logprobs"))
        if self.echo:
            found.append(("echo", "echo"))
        if self.suffix:
            found.append(("suffix", "suffix"))
        return found

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: a string or a list of token ids each."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens)


class ContentPart(BaseModel):
    model_config = REQUEST_CONFIG

    type: str
    text: Text | None = None


Content = Annotated[
    Text | list[ContentPart] | None,
    WrapValidator(ReportOneBranch(
        "a string or an array of content parts", {"string": Text, "array": list[ContentPart]}
    )),
]


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Content = None
    name: Text | None = None

    def text(self) -> str:
        """The content as one string (text parts are joined by newlines, as vLLM does)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text or "" for part in self.content)


class ResponseFormat(BaseModel):
    model_config = REQUEST_CONFIG

    type: str


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions: answer a conversation rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # deprecated name of the one below
    max_completion_tokens: int | None = Field(default=None, ge=1)  # None: fill the context
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Annotated[
        str | dict[str, Any] | None,
        WrapValidator(ReportOneBranch(
            "a string or an object", {"string": str, "object": dict[str, Any]}
        )),
    ] = None
    functions: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.logprobs:
            found.append(("logprobs", "logprobs"))
        if self.top_logprobs is not None:
            found.append(("top_logprobs", "top_logprobs"))
        if self.tools:
            found.append(("tools", "tools"))
        if self.tool_choice not in (None, "none"):
            found.append(("tool_choice", "tool_choice"))
        if self.functions:
            found.append(("functions", "functions"))
        if self.response_format is not None and self.response_format.type != "text":
            found.append(("response_format", f"response_format {self.response_format.type!r}"))
        for message in self.messages:
            if isinstance(message.content, list):
                for part in message.content:
                    if part.type != "text":
                        found.append(("messages", f"content parts of type {part.type!r}"))
        return found

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
        return self._sampling_params(max_tokens)


# --8<-- [end:requests]


# --8<-- [start:responses]
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens found in the prefix cache, whose KV was not computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_is_none)


class CompletionChunk(Completion):
    """One server-sent event of a streamed completion (OpenAI reuses the Completion shape)."""


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None  # always sent: OpenAI's schema requires the field (null here)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
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


class APIError(Exception):
    """An error the server answers with OpenAI's error body and the given HTTP status."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        type: str = "BadRequestError",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
