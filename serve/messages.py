"""What the server side (serve/engine) and the engine core (serve/core) say to each other.

The core knows token ids, pages and the GPU; the server side knows text: it tokenizes, detokenizes
and applies stop strings. These typed messages are all that passes between the two, today as
Python objects in one process, and encoded with msgspec when the core runs in a process of its
own. A message carries what changed, never a request's whole history, so that the work per step
on either side grows with the batch and not with the tokens generated so far.
"""

from itertools import zip_longest

import msgspec

from serve.sampling_params import SamplingParams


# --8<-- [start:core_messages]
class LogprobsColumns(msgspec.Struct, array_like=True):
    """Log-probabilities of several tokens, column by column: token i is token_ids[i], with
    log-probability logprobs[i]; top_ids[i] and top_logprobs[i] are the most likely tokens at
    its position (k of them, k >= 0)."""

    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


class CoreRequest(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    """A request ready for the core: its prompt as token ids, every limit already resolved."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what is left of the context
    seed: int  # the request's own seed, or one the server side drew for it
    arrival_time: float
    cache_salt: str | None = None  # shares cached prefixes only with requests of this salt


class CoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's part of one step: the tokens it gained, and why it ended, if it did."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or a stop token), "length", "abort"
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held at its first admission
    error: str | None = None  # set when the core ended the request because it failed
    error_param: str | None = None  # with error, when the request is at fault: its field (a 400)
    new_logprobs: LogprobsColumns | None = None  # the new tokens', when the request asked
    # with its first token, when asked: every prompt token's but the first (nothing predicts it)
    prompt_logprobs: LogprobsColumns | None = None
# --8<-- [end:core_messages]


class FinishedRequestStats(msgspec.Struct, frozen=True, array_like=True):
    finish_reason: str
    e2e_latency_s: float  # from arrival to the last token (or the abort)
    num_prompt_tokens: int
    num_generation_tokens: int


# --8<-- [start:engine_stats]
class EngineStats(msgspec.Struct, frozen=True):
    """The queue and the pool right after a step, and what happened since the last snapshot."""

    num_running: int
    num_waiting: int
    num_pages_used: int  # held by requests
    num_pages_total: int
    num_cached_pages: int = 0  # kept by the prefix cache, held by requests or not
    num_preemptions: int = 0  # since the last snapshot, like every field below
    num_prompt_tokens: int = 0  # prompts of requests that produced their first token
    num_generation_tokens: int = 0
    prefix_cache_queries: int = 0  # tokens of admitted requests, looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, the tokens found cached
    time_to_first_token_s: tuple[float, ...] = ()
    inter_token_latency_s: tuple[float, ...] = ()
    finished: tuple[FinishedRequestStats, ...] = ()
    # speculative decoding: rows that checked drafts, their drafts, the drafts accepted, and
    # by position (how often the 1st, 2nd, ... draft of a row was accepted)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()

    @property
    def kv_cache_usage(self) -> float:
        """The share of the pool in use, 0 to 1 (vLLM's kv_cache_usage_perc)."""
        return self.num_pages_used / self.num_pages_total if self.num_pages_total else 0.0

    def then(self, later: "EngineStats") -> "EngineStats":
        """This snapshot followed by a later one, as one: the later state, both periods' counts
        (each count added, each tuple of samples joined, the per-position counts added)."""
        summed = {name: getattr(self, name) + getattr(later, name)
                  for name in self.__struct_fields__ if name not in _STATE_FIELDS}
        summed["spec_accepted_per_pos"] = tuple(  # position by position, the shorter padded
            a + b for a, b in zip_longest(self.spec_accepted_per_pos, later.spec_accepted_per_pos,
                                          fillvalue=0))
        return msgspec.structs.replace(later, **summed)

    def __str__(self) -> str:
        line = (f"KV pages {self.num_pages_used}/{self.num_pages_total} used "
                f"({self.kv_cache_usage:.1%}), {self.num_running} running, "
                f"{self.num_waiting} waiting")
        return line + (f", {self.num_cached_pages} pages in the prefix cache"
                       if self.num_cached_pages else "")
# --8<-- [end:engine_stats]


_STATE_FIELDS = ("num_running", "num_waiting", "num_pages_used", "num_pages_total",
                 "num_cached_pages")  # as of the snapshot; every other field counts a period


# When the core runs in a process of its own (serve/core/core_process.py), these go with them:
# to the core, CoreStart first, then CoreRequest, CoreAbort and CoreCommand; from it, CoreReady
# (or CoreFailed) once, then a CoreStep after every step it runs.


class CoreStart(msgspec.Struct, tag=True, array_like=True):
    config: dict  # EngineConfig's fields
    eos_token_ids: list[int]


class CoreAbort(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    reason: str = "abort"  # "stop" when the server side found a stop string


class CoreCommand(msgspec.Struct, tag=True, array_like=True):
    name: str  # "reset_prefix_cache" or "shutdown"


class CoreReady(msgspec.Struct, tag=True, array_like=True):
    max_model_len: int  # after the KV pool was sized
    vocab_size: int
    num_pages: int


class CoreFailed(msgspec.Struct, tag=True, array_like=True):
    error_type: str  # "ValueError" for a config that cannot be served
    message: str


class CoreStep(msgspec.Struct, tag=True, array_like=True):
    outputs: list[CoreOutput]
    stats: EngineStats


ToCore = CoreStart | CoreRequest | CoreAbort | CoreCommand
FromCore = CoreReady | CoreFailed | CoreStep
