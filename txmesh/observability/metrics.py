"""
Request metrics with Istio's standard names and labels, so Istio's
dashboards read a txmesh mesh unchanged.

Each proxy owns a L{ProxyMetrics} with its own C{CollectorRegistry} (no
process-global state).  Label children are bound once per distinct label
tuple and cached, so the hot path is a dict lookup and two increments.
"""

from __future__ import annotations

from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from zope.interface import implementer

from txmesh.config.model import NodeConfig
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory

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


class ProxyMetrics:
    """
    One proxy's metrics.

    @ivar registry: the C{CollectorRegistry} served at C{/stats/prometheus}.
    """

    def __init__(self, node: NodeConfig, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._node = node
        r = self.registry
        self.requests_total = Counter(
            "istio_requests_total", "Requests handled by the proxy.", REQUEST_LABELS, registry=r)
        self.request_duration = Histogram(
            "istio_request_duration_milliseconds", "Request duration in milliseconds.",
            REQUEST_LABELS, buckets=DURATION_BUCKETS_MS, registry=r)
        self.config_reloads = Counter(
            "txmesh_config_reloads", "Config reloads by result.", ("result",), registry=r)
        self.downstream_connections = Gauge(
            "txmesh_downstream_connections_active", "Open downstream connections by listener.",
            ("listener",), registry=r)
        self._children: dict[tuple, tuple[Any, Any]] = {}

    def request_children(self, cluster: str, protocol: str, code: int, flags: str) -> tuple[Any, Any]:
        """
        @return: the bound (counter, histogram) children for one label set.
        """
        key = (cluster, protocol, code, flags)
        children = self._children.get(key)
        if children is None:
            n = self._node
            labels = ("source", n.workload, n.namespace, n.app, n.version,
                      cluster, cluster, protocol, str(code), flags or "-")
            children = (self.requests_total.labels(*labels), self.request_duration.labels(*labels))
            self._children[key] = children
        return children

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
        route = stream.route
        cluster = (route.cluster or "") if route is not None else ""
        request = stream.request_head
        protocol = "http" if request is None or request.version != b"2" else "grpc" \
            if (request.headers.get(b"content-type") or b"").startswith(b"application/grpc") else "http"
        counter, histogram = self._metrics.request_children(
            cluster, protocol, code, ",".join(stream.response_flags))
        counter.inc()
        histogram.observe((stream.clock.seconds() - stream.start_time) * 1000.0)


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
