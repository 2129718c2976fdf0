"""
The admin endpoint: a small HTTP API on its own listener for operators and
orchestrators -- readiness, the live config, cluster state and metrics.

It is not on the request path, so it is built on C{twisted.web}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

JSON = b"application/json"


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[Any], bytes]):
        super().__init__()
        self._render = render

    def render_GET(self, request: Any) -> bytes:
        return self._render(request)


def _json(request: Any, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode("utf-8") + b"\n"


class AdminSite(Site):
    """
    The admin endpoint's site; it keeps no access log of its own.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


class AdminResource(Resource):
    """
    The admin API's root.

    Pages: C{/ready}, C{/config_dump}, C{/clusters}, C{/stats/prometheus},
    C{/pilot} (the pilot channel's status; C{null} without a pilot).
    """

    def __init__(self, state: Any):
        """
        @param state: the proxy, which offers C{is_ready()},
            C{config_dump()}, C{clusters_dump()}, C{pilot_status()} and
            C{metrics_text()}.
        """
        super().__init__()
        self._state = state
        self.putChild(b"ready", _Leaf(self._ready))
        self.putChild(b"config_dump", _Leaf(lambda r: _json(r, state.config_dump())))
        self.putChild(b"clusters", _Leaf(lambda r: _json(r, state.clusters_dump())))
        self.putChild(b"pilot", _Leaf(lambda r: _json(r, state.pilot_status())))
        stats = Resource()
        stats.putChild(b"prometheus", _Leaf(self._prometheus))
        self.putChild(b"stats", stats)
        self.putChild(b"", _Leaf(self._index))

    def _ready(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        if self._state.is_ready():
            return b"LIVE\n"
        request.setResponseCode(503)
        return b"NOT READY\n"

    def _prometheus(self, request: Any) -> bytes:
        content_type, body = self._state.metrics_text()
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body

    def _index(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"txmesh-proxy admin: /ready /config_dump /clusters /pilot /stats/prometheus\n"
