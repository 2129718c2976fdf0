"""
The HTTP connection manager (Envoy's name): what an HTTP listener knows
between config versions -- its route table, its filter chain, its clusters --
and the place codecs get new streams from.

A listener's factory holds one manager and swaps it on reload; a stream
keeps the manager it started with, so in-flight requests finish on the
config they began on.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from typing import Any

import attrs

from txmesh.config.model import ListenerConfig, NodeConfig
from txmesh.filters.api import LocalReply
from txmesh.filters.chain import FilterChain, ResponseWriter
from txmesh.proxy.forward_proxy import ForwardProxyRoutes
from txmesh.proxy.mesh_tls import client_cert_header, downstream_identity
from txmesh.proxy.overload import NEVER_OVERLOADED, OVERLOADED_BODY
from txmesh.proxy.request_rate import RequestRate
from txmesh.proxy.router import RouteTable
from txmesh.proxy.stream import RequestHead, ResponseFlag

# Request ids need uniqueness, not secrecy: a PRNG seeded from the OS
# avoids a getrandom() system call per request.
_ids = random.Random(os.urandom(32))
_UUID4_MASK = ~(0xF << 76) & ~(0x3 << 62) & ((1 << 128) - 1)
_UUID4_BITS = (0x4 << 76) | (0x2 << 62)


def new_request_id(getrandbits=_ids.getrandbits) -> bytes:
    """
    @return: a random UUID (version 4) as C{bytes}, for C{x-request-id}.
    """
    h = b"%032x" % ((getrandbits(128) & _UUID4_MASK) | _UUID4_BITS)
    return b"%b-%b-%b-%b-%b" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def forwarding_headers(head: RequestHead, peer_ip: bytes, client_cert: bytes | None = None) -> bytes:
    """
    Add this hop to a downstream request, as every codec does before the
    stream starts: append the peer to C{x-forwarded-for}, set
    C{x-forwarded-proto} to the scheme the client used (keeping one it sent
    only when set to the same), give the request an C{x-request-id} if it
    has none, and drop any C{x-forwarded-client-cert} the client sent,
    setting it only from the connection's verified client certificate
    (Envoy's SANITIZE_SET).

    @param head: the request; its headers are changed in place.
    @param peer_ip: the client's address.
    @param client_cert: the C{x-forwarded-client-cert} value for a mutual
        TLS connection (see L{txmesh.proxy.mesh_tls.client_cert_header}),
        or C{None}.
    @return: the request id.
    """
    headers = head.headers
    items = headers.items()
    request_id = None
    xff_index = -1
    proto_seen = False
    xfcc_seen = False
    for i, (name, value) in enumerate(items):
        if name == b"x-request-id":
            request_id = value
        elif name == b"x-forwarded-for":
            xff_index = i
        elif name == b"x-forwarded-proto":
            items[i] = (name, head.scheme)
            proto_seen = True
        elif name == b"x-forwarded-client-cert":
            xfcc_seen = True
    if xfcc_seen:
        # Never believed from a client: only this proxy vouches for a peer.
        items[:] = [(n, v) for n, v in items if n != b"x-forwarded-client-cert"]
        xff_index = next((i for i, (n, _) in enumerate(items) if n == b"x-forwarded-for"), -1)
    if client_cert is not None:
        items.append((b"x-forwarded-client-cert", client_cert))
    if xff_index >= 0:
        items[xff_index] = (b"x-forwarded-for", items[xff_index][1] + b", " + peer_ip)
    else:
        items.append((b"x-forwarded-for", peer_ip))
    if not proto_seen:
        items.append((b"x-forwarded-proto", head.scheme))
    if request_id is None:
        request_id = new_request_id()
        items.append((b"x-request-id", request_id))
    return request_id


def node_labels(node: NodeConfig) -> dict[str, str]:
    """
    @return: the labels of the workload beside this proxy: its C{labels},
        plus C{app} and C{version} when known (they are labels in Kubernetes).
    """
    labels = dict(node.labels)
    for key, value in (("app", node.app), ("version", node.version)):
        if value != "unknown":
            labels.setdefault(key, value)
    return labels


@attrs.frozen
class ProxyContext:
    """
    Proxy-wide services that filters may use through C{stream.proxy}.

    @ivar node: who this proxy is.
    @ivar metrics: the proxy's metrics (L{txmesh.observability.metrics.ProxyMetrics}), or C{None}.
    @ivar clock: the proxy's C{IReactorTime}.
    @ivar deadlines: the L{txmesh.proxy.deadlines.DeadlineWheel} for
        per-request timeouts, or C{None} for plain C{clock.callLater}.
    @ivar rng: the C{random.Random} for weighted choices, or C{None} for the
        C{random} module.
    @ivar identity: the proxy's L{WorkloadIdentity
        <txmesh.proxy.workload_identity.WorkloadIdentity>}, or C{None}.
    @ivar overload: the proxy's L{OverloadManager
        <txmesh.proxy.overload.OverloadManager>}, or C{None}.
    """

    node: NodeConfig
    clock: Any
    metrics: Any = None
    deadlines: Any = None
    rng: Any = None
    identity: Any = None
    overload: Any = None


class HTTPConnectionManager:
    """
    One HTTP listener's current config, compiled.
    """

    def __init__(self, listener: ListenerConfig, clusters: Any, proxy: ProxyContext):
        """
        @param listener: the listener's config.
        @param clusters: the L{txmesh.proxy.cluster.ClusterSet} to route to.
        @param proxy: proxy-wide services.
        """
        self.listener = listener
        self.routes = RouteTable(listener.virtual_hosts, node_labels(proxy.node))
        self.clusters = clusters
        self.proxy = proxy
        self.clock = proxy.clock
        self._overload = proxy.overload if proxy.overload is not None else NEVER_OVERLOADED
        self._filters = listener.http_filters
        # Whether a codec needs to look for a route's own body limit.
        self.route_body_limits = any(
            getattr(r, "max_request_bytes", None) for vh in listener.virtual_hosts for r in vh.routes)
        self._route_lookup = self.routes.match
        if listener.forward_proxy is not None:
            self._route_lookup = ForwardProxyRoutes(listener.forward_proxy, self.routes.match).match

    def with_default_route(self, default: Callable[[RequestHead], Any]) -> HTTPConnectionManager:
        """
        @param default: the route lookup for requests no route matches
            (a capture listener's route to the connection's original
            destination).
        @return: a copy of this manager (same routes, clusters and
            filters) whose streams fall back to C{default}.
        """
        clone = copy.copy(self)
        lookup = self._route_lookup

        def lookup_or_default(head: RequestHead) -> Any:
            route = lookup(head)
            return route if route is not None else default(head)

        clone._route_lookup = lookup_or_default
        return clone

    def new_stream(self, writer: ResponseWriter, downstream_address: Any, request_id: bytes,
                   principal: str | None = None, local_port: int | None = None,
                   rate: RequestRate | None = None) -> FilterChain:
        """
        Start a stream for a codec.

        @param writer: the codec's downstream half for this stream.
        @param principal: the peer's verified SPIFFE ID (mutual TLS), or
            C{None}.
        @param local_port: the port the connection arrived on.
        @param rate: the connection's request rate limit (see
            L{request_rate}), or C{None}.
        """
        if rate is not None and not rate.allow(self.clock.seconds()):
            return _RateLimitedStream(writer, self.clock, self.listener.name, downstream_address, request_id,
                                      _no_route, self.clusters, ())
        if self._overload.shed_requests:
            # Before routing and before any filter is built: under memory
            # pressure, allocating less matters more (as Envoy).
            self._overload.count_shed_request()
            return _ShedStream(writer, self.clock, self.listener.name, downstream_address, request_id,
                               _no_route, self.clusters, ())
        stream = FilterChain(
            writer,
            self.clock,
            self.listener.name,
            downstream_address,
            request_id,
            self._route_lookup,
            self.clusters,
            self._filters,
        )
        stream.proxy = self.proxy
        if principal is not None:
            stream.downstream_principal = principal
        if local_port is not None:
            stream.downstream_port = local_port
        return stream

    def peer_info(self, transport: Any) -> tuple[str | None, bytes | None, int | None]:
        """
        What a codec learns once per connection about its peer.

        @return: the peer's verified SPIFFE ID (or C{None}), the
            C{x-forwarded-client-cert} value to set on its requests (or
            C{None}), and the local port.
        """
        host = transport.getHost()
        port = getattr(host, "port", None)
        if self.listener.mtls is None:
            return None, None, port
        principal, certificate = downstream_identity(transport)
        identity = self.proxy.identity
        own = identity.spiffe_id if identity is not None else None
        return principal, client_cert_header(own, principal, certificate), port


def _no_route(head: RequestHead) -> None:
    return None


_OVERLOADED = LocalReply(503, OVERLOADED_BODY, flag=ResponseFlag.OVERLOAD)
_RATE_LIMITED = LocalReply(429, b"too many requests on this connection\n", flag=ResponseFlag.RATE_LIMITED)


class _ShedStream(FilterChain):
    """
    A stream the overload manager sheds: C{503} with flag C{OL} as soon as
    its head arrives, without routing or filters (so it is not in
    C{istio_requests_total} or the access log, only in
    C{txmesh_overload_shed_total}).  A gRPC request gets C{UNAVAILABLE}.
    """

    def request_headers(self, head: RequestHead, end_stream: bool) -> None:
        self.request_head = head
        if end_stream:
            self.request_complete = True
        self._local_reply(_OVERLOADED, -1)


class _RateLimitedStream(FilterChain):
    """
    A request over its connection's rate limit: C{429} with flag C{RL}
    as soon as its head arrives, without routing or filters.
    """

    def request_headers(self, head: RequestHead, end_stream: bool) -> None:
        self.request_head = head
        if end_stream:
            self.request_complete = True
        self._local_reply(_RATE_LIMITED, -1)


def request_rate(listener: ListenerConfig) -> RequestRate | None:
    """
    @return: a new connection's request rate limit on C{listener}, or
        C{None} if it has none.
    """
    rate = listener.max_requests_per_second
    return RequestRate(rate) if rate > 0 else None


def body_limit(listener: ListenerConfig, route: Any) -> int:
    """
    @return: the request body limit of a request on C{listener} routed by
        C{route} (the lower of the listener's and the route's
        C{max_request_bytes}), or 0 for none.
    """
    limits = [n for n in (listener.max_request_bytes, getattr(route, "max_request_bytes", None)) if n]
    return min(limits) if limits else 0
