"""
The HTTP connection manager (Envoy's name): what an HTTP listener knows
between config versions -- its route table, its filter chain, its clusters --
and the place codecs get new streams from.

A listener's factory holds one manager and swaps it on reload; a stream
keeps the manager it started with, so in-flight requests finish on the
config they began on.
"""

from __future__ import annotations

import os
import random
from typing import Any

import attrs

from txmesh.config.model import ListenerConfig, NodeConfig
from txmesh.filters.chain import FilterChain, ResponseWriter
from txmesh.proxy.router import RouteTable
from txmesh.proxy.stream import RequestHead

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


def forwarding_headers(head: RequestHead, peer_ip: bytes) -> bytes:
    """
    Add this hop to a downstream request, as every codec does before the
    stream starts: append the peer to C{x-forwarded-for}, set
    C{x-forwarded-proto} to the scheme the client used (keeping one it sent
    only when set to the same), and give the request an C{x-request-id} if
    it has none.

    @param head: the request; its headers are changed in place.
    @param peer_ip: the client's address.
    @return: the request id.
    """
    headers = head.headers
    items = headers.items()
    request_id = None
    xff_index = -1
    proto_seen = False
    for i, (name, value) in enumerate(items):
        if name == b"x-request-id":
            request_id = value
        elif name == b"x-forwarded-for":
            xff_index = i
        elif name == b"x-forwarded-proto":
            items[i] = (name, head.scheme)
            proto_seen = True
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
    @ivar writes: the L{txmesh.proxy.write_coalescer.WriteCoalescer} codecs
        write through, or C{None} for plain C{transport.write}.
    @ivar deadlines: the L{txmesh.proxy.deadlines.DeadlineWheel} for
        per-request timeouts, or C{None} for plain C{clock.callLater}.
    @ivar rng: the C{random.Random} for weighted choices, or C{None} for the
        C{random} module.
    """

    node: NodeConfig
    clock: Any
    metrics: Any = None
    writes: Any = None
    deadlines: Any = None
    rng: Any = None


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
        self._filters = listener.http_filters

    def new_stream(self, writer: ResponseWriter, downstream_address: Any, request_id: bytes) -> FilterChain:
        """
        Start a stream for a codec.

        @param writer: the codec's downstream half for this stream.
        """
        stream = FilterChain(
            writer,
            self.clock,
            self.listener.name,
            downstream_address,
            request_id,
            self.routes.match,
            self.clusters,
            self._filters,
        )
        stream.proxy = self.proxy
        return stream
