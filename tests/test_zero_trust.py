"""
Zero trust end to end with real processes: a pilot with its CA, sidecars
that get workload certificates over the channel, and Istio security
documents in the pilot's config directory.

  - traffic between sidecars is mutual TLS: a tap between them sees only
    TLS records, and the app behind the server sidecar sees the caller's
    SPIFFE ID in C{x-forwarded-client-cert};
  - PeerAuthentication STRICT refuses a plaintext client, PERMISSIVE takes
    both;
  - an AuthorizationPolicy denies C{GET /admin} from namespace C{other};
  - a RequestAuthentication tells a valid JWT from an invalid one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support import curl, free_port, poll_until
from tests.test_mesh_processes import TXMESH, PilotProcess, join_token, run_txmesh
from tests.test_proxy_process import TWISTD, ProxyProcess

SIDECAR = """\
node: {{id: {name}, workload: {name}, namespace: {namespace}, app: {app}, labels: {{app: {app}}}}}
admin: {{address: "tcp:{{admin}}:interface=127.0.0.1"}}
pilot:
  addresses: ["{pilot}"]
  ca_file: {root}
  token_file: {token}
  inbound_port: {inbound}
  app_port: {app_port}
  outbound_address: "tcp:{{http}}:interface=127.0.0.1"
  backoff_base: 0.1
  backoff_max: 0.5
"""

SERVICES = """\
services:
  - host: api.default.svc.cluster.local
    ports: [{{name: http, number: 80, protocol: HTTP}}]
    endpoints:
      - {{address: 127.0.0.1, port: {api_endpoint}, labels: {{app: api, security.istio.io/tlsMode: istio}}}}
"""

ROUTES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api.default.svc.cluster.local]
  http: [{route: [{destination: {host: api.default.svc.cluster.local}}]}]
"""

PEER_AUTHENTICATION = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: default}}
spec: {{mtls: {{mode: {mode}}}}}
"""

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin-from-other, namespace: default}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: DENY
  rules:
    - from: [{{source: {{namespaces: [other]}}}}]
      to: [{{operation: {{methods: [GET], paths: [/admin]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: secure-needs-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: DENY
  rules:
    - from: [{{source: {{notRequestPrincipals: ["*"]}}}}]
      to: [{{operation: {{paths: [/secure]}}}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
    - issuer: https://issuer.example
      jwks: '{jwks}'
"""


class EchoApp(Resource):
    """
    An app that knows nothing of the mesh: answers with what it received.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        return json.dumps({"path": request.uri.decode(), "headers": headers}).encode()


class Tap(protocol.Protocol):
    """
    A TCP relay between two sidecars that keeps what went through.
    """

    def __init__(self, target: int, seen: list[bytes]):
        self._target = target
        self._seen = seen
        self._peer: Any = None
        self._buffer: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        relay = _Relay(self)
        d = TCP4ClientEndpoint(reactor, "127.0.0.1", self._target).connect(protocol.Factory.forProtocol(lambda: relay))

        def connected(p: Any) -> None:
            self._peer = p
            self.transport.resumeProducing()

        d.addCallbacks(connected, lambda _: self.transport.loseConnection())

    def dataReceived(self, data: bytes) -> None:
        self._seen.append(data)
        self._peer.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self._peer is not None:
            self._peer.transport.loseConnection()


class _Relay(protocol.Protocol):
    def __init__(self, tap: Tap):
        self._tap = tap

    def dataReceived(self, data: bytes) -> None:
        self._tap.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self._tap.transport.loseConnection()


class ZeroTrustTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> Any:
        if not os.path.exists(TWISTD) or not os.path.exists(TXMESH):
            raise unittest.SkipTest(f"no twistd/txmesh next to {sys.executable} (pip install -e .)")
        self.dir = tempfile.mkdtemp(prefix="txmesh-zero-trust-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        for sub in ("istio", "services"):
            os.mkdir(os.path.join(self.dir, sub))
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def write(self, relative: str, text: str) -> None:
        path = os.path.join(self.dir, relative)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(textwrap.dedent(text))
        os.replace(tmp, path)

    def jwks(self) -> str:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256", "use": "sig"}]})

    def token(self, issuer: str = "https://issuer.example") -> str:
        now = int(time.time())
        return jwt.encode({"iss": issuer, "sub": "alice", "iat": now, "exp": now + 600}, self.key,
                          algorithm="RS256", headers={"kid": "k1"})

    @defer.inlineCallbacks
    def sidecar(self, pilot: PilotProcess, name: str, namespace: str, app: str, app_port: int,
                inbound: int) -> Any:
        proxy = ProxyProcess(self)
        proxy.write(SIDECAR.format(name=name, namespace=namespace, app=app, pilot=pilot.address,
                                   root=os.path.join(self.dir, "ca", "root-cert.pem"),
                                   token=join_token(self.dir, app, namespace), inbound=inbound, app_port=app_port))
        proxy.start()
        yield proxy.wait_ready()
        return proxy

    @defer.inlineCallbacks
    def call(self, proxy: ProxyProcess, path: str, *headers: str) -> Any:
        args = ["-s", "--max-time", "3", "-o", "-", "-w", "\n%{http_code}", "-H", "Host: api.default.svc.cluster.local"]
        for h in headers:
            args += ["-H", h]
        out, _, code = yield curl(*args, proxy.http + path)
        if code != 0:
            return 0, b""
        body, _, status = out.rpartition(b"\n")
        return int(status), body

    def until(self, check: Any, what: str, timeout: float = 15.0) -> Any:
        return poll_until(check, what, timeout)

    @defer.inlineCallbacks
    def test_zero_trust(self) -> Any:
        app_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(EchoApp()))
        self.addCleanup(app_port.stopListening)
        api_inbound = free_port()
        seen: list[bytes] = []
        tap = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(lambda: Tap(api_inbound, seen)))
        self.addCleanup(tap.stopListening)
        self.write("services/api.yaml", SERVICES.format(api_endpoint=tap.getHost().port))
        self.write("istio/routes.yaml", ROUTES)
        self.write("istio/peer.yaml", PEER_AUTHENTICATION.format(mode="STRICT"))
        self.write("istio/policies.yaml", POLICIES.format(jwks=self.jwks()))

        pilot = PilotProcess(self, self.dir, "pilot")
        yield pilot.start()
        api = yield self.sidecar(pilot, "api-1", "default", "api", app_port.getHost().port, api_inbound)
        web = yield self.sidecar(pilot, "web-1", "default", "web", free_port(), free_port())
        intruder = yield self.sidecar(pilot, "other-1", "other", "tool", free_port(), free_port())
        self.assertIsNotNone(api)

        # 1. web -> api over mutual TLS; the app learns who called.
        def ok() -> Any:
            return self.call(web, "/hello").addCallback(lambda r: r if r[0] == 200 else None)

        status, body = yield self.until(ok, "web reaching api")
        xfcc = json.loads(body)["headers"].get("x-forwarded-client-cert", "")
        self.assertIn("URI=spiffe://cluster.local/ns/default/sa/web", xfcc)
        self.assertIn("By=spiffe://cluster.local/ns/default/sa/api", xfcc)
        wire = b"".join(seen)
        self.assertEqual(wire[:1], b"\x16")  # a TLS handshake record
        self.assertNotIn(b"GET /hello", wire)
        self.assertNotIn(b"x-forwarded-client-cert", wire.lower())

        # 2. STRICT: a plaintext client straight to api's sidecar gets nothing.
        out, _, code = yield curl("-s", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
                                  f"http://127.0.0.1:{api_inbound}/hello")
        self.assertNotEqual((code, out), (0, b"200"))

        # 3. PERMISSIVE: plaintext and mutual TLS both served.
        self.write("istio/peer.yaml", PEER_AUTHENTICATION.format(mode="PERMISSIVE"))

        def plaintext_ok() -> Any:
            d = curl("-s", "--max-time", "3", f"http://127.0.0.1:{api_inbound}/plain")
            return d.addCallback(lambda r: r[2] == 0 and b'"/plain"' in r[0])

        yield self.until(plaintext_ok, "plaintext accepted in PERMISSIVE")
        status, body = yield self.call(web, "/again")
        self.assertEqual(status, 200)
        self.assertIn("URI=spiffe://cluster.local/ns/default/sa/web",
                      json.loads(body)["headers"]["x-forwarded-client-cert"])

        # 4. Authorization: GET /admin from namespace other is denied.
        def intruder_denied() -> Any:
            return self.call(intruder, "/admin").addCallback(lambda r: r if r[0] == 403 else None)

        status, body = yield self.until(intruder_denied, "the DENY policy")
        self.assertEqual(body, b"RBAC: access denied")
        status, _ = yield self.call(web, "/admin")
        self.assertEqual(status, 200)
        status, _ = yield self.call(intruder, "/elsewhere")
        self.assertEqual(status, 200)

        # 5. Request authentication: valid, invalid and missing JWTs.
        status, body = yield self.call(web, "/secure", f"Authorization: Bearer {self.token()}")
        self.assertEqual(status, 200, body)
        status, body = yield self.call(web, "/secure", f"Authorization: Bearer {self.token('https://evil')}")
        self.assertEqual(status, 401, body)
        status, body = yield self.call(web, "/secure", "Authorization: Bearer not.a.jwt")
        self.assertEqual(status, 401, body)
        status, body = yield self.call(web, "/secure")
        self.assertEqual((status, body), (403, b"RBAC: access denied"))

        # The proxies' identities, as the operator sees them.
        listed = run_txmesh("proxy-status", "-o", "json", pilot=pilot)
        self.assertEqual(sorted(p["status"] for p in json.loads(listed.stdout)), ["SYNCED"] * 3)
