"""
The pilot's operator HTTP API: JSON views of the connected proxies, their
config, the services the registries know and the pilot's health.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.web.resource import Resource

if TYPE_CHECKING:
    from txmesh.pilot.service import PilotService


class OperatorAPI(Resource):
    """
    C{GET /proxies}, C{/proxies/<id>/config}, C{/services}, C{/status}, as JSON.
    """

    isLeaf = True

    def __init__(self, pilot: PilotService):
        super().__init__()
        self._pilot = pilot

    def _json(self, request: Any, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, indent=2, sort_keys=True).encode("utf-8") + b"\n"

    def render_GET(self, request: Any) -> bytes:
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if path == ["proxies"]:
            return self._json(request, 200, self._pilot.proxies())
        if len(path) == 3 and path[0] == "proxies" and path[2] == "config":
            for channel in self._pilot.channels:
                if channel.node is not None and channel.node.id == path[1]:
                    if channel.snapshot is None:
                        return self._json(request, 404, {"error": f"nothing pushed to {path[1]} yet"})
                    return self._json(request, 200, channel.snapshot.document())
            return self._json(request, 404, {"error": f"no connected proxy {path[1]}"})
        if path == ["services"]:
            return self._json(request, 200, self._pilot.services())
        if path == ["status"]:
            return self._json(request, 200, self._pilot.status())
        return self._json(request, 404, {"error": "not found (try /proxies, /services, /status)"})
