"""What the core counts between two snapshots of its state (serve/messages.py's EngineStats):
the server's metrics and logs are fed from the snapshots, never from the core's internals."""

from dataclasses import dataclass, field, fields

from serve.core.request import Request
from serve.core.scheduler import SchedulerOutput
from serve.messages import EngineStats, FinishedRequestStats


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
    spec_num_drafts: int = 0  # verify rows: requests that checked drafts in a step
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)  # [i]: i+1-th drafts accepted

    def on_schedule(self, out: SchedulerOutput, prefix_caching: bool) -> None:
        """A step was scheduled, not yet run (an admitted request's num_computed_tokens is still
        what the prefix cache found): count the preempted, and the tokens looked up and found."""
        self.num_preemptions += len(out.preempted)
        for item in out.scheduled:
            if item.admitted and prefix_caching:
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

    def on_verify(self, num_drafts: int, num_accepted: int) -> None:
        """A request checked num_drafts drafts and its first num_accepted matched."""
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += num_drafts
        self.spec_num_accepted_tokens += num_accepted
        per_pos = self.spec_accepted_per_pos
        per_pos.extend([0] * (num_drafts - len(per_pos)))  # (nothing if it is long enough)
        for position in range(num_accepted):
            per_pos[position] += 1

    def on_finish(self, request: Request, now: float) -> None:
        self.finished.append(FinishedRequestStats(
            request.finish_reason, now - request.arrival_time, request.num_prompt_tokens,
            len(request.output_token_ids)))

    def snapshot(self, num_running: int, num_waiting: int, num_pages_used: int,
                 num_pages_total: int, num_cached_pages: int) -> EngineStats:
        counts = {f.name: getattr(self, f.name) for f in fields(self)}  # EngineStats's names
        lists = {name: tuple(value) for name, value in counts.items() if isinstance(value, list)}
        return EngineStats(num_running, num_waiting, num_pages_used, num_pages_total,
                           num_cached_pages, **(counts | lists))
