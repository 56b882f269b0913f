"""What the engine reports for a request after each step (vLLM's RequestOutput shape)."""

from dataclasses import dataclass, field, replace


@dataclass(slots=True)
class TokenLogprobs:
    """One token's log-probability under the model's raw distribution, and the most likely
    tokens' at its position (as many as the request asked for, the most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability)


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence: its whole text and tokens (vLLM's shape); with `logprobs`
    asked, each token's TokenLogprobs and their sum."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None


@dataclass(slots=True)  # one per request per step: quicker to build
class RequestOutput:
    """What one step did for one request: its new tokens and text, and once it has finished, the
    whole output (`outputs`, also `text` and `token_ids`; empty before). Each step's work per
    request is then its new part alone, not everything generated so far.

    `error` is set when the request failed on its own (the engine goes on with the others).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    new_text: str = ""  # text that became final in this step (for streaming)
    new_token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    error_param: str | None = None  # with error: the request's field at fault (a 400)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache, not computed
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)  # with new_token_ids
    # with prompt_logprobs asked: one per prompt token, None for the first (nothing predicts
    # it); set on the first output, once the whole prompt has been computed
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    def merged(self, later: "RequestOutput") -> "RequestOutput":
        """This step's output and a later one's as one (a reader that fell behind catches up in
        one read): the new text and tokens of both, the rest as of the later."""
        return replace(later, new_text=self.new_text + later.new_text,
                       new_token_ids=self.new_token_ids + later.new_token_ids,
                       new_logprobs=self.new_logprobs + later.new_logprobs,
                       prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs)

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else None
