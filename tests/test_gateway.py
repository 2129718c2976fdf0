"""
Gateways, the pure parts: reading C{Gateway} documents, binding
VirtualServices to gateways, the gateway listeners the pilot builds, and
choosing a certificate by SNI.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import yaml
from twisted.trial import unittest

from tests.test_tls import make_ca, make_server_cert, pem_cert, pem_key
from txmesh.config.errors import ConfigError
from txmesh.config.gateway import PROXY_TYPE_LABEL, ROUTER, gateways_for, parse_gateway, parse_gateways
from txmesh.config.istio import translate
from txmesh.config.loader import ConfigLoader
from txmesh.filters.registry import FilterRegistry
from txmesh.pilot.credentials import Credential, load_credentials
from txmesh.pilot.gateways import build_gateway_snapshot, gateway_view, is_router, selected_gateways
from txmesh.pilot.snapshot import MeshConfig, Node
from txmesh.proxy.sni_router import SNIRouterFactory, client_hello_state
from txmesh.proxy.tls import select_by_server_name, server_name_matches


def gateway(servers: list[dict[str, Any]], name: str = "ingress", selector: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": "istio-system"},
            "spec": {"selector": selector or {"istio": "ingressgateway"}, "servers": servers}}


HTTP = {"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}
HTTPS = {"port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["bookinfo.example.com"],
         "tls": {"mode": "SIMPLE", "credentialName": "bookinfo"}}


class ParseTests(unittest.SynchronousTestCase):
    def test_servers(self) -> None:
        g = parse_gateway(gateway([HTTP, HTTPS]), "gw.yaml", 1)
        self.assertEqual(g.key, "istio-system/ingress")
        self.assertEqual([(s.port, s.protocol) for s in g.servers], [(8080, "HTTP"), (8443, "HTTPS")])
        self.assertEqual(g.servers[1].tls.credential_name, "bookinfo")
        self.assertEqual(g.servers[0].hosts, (("*", "*"),))

    def test_host_namespaces(self) -> None:
        server = dict(HTTP, hosts=["./a.example.com", "shop/b.example.com", "*/c.example.com", "d.example.com"])
        s = parse_gateway(gateway([server])).servers[0]
        self.assertEqual(s.hosts, (("istio-system", "a.example.com"), ("shop", "b.example.com"),
                                   ("*", "c.example.com"), ("*", "d.example.com")))
        self.assertTrue(s.admits("shop", "b.example.com"))
        self.assertFalse(s.admits("default", "b.example.com"))

    def test_selection(self) -> None:
        gateways = parse_gateways([("gw.yaml", 1, gateway([HTTP])),
                                   ("gw.yaml", 2, gateway([HTTP], "egress", {"istio": "egressgateway"}))])
        self.assertEqual([g.name for g in gateways_for(gateways, {"istio": "egressgateway", "x": "y"})], ["egress"])
        node = Node("gw", labels=((PROXY_TYPE_LABEL, ROUTER),))
        self.assertTrue(is_router(node))
        self.assertFalse(is_router(Node("sidecar")))

    def errors(self, body: dict[str, Any]) -> ConfigError:
        return self.assertRaises(ConfigError, parse_gateway, body, "gw.yaml", 3)

    def test_bad_documents(self) -> None:
        cases = [
            (gateway([dict(HTTPS, tls=None)]), "spec.servers[0].tls", "needs tls"),
            (gateway([dict(HTTPS, tls={"mode": "SIMPLE"})]), "spec.servers[0].tls.credentialName",
             "needs credentialName"),
            (gateway([dict(HTTPS, tls={"mode": "ISTIO_MUTUAL", "credentialName": "x"})]),
             "spec.servers[0].tls.mode", "not supported"),
            (gateway([dict(HTTP, port={"number": 9000, "name": "t", "protocol": "TLS"},
                           tls={"mode": "SIMPLE", "credentialName": "x"})]),
             "spec.servers[0].tls.mode", "mode PASSTHROUGH"),
            (gateway([dict(HTTP, port={"number": 9000, "name": "t", "protocol": "TLS"},
                           tls={"mode": "PASSTHROUGH", "credentialName": "x"})]),
             "spec.servers[0].tls.credentialName", "no certificate"),
            (gateway([dict(HTTP, hosts=["/x"])]), "spec.servers[0].hosts[0]", "NAMESPACE/HOST"),
            (gateway([dict(HTTP, port={"number": 8443, "name": "h", "protocol": "HTTP"}), HTTPS]),
             "spec.servers[1].port", "one port has one kind"),
            (gateway([dict(HTTP, port={"number": 0, "name": "h", "protocol": "HTTP"})]),
             "spec.servers[0].port.number", "between 1 and 65535"),
            (gateway([dict(HTTP, bogus=1)]), "spec.servers[0].bogus", "unknown field"),
        ]
        for body, field, reason in cases:
            e = self.errors(body)
            self.assertEqual((e.source, e.document, e.field), ("gw.yaml", 3, field), str(e))
            self.assertIn(reason, e.reason)


SERVICE = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "web"},
           "spec": {"hosts": ["web"], "ports": [{"number": 80, "name": "http"}], "resolution": "STATIC",
                    "endpoints": [{"address": "127.0.0.1", "ports": {"http": 9000}}]}}


def virtual_service(gateways: list[str] | None, match: list[dict] | None = None) -> dict:
    spec: dict[str, Any] = {"hosts": ["bookinfo.example.com"],
                            "http": [{"route": [{"destination": {"host": "web"}}]}]}
    if gateways is not None:
        spec["gateways"] = gateways
    if match is not None:
        spec["http"][0]["match"] = match
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "bookinfo", "namespace": "istio-system"}, "spec": spec}


def docs(*bodies: Any) -> list[tuple[str, int, Any]]:
    return [("istio.yaml", i + 1, b) for i, b in enumerate(bodies)]


class BindingTests(unittest.SynchronousTestCase):
    def routed(self, vs: dict, gateways: list[str] | None, port: int | None = None) -> list[str]:
        out = translate(docs(SERVICE, vs), "istio-system", gateways=gateways, gateway_port=port)
        return [d for vh in out.virtual_hosts for d in vh.domains if "example" in d]

    def test_bound_by_name_or_namespace_name(self) -> None:
        for written in (["ingress"], ["istio-system/ingress"]):
            self.assertEqual(self.routed(virtual_service(written), ["istio-system/ingress"], 8080),
                             ["bookinfo.example.com", "bookinfo.example.com:8080"])
            self.assertEqual(self.routed(virtual_service(written), None), [])

    def test_mesh_default(self) -> None:
        self.assertEqual(self.routed(virtual_service(None), ["istio-system/ingress"], 8080), [])
        self.assertNotEqual(self.routed(virtual_service(None), None), [])

    def test_match_gateways_and_port(self) -> None:
        vs = virtual_service(["ingress", "mesh"], [{"gateways": ["ingress"], "port": 8080}])
        self.assertNotEqual(self.routed(vs, ["istio-system/ingress"], 8080), [])
        self.assertEqual(self.routed(vs, ["istio-system/ingress"], 8443), [])
        self.assertEqual(self.routed(vs, None), [])

    def test_gateway_gets_no_default_routes(self) -> None:
        out = translate(docs(SERVICE), "istio-system", gateways=["istio-system/ingress"], gateway_port=8080)
        self.assertEqual(out.virtual_hosts, ())

    def test_gateway_document_is_not_a_warning(self) -> None:
        out = translate(docs(SERVICE, gateway([HTTP])), "istio-system")
        self.assertEqual(out.warnings, ())


class ViewTests(unittest.TestCase):
    def setUp(self) -> None:
        ca, key = make_ca()
        self.credentials = {}
        for name, host in (("bookinfo", "bookinfo.example.com"), ("api", "api.example.com")):
            cert, k = make_server_cert(ca, key, host, names=(host,))
            self.credentials[name] = Credential(name, pem_cert(cert), pem_key(k), pem_cert(ca))

    def snapshot(self, *bodies: Any) -> Any:
        mesh = MeshConfig(documents=docs(*bodies), credentials=self.credentials, mtls=True)
        node = Node("gw", namespace="istio-system",
                    labels=(("istio", "ingressgateway"), (PROXY_TYPE_LABEL, ROUTER)))
        view = gateway_view(mesh, "istio-system", selected_gateways(mesh, node))
        return build_gateway_snapshot(mesh, node, view)

    def test_listeners_with_sni_certificates(self) -> None:
        api = dict(HTTPS, hosts=["api.example.com"], tls={"mode": "MUTUAL", "credentialName": "api"})
        redirect = dict(HTTP, hosts=["bookinfo.example.com"], tls={"httpsRedirect": True})
        snapshot = self.snapshot(SERVICE, gateway([redirect, HTTPS, api]), virtual_service(["ingress"]))
        http, https = snapshot.resources["listeners"]
        self.assertEqual((http["name"], https["name"]), ("gateway-8080", "gateway-8443"))
        self.assertEqual(http["virtual_hosts"][0]["routes"][0]["redirect"]["scheme"], "https")
        self.assertEqual([e["server_names"] for e in https["tls"]["sni"]],
                         [["bookinfo.example.com"], ["api.example.com"]])
        self.assertIn("client_ca_pem", https["tls"]["sni"][1])
        self.assertNotIn("client_ca_pem", https["tls"]["sni"][0])
        # The proxy's loader takes it as pushed.
        config = ConfigLoader(FilterRegistry.from_plugins()).load_document(snapshot.document(), "<pilot>")
        tls = config.listeners[1].tls
        self.assertEqual([t.server_names for t in tls.sni], [("bookinfo.example.com",), ("api.example.com",)])
        self.assertTrue(tls.sni[1].client_ca_pem)

    def test_unrouted_port_answers_404(self) -> None:
        snapshot = self.snapshot(SERVICE, gateway([HTTP]))
        [listener] = snapshot.resources["listeners"]
        self.assertEqual(listener["virtual_hosts"][0]["routes"][0]["direct_response"]["status"], 404)

    def test_missing_credential(self) -> None:
        e = self.assertRaises(ConfigError, self.snapshot, SERVICE, gateway([dict(HTTPS, tls={
            "mode": "SIMPLE", "credentialName": "nope"})]))
        self.assertIn("credentials/nope/", e.reason)


class CredentialTests(unittest.TestCase):
    def test_load_and_refuse(self) -> None:
        base = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, base, True)
        ca, key = make_ca()
        cert, k = make_server_cert(ca, key)
        os.makedirs(os.path.join(base, "good"))
        for name, data in (("tls.crt", pem_cert(cert)), ("tls.key", pem_key(k))):
            with open(os.path.join(base, "good", name), "wb") as f:
                f.write(data)
        self.assertEqual(sorted(load_credentials(base)), ["good"])
        os.makedirs(os.path.join(base, "bad"))
        with open(os.path.join(base, "bad", "tls.crt"), "wb") as f:
            f.write(pem_cert(cert))
        e = self.assertRaises(ConfigError, load_credentials, base)
        self.assertEqual(e.source, os.path.join(base, "bad", "tls.key"))
        self.assertEqual(load_credentials(os.path.join(base, "none")), {})


class ServerNameTests(unittest.SynchronousTestCase):
    def test_patterns(self) -> None:
        self.assertTrue(server_name_matches("*", "a.example.com"))
        self.assertTrue(server_name_matches("*.example.com", "a.b.example.com"))
        self.assertFalse(server_name_matches("*.example.com", "example.com"))
        self.assertTrue(server_name_matches("A.example.com", "a.EXAMPLE.com."))
        self.assertFalse(server_name_matches("a.example.com", "b.example.com"))

    def test_most_specific_wins(self) -> None:
        entries = [(["*"], "any"), (["*.example.com"], "wild"), (["a.example.com"], "exact"),
                   (["*.b.example.com"], "longer")]
        self.assertEqual(select_by_server_name(entries, "a.example.com"), "exact")
        self.assertEqual(select_by_server_name(entries, "x.b.example.com"), "longer")
        self.assertEqual(select_by_server_name(entries, "z.example.com"), "wild")
        self.assertEqual(select_by_server_name(entries, "other.org"), "any")
        self.assertEqual(select_by_server_name(entries, None), "any")
        self.assertIsNone(select_by_server_name(entries[1:], None))


class YAMLTests(unittest.SynchronousTestCase):
    def test_documented_example_parses(self) -> None:
        path = os.path.join(os.path.dirname(__file__), "..", "docs", "gateways.md")
        with open(path) as f:
            text = f.read()
        blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
        found = [d for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, dict)]
        gateways = parse_gateways([("gateways.md", i + 1, d) for i, d in enumerate(found)])
        self.assertGreaterEqual(len(gateways), 2)


class L4RouteTests(unittest.SynchronousTestCase):
    VS = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "secure", "namespace": "istio-system"},
          "spec": {"hosts": ["secure.example.com"], "gateways": ["ingress"],
                   "tls": [{"match": [{"sniHosts": ["Secure.example.com"], "port": 443}],
                            "route": [{"destination": {"host": "web"}}]}],
                   "tcp": [{"match": [{"port": 5432}], "route": [{"destination": {"host": "web"}}]}]}}

    def test_tls_and_tcp_routes_on_their_ports(self) -> None:
        tls = translate(docs(SERVICE, self.VS), "istio-system", gateways=["istio-system/ingress"], gateway_port=443)
        self.assertEqual([(r.sni_hosts, r.cluster) for r in tls.tls_routes],
                         [(("secure.example.com",), "outbound|80||web.istio-system.svc.cluster.local")])
        self.assertEqual(tls.tcp_routes, ())
        tcp = translate(docs(SERVICE, self.VS), "istio-system", gateways=["istio-system/ingress"], gateway_port=5432)
        self.assertEqual([r.cluster for r in tcp.tcp_routes], ["outbound|80||web.istio-system.svc.cluster.local"])
        self.assertEqual(tcp.tls_routes, ())

    def test_sidecar_ignores_them_silently_when_bound_to_gateways(self) -> None:
        self.assertEqual(translate(docs(SERVICE, self.VS), "istio-system").warnings, ())

    def test_tls_match_needs_sni_hosts(self) -> None:
        vs = dict(self.VS, spec=dict(self.VS["spec"], tls=[{"match": [{"port": 443}],
                                                            "route": [{"destination": {"host": "web"}}]}]))
        e = self.assertRaises(ConfigError, translate, docs(SERVICE, vs), "istio-system",
                              gateways=["istio-system/ingress"], gateway_port=443)
        self.assertEqual(e.field, "spec.tls[0].match[0].sniHosts")

    def test_passthrough_listener(self) -> None:
        server = {"port": {"number": 443, "name": "tls", "protocol": "TLS"}, "hosts": ["secure.example.com"],
                  "tls": {"mode": "PASSTHROUGH"}}
        tcp = {"port": {"number": 5432, "name": "pg", "protocol": "TCP"}, "hosts": ["*"]}
        mesh = MeshConfig(documents=docs(SERVICE, gateway([server, tcp]), self.VS))
        node = Node("gw", namespace="istio-system", labels=(("istio", "ingressgateway"),))
        view = gateway_view(mesh, "istio-system", selected_gateways(mesh, node))
        passthrough, relay = view.listeners
        self.assertEqual((passthrough["protocol"], passthrough["sni_routes"]),
                         ("tcp", [{"server_names": ["secure.example.com"],
                                   "cluster": "outbound|80||web.istio-system.svc.cluster.local"}]))
        self.assertEqual(relay["cluster"], "outbound|80||web.istio-system.svc.cluster.local")
        snapshot = build_gateway_snapshot(mesh, node, view)
        config = ConfigLoader(FilterRegistry.from_plugins()).load_document(snapshot.document(), "<pilot>")
        self.assertEqual(config.listeners[0].sni_routes[0].server_names, ("secure.example.com",))


class SNIRouterTests(unittest.SynchronousTestCase):
    def hello(self, name: str) -> bytes:
        """
        A real ClientHello for C{name}, from OpenSSL.
        """
        from OpenSSL import SSL

        client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        client.set_tlsext_host_name(name.encode())
        client.set_connect_state()
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        return client.bio_read(65536)

    def test_client_hello_state(self) -> None:
        hello = self.hello("a.example.com")
        self.assertIsNone(client_hello_state(b""))
        self.assertIsNone(client_hello_state(hello[:3]))
        self.assertIsNone(client_hello_state(hello[:-1]))
        self.assertTrue(client_hello_state(hello))
        self.assertFalse(client_hello_state(b"GET / HTTP/1.1\r\n"))

    def route(self, name: str | None) -> Any:
        self.asked.append(name)
        return self.relay if name == "a.example.com" else None

    def test_routes_by_sni_with_the_bytes_read(self) -> None:
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        received: list[bytes] = []

        class Sink(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        self.asked: list[str | None] = []
        self.relay = Factory.forProtocol(Sink)
        clock = Clock()
        factory = SNIRouterFactory(self.route, clock, timeout=5)
        hello = self.hello("a.example.com")
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(hello[:10])
        self.assertEqual(self.asked, [])
        protocol.dataReceived(hello[10:] + b"more")
        self.assertEqual(self.asked, ["a.example.com"])
        self.assertEqual(b"".join(received), hello + b"more")
        self.assertFalse(transport.disconnecting)
        # Unknown name: closed; silent client: closed at the timeout.
        other = factory.buildProtocol(None)
        other.makeConnection(StringTransport())
        other.dataReceived(self.hello("b.example.com"))
        self.assertTrue(other.transport.disconnecting)
        silent = factory.buildProtocol(None)
        silent.makeConnection(StringTransport())
        clock.advance(5)
        self.assertEqual(self.asked[-1], None)
        self.assertTrue(silent.transport.disconnecting)
