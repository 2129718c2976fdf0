"""
Route tables, pure: given a request head, find the route that takes it.

Virtual hosts are matched by authority (exact, then suffix wildcards
C{*.example.com} longest first, then prefix wildcards C{api.*}, then C{*}),
as Envoy does; within a virtual host the first matching route wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import unquote_to_bytes

import attrs

from txmesh.config.model import HeaderMatch, Route, RouteMatch, VirtualHost
from txmesh.proxy.stream import Headers, RequestHead

_UNCACHED = object()
_VHOST_CACHE_SIZE = 4096


def _strip_port(authority: bytes) -> bytes:
    if authority.startswith(b"["):
        end = authority.find(b"]")
        return authority[: end + 1] if end > 0 else authority
    colon = authority.rfind(b":")
    if colon >= 0 and authority[colon + 1:].isdigit():
        return authority[:colon]
    return authority


def header_matches(m: HeaderMatch, headers: Headers) -> bool:
    """
    @return: whether C{headers} satisfy the condition C{m}.
    """
    value = headers.get(m.name)
    if m.present is not None:
        result = (value is not None) == m.present
    elif value is None:
        result = False
    elif m.exact is not None:
        result = value == m.exact
    elif m.prefix is not None:
        result = value.startswith(m.prefix)
    elif m.regex is not None:
        result = m.regex.fullmatch(value) is not None
    else:
        result = True
    return result != m.invert


def route_matches(match: RouteMatch, head: RequestHead, path: bytes | None = None) -> bool:
    """
    @param path: C{head}'s path without its query, if already known.
    @return: whether C{head} satisfies every condition of C{match}.
    """
    if match.methods and head.method not in match.methods:
        return False
    if path is None:
        path = head.path_only
    if match.path is not None:
        if path != match.path:
            return False
    elif match.regex is not None:
        if match.regex.fullmatch(path) is None:
            return False
    elif match.prefix is not None and not path.startswith(match.prefix):
        return False
    for hm in match.headers:
        if not header_matches(hm, head.headers):
            return False
    if match.query_params:
        params = query_params(head.path)
        for qm in match.query_params:
            if not header_matches(qm, params):
                return False
    if match.port is not None and authority_port(head.authority, head.scheme) != match.port:
        return False
    return True


def query_params(target: bytes) -> Headers:
    """
    @return: the query parameters of a request target, percent-decoded, as
        a L{Headers} (so header conditions apply to them unchanged).
    """
    q = target.find(b"?")
    if q < 0:
        return Headers()
    query = target[q + 1:]
    h = query.find(b"#")
    if h >= 0:
        query = query[:h]
    pairs = []
    for part in query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        pairs.append((unquote_to_bytes(name.replace(b"+", b" ")), unquote_to_bytes(value.replace(b"+", b" "))))
    return Headers(pairs)


def authority_port(authority: bytes, scheme: bytes) -> int:
    """
    @return: the port of C{authority}, or the scheme's default.
    """
    bare = _strip_port(authority)
    if bare is not authority and len(authority) > len(bare) + 1:
        return int(authority[len(bare) + 1:])
    return 443 if scheme == b"https" else 80


def source_labels_match(match: RouteMatch, node_labels: Mapping[str, str]) -> bool:
    """
    @return: whether the proxy's own workload has every label C{match}
        asks of the request's source (a sidecar is the source of what it
        sends out).
    """
    return all(node_labels.get(k) == v for k, v in match.source_labels)


class RouteTable:
    """
    An immutable set of virtual hosts, compiled for lookup.
    """

    def __init__(self, virtual_hosts: Sequence[VirtualHost], node_labels: Mapping[str, str] | None = None):
        """
        @param node_labels: the labels of the workload this proxy stands
            beside; routes whose C{source_labels} it lacks are left out.
        """
        if node_labels is not None:
            labels = dict(node_labels)
            virtual_hosts = [
                attrs.evolve(vh, routes=tuple(r for r in vh.routes if source_labels_match(r.match, labels)))
                for vh in virtual_hosts
            ]
        else:
            virtual_hosts = [
                attrs.evolve(vh, routes=tuple(r for r in vh.routes if not r.match.source_labels))
                for vh in virtual_hosts
            ]
        self._exact: dict[bytes, VirtualHost] = {}
        # Wildcard domains are indexed by their fixed part, so a lookup costs
        # one dict probe per character of the host, not one per wildcard.
        self._suffix: dict[bytes, VirtualHost] = {}
        self._prefix: dict[bytes, VirtualHost] = {}
        self._any: VirtualHost | None = None
        for vh in virtual_hosts:
            for domain in vh.domains:
                d = domain.lower().encode("idna" if not domain.isascii() else "ascii")
                if d == b"*":
                    self._any = self._any or vh
                elif d.startswith(b"*"):
                    self._suffix.setdefault(d[1:], vh)
                elif d.endswith(b"*"):
                    self._prefix.setdefault(d[:-1], vh)
                else:
                    self._exact.setdefault(d, vh)
        self.virtual_hosts = tuple(virtual_hosts)
        self._vhost_cache: dict[bytes, VirtualHost | None] = {}

    def virtual_host(self, authority: bytes) -> VirtualHost | None:
        """
        @return: the virtual host for C{authority} (port optional), or C{None}.
        """
        host = authority.lower()
        vh = self._exact.get(host)
        if vh is not None:
            return vh
        bare = _strip_port(host)
        if bare is not host:
            vh = self._exact.get(bare)
            if vh is not None:
                return vh
        # Wildcards are tried against the authority as sent (a domain such
        # as "*.example.com:8080" names a port) and without its port.
        # The longest matching wildcard wins, suffixes before prefixes.
        candidates = (host, bare) if bare is not host else (host,)
        if self._suffix:
            best: tuple[int, VirtualHost] | None = None
            for name in candidates:
                for i in range(1, len(name)):
                    vh = self._suffix.get(name[i:])
                    if vh is not None:
                        if best is None or len(name) - i > best[0]:
                            best = (len(name) - i, vh)
                        break
            if best is not None:
                return best[1]
        if self._prefix:
            best = None
            for name in candidates:
                for i in range(len(name) - 1, 0, -1):
                    vh = self._prefix.get(name[:i])
                    if vh is not None:
                        if best is None or i > best[0]:
                            best = (i, vh)
                        break
            if best is not None:
                return best[1]
        return self._any

    def match(self, head: RequestHead) -> Route | None:
        """
        @return: the first route of the matching virtual host that takes
            C{head}, or C{None} (no route: Envoy's C{NR}).
        """
        authority = head.authority
        vh = self._vhost_cache.get(authority, _UNCACHED)
        if vh is _UNCACHED:
            vh = self.virtual_host(authority)
            if len(self._vhost_cache) >= _VHOST_CACHE_SIZE:
                # Hostile clients can send endless distinct Hosts: bound it.
                self._vhost_cache.clear()
            self._vhost_cache[authority] = vh
        if vh is None:
            return None
        path = head.path_only
        for route in vh.routes:
            if route_matches(route.match, head, path):
                return route
        return None
