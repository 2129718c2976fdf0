"""
The pilot's own metrics, in Prometheus form, and the tiny site that serves
them at C{GET /metrics} (C{twistd txmesh-pilot --metrics}, by default
C{tcp:15014:interface=127.0.0.1} like istiod's monitoring port).

Each pilot owns a L{PilotMetrics} with its own C{CollectorRegistry}: no
process-global state, so several pilots (tests, embedding) never share
counts.  See C{docs/observability.md} for the table of names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

# From a config change taken to the push written: milliseconds for one proxy,
# seconds for a thousand (docs/benchmarks.md).
PUSH_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

RegistryStatuses = Callable[[], Iterable[Mapping[str, Any]]]


class RegistryErrorsCollector:
    """
    C{txmesh_pilot_registry_errors{registry}}: 1 for each registry whose
    status holds an error, 0 for the others, read at scrape time from the
    registries' own status (nothing to keep in step).
    """

    def __init__(self, statuses: RegistryStatuses):
        """
        @param statuses: returns each registry's status dict (at least
            C{name} and C{error}, see L{txmesh.pilot.registry.base.IRegistry.status}).
        """
        self._statuses = statuses

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """
        @return: the gauge family, one sample per registry.
        """
        family = GaugeMetricFamily(
            "txmesh_pilot_registry_errors", "1 when the service registry's status holds an error.",
            labels=("registry",))
        for status in self._statuses():
            family.add_metric((str(status.get("name", "?")),), 1.0 if status.get("error") else 0.0)
        yield family


class PilotMetrics:
    """
    One pilot's metrics.

    @ivar registry: the C{CollectorRegistry} served at C{/metrics}.
    @ivar proxies_connected: gauge of admitted channels.
    @ivar pushes: counter of pushes written, by resource C{type}.
    @ivar push_duration: histogram of seconds from a config change taken
        to each push it caused written.
    @ivar acks: counter of ACKs received.
    @ivar nacks: counter of NACKs received.
    @ivar config_rejected: counter of refused config changes.
    @ivar certificates_signed: counter of workload certificates signed.
    @ivar certificates_denied: counter of CSRs refused.
    @ivar proxies_refused: counter of channels refused at hello.
    @ivar config_generation: gauge of the config generation served.
    """

    def __init__(self, registry_statuses: RegistryStatuses = tuple, registry: CollectorRegistry | None = None):
        """
        @param registry_statuses: returns each service registry's status,
            for C{txmesh_pilot_registry_errors}; none by default.
        @param registry: the collector registry to register in; a new one
            by default.
        """
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.proxies_connected = Gauge(
            "txmesh_pilot_proxies_connected", "Proxies connected to this pilot (admitted channels).", registry=r)
        self.pushes = Counter(
            "txmesh_pilot_pushes", "Pushes written, by resource type pushed.", ("type",), registry=r)
        self.push_duration = Histogram(
            "txmesh_pilot_push_duration_seconds",
            "Seconds from a config change taken to each push it caused written.",
            buckets=PUSH_DURATION_BUCKETS, registry=r)
        self.acks = Counter("txmesh_pilot_acks", "ACKs received from proxies.", registry=r)
        self.nacks = Counter("txmesh_pilot_nacks", "NACKs received from proxies (config rejected).", registry=r)
        self.config_rejected = Counter(
            "txmesh_pilot_config_rejected", "Config changes refused as invalid (the last good one kept).",
            registry=r)
        self.certificates_signed = Counter(
            "txmesh_pilot_certificates_signed", "Workload certificates signed.", registry=r)
        self.certificates_denied = Counter(
            "txmesh_pilot_certificates_denied", "Certificate requests refused.", registry=r)
        self.proxies_refused = Counter(
            "txmesh_pilot_proxies_refused", "Proxies refused on the channel (credential, hello, node).",
            registry=r)
        self.config_generation = Gauge(
            "txmesh_pilot_config_generation", "Generation of the config served (taken changes).", registry=r)
        r.register(RegistryErrorsCollector(registry_statuses))

    def pushed(self, types: Iterable[str]) -> None:
        """
        Count one push carrying the resource C{types}.
        """
        for resource_type in types:
            self.pushes.labels(resource_type).inc()

    def exposition(self) -> tuple[str, bytes]:
        """
        @return: content type and body of the Prometheus text exposition.
        """
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)


class MetricsResource(Resource):
    """
    C{GET /metrics}: the Prometheus text exposition; every other path is 404.
    """

    isLeaf = True

    def __init__(self, metrics: PilotMetrics):
        """
        @param metrics: what to serve.
        """
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        if request.postpath not in ([b"metrics"], [b"metrics", b""]):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"txmesh-pilot metrics: GET /metrics\n"
        content_type, body = self._metrics.exposition()
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body


class MetricsSite(Site):
    """
    The site serving L{MetricsResource}; scrapes are not logged.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


def metrics_site(metrics: PilotMetrics) -> Site:
    """
    @param metrics: the pilot's metrics.
    @return: a site serving them at C{GET /metrics}.
    """
    return MetricsSite(MetricsResource(metrics))
