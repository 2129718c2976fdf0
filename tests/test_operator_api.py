"""
Tests for L{txmesh.pilot.api}: a real pilot on loopback with the operator
site of L{operator_site}, a raw-channel proxy connected to it, and treq over
real sockets.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from tests.test_pilot import ChannelClient
from txmesh.pilot.api import (
    MAX_BODY_BYTES,
    OPENAPI,
    OperatorAPI,
    OperatorRequest,
    loopback_only,
    openapi_text,
    operator_site,
)
from txmesh.pilot.messages import Ack, Hello, Node, Push
from txmesh.pilot.server import APP_PORT_LABEL, INBOUND_PORT_LABEL
from txmesh.pilot.service import PilotService

TIMEOUT = 5.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: a, namespace: default}
spec:
  hosts: [a.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1, labels: {version: v1}}]
"""

VIRTUAL_SERVICE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: default}
spec:
  hosts: [a.example.com]
  http:
    - route: [{destination: {host: a.example.com, port: {number: 80}}}]
      timeout: 5s
"""

DESTINATION_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a, namespace: default}
spec:
  host: a.example.com
  subsets: [{name: v1, labels: {version: v1}}]
"""

# Needs DESTINATION_RULE for its subset.
SUBSET_ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-v1, namespace: default}
spec:
  hosts: [v1.example.com]
  http:
    - route: [{destination: {host: a.example.com, subset: v1, port: {number: 80}}}]
"""

# A valid networking.istio.io document txmesh does not apply: a warning.
SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: s, namespace: default}
spec: {}
"""

SERVICES = """\
services:
  - host: b.default.svc.cluster.local
    ports: [{name: http, number: 8080, protocol: HTTP}]
    endpoints: [{address: 127.0.0.1, port: 18080}, {address: 127.0.0.2, port: 18080}]
"""


def pause(seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class LivePilot:
    """
    Mixin for a C{TestCase}: a pilot on loopback with a config directory, its
    operator site (with C{token}) on another loopback port, and an HTTP client.

    @ivar token: the site's token, or C{None} for an open API.
    """

    token: str | None = None

    def setUp(self) -> defer.Deferred:
        return defer.ensureDeferred(self.start_pilot())

    async def start_pilot(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.istio_dir = os.path.join(self.dir, "istio")
        os.mkdir(self.istio_dir)
        os.mkdir(os.path.join(self.dir, "services"))
        self.write("mesh.yaml", SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE)
        with open(os.path.join(self.dir, "services", "svc.yaml"), "w") as f:
            f.write(SERVICES)
        self.pilot = PilotService(self.dir, reactor, "tcp:0:interface=127.0.0.1", None, poll_interval=0.05)
        self.addCleanup(self.pilot.stopService)
        await self.pilot.startService()
        site = operator_site(self.pilot, "tcp:0:interface=127.0.0.1", self.token)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    def write(self, name: str, text: str) -> None:
        """
        Write an Istio file behind the API's back.
        """
        with open(os.path.join(self.istio_dir, name), "w", encoding="utf-8") as f:
            f.write(text)

    @defer.inlineCallbacks
    def proxy(self, node_id: str = "p1", ack: bool = True) -> Any:
        """
        Connect a proxy, take its first push and (by default) ACK it.
        """
        client = ChannelClient()
        port = self.pilot.channel_port.getHost().port
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        client.send(Hello(node=Node(id=node_id, workload="a-v1", labels={INBOUND_PORT_LABEL: "15006",
                                                                          APP_PORT_LABEL: "9080"})))
        push = yield client.next()
        if ack:
            client.send(Ack(nonce=push.nonce, version=push.version))
            yield self.wait_for(lambda: any(p["id"] == node_id and p["status"] == "SYNCED"
                                            for p in self.pilot.proxies()))
        return client, push

    @defer.inlineCallbacks
    def wait_for(self, check: Any, timeout: float = TIMEOUT) -> Any:
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() > deadline:
                self.fail("condition not met in time")
            yield pause(0.02)

    @defer.inlineCallbacks
    def call(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
             content_type: bytes | None = b"application/yaml", raw: bool = False) -> Any:
        """
        @return: C{(code, decoded JSON body, response)}.
        """
        headers: dict[bytes, list[bytes]] = {}
        given = self.token if token is None else token
        if given:
            headers[b"authorization"] = [b"Bearer " + given.encode()]
        if body is not None and content_type is not None:
            headers[b"content-type"] = [content_type]
        response = yield self.http.request(method, self.url + path, data=body, headers=headers, timeout=TIMEOUT)
        content = yield response.content()
        return response.code, (content if raw else json.loads(content)), response


class OperatorAPITests(LivePilot, TestCase):
    """
    An open operator API on loopback.
    """

    @defer.inlineCallbacks
    def test_proxies(self) -> Any:
        """
        C{GET /proxies} lists a connected proxy with its sync state.
        """
        _, push = yield self.proxy()
        code, proxies, _ = yield self.call("GET", "/proxies")
        self.assertEqual(code, 200)
        [p] = proxies
        self.assertEqual((p["id"], p["status"], p["acked_version"], p["pushed_version"]),
                         ("p1", "SYNCED", push.version, push.version))
        self.assertEqual((p["nacked_version"], p["last_nack_error"], p["workload"]), (None, None, "a-v1"))
        self.assertEqual(p["warnings"], [])

    @defer.inlineCallbacks
    def test_config(self) -> Any:
        """
        C{GET /proxies/<id>/config} is the whole pushed document.
        """
        _, push = yield self.proxy()
        code, doc, response = yield self.call("GET", "/proxies/p1/config")
        self.assertEqual(code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual((doc["listeners"], doc["clusters"]), (push.resources["listeners"], push.resources["clusters"]))
        self.assertEqual(doc["node"]["id"], "p1")
        self.assertIn("admin", doc)

    @defer.inlineCallbacks
    def test_routes(self) -> Any:
        """
        C{/config/routes} flattens listeners, virtual hosts and routes.
        """
        yield self.proxy()
        code, routes, _ = yield self.call("GET", "/proxies/p1/config/routes")
        self.assertEqual(code, 200)
        # The VirtualService's route, beside the registry services' defaults.
        by_listener = {r["listener"]: r for r in routes if r["listener"] == "inbound"
                       or "a.example.com" in r["domains"]}
        self.assertEqual(sorted(by_listener), ["inbound", "outbound"])
        outbound = by_listener["outbound"]
        self.assertTrue(any("b.default.svc.cluster.local" in r["domains"] for r in routes))
        self.assertIsNotNone(outbound["virtual_host"])
        self.assertEqual((outbound["cluster"], outbound["timeout"]), ("outbound|80||a.example.com", "5000ms"))
        self.assertEqual(by_listener["inbound"]["virtual_host"], None)
        self.assertEqual(by_listener["inbound"]["cluster"], "inbound|9080||a-v1")

    @defer.inlineCallbacks
    def test_clusters(self) -> Any:
        """
        C{/config/clusters}: settings and an endpoint count, no endpoints.
        """
        yield self.proxy()
        code, clusters, _ = yield self.call("GET", "/proxies/p1/config/clusters")
        self.assertEqual(code, 200)
        by_name = {c["name"]: c for c in clusters}
        outbound = by_name["outbound|80||a.example.com"]
        self.assertNotIn("endpoints", outbound)
        self.assertEqual((outbound["lb_policy"], outbound["endpoint_count"]), ("round_robin", 1))
        self.assertIn("connect_timeout", outbound)
        self.assertEqual(by_name["inbound|9080||a-v1"]["lb_policy"], "round_robin")

    @defer.inlineCallbacks
    def test_endpoints(self) -> Any:
        """
        C{/config/endpoints}: each cluster's endpoints as address:port with
        labels and weight.
        """
        yield self.proxy()
        code, endpoints, _ = yield self.call("GET", "/proxies/p1/config/endpoints")
        self.assertEqual(code, 200)
        by_cluster = {e["cluster"]: e for e in endpoints}
        self.assertEqual(by_cluster["outbound|80||a.example.com"],
                         {"cluster": "outbound|80||a.example.com", "endpoint": "10.0.0.1:80", "address": "10.0.0.1",
                          "port": 80, "weight": 1, "labels": {"version": "v1"}})
        self.assertEqual(by_cluster["inbound|9080||a-v1"]["endpoint"], "127.0.0.1:9080")

    @defer.inlineCallbacks
    def test_config_not_found(self) -> Any:
        """
        An unknown proxy or view is 404 with an error.
        """
        yield self.proxy()
        for path in ("/proxies/nobody/config", "/proxies/nobody/config/routes", "/proxies/p1/config/listeners",
                     "/nowhere", "/"):
            code, body, _ = yield self.call("GET", path)
            self.assertEqual(code, 404, path)
            self.assertIn("error", body)
        code, body, _ = yield self.call("GET", "/proxies/nobody/config")
        self.assertEqual(body["error"], "no connected proxy nobody")

    @defer.inlineCallbacks
    def test_method_not_allowed(self) -> Any:
        """
        A known path with the wrong method is 405 with C{Allow}.
        """
        code, body, response = yield self.call("POST", "/proxies", b"x")
        self.assertEqual(code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET"])
        code, body, response = yield self.call("GET", "/config/istio/x.yaml")
        self.assertEqual((code, response.headers.getRawHeaders(b"allow")), (405, [b"DELETE, PUT"]))

    @defer.inlineCallbacks
    def test_services_and_status(self) -> Any:
        """
        C{GET /services} and C{GET /status}, as before.
        """
        code, services, _ = yield self.call("GET", "/services")
        self.assertEqual(code, 200)
        self.assertEqual(list(services), ["b.default.svc.cluster.local"])
        self.assertEqual(len(services["b.default.svc.cluster.local"]["endpoints"]), 2)
        code, status, _ = yield self.call("GET", "/status")
        self.assertEqual(code, 200)
        self.assertTrue(status["config"]["ok"])
        self.assertEqual(status["config"]["generation"], self.pilot.config_version)

    @defer.inlineCallbacks
    def test_openapi(self) -> Any:
        """
        C{GET /openapi.json} serves L{OPENAPI}, which C{docs/openapi.json} holds
        too, and it describes every path.
        """
        code, served, _ = yield self.call("GET", "/openapi.json")
        self.assertEqual(code, 200)
        self.assertEqual(served, OPENAPI)
        with open(os.path.join(REPO, "docs", "openapi.json"), encoding="utf-8") as f:
            text = f.read()
        self.assertEqual(text, openapi_text(), "docs/openapi.json is stale: regenerate it from txmesh.pilot.api")
        self.assertEqual(sorted(OPENAPI["paths"]), [
            "/config/istio/{name}", "/config/validate", "/openapi.json", "/proxies", "/proxies/{proxy}/config",
            "/proxies/{proxy}/config/clusters", "/proxies/{proxy}/config/endpoints",
            "/proxies/{proxy}/config/routes", "/services", "/status",
        ])
        self.assertEqual(OPENAPI["components"]["securitySchemes"]["bearer"], {"type": "http", "scheme": "bearer"})
        self.assertTrue(OPENAPI["openapi"].startswith("3.0"))

    # --- validate ---

    @defer.inlineCallbacks
    def test_validate_ok(self) -> Any:
        """
        Valid documents: 200 with the translation's warnings; nothing changes.
        """
        generation = self.pilot.config_version
        code, body, _ = yield self.call("POST", "/config/validate", (DESTINATION_RULE + "---\n" + SIDECAR).encode())
        self.assertEqual(code, 200)
        self.assertEqual(body["valid"], True)
        [warning] = body["warnings"]
        self.assertIn("Sidecar is not supported", warning)
        self.assertEqual(self.pilot.config_version, generation)
        self.assertEqual(os.listdir(self.istio_dir), ["mesh.yaml"])

    @defer.inlineCallbacks
    def test_validate_together(self) -> Any:
        """
        Posted documents are checked with the directory's: a VirtualService
        may use a DestinationRule already there, and not one that is not.
        """
        code, body, _ = yield self.call("POST", "/config/validate", SUBSET_ROUTE.encode(), content_type=b"text/plain")
        self.assertEqual(code, 422)
        self.assertEqual(body["valid"], False)
        self.assertEqual(body["error"], "<request>: document 1: spec.http[0].route[0].destination.subset: "
                                        "subset 'v1' is not defined: no DestinationRule for a.example.com")
        self.write("rules.yaml", DESTINATION_RULE)
        code, body, _ = yield self.call("POST", "/config/validate", SUBSET_ROUTE.encode())
        self.assertEqual((code, body), (200, {"valid": True, "warnings": []}))

    @defer.inlineCallbacks
    def test_validate_as_file(self) -> Any:
        """
        C{?name=} validates the body as that file, replacing it.
        """
        self.write("rules.yaml", DESTINATION_RULE)
        self.write("route.yaml", SUBSET_ROUTE)
        code, body, _ = yield self.call("POST", "/config/validate?name=rules.yaml", SIDECAR.encode())
        self.assertEqual(code, 422)
        self.assertIn(os.path.join(self.istio_dir, "route.yaml") + ": document 1: spec.http[0]", body["error"])
        code, body, _ = yield self.call("POST", "/config/validate?name=../x.yaml", SIDECAR.encode())
        self.assertEqual(code, 400)

    @defer.inlineCallbacks
    def test_validate_bad_yaml(self) -> Any:
        """
        A body that is not YAML is 422 naming the request; one that is not
        even declared as YAML is 415.
        """
        code, body, _ = yield self.call("POST", "/config/validate", b"kind: [unclosed\n")
        self.assertEqual(code, 422)
        self.assertTrue(body["error"].startswith("<request>: not valid YAML"), body)
        code, body, _ = yield self.call("POST", "/config/validate", b"\x00\x01", content_type=b"image/png")
        self.assertEqual(code, 415)
        self.assertIn("image/png", body["error"])

    @defer.inlineCallbacks
    def test_body_too_large(self) -> Any:
        """
        A body over 1 MiB is 413, whatever the path, and nothing is written.
        """
        big = b"# " + b"x" * MAX_BODY_BYTES + b"\n"
        code, body, _ = yield self.call("POST", "/config/validate", big)
        self.assertEqual(code, 413)
        self.assertIn("larger than", body["error"])
        code, body, _ = yield self.call("PUT", "/config/istio/big.yaml", big)
        self.assertEqual(code, 413)
        self.assertFalse(os.path.exists(os.path.join(self.istio_dir, "big.yaml")))
        # Exactly the limit is read.
        code, body, _ = yield self.call("POST", "/config/validate", b"#" * (MAX_BODY_BYTES - 1) + b"\n")
        self.assertEqual(code, 200)

    # --- PUT and DELETE ---

    @defer.inlineCallbacks
    def test_put(self) -> Any:
        """
        A valid PUT writes the file, reloads (the generation grows) and
        pushes the change to the proxies.
        """
        client, first = yield self.proxy()
        generation = self.pilot.config_version
        code, body, _ = yield self.call("PUT", "/config/istio/rules.yaml", DESTINATION_RULE.encode())
        self.assertEqual((code, body["applied"]), (200, "rules.yaml"))
        self.assertGreater(body["generation"], generation)
        code, body, _ = yield self.call("PUT", "/config/istio/route.yml", SUBSET_ROUTE.encode())
        self.assertEqual(code, 200)
        with open(os.path.join(self.istio_dir, "route.yml"), encoding="utf-8") as f:
            self.assertEqual(f.read(), SUBSET_ROUTE)
        self.assertEqual(sorted(os.listdir(self.istio_dir)), ["mesh.yaml", "route.yml", "rules.yaml"])
        push = yield client.next()
        while "v1.example.com" not in json.dumps(push.resources):
            push = yield client.next()
        self.assertIsInstance(push, Push)
        code, status, _ = yield self.call("GET", "/status")
        self.assertTrue(status["config"]["ok"])

    @defer.inlineCallbacks
    def test_put_replaces(self) -> Any:
        """
        PUT of an existing name replaces it, validated without the old one.
        """
        code, body, _ = yield self.call("PUT", "/config/istio/mesh.yaml",
                                        (SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE.replace("5s", "9s")).encode())
        self.assertEqual(code, 200)
        with open(os.path.join(self.istio_dir, "mesh.yaml"), encoding="utf-8") as f:
            self.assertIn("9s", f.read())

    @defer.inlineCallbacks
    def test_bad_put_writes_nothing(self) -> Any:
        """
        An invalid PUT is 422 and leaves the directory and the pilot as they
        were.
        """
        generation = self.pilot.config_version
        code, body, _ = yield self.call("PUT", "/config/istio/route.yaml", SUBSET_ROUTE.encode())
        self.assertEqual(code, 422)
        self.assertIn("route.yaml: document 1: spec.http[0].route[0].destination.subset", body["error"])
        code, body, _ = yield self.call("PUT", "/config/istio/mesh.yaml", b"kind: [unclosed\n")
        self.assertEqual(code, 422)
        self.assertEqual(os.listdir(self.istio_dir), ["mesh.yaml"])
        with open(os.path.join(self.istio_dir, "mesh.yaml"), encoding="utf-8") as f:
            self.assertEqual(f.read(), SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE)
        self.assertEqual(self.pilot.config_version, generation)

    @defer.inlineCallbacks
    def test_put_refused_by_reload(self) -> Any:
        """
        Should the pilot refuse the written config after all (a file changed
        between check and reload), the old file is put back and it is 422.
        """
        reload = self.pilot.reload
        calls = []

        def refuse_once() -> bool:
            calls.append(1)
            if len(calls) == 1:
                self.pilot.config_error = "other.yaml: refused meanwhile"
                return False
            return reload()

        self.patch(self.pilot, "reload", refuse_once)
        code, body, _ = yield self.call("PUT", "/config/istio/mesh.yaml", SERVICE_ENTRY.encode())
        self.assertEqual((code, body), (422, {"valid": False, "error": "other.yaml: refused meanwhile"}))
        with open(os.path.join(self.istio_dir, "mesh.yaml"), encoding="utf-8") as f:
            self.assertEqual(f.read(), SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE)
        code, body, _ = yield self.call("PUT", "/config/istio/new.yaml", SIDECAR.encode())
        self.assertEqual(code, 200)
        calls.clear()
        code, body, _ = yield self.call("PUT", "/config/istio/newer.yaml", SIDECAR.encode())
        self.assertEqual(code, 422)
        self.assertEqual(sorted(os.listdir(self.istio_dir)), ["mesh.yaml", "new.yaml"])
        self.assertEqual(len(calls), 2)

    @defer.inlineCallbacks
    def test_delete(self) -> Any:
        """
        DELETE removes a file if the rest is valid (and reloads), refuses
        one the rest needs, and is 404 for a missing file.
        """
        self.write("rules.yaml", DESTINATION_RULE)
        self.write("route.yaml", SUBSET_ROUTE)
        self.pilot.reload()
        generation = self.pilot.config_version
        code, body, _ = yield self.call("DELETE", "/config/istio/rules.yaml")
        self.assertEqual(code, 422)
        self.assertIn("route.yaml: document 1", body["error"])
        self.assertTrue(os.path.exists(os.path.join(self.istio_dir, "rules.yaml")))
        code, body, _ = yield self.call("DELETE", "/config/istio/route.yaml")
        self.assertEqual((code, body["deleted"]), (200, "route.yaml"))
        self.assertGreater(body["generation"], generation)
        self.assertEqual(sorted(os.listdir(self.istio_dir)), ["mesh.yaml", "rules.yaml"])
        code, body, _ = yield self.call("DELETE", "/config/istio/route.yaml")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_bad_names(self) -> Any:
        """
        A name with a path separator, or not ending .yaml/.yml, is 400 and
        writes nothing.
        """
        for path in ("/config/istio/..%2Fescape.yaml", "/config/istio/a%5Cb.yaml", "/config/istio/sub/x.yaml",
                     "/config/istio/x.json", "/config/istio/.hidden.yaml", "/config/istio/..", "/config/istio/yaml"):
            code, body, _ = yield self.call("PUT", path, SIDECAR.encode())
            self.assertEqual(code, 400, path)
            self.assertIn("error", body)
            code, _, _ = yield self.call("DELETE", path)
            self.assertEqual(code, 400, path)
        self.assertEqual(os.listdir(self.istio_dir), ["mesh.yaml"])
        self.assertEqual(sorted(os.listdir(self.dir)), ["istio", "services"])


    @defer.inlineCallbacks
    def test_internal_error(self) -> Any:
        """
        A bug in a handler is a JSON 500, logged, with no traceback sent.
        """
        def broken() -> Any:
            raise RuntimeError("boom")

        self.patch(self.pilot, "proxies", broken)
        code, body, _ = yield self.call("GET", "/proxies")
        self.assertEqual(code, 500)
        self.assertNotIn("boom", json.dumps(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_plain_site_limit(self) -> Any:
        """
        The resource enforces its body limit in a plain L{Site} too (where
        the body is buffered whole before it is refused).
        """
        stub = StubTreq(OperatorAPI(self.pilot, max_body=16))
        response = yield stub.post("http://pilot/config/validate", data=b"#" * 17,
                                   headers={b"content-type": [b"application/yaml"]})
        self.assertEqual(response.code, 413)
        response = yield stub.post("http://pilot/config/validate", data=b"#" * 16,
                                   headers={b"content-type": [b"application/yaml"]})
        self.assertEqual(response.code, 200)


class AuthTests(LivePilot, TestCase):
    """
    An operator API with a token.
    """

    token = "s3cret-token"

    @defer.inlineCallbacks
    def test_no_token(self) -> Any:
        """
        Without C{Authorization}, every path is 401 with C{WWW-Authenticate}.
        """
        for method, path in (("GET", "/proxies"), ("GET", "/openapi.json"), ("GET", "/nowhere"),
                             ("POST", "/config/validate"), ("DELETE", "/config/istio/mesh.yaml")):
            code, body, response = yield self.call(method, path, token="")
            self.assertEqual(code, 401, path)
            self.assertIn("bearer token", body["error"])
            [challenge] = response.headers.getRawHeaders(b"www-authenticate")
            self.assertTrue(challenge.startswith(b"Bearer"))
        self.assertTrue(os.path.exists(os.path.join(self.istio_dir, "mesh.yaml")))

    @defer.inlineCallbacks
    def test_wrong_token(self) -> Any:
        """
        A wrong token (or scheme) is 401.
        """
        code, body, response = yield self.call("GET", "/status", token="s3cret-tokeN")
        self.assertEqual(code, 401)
        self.assertIn(b'error="invalid_token"', response.headers.getRawHeaders(b"www-authenticate")[0])
        response = yield self.http.get(self.url + "/status", headers={b"authorization": [b"Basic s3cret-token"]},
                                       timeout=TIMEOUT)
        yield response.content()
        self.assertEqual(response.code, 401)

    @defer.inlineCallbacks
    def test_token(self) -> Any:
        """
        The right token is let through (the scheme in any case).
        """
        code, body, _ = yield self.call("GET", "/status")
        self.assertEqual(code, 200)
        response = yield self.http.get(self.url + "/status", headers={b"authorization": [b"bearer s3cret-token"]},
                                       timeout=TIMEOUT)
        yield response.content()
        self.assertEqual(response.code, 200)


class OperatorSiteTests(SynchronousTestCase):
    """
    L{operator_site} refuses an open API on anything but loopback.
    """

    LOOPBACK = [
        "tcp:15011:interface=127.0.0.1",
        "tcp:0:interface=127.1.2.3",
        "tcp:15011:127.0.0.1",
        r"tcp6:15011:interface=\:\:1",
        r"tcp6:port=15011:interface=\:\:1",
        "ssl:15011:privateKey=key.pem:interface=127.0.0.1",
        "unix:/tmp/txmesh-pilot.sock",
    ]
    NOT_LOOPBACK = [
        ("tcp:15011", "all interfaces"),
        ("tcp:15011:interface=", "all interfaces"),
        ("tcp:15011:interface=0.0.0.0", "not loopback"),
        ("tcp:15011:interface=10.1.2.3", "not loopback"),
        ("tcp:15011:0.0.0.0", "not loopback"),
        ("tcp6:15011", "all interfaces"),
        (r"tcp6:15011:interface=\:\:", "not loopback"),
        ("tcp:15011:interface=localhost", "not an IP address"),
        ("ssl:15011:privateKey=key.pem", "all interfaces"),
        ("systemd:domain=INET:index=0", "cannot tell"),
        ("15011", "cannot tell"),
    ]

    def test_loopback_open(self) -> None:
        for listen in self.LOOPBACK:
            self.assertEqual(loopback_only(listen), (True, ""), listen)
            site = operator_site(object(), listen, None)  # type: ignore[arg-type]
            self.assertIsInstance(site, Site)
            self.assertIs(site.requestFactory, OperatorRequest)

    def test_not_loopback_needs_token(self) -> None:
        for listen, why in self.NOT_LOOPBACK:
            for token in (None, ""):
                with self.assertRaises(ValueError, msg=listen) as cm:
                    operator_site(object(), listen, token)  # type: ignore[arg-type]
                self.assertIn(why, str(cm.exception), listen)
                self.assertIn(listen, str(cm.exception))
            self.assertIsInstance(operator_site(object(), listen, "t"), Site)  # type: ignore[arg-type]
