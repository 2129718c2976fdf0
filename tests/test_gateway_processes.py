"""
Gateways end to end with real processes: a C{txmesh-pilot}, two
C{txmesh-proxy --router} gateways (ingress and egress) and a sidecar, with
real upstreams and C{curl} as the client.

Ingress: an Istio C{Gateway} with an HTTP port (one host redirected to
HTTPS, one served in the clear) and an HTTPS port with two operator
certificates chosen by SNI, one of them C{MUTUAL}; VirtualServices bound to
the gateway route each host.

Egress: a VirtualService bound to C{mesh} and to the egress gateway sends
the sidecar's requests for an external host to the egress gateway, which
sends them on over TLS (origination by a DestinationRule C{tls.mode:
SIMPLE}) to a TLS server standing in for the external service.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support import RecordingFactory, curl, fixed_response, free_port, listen_upstream, sleep
from tests.test_mesh_processes import TXMESH, PilotProcess, join_token
from tests.test_proxy_process import TWISTD, ProxyProcess
from tests.test_tls import make_ca, make_server_cert, pem_cert, pem_key

GATEWAY_BOOTSTRAP = """\
node: {{id: {node}, workload: {node}, namespace: istio-system}}
admin: {{address: "tcp:{{admin}}:interface=127.0.0.1"}}
pilot: {{backoff_base: 0.1, backoff_max: 0.5}}
"""

SIDECAR_BOOTSTRAP = """\
node: {id: sleep, workload: sleep, namespace: default}
admin: {address: "tcp:{admin}:interface=127.0.0.1"}
pilot:
  outbound_address: "tcp:{http}:interface=127.0.0.1"
  backoff_base: 0.1
  backoff_max: 0.5
"""

MESH = """\
inbound_address: "tcp:{port}:interface=127.0.0.1"
"""

ISTIO = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - port: {{number: {http}, name: http, protocol: HTTP}}
      hosts: [bookinfo.example.com]
      tls: {{httpsRedirect: true}}
    - port: {{number: {http}, name: http-plain, protocol: HTTP}}
      hosts: [plain.example.com]
    - port: {{number: {https}, name: https, protocol: HTTPS}}
      hosts: [bookinfo.example.com]
      tls: {{mode: SIMPLE, credentialName: bookinfo-cert}}
    - port: {{number: {https}, name: https-api, protocol: HTTPS}}
      hosts: ["default/api.example.com"]
      tls: {{mode: MUTUAL, credentialName: api-cert}}
    - port: {{number: {passthrough}, name: tls, protocol: TLS}}
      hosts: [secure.example.com]
      tls: {{mode: PASSTHROUGH}}
    - port: {{number: {tcp}, name: tcp, protocol: TCP}}
      hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
    - port: {{number: {egress}, name: http, protocol: HTTP}}
      hosts: [external.example]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {web}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: default}}
spec:
  hosts: [api]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {api}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bookinfo}}
spec:
  hosts: [bookinfo.example.com, plain.example.com]
  gateways: [istio-system/ingress]
  http: [{{route: [{{destination: {{host: web}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure}}
spec:
  hosts: [secure-backend]
  ports: [{{number: 443, name: tls, protocol: TLS, targetPort: {secure}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: secure}}
spec:
  hosts: [secure.example.com]
  gateways: [istio-system/ingress]
  tls:
    - match: [{{sniHosts: [secure.example.com], port: {passthrough}}}]
      route: [{{destination: {{host: secure-backend}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: raw-tcp}}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  tcp: [{{match: [{{port: {tcp}}}], route: [{{destination: {{host: web}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: default}}
spec:
  hosts: [api.example.com]
  gateways: [istio-system/ingress]
  http: [{{route: [{{destination: {{host: api}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: egressgateway, namespace: istio-system}}
spec:
  hosts: [istio-egressgateway.istio-system.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {egress}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external}}
spec:
  hosts: [external.example]
  location: MESH_EXTERNAL
  ports: [{{number: 443, name: https, protocol: HTTPS, targetPort: {external}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: external}}
spec:
  host: external.example
  trafficPolicy:
    tls: {{mode: SIMPLE, sni: external.example, caCertificates: {external_ca}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: external-through-egress}}
spec:
  hosts: [external.example]
  gateways: [istio-system/egress, mesh]
  http:
    - match: [{{gateways: [mesh]}}]
      route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local, port: {{number: 80}}}}}}]
    - match: [{{gateways: [istio-system/egress], port: {egress}}}]
      route: [{{destination: {{host: external.example, port: {{number: 443}}}}}}]
"""


class _External(BaseHTTPRequestHandler):
    """
    The external service: HTTPS, answering with what it saw.
    """

    def do_GET(self) -> None:
        body = json.dumps({"service": "external", "host": self.headers.get("host"),
                           "name": getattr(self.server, "name", None),
                           "sni": getattr(self.server, "last_sni", None)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class GatewayProcessTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> Any:
        if not os.path.exists(TWISTD) or not os.path.exists(TXMESH):
            raise unittest.SkipTest(f"no twistd/txmesh next to {sys.executable} (pip install -e .)")
        self.dir = tempfile.mkdtemp(prefix="txmesh-gateway-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.mkdir(os.path.join(self.dir, "istio"))
        self.ca, self.ca_key = make_ca()
        self.ca_path = self.write("operator-ca.pem", pem_cert(self.ca))

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def credential(self, name: str, host: str, ca: bool = False) -> None:
        cert, key = make_server_cert(self.ca, self.ca_key, host, names=(host,))
        self.write(f"credentials/{name}/tls.crt", pem_cert(cert))
        self.write(f"credentials/{name}/tls.key", pem_key(key))
        if ca:
            self.write(f"credentials/{name}/ca.crt", pem_cert(self.ca))

    def tls_server(self, name: str) -> int:
        """
        @return: the port of an HTTPS server with a certificate for C{name}
            that answers with the Host and SNI it saw.
        """
        cert, key = make_server_cert(self.ca, self.ca_key, name, names=(name,))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.write(f"{name}.pem", pem_cert(cert)), self.write(f"{name}.key", pem_key(key)))
        server = ThreadingHTTPServer(("127.0.0.1", 0), _External)
        server.name = name  # type: ignore[attr-defined]

        def remember_sni(sock: Any, name: str | None, ctx: Any) -> None:
            server.last_sni = name  # type: ignore[attr-defined]

        context.sni_callback = remember_sni
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return server.server_address[1]

    @defer.inlineCallbacks
    def gateway(self, pilot: PilotProcess, node: str, label: str) -> Any:
        proxy = ProxyProcess(self)
        proxy.write(GATEWAY_BOOTSTRAP.format(node=node))
        proxy.start("--pilot", pilot.address, "--pilot-ca", os.path.join(self.dir, "ca", "root-cert.pem"),
                    "--pilot-token-file", join_token(self.dir, node, "istio-system"),
                    "--router", "--label", f"istio={label}")
        yield proxy.wait_ready()
        return proxy

    @defer.inlineCallbacks
    def wait_curl(self, *args: str, expect: bytes, timeout: float = 15.0) -> Any:
        deadline = reactor.seconds() + timeout
        while True:
            out, err, code = yield curl("--max-time", "2", "-s", *args)
            if code == 0 and expect in out:
                return out
            if reactor.seconds() > deadline:
                raise AssertionError(f"curl {' '.join(args)}: {code} {out!r} {err!r}, expected {expect!r}")
            yield sleep(0.1)

    @defer.inlineCallbacks
    def test_ingress_and_egress(self) -> Any:
        web = yield listen_upstream(self, RecordingFactory(fixed_response(b"web")))
        api = yield listen_upstream(self, RecordingFactory(fixed_response(b"api")))
        external = self.tls_server("external.example")
        secure = self.tls_server("secure.example.com")
        ports = {"http": free_port(), "https": free_port(), "egress": free_port(), "passthrough": free_port(),
                 "tcp": free_port()}
        self.credential("bookinfo-cert", "bookinfo.example.com")
        self.credential("api-cert", "api.example.com", ca=True)
        client, client_key = make_server_cert(self.ca, self.ca_key, "operator", names=("client.example",),
                                              client=True)
        client_cert = self.write("client.pem", pem_cert(client))
        client_key_path = self.write("client.key", pem_key(client_key))
        self.write("mesh.yaml", MESH.encode())
        self.write("istio/gateways.yaml", ISTIO.format(web=web, api=api, external=external, secure=secure,
                                                       external_ca=self.ca_path, **ports).encode())
        pilot = PilotProcess(self, self.dir, "pilot")
        yield pilot.start()
        ingress = yield self.gateway(pilot, "ingressgateway", "ingressgateway")
        egress = yield self.gateway(pilot, "egressgateway", "egressgateway")

        http, https = ports["http"], ports["https"]
        resolve = ["--resolve", f"bookinfo.example.com:{https}:127.0.0.1",
                   "--resolve", f"api.example.com:{https}:127.0.0.1",
                   "--resolve", f"bookinfo.example.com:{http}:127.0.0.1",
                   "--resolve", f"plain.example.com:{http}:127.0.0.1",
                   "--resolve", f"other.example.com:{http}:127.0.0.1"]

        # HTTPS with the operator's certificate for the SNI name (curl checks
        # the name against the CA), routed to the host's service.
        yield self.wait_curl(*resolve, "--cacert", self.ca_path, f"https://bookinfo.example.com:{https}/",
                             expect=b"web")
        # The other certificate on the same port, MUTUAL: refused without a
        # client certificate, served with one.
        _, _, code = yield curl("--max-time", "5", "-s", *resolve, "--cacert", self.ca_path,
                                f"https://api.example.com:{https}/")
        self.assertNotEqual(code, 0)
        yield self.wait_curl(*resolve, "--cacert", self.ca_path, "--cert", client_cert, "--key", client_key_path,
                             f"https://api.example.com:{https}/", expect=b"api")
        # httpsRedirect on the HTTP port; another host there in the clear;
        # a host no server takes gets 404.
        out = yield self.wait_curl(*resolve, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                                   f"http://bookinfo.example.com:{http}/page?x=1", expect=b"301")
        self.assertEqual(out, f"301 https://bookinfo.example.com:{https}/page?x=1".encode())
        yield self.wait_curl(*resolve, f"http://plain.example.com:{http}/", expect=b"web")
        out, _, _ = yield curl("--max-time", "2", "-s", "-o", "/dev/null", "-w", "%{http_code}", *resolve,
                               f"http://other.example.com:{http}/")
        self.assertEqual(out, b"404")

        # TLS passthrough: routed by SNI, not terminated (the backend's own
        # certificate reaches curl); an unknown name is closed.  TCP: bytes
        # relayed to the route's service.
        passthrough = ports["passthrough"]
        out = yield self.wait_curl("--resolve", f"secure.example.com:{passthrough}:127.0.0.1", "--cacert",
                                   self.ca_path, f"https://secure.example.com:{passthrough}/", expect=b"secure")
        self.assertEqual(json.loads(out)["sni"], "secure.example.com")
        _, _, code = yield curl("--max-time", "5", "-s", "-k", "--resolve",
                                f"other.example.com:{passthrough}:127.0.0.1",
                                f"https://other.example.com:{passthrough}/")
        self.assertNotEqual(code, 0)
        yield self.wait_curl(f"http://127.0.0.1:{ports['tcp']}/", expect=b"web")

        # Egress: the sidecar sends external.example to the egress gateway,
        # which originates TLS to the external server.
        sidecar = ProxyProcess(self)
        sidecar.write(SIDECAR_BOOTSTRAP)
        sidecar.start("--pilot", pilot.address, "--pilot-ca", os.path.join(self.dir, "ca", "root-cert.pem"),
                      "--pilot-token-file", join_token(self.dir, "sleep"))
        yield sidecar.wait_ready()
        out = yield self.wait_curl("-H", "host: external.example", sidecar.http + "/", expect=b"external")
        seen = json.loads(out)
        self.assertEqual((seen["host"], seen["sni"]), ("external.example", "external.example"))
        # Both hops are metered: the sidecar's and the egress gateway's
        # source-side istio_requests_total.
        for proxy in (sidecar, egress):
            stats, _, _ = yield curl("-s", proxy.admin + "/stats/prometheus")
            self.assertIn(b"istio_requests_total{", stats)
        stats, _, _ = yield curl("-s", egress.admin + "/stats/prometheus")
        self.assertIn(b'destination_service="external.example"', stats)
        stats, _, _ = yield curl("-s", ingress.admin + "/stats/prometheus")
        self.assertIn(b'response_code="301"', stats)
