"""
Request metrics with Istio's standard names and labels, so Istio's
dashboards read a txmesh mesh unchanged.

Each proxy owns a L{ProxyMetrics} with its own C{CollectorRegistry} (no
process-global state).  Request series are plain Python numbers found by one
dict lookup per request and rendered by a custom collector at scrape time, so
the hot path takes no locks and builds no label dicts.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from zope.interface import implementer

from txmesh.config.model import NodeConfig
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory
from txmesh.proxy.grpc import is_grpc

# Istio's default buckets for istio_request_duration_milliseconds.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                       300000, 600000, 1800000, 3600000)

REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_app",
    "source_version",
    "destination_service",
    "destination_service_name",
    "request_protocol",
    "response_code",
    "response_flags",
)


class RequestSeries:
    """
    One label set's request count and duration histogram, as plain numbers:
    the reactor is single-threaded, so the hot path needs no locks.

    @ivar buckets: per-bucket (not cumulative) counts; the last is C{+Inf}.
    """

    __slots__ = ("labels", "count", "duration_sum", "buckets")

    def __init__(self, labels: tuple[str, ...]):
        self.labels = labels
        self.count = 0
        self.duration_sum = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS_MS) + 1)

    def observe(self, duration_ms: float, _bisect: Any = bisect_left, _bounds: tuple = DURATION_BUCKETS_MS) -> None:
        """
        Count one request that took C{duration_ms}.
        """
        self.count += 1
        self.duration_sum += duration_ms
        self.buckets[_bisect(_bounds, duration_ms)] += 1


class RequestMetricsCollector:
    """
    Exposes every L{RequestSeries} as C{istio_requests_total} and
    C{istio_request_duration_milliseconds} through prometheus-client.
    """

    def __init__(self) -> None:
        self.series: dict[tuple, RequestSeries] = {}

    def collect(self) -> Any:
        requests = CounterMetricFamily("istio_requests", "Requests handled by the proxy.", labels=REQUEST_LABELS)
        durations = HistogramMetricFamily(
            "istio_request_duration_milliseconds", "Request duration in milliseconds.", labels=REQUEST_LABELS)
        bounds = [str(b) for b in DURATION_BUCKETS_MS] + ["+Inf"]
        for series in list(self.series.values()):
            requests.add_metric(series.labels, series.count)
            cumulative = list(accumulate(series.buckets))
            durations.add_metric(series.labels, list(zip(bounds, cumulative, strict=True)), series.duration_sum)
        yield requests
        yield durations


class ProxyMetrics:
    """
    One proxy's metrics.

    @ivar registry: the C{CollectorRegistry} served at C{/stats/prometheus}.
    """

    def __init__(self, node: NodeConfig, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._node = node
        r = self.registry
        self._requests = RequestMetricsCollector()
        r.register(self._requests)
        self.config_reloads = Counter(
            "txmesh_config_reloads", "Config reloads by result.", ("result",), registry=r)
        self.downstream_connections = Gauge(
            "txmesh_downstream_connections_active", "Open downstream connections by listener.",
            ("listener",), registry=r)

    def request_series(self, cluster: str, protocol: str, code: int, flags: str) -> RequestSeries:
        """
        @return: the series for one label set, created on first use.
        """
        key = (cluster, protocol, code, flags)
        series = self._requests.series.get(key)
        if series is None:
            n = self._node
            labels = ("source", n.workload, n.namespace, n.app, n.version,
                      cluster, cluster, protocol, str(code), flags or "-")
            series = self._requests.series[key] = RequestSeries(labels)
        return series

    def exposition(self) -> tuple[str, bytes]:
        """
        @return: content type and body of the Prometheus text exposition.
        """
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)


class MetricsFilter(HTTPFilter):
    """
    Counts each request and observes its duration when the stream ends.
    """

    __slots__ = ("_stream", "_metrics")

    def __init__(self, stream: Any, metrics: ProxyMetrics):
        self._stream = stream
        self._metrics = metrics

    def stream_complete(self) -> None:
        stream = self._stream
        head = stream.response_head
        code = head.status if head is not None else 0
        cluster = stream.upstream_cluster
        if cluster is None:
            route = stream.route
            cluster = (route.cluster or "") if route is not None else ""
        request = stream.request_head
        protocol = "grpc" if request is not None and is_grpc(request) else "http"
        flags = stream.response_flags
        self._metrics.request_series(cluster, protocol, code, ",".join(flags) if flags else "").observe(
            (stream.clock.seconds() - stream.start_time) * 1000.0)


@implementer(IHTTPFilterFactory)
class MetricsFactory:
    """
    The C{metrics} filter: Istio-named request metrics.
    """

    name = "metrics"

    def parse_config(self, raw: Any) -> None:
        if raw:
            from txmesh.config.errors import FilterConfigError

            raise FilterConfigError(next(iter(raw)), "the metrics filter takes no config")
        return None

    def create_filter(self, config: Any, stream: Any) -> HTTPFilter:
        metrics = stream.proxy.metrics if stream.proxy is not None else None
        if metrics is None:
            return HTTPFilter()
        return MetricsFilter(stream, metrics)
