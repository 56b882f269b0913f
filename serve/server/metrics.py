"""Prometheus metrics for `GET /metrics`, and the engine-state log line.

The engine publishes an EngineStats snapshot after every step (AsyncEngine calls `record` on its
loop thread); nothing here reads the engine itself. Names follow vLLM's under our prefix, so
dashboards built for vLLM need only the prefix changed.
"""

import asyncio
import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serve.messages import EngineStats

if TYPE_CHECKING:
    from serve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0  # how often the server logs the engine's state while it is busy
PREFIX = "nanoserve:"
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


# --8<-- [start:metrics]
class ServerMetrics:
    """Every metric of one app, in a registry of its own (not prometheus_client's global one,
    so that several apps in one process, as in the tests, each report their own engine)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{PREFIX}{name}", doc, buckets=buckets, registry=registry)

        self.running = gauge(f"{PREFIX}num_requests_running", "Requests in the running batch.")
        self.waiting = gauge(f"{PREFIX}num_requests_waiting",
                             "Requests queued, preempted ones included.")
        self.kv_usage = gauge(f"{PREFIX}kv_cache_usage_perc", "KV cache pages in use, 0 to 1.")
        self.pages_total = gauge("nanoserve_kv_pages_total", "KV cache pages in the pool.")
        self.pages_used = gauge("nanoserve_kv_pages_used", "KV cache pages held by requests.")
        self.cached_pages = gauge("nanoserve_prefix_cache_pages",
                                  "KV cache pages the prefix cache keeps, held or not.")
        self.prefix_queries = counter("prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Requests preempted (they recompute later).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = counter("request_success", "Requests finished.",
                                       ("finished_reason",))
        self.ttft = histogram("time_to_first_token_seconds", "From arrival to the first token.",
                              TTFT_BUCKETS_S)
        self.itl = histogram("inter_token_latency_seconds", "Between two tokens of one request.",
                             ITL_BUCKETS_S)
        # speculative decoding (vLLM's names): verify rows, their drafts, the drafts accepted
        self.spec_drafts = counter("spec_decode_num_drafts",
                                   "Verify rows: a request checking drafts in a step.")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens checked.")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by their position in the row (0: the first draft).",
            ("position",))
        self.e2e = histogram("e2e_request_latency_seconds", "From arrival to the last token.",
                             E2E_BUCKETS_S)
        # verify rows, their drafts and the drafts accepted since the last log line
        self.drafts_since_log = [0, 0, 0]

    def take_acceptance(self) -> str | None:
        """The log line's speculative part since the last call (vLLM's mean acceptance
        length: tokens per verify row, 1 + its accepted drafts), or None without drafts."""
        rows, drafts, accepted = self.drafts_since_log
        self.drafts_since_log = [0, 0, 0]
        if not rows:
            return None
        return (f"mean acceptance length {1 + accepted / rows:.2f}, {accepted}/{drafts} drafts "
                f"accepted ({accepted / drafts:.1%})")

    def record(self, stats: EngineStats) -> None:
        """Take in one snapshot (called on the engine's loop thread; prometheus_client's
        metrics are thread-safe)."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.pages_total.set(stats.num_pages_total)
        self.pages_used.set(stats.num_pages_used)
        self.cached_pages.set(stats.num_cached_pages)
        self.prefix_queries.inc(stats.prefix_cache_queries)
        self.prefix_hits.inc(stats.prefix_cache_hits)
        self.preemptions.inc(stats.num_preemptions)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        for seconds in stats.time_to_first_token_s:
            self.ttft.observe(seconds)
        for seconds in stats.inter_token_latency_s:
            self.itl.observe(seconds)
        if stats.spec_num_drafts:
            self.drafts_since_log[0] += stats.spec_num_drafts
            self.drafts_since_log[1] += stats.spec_num_draft_tokens
            self.drafts_since_log[2] += stats.spec_num_accepted_tokens
            self.spec_drafts.inc(stats.spec_num_drafts)
            self.spec_draft_tokens.inc(stats.spec_num_draft_tokens)
            self.spec_accepted.inc(stats.spec_num_accepted_tokens)
            for position, count in enumerate(stats.spec_accepted_per_pos):
                self.spec_accepted_per_pos.labels(position=str(position)).inc(count)
        for finished in stats.finished:
            self.request_success.labels(finished_reason=finished.finish_reason).inc()
            self.e2e.observe(finished.e2e_latency_s)
# --8<-- [end:metrics]


def log_engine_state(stats: EngineStats, speculation: str | None = None) -> str:
    """Log one line such as "KV pages 120/4096 used (2.9%), 3 running, 0 waiting" (with
    speculative decoding, its acceptance since the last line after it); return it."""
    line = str(stats) + (f", {speculation}" if speculation else "")
    logger.info(line)
    return line


async def log_while_busy(engine: "AsyncEngine", metrics: ServerMetrics | None = None,
                         interval_s: float = LOG_INTERVAL_S) -> None:
    """Log the engine's latest snapshot every interval_s while it has requests, until cancelled.
    An idle server stays quiet."""
    while True:
        await asyncio.sleep(interval_s)
        stats = engine.latest_stats
        if stats is not None and (stats.num_running or stats.num_waiting):
            log_engine_state(stats, metrics.take_acceptance() if metrics else None)
