"""
txmesh's own configuration model: immutable C{attrs} values that the proxy
runs from.  YAML (and, later, the pilot's channel and Istio documents) are
translated into these; nothing above the loader sees raw dicts.
"""

from __future__ import annotations

import re
from typing import Any

import attrs


@attrs.frozen
class Endpoint:
    """
    One upstream address.

    @ivar host: IP address or host name.
    @ivar port: TCP port.
    @ivar labels: endpoint labels (version, zone, ...).
    """

    host: str
    port: int
    labels: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@attrs.frozen
class ClusterConfig:
    """
    A named group of upstream endpoints and how to talk to them.

    @ivar connect_timeout: seconds to wait for a TCP connection.
    @ivar lb_policy: C{round_robin}, C{random} or C{least_request}.
    @ivar max_idle_per_endpoint: idle keep-alive connections kept per endpoint.
    @ivar idle_timeout: seconds an idle pooled connection is kept open.
    """

    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = 5.0
    lb_policy: str = "round_robin"
    max_idle_per_endpoint: int = 128
    idle_timeout: float = 60.0


@attrs.frozen
class HeaderMatch:
    """
    A condition on one request header.  Exactly one of C{exact}, C{prefix},
    C{regex} or C{present} is set; C{invert} negates the result.
    """

    name: bytes
    exact: bytes | None = None
    prefix: bytes | None = None
    regex: re.Pattern[bytes] | None = None
    present: bool | None = None
    invert: bool = False


@attrs.frozen
class RouteMatch:
    """
    What a request must look like to take a route: one of C{prefix},
    C{path} (exact) or C{regex} on the path, plus header conditions and
    methods (all must hold).
    """

    prefix: bytes | None = b"/"
    path: bytes | None = None
    regex: re.Pattern[bytes] | None = None
    headers: tuple[HeaderMatch, ...] = ()
    methods: tuple[bytes, ...] = ()


@attrs.frozen
class DirectResponse:
    """
    A route answered by the proxy itself.
    """

    status: int
    body: bytes = b""


@attrs.frozen
class Route:
    """
    One routing rule.

    @ivar cluster: destination cluster name (unless C{direct_response}).
    @ivar timeout: seconds for the whole upstream exchange; 0 disables.
    @ivar prefix_rewrite: replaces the matched prefix before forwarding.
    @ivar host_rewrite: replaces the C{Host}/authority before forwarding.
    @ivar filter_overrides: per-route filter config by filter name; a value
        of C{None} disables that filter on this route.
    """

    name: str
    match: RouteMatch
    cluster: str | None = None
    direct_response: DirectResponse | None = None
    timeout: float = 15.0
    prefix_rewrite: bytes | None = None
    host_rewrite: bytes | None = None
    request_headers_to_add: tuple[tuple[bytes, bytes], ...] = ()
    response_headers_to_add: tuple[tuple[bytes, bytes], ...] = ()
    filter_overrides: tuple[tuple[str, Any], ...] = ()


@attrs.frozen
class VirtualHost:
    """
    Routes for a set of domains (C{Host} values); C{"*"} matches any,
    C{"*.example.com"} a suffix, C{"api.*"} a prefix.
    """

    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@attrs.frozen
class FilterConfig:
    """
    One configured filter in a chain.

    @ivar name: the factory's plugin name.
    @ivar factory: the L{IHTTPFilterFactory} or L{INetworkFilterFactory}.
    @ivar config: what the factory's C{parse_config} returned.
    """

    name: str
    factory: Any = attrs.field(eq=False)
    config: Any = None


@attrs.frozen
class ListenerConfig:
    """
    One listening port and what it carries.

    @ivar address: a Twisted server endpoint string,
        e.g. C{tcp:15001:interface=127.0.0.1}.
    @ivar protocol: C{http} (HTTP/1.1 L7 proxy) or C{tcp} (L4 proxy).
    @ivar cluster: the upstream cluster of a C{tcp} listener.
    @ivar idle_timeout: seconds a connection may be idle before it is closed.
    @ivar request_headers_timeout: seconds a client has to send a complete
        request head (slowloris defence).
    @ivar max_request_headers_bytes: limit on the request head; beyond it 431.
    @ivar default_host: authority used for HTTP/1.0 requests with no C{Host}.
    """

    name: str
    address: str
    protocol: str = "http"
    virtual_hosts: tuple[VirtualHost, ...] = ()
    http_filters: tuple[FilterConfig, ...] = ()
    network_filters: tuple[FilterConfig, ...] = ()
    cluster: str | None = None
    idle_timeout: float = 300.0
    request_headers_timeout: float = 30.0
    max_request_headers_bytes: int = 64 * 1024
    default_host: bytes | None = None
    scheme: bytes = b"http"


@attrs.frozen
class NodeConfig:
    """
    Who this proxy is: the workload it stands beside.
    """

    id: str = "txmesh-proxy"
    workload: str = "unknown"
    namespace: str = "default"
    app: str = "unknown"
    version: str = "unknown"


@attrs.frozen
class ProxyConfig:
    """
    Everything a proxy runs from.

    @ivar source: where it was loaded from (for messages and C{/config_dump}).
    @ivar raw: the document as loaded, for C{/config_dump}.
    """

    listeners: tuple[ListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    admin_address: str | None = None
    node: NodeConfig = NodeConfig()
    source: str | None = None
    raw: Any = attrs.field(default=None, eq=False, repr=False)

    def cluster(self, name: str) -> ClusterConfig | None:
        """
        @return: the cluster called C{name}, or C{None}.
        """
        for c in self.clusters:
            if c.name == name:
                return c
        return None
