"""The cluster's `GET /metrics`: every replica's metrics, labelled with the replica, and their
totals.

Each replica sends its app's /metrics text to one small Ray actor, the board, every second; the
ingress reads the board and merges. A replica that stops reporting (it died) drops out after a
few seconds, and its restarted successor reports under a new name, from zero: read the
counters with Prometheus's rate() or increase(), which take such resets in their stride.
"""

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPORT_INTERVAL_S = 1.0
STALE_AFTER_S = 5 * REPORT_INTERVAL_S
# samples whose sum over replicas means nothing: creation times, and shares of a replica's pool
NOT_SUMMED = ("_created", "_perc")


class MetricsBoard:
    """The replicas' latest /metrics texts (a Ray actor: many replicas write, the ingress
    reads)."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}  # replica -> (when, text)

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def fresh(self) -> dict[str, str]:
        """replica -> text, of the replicas that reported within STALE_AFTER_S."""
        now = time.monotonic()
        return {replica: text for replica, (when, text) in self.texts.items()
                if now - when < STALE_AFTER_S}


# --8<-- [start:merged]
def merged(texts: dict[str, str]) -> bytes:
    """One Prometheus exposition of every replica's samples, each with a `replica` label, and
    of each sample's sum over the replicas, without one: `nanoserve:prompt_tokens_total` is the
    cluster's, `nanoserve:prompt_tokens_total{replica="..."}` one replica's."""
    families: dict[str, Metric] = {}
    totals: dict[tuple, float] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            into = families.setdefault(family.name, Metric(family.name, family.documentation,
                                                           family.type))
            for sample in family.samples:
                into.add_sample(sample.name, {**sample.labels, "replica": replica},
                                sample.value)
                if not sample.name.endswith(NOT_SUMMED):
                    key = (family.name, sample.name, tuple(sample.labels.items()))
                    totals[key] = totals.get(key, 0.0) + sample.value
    for (family, name, labels), value in totals.items():
        families[family].add_sample(name, dict(labels), value)
    registry = CollectorRegistry()
    registry.register(_Families(families))
    return generate_latest(registry)
# --8<-- [end:merged]


class _Families:
    """A prometheus_client collector of metric families built already."""

    def __init__(self, families: dict[str, Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families.values()
