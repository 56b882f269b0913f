"""A request's state inside the engine core: its tokens, its progress and its pages."""

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
    cache_salt: str | None = None  # shares cached prefixes only with requests of this salt
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" or "length" (OpenAI's names), "abort"
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of its tokens, how many its first admission found cached
    page_table: PageTable | None = None  # set while the request holds pages
    # its last output token was sampled into its slot (its block table row) on the device, where
    # its next step reads it; until its first sample after (re)admission, the host sends tokens
    token_in_slot: bool = False
    # speculative decoding: the tokens proposed to follow its last one, checked by its next
    # step, and the proposer's own state for it (NgramIndex)
    draft_token_ids: list[int] = field(default_factory=list)
    draft_state: object | None = None
    grammar: object | None = None  # structured output: its GrammarState (serve/structured)
    # prompt log-probabilities computed so far (LogprobsColumns, one per chunk), reported with
    # its first token; until then it skips the prefix cache (a cached prefix has no logits)
    prompt_logprobs: list | None = None
    num_prompt_logprobs: int = 0  # prompt positions whose log-probabilities a step computes
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
        return self.token_ids_between(start, self.num_tokens)

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """(prompt + output)[start:end], copying only those tokens."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """It asked for prompt log-probabilities and has not had them yet."""
        return self.params.prompt_logprobs is not None and not self.output_token_ids
