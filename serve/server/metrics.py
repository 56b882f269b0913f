"""Memory made visible: KV pages in use and requests in flight, for `GET /metrics` and the log.

Nothing is counted as it happens. The numbers are read from the engine when Prometheus scrapes or
a log line is due, so the engine's step loop does no extra work for them.
"""

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from serve.engine.async_engine import AsyncEngine
    from serve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0  # how often the server logs the engine's state while it is busy


# --8<-- [start:engine_state]
@dataclass(frozen=True)
class EngineState:
    """What the pool and the queue hold right now."""

    pages_used: int  # held by a request (pages only promised to one are still free)
    pages_total: int
    num_running: int
    num_waiting: int

    @classmethod
    def read(cls, engine: "LLMEngine") -> "EngineState":
        # Called from the server's event loop while the engine's own thread steps, with no lock:
        # each value is a plain int or a len(), which CPython reads whole, so a reading is never
        # torn, only up to one step stale (and two values may come from neighbouring steps).
        allocator = engine.allocator
        return cls(
            pages_used=allocator.num_pages - allocator.num_free_pages,
            pages_total=allocator.num_pages,
            num_running=engine.num_running,
            num_waiting=len(engine.scheduler.waiting),
        )

    @property
    def usage(self) -> float:
        """The share of the pool in use, 0 to 1 (vLLM's kv_cache_usage)."""
        return self.pages_used / self.pages_total if self.pages_total else 0.0

    def __str__(self) -> str:
        return (f"KV pages {self.pages_used}/{self.pages_total} used ({self.usage:.1%}), "
                f"{self.num_running} running, {self.num_waiting} waiting")
# --8<-- [end:engine_state]


class EngineCollector(Collector):
    """Prometheus gauges read from the engine at scrape time."""

    def __init__(self, engine: "LLMEngine") -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = EngineState.read(self.engine)
        yield GaugeMetricFamily(
            "nanoserve_kv_pages_total", "KV cache pages in the pool.", value=state.pages_total)
        yield GaugeMetricFamily(
            "nanoserve_kv_pages_used", "KV cache pages held by requests.", value=state.pages_used)
        yield GaugeMetricFamily(
            "nanoserve_kv_cache_usage_ratio", "KV cache pages in use, 0 to 1.", value=state.usage)
        yield GaugeMetricFamily(
            "nanoserve_requests_running", "Requests being generated.", value=state.num_running)
        yield GaugeMetricFamily(
            "nanoserve_requests_waiting", "Requests queued for a batch.", value=state.num_waiting)


def metrics_registry(engine: "LLMEngine") -> CollectorRegistry:
    """A registry of the engine's gauges. One per app, not prometheus_client's global REGISTRY,
    so that several apps in one process (the tests) each report their own engine."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    return registry


def log_engine_state(engine: "LLMEngine") -> str:
    """Log one line such as "KV pages 120/4096 used (2.9%), 3 running, 0 waiting"; return it."""
    line = str(EngineState.read(engine))
    logger.info(line)
    return line


async def log_while_busy(engine: "AsyncEngine", interval_s: float = LOG_INTERVAL_S) -> None:
    """Log the engine's state every interval_s while it has unfinished requests, until cancelled.
    An idle server stays quiet."""
    while True:
        await asyncio.sleep(interval_s)
        if engine.has_unfinished_requests():
            log_engine_state(engine.engine)
