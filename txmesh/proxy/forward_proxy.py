"""
Forward-proxy routing: what an HTTP listener with C{forward_proxy} does
with the requests of apps that honour C{HTTP_PROXY} and C{HTTPS_PROXY}.

The codec has already turned an absolute-form request
(C{GET http://host:port/path}) into origin form, its authority replacing
C{Host}, and marked it C{absolute_form}.  L{ForwardProxyRoutes} then routes
it by host like any other request, so the mesh's virtual hosts apply; when
none matches it goes to the target itself through a passthrough cluster
(Istio's C{ALLOW_ANY}), unless C{allow_hosts} forbids the host.

A C{CONNECT host:port} is never matched against routes (their paths start
with C{/}): it gets a tunnel to the target when the port is one of
C{connect_ports} and the host is allowed, and 403 otherwise.  The router
opens the tunnel (see L{txmesh.filters.router}).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable

from txmesh.config.model import DirectResponse, ForwardProxyConfig, Route, RouteMatch
from txmesh.proxy.cluster import passthrough_cluster_name
from txmesh.proxy.stream import RequestHead

_DEFAULT_HTTP_PORT = 80


def split_host_port(authority: bytes, default_port: int | None) -> tuple[str, int | None] | None:
    """
    @param authority: C{host}, C{host:port}, C{[v6]} or C{[v6]:port}.
    @param default_port: the port when C{authority} names none.
    @return: the host (without brackets, lower case) and the port, or
        C{None} if the port is not a number from 1 to 65535.
    """
    text = authority.decode("ascii", "replace").lower()
    port_text = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    else:
        host = text
    if not host:
        return None
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None
    return host, int(port_text)


def _reply(name: str, status: int, body: bytes) -> Route:
    return Route(name, RouteMatch(), direct_response=DirectResponse(status, body))


_BAD_TARGET = _reply("forward_proxy_bad_target", 400, b"bad forward proxy target\n")
_NO_CONNECT_PORT = _reply("forward_proxy_forbidden", 403, b"CONNECT to this port is not allowed\n")
_HOST_FORBIDDEN = _reply("forward_proxy_forbidden", 403, b"this host is not allowed\n")


class ForwardProxyRoutes:
    """
    A listener's route lookup in forward-proxy mode, in front of its
    L{RouteTable <txmesh.proxy.router.RouteTable>}.
    """

    def __init__(self, config: ForwardProxyConfig, match: Callable[[RequestHead], Route | None]):
        """
        @param config: the listener's C{forward_proxy}.
        @param match: the listener's own route lookup.
        """
        self._config = config
        self._match = match
        self._connect_ports = frozenset(config.connect_ports)

    def match(self, head: RequestHead) -> Route | None:
        """
        @return: the route for C{head}: a configured one, a passthrough
            route to its target, a 403 or 400 direct response, or C{None}
            (no route: 404) for an origin-form request no route matches.
        """
        if head.method == b"CONNECT":
            target = split_host_port(head.authority, None)
            if target is None or target[1] is None:
                return _BAD_TARGET
            host, port = target
            if port not in self._connect_ports:
                return _NO_CONNECT_PORT
            return self._passthrough("connect", host, port)
        route = self._match(head)
        if route is not None or not head.absolute_form:
            # An origin-form request is a reverse-proxy request: its Host
            # alone must never open a way out of the mesh.
            return route
        target = split_host_port(head.authority, _DEFAULT_HTTP_PORT)
        if target is None:
            return _BAD_TARGET
        host, port = target
        return self._passthrough("http", host, port)

    def _passthrough(self, kind: str, host: str, port: int | None) -> Route:
        if not self._config.allows_host(host):
            return _HOST_FORBIDDEN
        # No timeout, as Istio's PassthroughCluster: a tunnel, or a long
        # download, lasts as long as the app wants.
        return Route(f"PassthroughCluster|{kind}", RouteMatch(), cluster=passthrough_cluster_name(kind, host, port),
                     timeout=0.0)
