"""
Istio's standard metrics, and txmesh's own, for one proxy.

Istio's names and labels (C{istio_requests_total},
C{istio_request_duration_milliseconds}, C{istio_request_bytes},
C{istio_response_bytes}, C{istio_tcp_*}) let Istio's dashboards read a
txmesh mesh unchanged.  Each proxy owns a L{ProxyMetrics} with its own
C{CollectorRegistry} (no process-global state).

The hot path takes no locks and builds no label dicts: a finished request
makes one small tuple of what varies (cluster, code, flags, the peer's
metadata header as received...), finds its series with one dict lookup and
adds to plain Python numbers (the reactor is single-threaded).  Only a key
seen for the first time computes its labels (L{request_labels}, pure).
Custom collectors turn the numbers into Prometheus families at scrape time.

Cardinality is bounded: no label carries a path or an id, and each family
holds at most C{max_series} label sets; past that, new label sets are
counted in one I{overflow} series per reporter (every label but
C{reporter} is C{"overflow"}) and in C{txmesh_metrics_series_dropped_total}.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable
from functools import partial
from itertools import accumulate
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString
from zope.interface import implementer

from txmesh.config.model import NodeConfig
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory
from txmesh.observability.peer_metadata import NO_PEER, PEER_HEADER, UNKNOWN, PeerMetadata, clean, decode, encode
from txmesh.proxy.grpc import is_grpc
from txmesh.proxy.mesh_tls import downstream_identity
from txmesh.proxy.overload import LAG_BUCKETS

# Istio's default buckets for istio_request_duration_milliseconds.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                       300000, 600000, 1800000, 3600000)

# Istio's buckets for istio_request_bytes and istio_response_bytes.
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)

SOURCE = "source"
DESTINATION = "destination"

OVERFLOW = "overflow"
"""
The value of every label but C{reporter} on a family's overflow series.
"""

DEFAULT_MAX_SERIES = 10_000

REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)

# As Istio: the TCP families have no response code or gRPC status.
TCP_LABELS = tuple(name for name in REQUEST_LABELS if name not in ("response_code", "grpc_response_status"))
_TCP_INDEXES = tuple(REQUEST_LABELS.index(name) for name in TCP_LABELS)
_TCP_POLICY = TCP_LABELS.index("connection_security_policy")

# The "le" label values, rendered as Prometheus's Go clients do.
_DURATION_LE = [floatToGoString(b) for b in DURATION_BUCKETS_MS] + ["+Inf"]
_BYTES_LE = [floatToGoString(b) for b in BYTES_BUCKETS] + ["+Inf"]
_LAG_LE = [floatToGoString(b) for b in LAG_BUCKETS] + ["+Inf"]

_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?\Z")


# Labels (pure)

@attrs.frozen
class DestinationService:
    """
    The three C{destination_service*} labels.
    """

    host: str
    name: str
    namespace: str


def service_of_host(host: str, default_namespace: str = UNKNOWN) -> DestinationService:
    """
    @param host: a service host, e.g. C{reviews.default.svc.cluster.local}
        or C{reviews}.
    @param default_namespace: the namespace of a short (one-label) name.
    @return: the service: name and namespace from a C{<name>.<ns>.svc...}
        host; a short name is C{default_namespace}'s; any other host (an
        external one) is its own name, in an unknown namespace.
    """
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc" and parts[0] and parts[1]:
        return DestinationService(host, parts[0], parts[1])
    if len(parts) == 1:
        return DestinationService(host, host, default_namespace)
    return DestinationService(host, host, UNKNOWN)


def service_of_cluster(cluster: str, default_namespace: str = UNKNOWN) -> DestinationService:
    """
    @param cluster: a cluster name: Istio's C{outbound|<port>|<subset>|<host>}
        form gives C{<host>}; an C{inbound|<port>|<subset>|<host>} name
        gives C{<host>} only when it is a service host
        (C{<name>.<ns>.svc...}, as Istio's older inbound names were), since
        txmesh's own inbound names end with the I{workload}
        (C{inbound|9080||reviews-v1}), which is no service; any other name
        is the service's host and name.
    @return: the destination service; C{"unknown"} for an empty name or an
        inbound name without a service host.
    """
    if cluster.startswith("outbound|"):
        parts = cluster.split("|")
        if len(parts) == 4 and parts[3]:
            return service_of_host(parts[3], default_namespace)
    elif cluster.startswith("inbound|"):
        parts = cluster.split("|")
        if len(parts) == 4:
            service = service_of_host(parts[3].lower())
            if service.namespace != UNKNOWN and _HOST.match(service.host):
                return service
        return DestinationService(UNKNOWN, UNKNOWN, UNKNOWN)
    if not cluster:
        return DestinationService(UNKNOWN, UNKNOWN, UNKNOWN)
    return service_of_host(cluster, default_namespace)


def namespace_of_principal(principal: str | None) -> str:
    """
    @param principal: a SPIFFE ID, C{spiffe://<trust domain>/ns/<namespace>/sa/<account>}.
    @return: its namespace, or C{"unknown"} if it is not of that form (or
        not a valid label value).
    """
    if not principal or not principal.startswith("spiffe://"):
        return UNKNOWN
    parts = principal.split("/")
    # ["spiffe:", "", <trust domain>, "ns", <namespace>, "sa", <account>]
    if len(parts) == 7 and parts[3] == "ns" and parts[5] == "sa" and parts[4]:
        return clean(parts[4])
    return UNKNOWN


def authority_host(authority: bytes | str | None) -> str | None:
    """
    @return: the host of a C{Host}/C{:authority} value, lower-cased and
        without its port, or C{None} if it is not a plausible DNS name or
        IPv4 address.
    """
    if not authority:
        return None
    if isinstance(authority, bytes):
        try:
            authority = authority.decode("ascii")
        except UnicodeDecodeError:
            return None
    host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    host = host.lower()
    return host if _HOST.match(host) else None


def request_labels(
    *,
    reporter: str,
    node: NodeConfig,
    cluster: str,
    protocol: str,
    code: int,
    grpc_status: str,
    flags: str,
    peer: PeerMetadata = NO_PEER,
    own_principal: str | None = None,
    downstream_principal: str | None = None,
    upstream_mtls: bool = False,
    authority: bytes | str | None = None,
) -> tuple[str, ...]:
    """
    The values of L{REQUEST_LABELS} for one request, as Istio computes them.

    The I{source} reporter (the client's sidecar) knows itself and the
    service it routed to (its cluster); the destination workload comes from
    the peer metadata of the response.  The I{destination} reporter (the
    server's sidecar) knows itself; the source workload comes from the peer
    metadata of the request and the source principal from mutual TLS.
    Without peer metadata (a client that sends none, or any TCP
    connection), the source namespace is the verified principal's, as
    Istio falls back to it.

    @param reporter: L{SOURCE} or L{DESTINATION}.
    @param node: this proxy's node.
    @param cluster: the cluster the request was routed to (C{""} if none).
    @param protocol: C{"http"}, C{"grpc"} or C{"tcp"}.
    @param code: the HTTP status sent downstream (0 if none was).
    @param grpc_status: the gRPC status (decimal), C{""} for non-gRPC.
    @param flags: the response flags joined by commas, C{""} if none.
    @param peer: the other proxy's metadata.
    @param own_principal: this proxy's SPIFFE ID, if it has one.
    @param downstream_principal: (destination) the client's verified SPIFFE
        ID, or C{None} if the connection was not mutual TLS.
    @param upstream_mtls: (source) whether the cluster uses mutual TLS.
    @param authority: (destination) the request's authority, naming the
        service when the cluster is an inbound one (C{inbound|...}); without
        one (TCP), the inbound cluster name may (see L{service_of_cluster}).
    @return: the label values, in L{REQUEST_LABELS} order.
    """
    namespace = clean(node.namespace)
    me = (clean(node.workload), namespace, clean(node.app), clean(node.version))
    if reporter == DESTINATION:
        host = authority_host(authority) if cluster.startswith("inbound|") else None
        service = service_of_host(host, namespace) if host is not None else service_of_cluster(cluster, namespace)
        mtls = downstream_principal is not None
        source_namespace = peer.namespace
        if source_namespace == UNKNOWN and mtls:
            source_namespace = namespace_of_principal(downstream_principal)
        source = (peer.workload, source_namespace, downstream_principal or UNKNOWN, peer.app, peer.version)
        destination = (me[0], me[1], (own_principal or UNKNOWN) if mtls else UNKNOWN, me[2], me[3])
        policy = "mutual_tls" if mtls else "none"
    else:
        service = service_of_cluster(cluster)
        source = (me[0], me[1], (own_principal or UNKNOWN) if upstream_mtls else UNKNOWN, me[2], me[3])
        destination = (peer.workload, peer.namespace, UNKNOWN, peer.app, peer.version)
        # As Istio: the client side does not report the policy.
        policy = UNKNOWN
    return (
        reporter,
        source[0], source[1], source[2], source[3], source[4], UNKNOWN,
        destination[0], destination[1], destination[2], destination[3], destination[4],
        service.host, service.name, service.namespace, UNKNOWN,
        protocol, str(code), grpc_status, flags or "-", policy,
    )


def tcp_labels(**kwargs: Any) -> tuple[str, ...]:
    """
    The values of L{TCP_LABELS}: L{request_labels} without the response
    code and gRPC status.
    """
    full = request_labels(code=0, grpc_status="", protocol="tcp", **kwargs)
    return tuple(full[i] for i in _TCP_INDEXES)


def overflow_labels(names: tuple[str, ...], reporter: str) -> tuple[str, ...]:
    return tuple(reporter if name == "reporter" else OVERFLOW for name in names)


# Series: plain numbers

class RequestSeries:
    """
    One label set's request count and duration and size histograms, as
    plain numbers.

    @ivar buckets: per-bucket (not cumulative) duration counts; the last is
        C{+Inf}.  So are C{request_buckets} and C{response_buckets} (bytes).
    """

    __slots__ = ("labels", "count", "duration_sum", "buckets", "request_bytes", "request_buckets",
                 "response_bytes", "response_buckets")

    def __init__(self, labels: tuple[str, ...]):
        self.labels = labels
        self.count = 0
        self.duration_sum = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS_MS) + 1)
        self.request_bytes = 0
        self.request_buckets = [0] * (len(BYTES_BUCKETS) + 1)
        self.response_bytes = 0
        self.response_buckets = [0] * (len(BYTES_BUCKETS) + 1)

    def observe(self, duration_ms: float, request_bytes: int = 0, response_bytes: int = 0,
                _bisect: Any = bisect_left, _bounds: tuple = DURATION_BUCKETS_MS,
                _bytes: tuple = BYTES_BUCKETS) -> None:
        """
        Count one request that took C{duration_ms} and carried these body
        sizes.
        """
        self.count += 1
        self.duration_sum += duration_ms
        self.buckets[_bisect(_bounds, duration_ms)] += 1
        self.request_bytes += request_bytes
        self.request_buckets[_bisect(_bytes, request_bytes)] += 1
        self.response_bytes += response_bytes
        self.response_buckets[_bisect(_bytes, response_bytes)] += 1


class TCPSeries:
    """
    One label set's TCP counters.
    """

    __slots__ = ("labels", "opened", "closed", "received", "sent")

    def __init__(self, labels: tuple[str, ...]):
        self.labels = labels
        self.opened = 0
        self.closed = 0
        self.received = 0
        self.sent = 0


class _SeriesTable:
    """
    One family's series by label set, at most C{max_series} of them plus
    one overflow series per reporter; and a cache from hot-path keys to
    series, cleared whenever it grows past four times that.
    """

    def __init__(self, make: Callable[[tuple[str, ...]], Any], names: tuple[str, ...], max_series: int):
        self._make = make
        self._names = names
        self.max_series = max_series
        self.series: dict[tuple[str, ...], Any] = {}
        self.keys: dict[Any, Any] = {}
        self.dropped = 0
        self._overflows = 0

    def lookup(self, key: Any, labels: Callable[[], tuple[str, ...]]) -> Any:
        """
        @return: the series of C{key}, computing its labels on a miss.
        """
        series = self.keys.get(key)
        if series is not None:
            return series
        values = labels()
        series = self.series.get(values)
        if series is None:
            if len(self.series) - self._overflows < self.max_series:
                series = self.series[values] = self._make(values)
            else:
                self.dropped += 1
                over = overflow_labels(self._names, values[0])
                series = self.series.get(over)
                if series is None:
                    # Overflow series do not count against the cap.
                    series = self.series[over] = self._make(over)
                    self._overflows += 1
        if len(self.keys) >= 4 * self.max_series:
            self.keys.clear()
        self.keys[key] = series
        return series


# The HTTP filter

class _MetricsFilter(HTTPFilter):
    __slots__ = ("_stream", "_http", "_own", "_peer", "_trailers")

    def __init__(self, stream: Any, http: RequestMetrics, own: bytes | None):
        self._stream = stream
        self._http = http
        self._own = own
        self._peer: bytes | None = None
        self._trailers: Any = None

    def response_trailers(self, trailers: Any) -> None:
        # Only for the grpc-status they carry.
        self._trailers = trailers


def _take_peer(headers: Any, _name: bytes = PEER_HEADER) -> bytes | None:
    """
    @return: the first C{x-txmesh-peer} value of C{headers}, removing
        them all; C{None} if there is none.
    """
    # A plain scan: Headers.get and .remove would each normalise the name.
    for name, value in headers:
        if name == _name:
            headers.remove(_name)
            return value
    return None


def _put_own(headers: Any, own: bytes, _name: bytes = PEER_HEADER) -> None:
    """
    Make C{own} the only C{x-txmesh-peer} value of C{headers}.
    """
    for name, _ in headers:
        if name == _name:
            headers.set(_name, own)
            return
    # Appended as is: Headers.add would normalise a name that already is.
    headers.items().append((_name, own))


class SourceMetricsFilter(_MetricsFilter):
    """
    The client side's sidecar: sends its metadata on the request, reads
    (and removes) the server side's from the response.
    """

    __slots__ = ()

    def request_headers(self, head: Any, end_stream: bool) -> None:
        own = self._own
        if own is not None:
            _put_own(head.headers, own)

    def response_headers(self, head: Any, end_stream: bool) -> None:
        self._peer = _take_peer(head.headers)

    def stream_complete(self) -> None:
        self._http.record(SOURCE, self._stream, self._peer, self._trailers)


class DestinationMetricsFilter(_MetricsFilter):
    """
    The server side's sidecar: reads (and removes) the client side's
    metadata from the request, sends its own on the response.
    """

    __slots__ = ()

    def request_headers(self, head: Any, end_stream: bool) -> None:
        self._peer = _take_peer(head.headers)

    def response_headers(self, head: Any, end_stream: bool) -> None:
        own = self._own
        if own is not None:
            _put_own(head.headers, own)

    def stream_complete(self) -> None:
        self._http.record(DESTINATION, self._stream, self._peer, self._trailers)


class RequestMetrics:
    """
    The four HTTP families, sharing one table of series (every request is
    in all four, so they always have the same label sets).

    @ivar peer_header: this proxy's C{x-txmesh-peer} value.
    """

    def __init__(self, node: NodeConfig, max_series: int, identity: Any = None):
        self.node = node
        self.identity = identity
        self.table = _SeriesTable(RequestSeries, REQUEST_LABELS, max_series)
        self.peer_header = encode(node.workload, node.namespace, node.app, node.version)

    def record(self, reporter: str, stream: Any, peer: bytes | None, trailers: Any) -> None:
        """
        Count one finished stream.

        @param peer: the other proxy's C{x-txmesh-peer} value, as received.
        @param trailers: the response trailers, if any.
        """
        head = stream.response_head
        code = head.status if head is not None else 0
        cluster = stream.upstream_cluster
        if cluster is None:
            route = stream.route
            cluster = (route.cluster or "") if route is not None else ""
        request = stream.request_head
        grpc = request is not None and is_grpc(request)
        status = None
        if grpc:
            if trailers is not None:
                status = trailers.get(b"grpc-status")
            if status is None and head is not None:
                status = head.headers.get(b"grpc-status")
        flags = stream.response_flags
        flags = ",".join(flags) if flags else ""
        if reporter == SOURCE:
            key = (cluster, grpc, code, status, flags, peer)
        else:
            principal = stream.downstream_principal
            authority = request.authority if request is not None and cluster[:8] == "inbound|" else None
            key = (reporter, cluster, grpc, code, status, flags, peer, principal, authority)
        series = self.table.keys.get(key)
        if series is None:
            # A partial, not a lambda: a closure would make every argument
            # a cell on each call, hit or miss.
            series = self.table.lookup(key, partial(self._labels, reporter, stream, cluster, grpc, code, status,
                                                    flags, peer))
        series.observe((stream.clock.seconds() - stream.start_time) * 1000.0, stream.bytes_received,
                       stream.bytes_sent)

    def _labels(self, reporter: str, stream: Any, cluster: str, grpc: bool, code: int, status: bytes | None,
                flags: str, peer: bytes | None) -> tuple[str, ...]:
        identity = self.identity
        if identity is None and stream.proxy is not None:
            identity = stream.proxy.identity
        own = identity.spiffe_id if identity is not None else None
        upstream_mtls = False
        if reporter == SOURCE and cluster and stream.cluster_manager is not None:
            found = stream.cluster_manager.get(cluster)
            tls = getattr(getattr(found, "config", None), "tls", None)
            upstream_mtls = tls is not None and tls.mode == "ISTIO_MUTUAL"
        if grpc:
            grpc_status = status.decode("ascii") if status is not None and status.isdigit() else UNKNOWN
        else:
            grpc_status = ""
        request = stream.request_head
        return request_labels(
            reporter=reporter, node=self.node, cluster=cluster, protocol="grpc" if grpc else "http", code=code,
            grpc_status=grpc_status, flags=flags, peer=decode(peer), own_principal=own,
            downstream_principal=stream.downstream_principal, upstream_mtls=upstream_mtls,
            authority=request.authority if request is not None else None)

    def collect(self) -> Iterable[Any]:
        requests = CounterMetricFamily("istio_requests", "Requests handled by the proxy.", labels=REQUEST_LABELS)
        durations = HistogramMetricFamily(
            "istio_request_duration_milliseconds", "Request duration in milliseconds.", labels=REQUEST_LABELS)
        request_bytes = HistogramMetricFamily(
            "istio_request_bytes", "Request body size in bytes.", labels=REQUEST_LABELS)
        response_bytes = HistogramMetricFamily(
            "istio_response_bytes", "Response body size in bytes.", labels=REQUEST_LABELS)
        bounds = _DURATION_LE
        byte_bounds = _BYTES_LE
        for series in list(self.table.series.values()):
            labels = series.labels
            requests.add_metric(labels, series.count)
            durations.add_metric(labels, list(zip(bounds, accumulate(series.buckets), strict=True)),
                                 series.duration_sum)
            request_bytes.add_metric(labels, list(zip(byte_bounds, accumulate(series.request_buckets), strict=True)),
                                     series.request_bytes)
            response_bytes.add_metric(labels, list(zip(byte_bounds, accumulate(series.response_buckets),
                                                       strict=True)), series.response_bytes)
        yield requests
        yield durations
        yield request_bytes
        yield response_bytes


# TCP

class TCPListenerMetrics:
    """
    The L{txmesh.proxy.tcp.TCPProxyFactory} observer of one TCP listener (or
    one of its SNI routes): counts connections when they open and close,
    and their bytes when they close or a scrape comes (as Istio reports
    long connections periodically).

    On a mutual TLS listener the labels depend on the connection: its
    peer's SPIFFE ID (C{source_principal}, and the source namespace)
    is only known once the TLS handshake is done, so such a connection is
    counted as opened then (L{connection_secured}), or when it closes if it
    never gets that far.  Label sets are computed once per (listener, peer
    principal, flags) and then found with one dict lookup.
    """

    def __init__(self, tcp: TCPMetrics, reporter: str, cluster: str, security_policy: str | None,
                 peer_identity: bool = False, upstream_mtls: bool = False):
        """
        @param security_policy: the C{connection_security_policy} of every
            connection, or C{None} to decide per connection (Istio's
            PERMISSIVE mode: C{mutual_tls} if the peer proved an identity).
        @param peer_identity: whether to read each connection's peer
            principal from its TLS transport (a mutual TLS listener).
        @param upstream_mtls: whether the cluster is C{ISTIO_MUTUAL} (the
            source reporter's C{source_principal}).
        """
        self._tcp = tcp
        self._reporter = reporter
        self._cluster = cluster
        self._policy = security_policy
        self._peer_identity = peer_identity
        self._upstream_mtls = upstream_mtls
        # What tells this listener's label sets from another's, in the
        # table's key cache.
        self._key = (reporter, cluster, security_policy, upstream_mtls)

    def _series(self, principal: str | None, flags: str) -> TCPSeries:
        key = (self._key, principal, flags)
        tcp = self._tcp
        series = tcp.table.keys.get(key)
        if series is None:
            series = tcp.table.lookup(key, lambda: tcp.labels(self._reporter, self._cluster, self._policy, flags,
                                                              principal, self._upstream_mtls))
        return series

    def _open(self, connection: Any) -> list:
        principal = None
        if self._peer_identity:
            principal = downstream_identity(connection.downstream_transport)[0]
        series = self._series(principal, "")
        series.opened += 1
        return [series, 0, 0, principal]

    def connection_opened(self, connection: Any) -> None:
        """
        @param connection: has C{bytes_received}, C{bytes_sent} and
            C{downstream_transport}.
        """
        if self._peer_identity and hasattr(connection.downstream_transport, "getPeerCertificate"):
            # TLS: counted by connection_secured, once the peer is known.
            self._tcp.live[connection] = None
        else:
            # Plaintext (a PERMISSIVE listener's non-TLS client): no peer to wait for.
            self._tcp.live[connection] = self._open(connection)

    def connection_secured(self, connection: Any) -> None:
        """
        The TLS handshake of C{connection}'s downstream side is done: its
        peer's certificate can be read.
        """
        live = self._tcp.live
        if connection in live and live[connection] is None:
            live[connection] = self._open(connection)

    def connection_closed(self, connection: Any, stats: Any) -> None:
        """
        @param stats: a L{txmesh.proxy.tcp.TCPConnectionStats}.
        """
        entry = self._tcp.live.pop(connection, None)
        if entry is None:
            entry = self._open(connection)
        series = self._series(entry[3], ",".join(stats.response_flags))
        series.closed += 1
        series.received += stats.bytes_received - entry[1]
        series.sent += stats.bytes_sent - entry[2]


class TCPMetrics:
    """
    The four C{istio_tcp_*} families.

    @ivar live: open connections: C{[series, bytes received, bytes sent,
        peer principal]} already counted, by connection; C{None} for one
        not counted yet (its TLS handshake is not done).
    """

    def __init__(self, node: NodeConfig, max_series: int, identity: Callable[[], Any]):
        self.node = node
        self._identity = identity
        self.table = _SeriesTable(TCPSeries, TCP_LABELS, max_series)
        self.live: dict[Any, list | None] = {}

    def labels(self, reporter: str, cluster: str, policy: str | None, flags: str, principal: str | None = None,
               upstream_mtls: bool = False) -> tuple[str, ...]:
        """
        @param policy: the C{connection_security_policy}, or C{None} for
            what the peer's principal implies.
        @param principal: the downstream peer's verified SPIFFE ID, if any.
        @return: the values of L{TCP_LABELS}.
        """
        identity = self._identity()
        own = identity.spiffe_id if identity is not None else None
        values = tcp_labels(reporter=reporter, node=self.node, cluster=cluster, flags=flags, own_principal=own,
                            downstream_principal=principal, upstream_mtls=upstream_mtls)
        if policy is None:
            return values
        return values[:_TCP_POLICY] + (policy,) + values[_TCP_POLICY + 1:]

    def listener(self, name: str, cluster: str, mtls: str | None,
                 upstream_mtls: bool = False) -> TCPListenerMetrics:
        """
        @param name: the listener's name: C{inbound} reports as the
            destination, any other as the source.
        @param mtls: the listener's mutual TLS mode, or C{None}.
        @param upstream_mtls: whether C{cluster} is C{ISTIO_MUTUAL}.
        @return: the observer for the listener's L{TCPProxyFactory}.
        """
        reporter = DESTINATION if name == "inbound" else SOURCE
        policy: str | None
        if reporter == SOURCE:
            # As Istio: the client side does not report the policy.
            policy = UNKNOWN
        elif mtls is None:
            policy = "none"
        elif mtls == "STRICT":
            policy = "mutual_tls"
        else:
            policy = None
        return TCPListenerMetrics(self, reporter, cluster, policy, peer_identity=mtls is not None,
                                  upstream_mtls=upstream_mtls and reporter == SOURCE)

    def _flush_live(self) -> None:
        for connection, entry in self.live.items():
            if entry is None:
                continue
            series = entry[0]
            received, sent = connection.bytes_received, connection.bytes_sent
            series.received += received - entry[1]
            series.sent += sent - entry[2]
            entry[1], entry[2] = received, sent

    def collect(self) -> Iterable[Any]:
        self._flush_live()
        families = {
            "opened": CounterMetricFamily("istio_tcp_connections_opened", "TCP connections opened.",
                                          labels=TCP_LABELS),
            "closed": CounterMetricFamily("istio_tcp_connections_closed", "TCP connections closed.",
                                          labels=TCP_LABELS),
            "received": CounterMetricFamily("istio_tcp_received_bytes", "Bytes received from TCP clients.",
                                            labels=TCP_LABELS),
            "sent": CounterMetricFamily("istio_tcp_sent_bytes", "Bytes sent to TCP clients.", labels=TCP_LABELS),
        }
        for series in list(self.table.series.values()):
            for attr, family in families.items():
                family.add_metric(series.labels, getattr(series, attr))
        yield from families.values()


# txmesh's own

class _ProxyStateCollector:
    """
    txmesh's own gauges and counters, read from the proxy's state at scrape
    time (so the request path pays nothing for them).
    """

    def __init__(self, metrics: ProxyMetrics):
        self._m = metrics

    def collect(self) -> Iterable[Any]:
        m = self._m
        dropped = CounterMetricFamily("txmesh_metrics_series_dropped",
                                      "Label sets folded into a family's overflow series.", labels=("family",))
        dropped.add_metric(("istio_requests",), m.http.table.dropped)
        dropped.add_metric(("istio_tcp",), m.tcp.table.dropped)
        yield dropped
        retries = CounterMetricFamily("txmesh_upstream_retries", "Retries started, by cluster.", labels=("cluster",))
        for cluster, n in sorted(m.retries.items()):
            retries.add_metric((cluster,), n)
        yield retries
        clusters = list(m.clusters()) if m.clusters is not None else []
        active = GaugeMetricFamily("txmesh_upstream_connections_active",
                                   "Open upstream (pool) connections, by cluster.", labels=("cluster",))
        overflow = CounterMetricFamily(
            "txmesh_upstream_overflow",
            "Requests refused by a circuit breaker (kind rq, rq_pending, cx) or retries refused by the retry "
            "budget (kind retry), by cluster.", labels=("cluster", "kind"))
        ejections = CounterMetricFamily("txmesh_outlier_ejections", "Outlier ejections enforced, by cluster.",
                                        labels=("cluster",))
        ejected = GaugeMetricFamily("txmesh_outlier_ejections_active", "Hosts ejected now, by cluster.",
                                    labels=("cluster",))
        for cluster in clusters:
            name = cluster.name
            active.add_metric((name,), sum(pool.connections for pool in cluster.pools()))
            breaker = cluster.breaker.stats()
            overflow.add_metric((name, "rq"), breaker["upstream_rq_overflow"])
            overflow.add_metric((name, "rq_pending"), breaker["upstream_rq_pending_overflow"])
            overflow.add_metric((name, "cx"), breaker["upstream_cx_overflow"])
            overflow.add_metric((name, "retry"), cluster.retry_budget.overflows)
            if cluster.outlier is not None:
                stats = cluster.outlier.stats()
                ejections.add_metric((name,), stats["ejections_enforced_total"])
                ejected.add_metric((name,), stats["ejections_active"])
        yield from (active, overflow, ejections, ejected)
        if m.config_version is not None:
            version = GaugeMetricFamily("txmesh_config_version", "Config versions applied since start.")
            version.add_metric((), m.config_version())
            yield version
        if m.pilot_status is not None:
            yield from pilot_families(m.pilot_status())
        if m.filter_factories is not None:
            yield from _factory_families(m.filter_factories())
        yield from _overload_families(m.overload)


def pilot_families(status: dict | None) -> Iterable[Any]:
    """
    The pilot channel's state as metric families (none without a pilot).

    @param status: L{PilotClient.status
        <txmesh.proxy.pilot_client.PilotClient.status>}, or C{None}.
    """
    if status is None:
        return
    connected = GaugeMetricFamily("txmesh_pilot_connected", "1 while the pilot channel is up.")
    connected.add_metric((), 1 if status.get("connected") else 0)
    yield connected
    info = GaugeMetricFamily("txmesh_pilot_info", "The config version last acked to the pilot.", labels=("version",))
    acked = status.get("acked_version")
    info.add_metric((str(acked)[:64] if acked else "",), 1)
    yield info


def _overload_families(overload: Any) -> Iterable[Any]:
    """
    The overload manager's measures, state and shed load (see
    L{txmesh.proxy.overload.OverloadManager}): families without samples
    when the proxy has none (no C{overload} section).
    """
    memory = GaugeMetricFamily("txmesh_overload_memory_bytes",
                               "The proxy's resident memory at the last overload measurement.")
    lag = GaugeMetricFamily("txmesh_overload_event_loop_lag_seconds",
                            "How late the last overload measurement ran (event-loop lag).")
    histogram = HistogramMetricFamily("txmesh_event_loop_lag_seconds",
                                      "Event-loop lag, at each overload measurement.")
    state = GaugeMetricFamily("txmesh_overload_state",
                              "0 normal, 1 shedding new requests, 2 also refusing new connections.")
    shed = CounterMetricFamily("txmesh_overload_shed", "Load shed by the overload manager.", labels=("what",))
    if overload is not None:
        if overload.memory_bytes is not None:
            memory.add_metric((), overload.memory_bytes)
        lag.add_metric((), overload.lag_seconds)
        histogram.add_metric((), list(zip(_LAG_LE, accumulate(overload.lag_buckets), strict=True)),
                             overload.lag_sum)
        state.add_metric((), overload.state)
        shed.add_metric(("request",), overload.requests_shed)
        shed.add_metric(("connection",), overload.connections_refused)
    yield from (memory, lag, histogram, state, shed)


def _factory_families(factories: Iterable[Any]) -> Iterable[Any]:
    """
    Counters filter factories keep (a factory may offer
    C{metric_samples()}: C{(name, help, labels, value)} tuples), as
    counter families.
    """
    families: dict[str, Any] = {}
    for factory in factories:
        samples = getattr(factory, "metric_samples", None)
        if samples is None:
            continue
        for name, documentation, labels, value in samples():
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(name, documentation, labels=tuple(labels))
            family.add_metric(tuple(labels.values()), value)
    yield from families.values()


class ProxyMetrics:
    """
    One proxy's metrics.

    @ivar registry: the C{CollectorRegistry} served at C{/stats/prometheus}.
    @ivar http: the Istio HTTP families (L{RequestMetrics}).
    @ivar tcp: the Istio TCP families (L{TCPMetrics}).
    @ivar retries: retries started, by cluster name.
    """

    def __init__(self, node: NodeConfig, registry: CollectorRegistry | None = None,
                 max_series: int = DEFAULT_MAX_SERIES, identity: Any = None):
        """
        @param node: this proxy's node (its labels).
        @param max_series: the cap on label sets per family.
        @param identity: this proxy's workload identity (for the principal
            labels), or C{None} to take C{stream.proxy.identity}.
        """
        self.registry = registry if registry is not None else CollectorRegistry()
        self._node = node
        self._identity = identity
        self.http = RequestMetrics(node, max_series, identity)
        self.tcp = TCPMetrics(node, max_series, lambda: self._identity)
        self.retries: dict[str, int] = {}
        self.clusters: Callable[[], Iterable[Any]] | None = None
        self.config_version: Callable[[], int] | None = None
        self.pilot_status: Callable[[], dict | None] | None = None
        self.filter_factories: Callable[[], Iterable[Any]] | None = None
        self.overload: Any = None
        r = self.registry
        r.register(self.http)
        r.register(self.tcp)
        r.register(_ProxyStateCollector(self))
        self.config_reloads = Counter(
            "txmesh_config_reloads", "Config reloads by result.", ("result",), registry=r)
        self.downstream_connections = Gauge(
            "txmesh_downstream_connections_active", "Open downstream connections by listener.",
            ("listener",), registry=r)
        self.downstream_connections_overflow = Counter(
            "txmesh_downstream_connections_overflow",
            "Downstream connections closed at once because the listener had max_connections open.",
            ("listener",), registry=r)

    def watch(self, *, clusters: Callable[[], Iterable[Any]] | None = None,
              config_version: Callable[[], int] | None = None,
              pilot_status: Callable[[], dict | None] | None = None,
              filter_factories: Callable[[], Iterable[Any]] | None = None) -> None:
        """
        Read these at each scrape for txmesh's own metrics.

        @param clusters: returns the live L{txmesh.proxy.cluster.Cluster}s.
        @param config_version: returns the applied config version.
        @param pilot_status: returns L{PilotClient.status
            <txmesh.proxy.pilot_client.PilotClient.status>} or C{None}.
        @param filter_factories: returns the HTTP filter factories, some of
            which keep counters (C{metric_samples()}), e.g. the tracing
            reporters' dropped spans.
        """
        self.clusters = clusters
        self.filter_factories = filter_factories
        self.config_version = config_version
        self.pilot_status = pilot_status

    def watch_overload(self, overload: Any) -> None:
        """
        Export C{overload}'s measures and state (the C{txmesh_overload_*}
        families and C{txmesh_event_loop_lag_seconds}) at each scrape.

        @param overload: an L{OverloadManager
            <txmesh.proxy.overload.OverloadManager>}.
        """
        self.overload = overload

    def set_identity(self, identity: Any) -> None:
        """
        Use C{identity}'s SPIFFE ID as this proxy's principal.
        """
        self._identity = self.http.identity = identity
        # Label sets computed before had no principal of ours; series
        # already counted keep their labels.
        self.http.table.keys.clear()
        self.tcp.table.keys.clear()

    def tcp_listener(self, name: str, cluster: str, mtls: str | None = None,
                     upstream_mtls: bool = False) -> TCPListenerMetrics:
        """
        @return: the observer a TCP listener's factory reports to (see
            L{TCPMetrics.listener}).
        """
        return self.tcp.listener(name, cluster, mtls, upstream_mtls)

    def count_retry(self, cluster: str) -> None:
        """
        A retry started on C{cluster}.
        """
        self.retries[cluster] = self.retries.get(cluster, 0) + 1

    def exposition(self) -> tuple[str, bytes]:
        """
        @return: content type and body of the Prometheus text exposition.
        """
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)


# The filter factory

@attrs.frozen
class MetricsConfig:
    """
    The C{metrics} filter's config.

    @ivar reporter: L{SOURCE}, L{DESTINATION}, or C{None} for the listener's
        role: C{destination} for a listener named C{inbound}, else C{source}.
    @ivar peer_metadata: whether to send this proxy's metadata
        (C{x-txmesh-peer}); the peer's is read and removed either way.
    """

    reporter: str | None = None
    peer_metadata: bool = True


@implementer(IHTTPFilterFactory)
class MetricsFactory:
    """
    The C{metrics} filter: Istio's request metrics, and the peer metadata
    exchange that fills their workload labels.
    """

    name = "metrics"

    def parse_config(self, raw: Any) -> MetricsConfig | None:
        from txmesh.config.errors import FilterConfigError

        if not raw:
            return None
        if not isinstance(raw, dict):
            raise FilterConfigError("", "expected a mapping")
        for key in raw:
            if key not in ("reporter", "peer_metadata"):
                raise FilterConfigError(
                    str(key), "unknown field: the metrics filter takes no config other than reporter and peer_metadata")
        reporter = raw.get("reporter")
        if reporter not in (None, SOURCE, DESTINATION):
            raise FilterConfigError("reporter", f"expected source or destination, not {reporter!r}")
        exchange = raw.get("peer_metadata", True)
        if not isinstance(exchange, bool):
            raise FilterConfigError("peer_metadata", f"expected true or false, not {exchange!r}")
        return MetricsConfig(reporter, exchange)

    def create_filter(self, config: Any, stream: Any) -> HTTPFilter:
        metrics = stream.proxy.metrics if stream.proxy is not None else None
        if metrics is None:
            return HTTPFilter()
        http = metrics.http
        if config is None:
            reporter, own = None, http.peer_header
        else:
            reporter, own = config.reporter, (http.peer_header if config.peer_metadata else None)
        if reporter is None:
            reporter = DESTINATION if stream.listener_name == "inbound" else SOURCE
        if reporter == DESTINATION:
            return DestinationMetricsFilter(stream, http, own)
        return SourceMetricsFilter(stream, http, own)
