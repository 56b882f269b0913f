"""What the engine publishes after each step, so that nobody reads its internals from another
thread: the server's metrics and logs are fed from these snapshots."""

from dataclasses import dataclass, field

from serve.core.request import Request
from serve.core.scheduler import SchedulerOutput


@dataclass(frozen=True)
class FinishedRequestStats:
    finish_reason: str
    e2e_latency_s: float  # from arrival to the last token (or the abort)
    num_prompt_tokens: int
    num_generation_tokens: int


# --8<-- [start:engine_stats]
@dataclass(frozen=True)
class EngineStats:
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

    @property
    def kv_cache_usage(self) -> float:
        """The share of the pool in use, 0 to 1 (vLLM's kv_cache_usage_perc)."""
        return self.num_pages_used / self.num_pages_total if self.num_pages_total else 0.0

    def __str__(self) -> str:
        line = (f"KV pages {self.num_pages_used}/{self.num_pages_total} used "
                f"({self.kv_cache_usage:.1%}), {self.num_running} running, "
                f"{self.num_waiting} waiting")
        return line + (f", {self.num_cached_pages} pages in the prefix cache"
                       if self.num_cached_pages else "")
# --8<-- [end:engine_stats]


@dataclass
class StatsCollector:
    """Counts what happens between two snapshots (the engine starts a new one after each)."""

    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    time_to_first_token_s: list[float] = field(default_factory=list)
    inter_token_latency_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)

    def on_schedule(self, out: SchedulerOutput, prefix_caching: bool) -> None:
        """A step was scheduled: count who was preempted and, with a prefix cache, the tokens
        admissions looked up and found."""
        self.num_preemptions += len(out.preempted)
        for item in out.scheduled:
            if item.admitted and prefix_caching:  # (called before the step: num_computed_tokens
                # is still what the lookup found)
                self.prefix_cache_queries += item.request.num_tokens
                self.prefix_cache_hits += item.request.num_computed_tokens

    def on_token(self, request: Request, now: float) -> None:
        """A request produced a token (already appended); its timestamps move on."""
        if request.first_token_time is None:
            request.first_token_time = now
            self.time_to_first_token_s.append(now - request.arrival_time)
            self.num_prompt_tokens += request.num_prompt_tokens
        else:
            self.inter_token_latency_s.append(now - request.last_token_time)
        request.last_token_time = now
        self.num_generation_tokens += 1

    def on_finish(self, request: Request, now: float) -> None:
        self.finished.append(FinishedRequestStats(
            request.finish_reason, now - request.arrival_time, request.num_prompt_tokens,
            len(request.output_token_ids)))

    def snapshot(self, num_running: int, num_waiting: int, num_pages_used: int,
                 num_pages_total: int, num_cached_pages: int) -> EngineStats:
        return EngineStats(
            num_running, num_waiting, num_pages_used, num_pages_total, num_cached_pages,
            num_preemptions=self.num_preemptions, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            time_to_first_token_s=tuple(self.time_to_first_token_s),
            inter_token_latency_s=tuple(self.inter_token_latency_s),
            finished=tuple(self.finished))
