"""
The admin endpoint: a small HTTP API on its own listener for operators and
orchestrators -- readiness, the live config, cluster state and metrics.

It is not on the request path, so it is built on C{twisted.web}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

log = Logger()

JSON = b"application/json"


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[Any], bytes]):
        super().__init__()
        self._render = render

    def render_GET(self, request: Any) -> Any:
        body = self._render(request)
        if not isinstance(body, Deferred):
            return body

        # A page the state computes asynchronously (the parent of worker
        # processes asks them, see txmesh.proxy.workers).
        def failed(failure: Any) -> bytes:
            log.failure("admin page {path} failed", failure, path=request.path)
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain")
            return b"internal error\n"

        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(data: bytes) -> None:
            if not gone:
                request.write(data)
                request.finish()

        body.addErrback(failed).addCallback(write)
        return NOT_DONE_YET


def _later(value: Any, then: Callable[[Any], bytes]) -> Any:
    """
    @return: C{then(value)}, or a L{Deferred} of it if C{value} is one.
    """
    if isinstance(value, Deferred):
        return value.addCallback(then)
    return then(value)


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
    C{/pilot} (the pilot channel's status; C{null} without a pilot),
    C{/overload} (the overload manager's state and measures; C{null}
    without an C{overload} section).
    """

    def __init__(self, state: Any):
        """
        @param state: the proxy, which offers C{is_ready()},
            C{config_dump()}, C{clusters_dump()}, C{pilot_status()} and
            C{metrics_text()} (the last two may return a L{Deferred}),
            and may have an C{overload} (an
            L{OverloadManager <txmesh.proxy.overload.OverloadManager>} or
            C{None}).
        """
        super().__init__()
        self._state = state
        self.putChild(b"ready", _Leaf(self._ready))
        self.putChild(b"config_dump", _Leaf(lambda r: _json(r, state.config_dump())))
        self.putChild(b"clusters", _Leaf(lambda r: _later(state.clusters_dump(), lambda v: _json(r, v))))
        self.putChild(b"pilot", _Leaf(lambda r: _json(r, state.pilot_status())))
        self.putChild(b"overload", _Leaf(self._overload))
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

    def _prometheus(self, request: Any) -> Any:
        def page(text: tuple[str, bytes]) -> bytes:
            content_type, body = text
            request.setHeader(b"content-type", content_type.encode("ascii"))
            return body

        return _later(self._state.metrics_text(), page)

    def _overload(self, request: Any) -> bytes:
        overload = getattr(self._state, "overload", None)
        return _json(request, overload.status() if overload is not None else None)

    def _index(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"txmesh-proxy admin: /ready /config_dump /clusters /pilot /overload /stats/prometheus\n"
