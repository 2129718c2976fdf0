"""
Tests for the transparent capture listener (L{txmesh.capture.listener}):
table tests of the pure sniffing (L{txmesh.capture.sniff}), and a real
C{twistd txmesh-proxy} inside a network namespace of the test's own, with
C{REDIRECT}ed clients.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from types import SimpleNamespace
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.netns import NetworkNamespace, skip_reason
from txmesh.capture.listener import CaptureFactory, default_route
from txmesh.capture.sniff import HTTP, OPAQUE, TLS, classify, server_name
from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.config.model import CaptureConfig
from txmesh.filters.registry import FilterRegistry
from txmesh.proxy.cluster import passthrough_cluster_name
from txmesh.proxy.http2 import PREFACE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def client_hello(server: str | None) -> bytes:
    """
    @return: the ClientHello Python's TLS client sends, asking for
        C{server} by SNI (or not at all for C{None}).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=server)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class ClassifyTests(SynchronousTestCase):
    """
    L{classify} tells HTTP, TLS and opaque bytes apart, and waits while it
    cannot.
    """

    def test_table(self) -> None:
        hello = client_hello("example.com")
        table = [
            (b"", None),
            (b"G", None),
            (b"GET", None),
            (b"GET /", None),
            (b"GET / HTTP/1.1\r\n", HTTP),
            (b"GET / HTTP/1.1\n", HTTP),
            (b"POST /x?y=1 HTTP/1.0\r\nHost: a\r\n\r\n", HTTP),
            (b"OPTIONS * HTTP/1.1\r\n", HTTP),
            (b"CONNECT example.com:443 HTTP/1.1\r\n", HTTP),
            (PREFACE[:3], None),
            (PREFACE[:10], None),
            (PREFACE, HTTP),
            (PREFACE + b"\x00\x00\x12\x04", HTTP),
            (b"PRI * HTTP/2.1\r\n", OPAQUE),
            (b"GET / SPDY/3\r\n", OPAQUE),
            (b"GET / HTTP/2\r\n", OPAQUE),
            (b"GETX / HTTP/1.1\r\n", OPAQUE),
            (b"get / HTTP/1.1\r\n", OPAQUE),
            (b"GET /\x00", OPAQUE),
            (b"GET /" + b"a" * 9000, OPAQUE),
            (hello, TLS),
            (hello[:1], None),
            (hello[:3], TLS),
            (b"\x16\x01", OPAQUE),
            (b"SSH-2.0-OpenSSH_9.6\r\n", OPAQUE),
            (b"\x00\x00\x00\x01", OPAQUE),
            (b"hello", OPAQUE),
            (b"*1\r\n$4\r\nPING\r\n", OPAQUE),  # Redis
        ]
        for data, expected in table:
            self.assertEqual(classify(data), expected, data[:40])


class ServerNameTests(SynchronousTestCase):
    """
    L{server_name} reads the SNI of a ClientHello.
    """

    def test_table(self) -> None:
        hello = client_hello("API.Example.com")
        table = [
            (hello, "api.example.com"),
            (client_hello("a.b"), "a.b"),
            (client_hello(None), None),
            (hello[:20], None),
            (hello[:-1], None),
            (b"", None),
            (b"GET / HTTP/1.1\r\n", None),
            (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", None),  # a ServerHello
            (b"\x16\x03\x01\xff\xff" + b"\x01" * 40, None),
        ]
        for data, expected in table:
            self.assertEqual(server_name(data), expected, data[:40])

    def test_every_truncation(self) -> None:
        """
        No prefix of a ClientHello makes L{server_name} raise.
        """
        hello = client_hello("example.com")
        for n in range(len(hello)):
            self.assertIn(server_name(hello[:n]), (None, "example.com"))


class ConfigTests(SynchronousTestCase):
    """
    A listener's C{capture} section.
    """

    def _load(self, capture: Any, **extra: Any) -> Any:
        document = {"listeners": [{"name": "outbound", "address": "tcp:15001:interface=127.0.0.1",
                                   "capture": capture, **extra}]}
        return ConfigLoader(FilterRegistry.from_plugins()).load_document(document, "test.yaml")

    def test_defaults(self) -> None:
        """
        C{capture: {}} is C{ALLOW_ANY} with a 0.1 s sniff timeout; the
        listener needs no routes.
        """
        listener = self._load({}).listeners[0]
        self.assertEqual(listener.capture, CaptureConfig("ALLOW_ANY", 0.1))

    def test_values(self) -> None:
        listener = self._load({"mode": "REGISTRY_ONLY", "sniff_timeout": "250ms"}).listeners[0]
        self.assertEqual(listener.capture, CaptureConfig("REGISTRY_ONLY", 0.25))

    def test_refused(self) -> None:
        for capture, extra, field in [
            ({"mode": "DENY"}, {}, "listeners[0].capture.mode"),
            ({"sniff_timeout": "0s"}, {}, "listeners[0].capture.sniff_timeout"),
            ({"sniff_timeout": "1m"}, {}, "listeners[0].capture.sniff_timeout"),
            ({"bogus": 1}, {}, "listeners[0].capture"),
            ({}, {"mtls": "STRICT"}, "listeners[0].capture"),
        ]:
            with self.assertRaises(ConfigError) as e:
                self._load(capture, **extra)
            self.assertIn(field, str(e.exception))


class _Recording(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class _Listener:
    """
    What L{CaptureFactory} reads of an HTTP listener factory: its current
    manager's C{listener.capture}.
    """

    def __init__(self, mode: str) -> None:
        self.manager = SimpleNamespace(listener=SimpleNamespace(capture=CaptureConfig(mode, 0.1)))


class CaptureProtocolTests(SynchronousTestCase):
    """
    L{CaptureFactory}'s protocols wait for the first bytes (or the sniff
    timeout) and then relay, or close in C{REGISTRY_ONLY}.
    """

    def _connect(self, mode: str) -> tuple[Any, StringTransport, Clock, list[Any]]:
        clock = Clock()
        relays: list[Any] = []

        def relay(destination: tuple[str, int]) -> Factory:
            inner = _Recording()
            relays.append((destination, inner))
            return Factory.forProtocol(lambda: inner)

        factory = CaptureFactory(lambda: _Listener(mode), relay, clock)  # type: ignore[arg-type,return-value]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        transport.original_destination = ("10.1.2.3", 25)  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        return protocol, transport, clock, relays

    def test_silent(self) -> None:
        """
        A client that sends nothing is relayed once the sniff timeout
        passes, and what it sends later goes to the relay.
        """
        protocol, transport, clock, relays = self._connect("ALLOW_ANY")
        clock.advance(0.05)
        self.assertEqual(relays, [])
        clock.advance(0.05)
        self.assertEqual([d for d, _ in relays], [("10.1.2.3", 25)])
        protocol.dataReceived(b"EHLO me\r\n")
        self.assertEqual(relays[0][1].data, b"EHLO me\r\n")
        self.assertFalse(transport.disconnecting)

    def test_opaque(self) -> None:
        """
        Bytes that are not HTTP are relayed at once, the first ones
        included; no timer is left behind.
        """
        protocol, _, clock, relays = self._connect("ALLOW_ANY")
        protocol.dataReceived(b"\x00\x01")
        self.assertEqual(relays[0][1].data, b"\x00\x01")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_partial_then_timeout(self) -> None:
        """
        The start of a request line that never ends is relayed at the
        timeout.
        """
        protocol, _, clock, relays = self._connect("ALLOW_ANY")
        protocol.dataReceived(b"GET /")
        self.assertEqual(relays, [])
        clock.advance(0.1)
        self.assertEqual(relays[0][1].data, b"GET /")

    def test_registry_only(self) -> None:
        """
        C{REGISTRY_ONLY} closes what is not HTTP, silent clients included.
        """
        protocol, transport, clock, relays = self._connect("REGISTRY_ONLY")
        clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        protocol, transport, clock, relays = self._connect("REGISTRY_ONLY")
        protocol.dataReceived(client_hello("example.com"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(relays, [])

    def test_lost_while_sniffing(self) -> None:
        """
        A connection lost before anything was decided leaves no timer.
        """
        protocol, _, clock, relays = self._connect("ALLOW_ANY")
        protocol.connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(relays, [])


class DefaultRouteTests(SynchronousTestCase):
    """
    L{default_route}: where a captured request no route matches goes.
    """

    def test_allow_any(self) -> None:
        route = default_route("ALLOW_ANY", ("10.1.2.3", 8080))
        self.assertEqual(route.cluster, passthrough_cluster_name("http", "10.1.2.3", 8080))
        self.assertEqual(route.timeout, 0.0)

    def test_registry_only(self) -> None:
        route = default_route("REGISTRY_ONLY", ("10.1.2.3", 8080))
        self.assertEqual((route.name, route.direct_response.status, route.direct_response.flag),
                         ("BlackHoleCluster", 502, "NR"))


# Runs inside the namespace: HTTP servers that answer with who they are and
# the request headers they got, a TCP echo server and a server-first one
# (a banner, then echo).
_SERVERS = textwrap.dedent("""
    import json, socket, socketserver, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def http(name):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def do_GET(self):
                body = json.dumps({"server": name, "headers": {k.lower(): v for k, v in self.headers.items()}})
                body = body.encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def log_message(self, *args):
                pass
        return Handler

    class Echo(socketserver.BaseRequestHandler):
        banner = b""
        def handle(self):
            if self.banner:
                self.request.sendall(self.banner)
            while True:
                data = self.request.recv(65536)
                if not data:
                    return
                self.request.sendall(data)

    class Banner(Echo):
        banner = b"220 banner.test ESMTP\\r\\n"

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    host = sys.argv[1]
    servers = [ThreadingHTTPServer((host, 18080), http("passthrough")),
               ThreadingHTTPServer((host, 18084), http("known")),
               Server((host, 18081), Echo), Server((host, 18082), Banner)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")

# Runs inside the namespace as the app (uid 1337, whose connections are
# redirected): each step's result, as JSON.
_CLIENT = textwrap.dedent("""
    import base64, json, socket, sys, time

    def http(host, port, authority):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(("GET /x HTTP/1.1\\r\\nHost: %s\\r\\nConnection: close\\r\\n\\r\\n" % authority).encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\\r\\n\\r\\n")
        lines = head.decode().split("\\r\\n")
        headers = dict((k.lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
        return {"status": int(lines[0].split()[1]), "headers": headers, "body": body.decode()}

    def echo(host, port, payload):
        payload = base64.b64decode(payload)
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(payload)
            data = b""
            try:
                while len(data) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError as e:
                return {"error": str(e), "data": base64.b64encode(data).decode()}
        return {"data": base64.b64encode(data).decode()}

    def half_close(host, port, payload):
        payload = base64.b64decode(payload)
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return {"data": base64.b64encode(data).decode()}

    def banner(host, port):
        start = time.monotonic()
        with socket.create_connection((host, port), timeout=10) as s:
            try:
                data = s.recv(65536)
            except OSError as e:
                return {"error": str(e)}
            waited = time.monotonic() - start
            s.sendall(b"QUIT\\r\\n")
            more = s.recv(65536) if data else b""
        return {"data": data.decode(), "after": more.decode(), "waited": waited}

    print(json.dumps([globals()[step[0]](*step[1:]) for step in json.loads(sys.argv[1])]))
""")

_CONFIG = """
node: {{id: capture-test, workload: app, namespace: default, app: app, version: v1}}
admin: {{address: "tcp:15000:interface=127.0.0.1"}}
listeners:
  - name: outbound
    address: "tcp:15001:interface=127.0.0.1"
    capture: {{mode: {mode}, sniff_timeout: 0.3s}}
    virtual_hosts:
      - name: known
        domains: [known.mesh]
        routes:
          - {{name: known, match: {{prefix: /}}, cluster: known}}
clusters:
  - name: known
    endpoints: ["{address}:18084"]
"""

APP_UID = 1337
ADDRESS = "10.77.0.1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class NamespaceTests(SynchronousTestCase):
    """
    A real C{twistd txmesh-proxy} with a capture listener on 15001, inside a
    network namespace where the app's (uid 1337) connections to
    C{10.77.0.1} are C{REDIRECT}ed to it; the proxy (root) is not.
    """

    def setUp(self) -> None:
        reason = skip_reason("iptables", "setpriv")
        if reason:
            self.skipTest(reason)
        if not os.path.exists(TWISTD):
            self.skipTest(f"no twistd next to {sys.executable}")
        self.ns = NetworkNamespace(self)
        self.ns.check(["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"])
        self.ns.check(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", ADDRESS,
                       "-m", "owner", "--uid-owner", str(APP_UID), "-j", "REDIRECT", "--to-ports", "15001"])
        self.dir = tempfile.mkdtemp(prefix="txmesh-capture-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        servers = self._spawn([sys.executable, "-c", _SERVERS, ADDRESS], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
        line = servers.stdout.readline()
        self.assertEqual(line, b"ready\n")

    def _spawn(self, command: list[str], **kwargs: Any) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", self.ns.name, *command], **kwargs)

        def stop() -> None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()

        self.addCleanup(stop)
        return process

    def _proxy(self, mode: str) -> str:
        """
        Run the proxy in the namespace until it is ready.

        @return: the path of its log.
        """
        config = os.path.join(self.dir, "proxy.yaml")
        with open(config, "w") as f:
            f.write(_CONFIG.format(mode=mode, address=ADDRESS))
        log_path = os.path.join(self.dir, "proxy.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
        with open(log_path, "wb") as out:
            process = self._spawn([TWISTD, "-n", "--pidfile=", "txmesh-proxy", "--config", config],
                                  cwd=self.dir, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.addCleanup(self._check_log, log_path)
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                self.fail(f"txmesh-proxy exited with {process.returncode}:\n{self._read(log_path)}")
            ready = self.ns.run(["curl", "-s", "--max-time", "1", "-o", "/dev/null", "-w", "%{http_code}",
                                 "http://127.0.0.1:15000/ready"])
            if ready.returncode == 0 and ready.stdout == "200":
                return log_path
            if time.monotonic() > deadline:
                self.fail(f"txmesh-proxy not ready:\n{self._read(log_path)}")
            time.sleep(0.1)

    def _read(self, path: str) -> str:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def _check_log(self, path: str) -> None:
        text = self._read(path)
        if "Traceback" in text or "Unhandled" in text:
            raise AssertionError(f"txmesh-proxy logged an error:\n{text}")

    def _client(self, *steps: list[Any]) -> list[Any]:
        out = self.ns.check(["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
                             sys.executable, "-c", _CLIENT, json.dumps(steps)], timeout=60)
        return json.loads(out)

    def test_allow_any(self) -> None:
        """
        C{ALLOW_ANY}: HTTP goes through the proxy (which adds
        C{x-request-id} and C{x-forwarded-for}) to the original destination,
        or to a route's cluster when its C{Host} matches one; opaque bytes
        and a TLS ClientHello are relayed to the original destination; a
        client that sends nothing gets a server-first banner after the
        sniff timeout.
        """
        log_path = self._proxy("ALLOW_ANY")
        hello = client_hello("secure.example.com")
        passthrough, known, echoed, half, tls, banner = self._client(
            ["http", ADDRESS, 18080, "example.org"],
            ["http", ADDRESS, 18080, "known.mesh"],
            ["echo", ADDRESS, 18081, _b64(b"opaque bytes\x00\x01")],
            ["half_close", ADDRESS, 18081, _b64(b"\x00request, then end-of-file")],
            ["echo", ADDRESS, 18081, _b64(hello)],
            ["banner", ADDRESS, 18082],
        )
        self.assertEqual(passthrough["status"], 200, passthrough)
        body = json.loads(passthrough["body"])
        self.assertEqual(body["server"], "passthrough")
        self.assertIn("x-request-id", body["headers"])
        self.assertEqual(body["headers"]["x-forwarded-for"], ADDRESS)

        self.assertEqual(known["status"], 200, known)
        body = json.loads(known["body"])
        self.assertEqual(body["server"], "known")
        self.assertIn("x-request-id", body["headers"])

        self.assertEqual(echoed, {"data": _b64(b"opaque bytes\x00\x01")})
        # The relay keeps the client's half-close: the reply still comes.
        self.assertEqual(half, {"data": _b64(b"\x00request, then end-of-file")})
        self.assertEqual(tls, {"data": _b64(hello)})

        self.assertEqual(banner["data"], "220 banner.test ESMTP\r\n", banner)
        self.assertEqual(banner["after"], "QUIT\r\n")
        self.assertGreaterEqual(banner["waited"], 0.25)

        text = self._read(log_path)
        self.assertIn("relaying tls connection", text)
        self.assertIn("to 10.77.0.1:18081 (sni secure.example.com)", text)
        self.assertIn("relaying silent connection", text)

        # The relays are counted under the PassthroughCluster.
        metrics = self.ns.check(["curl", "-s", "http://127.0.0.1:15000/stats/prometheus"])
        self.assertIn("PassthroughCluster", metrics)

    def test_h2_prior_knowledge(self) -> None:
        """
        The HTTP/2 preface is sniffed as HTTP: an h2c client reaches the
        original destination (an HTTP/1.1 server) through the proxy.
        """
        self._proxy("ALLOW_ANY")
        done = self.ns.run(["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
                            "curl", "-s", "--max-time", "10", "--http2-prior-knowledge",
                            f"http://{ADDRESS}:18080/h2"])
        self.assertEqual(done.returncode, 0, done.stderr)
        body = json.loads(done.stdout)
        self.assertEqual(body["server"], "passthrough")
        self.assertIn("x-request-id", body["headers"])

    def test_registry_only(self) -> None:
        """
        C{REGISTRY_ONLY}: HTTP to a host no route knows gets 502 with flag
        C{NR}; a routed host still works; other traffic is closed.
        """
        self._proxy("REGISTRY_ONLY")
        refused, known, echoed, banner = self._client(
            ["http", ADDRESS, 18080, "example.org"],
            ["http", ADDRESS, 18080, "known.mesh"],
            ["echo", ADDRESS, 18081, _b64(b"opaque")],
            ["banner", ADDRESS, 18082],
        )
        self.assertEqual(refused["status"], 502, refused)
        self.assertEqual(refused["headers"].get("x-txmesh-flags"), "NR")
        self.assertEqual(json.loads(known["body"])["server"], "known")
        self.assertEqual(echoed.get("data"), "")
        self.assertEqual(banner.get("data", ""), "")
