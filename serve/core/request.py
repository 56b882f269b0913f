"""A request's state inside the engine, and what the engine reports about it after each step."""

import enum
import time
from dataclasses import dataclass, field

from serve.core.kv.page_allocator import PageTable
from serve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, never run
    RUNNING = "running"  # holds pages; computes tokens every step
    PREEMPTED = "preempted"  # gave its pages back; waits at the front of the queue to recompute
    FINISHED = "finished"


# --8<-- [start:request]
@dataclass
class Request:
    """Everything the engine knows about one request: its tokens, its progress and its pages.

    `num_computed_tokens` counts the tokens whose K and V are in the cache. The tokens still to
    compute are all_token_ids[num_computed_tokens:]: the prompt past its cached prefix when the
    request is admitted, then the one token sampled last step. A preempted request drops back to
    0 and recomputes its prompt and everything it generated (past what is still cached) in one
    prefill.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # the most output tokens it may produce (resolved, never None)
    sampling_seed: int  # its own seed, or one the engine drew for it
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    # Detokenized output: the text already reported, in pieces (joined once, at the end), and
    # the text held back because it could still grow into a stop string. Appending to one
    # string every step would copy the whole text every step.
    sent_text: list[str] = field(default_factory=list)
    unsent_text: str = ""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" or "length" (OpenAI's names), "abort"
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of its tokens, how many its first admission found cached
    page_table: PageTable | None = None  # set while the request holds pages
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
# --8<-- [end:request]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_from(self, start: int) -> list[int]:
        """(prompt + output)[start:], without building the whole list (a decode needs one)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt :]
        return self.prompt_token_ids[start:] + self.output_token_ids

    @property
    def output_text(self) -> str:
        """The whole output text so far (cut at a stop string once one is found)."""
        return "".join(self.sent_text) + self.unsent_text

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def started(self) -> bool:
        """It has produced output (a preempted request has; a waiting one has not)."""
        return bool(self.output_token_ids)


@dataclass
class CompletionOutput:
    """One generated sequence: its whole text and tokens (vLLM's shape)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
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
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache, not computed

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else None
