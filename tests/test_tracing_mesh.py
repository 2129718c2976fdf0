"""
Distributed tracing across a real mesh: a pilot pushing telemetry, two
sidecars (real C{twistd} processes) and two services; the services only
copy the trace headers from the request they serve onto the request they
make, as Istio asks of applications.  The spans reach a Zipkin-compatible
collector run by the test: one trace, the right parent links, valid Zipkin
v2 JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support import curl, free_port, sleep
from tests.test_mesh_processes import TXMESH, PilotProcess, join_token
from tests.test_proxy_process import TWISTD, ProxyProcess
from tests.test_zero_trust import SIDECAR
from tests.test_zipkin import Collector

PROPAGATED = (b"traceparent", b"tracestate", b"x-request-id", b"x-b3-traceid", b"x-b3-spanid",
              b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags", b"b3")

SERVICES = """\
services:
  - host: api.default.svc.cluster.local
    ports: [{{name: http, number: 80, protocol: HTTP}}]
    endpoints: [{{address: 127.0.0.1, port: {api}, labels: {{app: api}}}}]
"""

ROUTES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api.default.svc.cluster.local]
  http: [{route: [{destination: {host: api.default.svc.cluster.local}}]}]
"""


class Api(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"api says hi"


class Web(Resource):
    """
    Calls the api through its own sidecar's outbound listener, copying the
    trace headers (the one thing an app does for tracing).
    """

    isLeaf = True

    def __init__(self, outbound: int):
        super().__init__()
        self._outbound = outbound

    def render_GET(self, request: Any) -> Any:
        headers = Headers({b"host": [b"api.default.svc.cluster.local"]})
        for name in PROPAGATED:
            value = request.getHeader(name)
            if value is not None:
                headers.setRawHeaders(name, [value])
        d = Agent(reactor).request(b"GET", f"http://127.0.0.1:{self._outbound}/".encode(), headers)
        d.addCallback(readBody)

        def done(body: bytes) -> None:
            request.write(b"web got: " + body)
            request.finish()

        def failed(failure: Any) -> None:
            request.setResponseCode(502)
            request.write(failure.getErrorMessage().encode())
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET


class TracingMeshTests(unittest.TestCase):
    timeout = 90

    def setUp(self) -> Any:
        if not os.path.exists(TWISTD) or not os.path.exists(TXMESH):
            raise unittest.SkipTest(f"no twistd/txmesh next to {sys.executable} (pip install -e .)")
        self.dir = tempfile.mkdtemp(prefix="txmesh-tracing-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        for sub in ("istio", "services"):
            os.mkdir(os.path.join(self.dir, sub))

    def write(self, relative: str, text: str) -> None:
        with open(os.path.join(self.dir, relative), "w") as f:
            f.write(textwrap.dedent(text))

    @defer.inlineCallbacks
    def sidecar(self, pilot: PilotProcess, app: str, app_port: int, inbound: int) -> Any:
        proxy = ProxyProcess(self)
        proxy.write(SIDECAR.format(name=f"{app}-1", namespace="default", app=app, pilot=pilot.address,
                                   root=os.path.join(self.dir, "ca", "root-cert.pem"),
                                   token=join_token(self.dir, app), inbound=inbound, app_port=app_port))
        proxy.start()
        yield proxy.wait_ready()
        return proxy

    @defer.inlineCallbacks
    def test_one_trace_across_two_services(self) -> Any:
        collector = Collector()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(collector))
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/api/v2/spans"
        self.write("mesh.yaml", f"""\
            telemetry:
              tracing: {{collector: "{url}", sampling: 100, flush_interval: 0.2s}}
            registries: [{{type: file, path: services}}]
            """)
        api_inbound, web_inbound = free_port(), free_port()
        self.write("services/api.yaml", SERVICES.format(api=api_inbound))
        self.write("istio/routes.yaml", ROUTES)

        pilot = PilotProcess(self, self.dir, "pilot")
        yield pilot.start()
        api_app = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(Api()))
        self.addCleanup(api_app.stopListening)
        yield self.sidecar(pilot, "api", api_app.getHost().port, api_inbound)
        web_sidecar = ProxyProcess(self)  # its outbound port is known before the app starts
        web_app = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(Web(web_sidecar.ports["http"])))
        self.addCleanup(web_app.stopListening)
        web_sidecar.write(SIDECAR.format(name="web-1", namespace="default", app="web", pilot=pilot.address,
                                         root=os.path.join(self.dir, "ca", "root-cert.pem"),
                                         token=join_token(self.dir, "web"), inbound=web_inbound,
                                         app_port=web_app.getHost().port))
        web_sidecar.start()
        yield web_sidecar.wait_ready()

        # A client that starts a trace, sampled, with a W3C parent.
        parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        deadline = reactor.seconds() + 20
        while True:
            out, _, code = yield curl("-s", "--max-time", "3", "-H", f"traceparent: {parent}",
                                      "-H", "x-request-id: trace-me-1", f"http://127.0.0.1:{web_inbound}/")
            if out == b"web got: api says hi" or reactor.seconds() > deadline:
                break
            yield sleep(0.2)
        self.assertEqual(out, b"web got: api says hi")

        def spans() -> list[dict]:
            return [s for s in collector.spans if s.get("tags", {}).get("guid:x-request-id") == "trace-me-1"]

        while len(spans()) < 3 and reactor.seconds() < deadline + 10:
            yield sleep(0.1)
        got = spans()
        self.assertEqual(collector.errors, [])  # every span valid against the Zipkin v2 model
        by_kind: dict[tuple[str, str], dict] = {}
        for span in got:
            by_kind[(span["localEndpoint"]["serviceName"], span["kind"])] = span
        self.assertEqual(sorted(by_kind), [("api-1", "SERVER"), ("web-1", "CLIENT"), ("web-1", "SERVER")],
                         json.dumps(got, indent=1))
        web_server, web_client, api_server = (by_kind[("web-1", "SERVER")], by_kind[("web-1", "CLIENT")],
                                              by_kind[("api-1", "SERVER")])
        self.assertEqual({s["traceId"] for s in got}, {"4bf92f3577b34da6a3ce929d0e0e4736"})
        self.assertEqual(web_server["parentId"], "00f067aa0ba902b7")
        self.assertEqual(web_client["parentId"], web_server["id"])
        self.assertEqual(api_server["parentId"], web_client["id"])
        self.assertEqual(api_server["tags"]["http.status_code"], "200")
