"""
Forward-proxy listeners (C{forward_proxy}): apps configured with
C{HTTP_PROXY}/C{HTTPS_PROXY} use the mesh unchanged.

Integration tests run real programs (curl, nginx with TLS, a Python app
using C{urllib} with C{HTTP_PROXY}) through an in-process proxy on loopback
sockets; the pure parts (target parsing, the route lookup, the config) are
tested without sockets.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from zope.interface import implementer

from tests.support import (
    Nginx,
    ProxyHarness,
    RecordingFactory,
    curl,
    fixed_response,
    free_port,
    listen_upstream,
    raw_connect,
    raw_exchange,
)
from tests.test_tls import Certificates
from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.config.model import ForwardProxyConfig, Route, RouteMatch
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory
from txmesh.proxy.forward_proxy import ForwardProxyRoutes, split_host_port
from txmesh.proxy.http1 import ProtocolError, RequestParser, split_absolute_form
from txmesh.proxy.stream import Headers, RequestHead

FORWARD = """
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        forward_proxy: {connect_ports: [{tls_port}, {dead_port}, {echo_port}], allow_hosts: {allow}}
        virtual_hosts:
          - name: mesh
            domains: ["mesh.example"]
            routes: [{match: {prefix: /}, cluster: app, request_headers_to_add: {x-via-mesh: "yes"}}]
    clusters:
      - {name: app, endpoints: ["127.0.0.1:{up}"]}
    """

REVERSE = """
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        routes: [{match: {prefix: /}, cluster: app}]
    clusters:
      - {name: app, endpoints: ["127.0.0.1:{up}"]}
    """

WAIT = 10.0


def _env_without_proxies(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(extra)
    return env


def _request_head(received: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    head = received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return head[0], headers


@implementer(IHalfCloseableProtocol)
class _AnswerAtEOF(Protocol):
    """
    An upstream that reads until end-of-file, then answers on its still
    open write half and closes.
    """

    def connectionMade(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.write(b"got " + self.received)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class ForwardProxyTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, allow: str = '["*"]', tls_port: int = 1, **values: Any) -> Any:
        self.upstream = RecordingFactory(fixed_response(b"from upstream"))
        up = yield listen_upstream(self, self.upstream)
        self.up = up
        self.dead_port = free_port()  # nothing listens there
        echo = Factory.forProtocol(_AnswerAtEOF)
        self.echo_port = yield listen_upstream(self, echo)
        h = ProxyHarness(self, registry=FilterRegistry(http=[RouterFactory()]))
        yield h.start(FORWARD, up=up, allow=allow, tls_port=tls_port, dead_port=self.dead_port,
                      echo_port=self.echo_port, **values)
        self.h = h
        return h

    @defer.inlineCallbacks
    def test_curl_absolute_form_reaches_upstream_in_origin_form(self) -> Any:
        """
        C{curl -x} sends C{GET http://host:port/path}: the upstream gets
        origin form, the target's authority as C{Host}, and no proxy
        headers.
        """
        h = yield self.start()
        out, err, code = yield curl("--noproxy", "", "-x", f"http://127.0.0.1:{h.port()}",
                                    "-H", "Proxy-Authorization: Basic c2VjcmV0",
                                    f"http://127.0.0.1:{self.up}/path?q=1")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"from upstream")
        line, headers = _request_head(self.upstream.all_received())
        self.assertEqual(line, b"GET /path?q=1 HTTP/1.1")
        self.assertEqual(headers[b"host"], f"127.0.0.1:{self.up}".encode())
        self.assertNotIn(b"proxy-connection", headers)
        self.assertNotIn(b"proxy-authorization", headers)
        self.assertIn(b"x-request-id", headers)

    @defer.inlineCallbacks
    def test_mesh_routes_apply(self) -> Any:
        """
        An absolute-form request for a host of the mesh takes the mesh's
        route, not the passthrough.
        """
        h = yield self.start()
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET http://mesh.example/a HTTP/1.1\r\nHost: other\r\n"
                               b"Proxy-Connection: keep-alive\r\n\r\n")
        data = yield client.wait_for(lambda d: d.endswith(b"from upstream"), WAIT)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        line, headers = _request_head(self.upstream.all_received())
        self.assertEqual(line, b"GET /a HTTP/1.1")
        self.assertEqual(headers[b"host"], b"mesh.example")
        self.assertEqual(headers[b"x-via-mesh"], b"yes")

    @defer.inlineCallbacks
    def test_origin_form_without_route_is_404(self) -> Any:
        """
        On a forward-proxy listener an origin-form request's C{Host} alone
        never opens a passthrough.
        """
        h = yield self.start()
        data = yield raw_exchange(
            self, h.port(), f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{self.up}\r\nConnection: close\r\n\r\n".encode())
        self.assertTrue(data.startswith(b"HTTP/1.1 404 "), data)
        self.assertEqual(self.upstream.received, [])

    @defer.inlineCallbacks
    def test_host_not_allowed_is_403(self) -> Any:
        h = yield self.start(allow='["mesh.example", "*.internal"]')
        data = yield raw_exchange(
            self, h.port(),
            f"GET http://127.0.0.1:{self.up}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        self.assertTrue(data.startswith(b"HTTP/1.1 403 "), data)
        self.assertEqual(self.upstream.received, [])

    @defer.inlineCallbacks
    def test_urllib_with_http_proxy(self) -> Any:
        """
        An unchanged app that honours C{HTTP_PROXY} goes through the proxy:
        the upstream sees the proxy's C{x-request-id} and C{x-forwarded-for}.
        """
        h = yield self.start()
        script = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{self.up}/x').read())"
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ("-c", script), env=_env_without_proxies(HTTP_PROXY=f"http://127.0.0.1:{h.port()}"))
        self.assertEqual(code, 0, err)
        self.assertEqual(out.strip(), b"b'from upstream'")
        line, headers = _request_head(self.upstream.all_received())
        self.assertEqual(line, b"GET /x HTTP/1.1")
        self.assertIn(b"x-request-id", headers)
        self.assertEqual(headers[b"x-forwarded-for"], b"127.0.0.1")

    @defer.inlineCallbacks
    def test_connect_tls_end_to_end(self) -> Any:
        """
        C{curl -x ... https://...} tunnels TLS through C{CONNECT} to nginx;
        the certificate is verified end to end, so the proxy relayed the
        handshake untouched.
        """
        certs = Certificates(self)
        tls_port = free_port()
        nginx = Nginx(self, f"""
            server {{
              listen 127.0.0.1:{tls_port} ssl;
              ssl_certificate {certs.path("server.pem")};
              ssl_certificate_key {certs.path("server.key")};
              location / {{ default_type text/plain; return 200 "tls ok $server_protocol\\n"; }}
            }}
            """)
        yield nginx.wait_listening(tls_port)
        h = yield self.start(tls_port=tls_port)
        out, err, code = yield curl("--noproxy", "", "-x", f"http://127.0.0.1:{h.port()}",
                                    "--cacert", certs.path("ca.pem"), f"https://localhost:{tls_port}/")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"tls ok HTTP/1.1\n")

    @defer.inlineCallbacks
    def test_connect_forbidden_port(self) -> Any:
        h = yield self.start()
        data = yield raw_exchange(
            self, h.port(), f"CONNECT 127.0.0.1:{self.up} HTTP/1.1\r\nHost: 127.0.0.1:{self.up}\r\n\r\n".encode())
        self.assertTrue(data.startswith(b"HTTP/1.1 403 "), data)
        self.assertEqual(self.upstream.connections, [])

    @defer.inlineCallbacks
    def test_connect_forbidden_host(self) -> Any:
        h = yield self.start(allow='["*.internal"]')
        data = yield raw_exchange(
            self, h.port(), f"CONNECT 127.0.0.1:{self.echo_port} HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(data.startswith(b"HTTP/1.1 403 "), data)

    @defer.inlineCallbacks
    def test_connect_failure_is_502_uf(self) -> Any:
        h = yield self.start()
        data = yield raw_exchange(
            self, h.port(), f"CONNECT 127.0.0.1:{self.dead_port} HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(data.startswith(b"HTTP/1.1 502 "), data)
        self.assertIn(b"x-txmesh-flags: UF", data)

    @defer.inlineCallbacks
    def test_connect_half_close(self) -> Any:
        """
        The client's end-of-file reaches the upstream as end-of-file, and
        the upstream's answer still reaches the client; bytes sent with the
        C{CONNECT} head are the tunnel's first bytes.
        """
        h = yield self.start()
        client = yield raw_connect(self, h.port())
        client.transport.write(f"CONNECT 127.0.0.1:{self.echo_port} HTTP/1.1\r\n\r\nearly ".encode())
        data = yield client.wait_for(lambda d: b"\r\n\r\n" in d, WAIT)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 Connection Established\r\n"), data)
        self.assertNotIn(b"content-length", data.lower())
        client.transport.write(b"late")
        client.transport.loseWriteConnection()
        data = yield client.closed.addTimeout(WAIT, reactor)
        self.assertTrue(data.endswith(b"\r\n\r\ngot early late"), data)


class ReverseProxyTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_absolute_form_refused_without_forward_proxy(self) -> Any:
        upstream = RecordingFactory(fixed_response())
        up = yield listen_upstream(self, upstream)
        h = ProxyHarness(self, registry=FilterRegistry(http=[RouterFactory()]))
        yield h.start(REVERSE, up=up)
        data = yield raw_exchange(self, h.port(), f"GET http://127.0.0.1:{up}/ HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        self.assertTrue(data.startswith(b"HTTP/1.1 400 "), data)
        self.assertIn(b"x-txmesh-flags: DPE", data)
        self.assertEqual(upstream.received, [])


class _Recorder:
    def __init__(self) -> None:
        self.heads: list[RequestHead] = []

    def request_head(self, head: RequestHead, end_stream: bool, keep_alive: bool) -> None:
        self.heads.append(head)

    def request_data(self, data: bytes) -> None:
        pass

    def request_end(self, trailers: Any) -> None:
        pass


class AbsoluteFormTests(unittest.SynchronousTestCase):
    def parse(self, data: bytes) -> RequestHead:
        sink = _Recorder()
        RequestParser(sink, forward_proxy=True).receive_data(data)
        return sink.heads[0]

    def test_split(self) -> None:
        self.assertEqual(split_absolute_form(b"http://h:8080/a/b?c=d"), (b"h:8080", b"/a/b?c=d"))
        self.assertEqual(split_absolute_form(b"HTTP://h"), (b"h", b"/"))
        self.assertEqual(split_absolute_form(b"http://h?x"), (b"h", b"/?x"))
        self.assertEqual(split_absolute_form(b"http://[::1]:80/"), (b"[::1]:80", b"/"))

    def test_split_rejects(self) -> None:
        for target in (b"https://h/", b"ftp://h/", b"http:///x", b"http://user@h/", b"h/x"):
            e = self.assertRaises(ProtocolError, split_absolute_form, target)
            self.assertEqual(e.status, 400)

    def test_parser_rewrites_target_and_host(self) -> None:
        head = self.parse(b"GET http://up.example:81/p HTTP/1.1\r\nHost: wrong\r\nProxy-Connection: keep-alive\r\n"
                          b"Proxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n")
        self.assertEqual((head.method, head.path, head.authority), (b"GET", b"/p", b"up.example:81"))
        self.assertTrue(head.absolute_form)
        self.assertEqual(list(head.headers.items()), [(b"accept", b"*/*")])

    def test_origin_form_not_marked(self) -> None:
        head = self.parse(b"GET /p HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertFalse(head.absolute_form)

    def test_split_host_port(self) -> None:
        self.assertEqual(split_host_port(b"Example.COM", 80), ("example.com", 80))
        self.assertEqual(split_host_port(b"h:443", None), ("h", 443))
        self.assertEqual(split_host_port(b"[::1]:8443", None), ("::1", 8443))
        self.assertEqual(split_host_port(b"[::1]", 80), ("::1", 80))
        self.assertIsNone(split_host_port(b"h:0", None))
        self.assertIsNone(split_host_port(b"h:x", None))
        self.assertIsNone(split_host_port(b":80", None))


class ForwardProxyRoutesTests(unittest.SynchronousTestCase):
    def lookup(self, **config: Any) -> ForwardProxyRoutes:
        mesh = Route("mesh", RouteMatch(), cluster="app")
        return ForwardProxyRoutes(ForwardProxyConfig(**config),
                                  lambda head: mesh if head.authority == b"mesh.example" else None)

    def head(self, method: bytes, authority: bytes, absolute: bool = True) -> RequestHead:
        return RequestHead(method, authority if method == b"CONNECT" else b"/", authority, Headers([]),
                           absolute_form=absolute)

    def test_mesh_route_first(self) -> None:
        self.assertEqual(self.lookup().match(self.head(b"GET", b"mesh.example")).cluster, "app")

    def test_passthrough(self) -> None:
        route = self.lookup().match(self.head(b"GET", b"ext.example"))
        self.assertEqual(route.cluster, "PassthroughCluster|http|ext.example|80")
        self.assertEqual(route.timeout, 0)

    def test_origin_form_no_passthrough(self) -> None:
        self.assertIsNone(self.lookup().match(self.head(b"GET", b"ext.example", absolute=False)))

    def test_allow_hosts(self) -> None:
        lookup = self.lookup(allow_hosts=("*.internal",))
        self.assertEqual(lookup.match(self.head(b"GET", b"ext.example")).direct_response.status, 403)
        self.assertEqual(lookup.match(self.head(b"GET", b"db.internal:8080")).cluster,
                         "PassthroughCluster|http|db.internal|8080")

    def test_connect(self) -> None:
        lookup = self.lookup()
        self.assertEqual(lookup.match(self.head(b"CONNECT", b"ext.example:443")).cluster,
                         "PassthroughCluster|connect|ext.example|443")
        self.assertEqual(lookup.match(self.head(b"CONNECT", b"ext.example:22")).direct_response.status, 403)
        self.assertEqual(lookup.match(self.head(b"CONNECT", b"ext.example")).direct_response.status, 400)
        # CONNECT never takes a mesh route.
        self.assertEqual(lookup.match(self.head(b"CONNECT", b"mesh.example:443")).cluster,
                         "PassthroughCluster|connect|mesh.example|443")


class ForwardProxyConfigTests(unittest.SynchronousTestCase):
    def load(self, forward: str, routes: str = "") -> Any:
        text = f"""
listeners:
  - name: http
    address: "tcp:0:interface=127.0.0.1"
    forward_proxy: {forward}
{routes}
clusters: []
"""
        return ConfigLoader(FilterRegistry(http=[RouterFactory()])).load_bytes(text.encode(), "proxy.yaml")

    def test_defaults(self) -> None:
        listener = self.load("{}").listeners[0]
        self.assertEqual(listener.forward_proxy, ForwardProxyConfig((443,), ("*",)))

    def test_values(self) -> None:
        listener = self.load('{connect_ports: [443, 8443], allow_hosts: ["*.example.com", "[::1]"]}').listeners[0]
        self.assertEqual(listener.forward_proxy, ForwardProxyConfig((443, 8443), ("*.example.com", "::1")))

    def test_off_by_default(self) -> None:
        """
        Without C{forward_proxy} a listener still needs routes; with it,
        none are needed (everything may pass through).
        """
        text = b"listeners: [{name: http, address: 'tcp:0'}]\nclusters: []\n"
        self.assertRaises(ConfigError, ConfigLoader(FilterRegistry(http=[RouterFactory()])).load_bytes, text)
        text = b"listeners: [{name: http, address: 'tcp:0', routes: []}]\nclusters: []\n"
        config = ConfigLoader(FilterRegistry(http=[RouterFactory()])).load_bytes(text)
        self.assertIsNone(config.listeners[0].forward_proxy)

    def test_bad_port(self) -> None:
        e = self.assertRaises(ConfigError, self.load, "{connect_ports: [0]}")
        self.assertIn("forward_proxy.connect_ports[0]", str(e))

    def test_host_with_port(self) -> None:
        e = self.assertRaises(ConfigError, self.load, '{allow_hosts: ["a.example:443"]}')
        self.assertIn("forward_proxy.allow_hosts[0]", str(e))

    def test_unknown_key(self) -> None:
        e = self.assertRaises(ConfigError, self.load, "{ports: [443]}")
        self.assertIn("forward_proxy.ports", str(e))
