"""
One Prometheus page for the worker processes of C{--concurrency N}: the
parent scrapes each worker's exposition (over its pipe) and merges them
here (pure: text in, families out).

Why not prometheus-client's multiprocess mode: L{ProxyMetrics
<txmesh.observability.metrics.ProxyMetrics>} keeps its Istio families as
plain numbers turned into families by custom collectors at scrape time,
which the multiprocess mode (values in shared mmap files, written by
C{Counter}/C{Histogram} objects) cannot see.  Merging the workers'
expositions keeps the hot path as it is and the page identical in shape to
a single process's.

Counters, histograms and most gauges (open connections, memory) are summed
over the workers; a few gauges describe state every worker shares (the
config version, the overload state) and take the largest value; the
C{_created} sample of a counter takes the earliest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

MAX_FAMILIES = frozenset({
    # Same in every worker: they all apply the parent's configs.
    "txmesh_config_version",
    "txmesh_config_reloads",
    "txmesh_pilot_connected",
    "txmesh_pilot_info",
    # The worst worker is what an operator wants to see.
    "txmesh_overload_state",
    "txmesh_overload_event_loop_lag_seconds",
})
"""
Families merged by their largest value rather than their sum.
"""


def merge_expositions(texts: Iterable[str]) -> list[Metric]:
    """
    @param texts: Prometheus text expositions, one per process.
    @return: the merged families, in the order first seen.
    @raise ValueError: a text does not parse.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            table = values[family.name]
            largest = family.name in MAX_FAMILIES
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = table.get(key)
                if old is None:
                    table[key] = sample.value
                elif sample.name.endswith("_created"):
                    table[key] = min(old, sample.value)
                elif largest:
                    table[key] = max(old, sample.value)
                else:
                    table[key] = old + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class _Fixed:
    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterable[Any]:
        return self._families


def render(families: list[Metric]) -> bytes:
    """
    @return: C{families} as a Prometheus text exposition.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)
