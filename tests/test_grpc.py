"""
gRPC through txmesh: the pure helpers (L{txmesh.proxy.grpc}), local replies
a gRPC client can read (the filter chain), the client's C{grpc-timeout} as
a deadline (the router), and real grpcio clients and servers end to end.

The end-to-end tests generate code from C{tests/grpc_fixtures/echo.proto}
at test time and run grpcio's server and client as child processes
(C{tests/grpc_fixtures/runner.py}): grpcio's threads never touch the
reactor, and the client reports what it saw as JSON.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.support import (
    ProxyHarness,
    RecordingFactory,
    free_port,
    listen_upstream,
    raw_connect,
    sleep,
)
from txmesh.config.model import FilterConfig, Route, RouteMatch
from txmesh.filters.api import HTTPFilter, LocalReply
from txmesh.filters.chain import FilterChain
from txmesh.filters.fault import FaultFactory
from txmesh.filters.router import RouterFactory
from txmesh.proxy import grpc
from txmesh.proxy.stream import FLAGS_HEADER, Headers, RequestHead, ResponseFlag
from txmesh.testing import FilterHarness, StubUpstream

GRPC = {"content-type": "application/grpc", "te": "trailers"}
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpc_fixtures")
RUNNER = os.path.join(FIXTURES, "runner.py")


class IsGrpcTests(unittest.SynchronousTestCase):
    def head(self, ctype: bytes | None) -> RequestHead:
        headers = Headers([(b"content-type", ctype)] if ctype is not None else [])
        return RequestHead(b"POST", b"/pkg.Svc/Call", b"h", headers, version=b"2")

    def test_content_types(self):
        for ctype in (b"application/grpc", b"application/grpc+proto", b"application/grpc+json",
                      b"Application/GRPC", b"application/grpc; charset=utf-8"):
            self.assertTrue(grpc.is_grpc(self.head(ctype)), ctype)
        for ctype in (None, b"", b"application/json", b"application/grpc-web", b"application/grpc-web+proto",
                      b"application/grpcx", b"text/plain"):
            self.assertFalse(grpc.is_grpc(self.head(ctype)), ctype)


class GrpcTimeoutTests(unittest.SynchronousTestCase):
    def test_units(self):
        cases = {
            b"1H": 3600.0, b"2M": 120.0, b"3S": 3.0, b"100m": 0.1, b"250u": 250e-6, b"5n": 5e-9,
            b"0S": 0.0, b"99999999S": 99999999.0,
        }
        for value, seconds in cases.items():
            self.assertAlmostEqual(grpc.parse_grpc_timeout(value), seconds, msg=value)

    def test_invalid(self):
        for value in (None, b"", b"S", b"10", b"10s", b"10x", b"-1S", b"1.5S", b"123456789S", b" 1S",
                      b"1 S", b"\xff1S"):
            self.assertIsNone(grpc.parse_grpc_timeout(value), value)

    def test_format_round_trips(self):
        for seconds in (0.0, 0.1, 1.5, 30.0, 86400.0, 10 ** 6):
            value = grpc.format_grpc_timeout(seconds)
            self.assertLessEqual(len(value), 9)
            self.assertAlmostEqual(grpc.parse_grpc_timeout(value), seconds, places=3)


class StatusMappingTests(unittest.SynchronousTestCase):
    def test_http_to_grpc(self):
        """
        gRPC's http-grpc-status-mapping.md, and UNKNOWN for the rest.
        """
        expected = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14,
                    500: 2, 200: 2, 418: 2, 409: 2}
        for status, code in expected.items():
            self.assertEqual(grpc.http_to_grpc_status(status), code, status)

    def test_local_reply_status(self):
        """
        The proxy's own timeouts are DEADLINE_EXCEEDED (Envoy's router does
        the same for gRPC); connect failures, overflow and no healthy
        upstream are UNAVAILABLE; no route is UNIMPLEMENTED.
        """
        F = ResponseFlag
        self.assertEqual(grpc.local_reply_grpc_status(504, F.UPSTREAM_TIMEOUT), grpc.DEADLINE_EXCEEDED)
        for flag in (F.UPSTREAM_CONNECTION_FAILURE, F.UPSTREAM_OVERFLOW, F.NO_HEALTHY_UPSTREAM,
                     F.UPSTREAM_CONNECTION_TERMINATION):
            self.assertEqual(grpc.local_reply_grpc_status(503, flag), grpc.UNAVAILABLE, flag)
        self.assertEqual(grpc.local_reply_grpc_status(404, F.NO_ROUTE), grpc.UNIMPLEMENTED)
        self.assertEqual(grpc.local_reply_grpc_status(502, F.UPSTREAM_PROTOCOL_ERROR), grpc.UNAVAILABLE)
        self.assertEqual(grpc.local_reply_grpc_status(403, F.RBAC_DENIED), grpc.PERMISSION_DENIED)


class GrpcMessageTests(unittest.SynchronousTestCase):
    def test_encode(self):
        self.assertEqual(grpc.encode_grpc_message("plain text, ok!"), b"plain text, ok!")
        self.assertEqual(grpc.encode_grpc_message("100%"), b"100%25")
        self.assertEqual(grpc.encode_grpc_message("caf\u00e9"), b"caf%C3%A9")
        self.assertEqual(grpc.encode_grpc_message(b"a\r\nb\x7f"), b"a%0D%0Ab%7F")

    def test_decode(self):
        for text in ("plain", "100% sure", "caf\u00e9 \u2603", "line\nbreak", ""):
            self.assertEqual(grpc.decode_grpc_message(grpc.encode_grpc_message(text)), text)
        # Malformed escapes are kept, as gRPC's spec asks.
        self.assertEqual(grpc.decode_grpc_message(b"50%"), "50%")
        self.assertEqual(grpc.decode_grpc_message(b"%zz%4"), "%zz%4")

    def test_trailers_only_headers(self):
        self.assertEqual(grpc.trailers_only_headers(14, b"no healthy upstream\n"), [
            (b"content-type", b"application/grpc"), (b"grpc-status", b"14"),
            (b"grpc-message", b"no healthy upstream")])
        self.assertEqual(grpc.trailers_only_headers(12, b""), [
            (b"content-type", b"application/grpc"), (b"grpc-status", b"12")])


class FramingTests(unittest.SynchronousTestCase):
    def test_frames(self):
        data = grpc.frame_message(b"abc") + grpc.frame_message(b"") + grpc.frame_message(b"xyz")[:6]
        messages, rest = grpc.unframe_messages(data)
        self.assertEqual(messages, [b"abc", b""])
        self.assertEqual(rest, b"\x00\x00\x00\x00\x03x")

    def test_compressed_refused(self):
        self.assertRaises(ValueError, grpc.unframe_messages, grpc.frame_message(b"abc", compressed=True))

    def test_health_messages(self):
        self.assertEqual(grpc.health_check_request(""), b"")
        self.assertEqual(grpc.health_check_request("svc"), b"\x0a\x03svc")
        self.assertEqual(grpc.parse_health_check_response(b""), grpc.HEALTH_UNKNOWN)
        self.assertEqual(grpc.parse_health_check_response(b"\x08\x01"), grpc.HEALTH_SERVING)
        self.assertEqual(grpc.parse_health_check_response(b"\x08\x02"), grpc.HEALTH_NOT_SERVING)
        # Unknown fields are skipped.
        self.assertEqual(grpc.parse_health_check_response(b"\x12\x02hi\x08\x01"), grpc.HEALTH_SERVING)
        self.assertRaises(ValueError, grpc.parse_health_check_response, b"\x08")
        self.assertRaises(ValueError, grpc.parse_health_check_response, b"\x12\x05hi")


class _Reply(HTTPFilter):
    """
    Answers every request with a fixed L{LocalReply}, as the router does
    when it fails.
    """

    def __init__(self, reply: LocalReply):
        self._reply = reply

    def request_headers(self, head, end_stream):
        return self._reply


class _Raise(HTTPFilter):
    def request_headers(self, head, end_stream):
        raise RuntimeError("boom")


class _Factory:
    def __init__(self, make):
        self.name = "test"
        self._make = make

    def parse_config(self, raw):
        return None

    def create_filter(self, config, stream):
        return self._make()


def replying(reply: LocalReply) -> FilterHarness:
    return FilterHarness([(_Factory(lambda: _Reply(reply)), {})])


class LocalReplyTests(unittest.SynchronousTestCase):
    """
    A local reply to a gRPC request is a trailers-only gRPC response.
    """

    def test_unavailable(self):
        harness = replying(LocalReply(503, b"no healthy upstream", flag=ResponseFlag.NO_HEALTHY_UPSTREAM))
        r = harness.request("POST", "/pkg.Svc/Call", headers=GRPC, body=grpc.frame_message(b"x"))
        self.assertEqual(r.status, 200)
        self.assertTrue(r.complete)
        self.assertEqual(r.body, b"")
        self.assertIsNone(r.upstream_request)
        self.assertEqual(r.headers.get(b"content-type"), b"application/grpc")
        self.assertEqual(r.headers.get(b"grpc-status"), b"14")
        self.assertEqual(r.headers.get(b"grpc-message"), b"no healthy upstream")
        self.assertIsNone(r.headers.get(b"content-length"))
        self.assertEqual(r.flags, ["UH"])
        self.assertEqual(r.headers.get(FLAGS_HEADER), b"UH")

    def test_timeout_is_deadline_exceeded(self):
        harness = replying(LocalReply(504, b"upstream request timeout", flag=ResponseFlag.UPSTREAM_TIMEOUT))
        r = harness.request("POST", "/pkg.Svc/Call", headers={"content-type": "application/grpc+proto"})
        self.assertEqual((r.status, r.headers.get(b"grpc-status")), (200, b"4"))
        self.assertEqual(r.headers.get(b"grpc-message"), b"upstream request timeout")
        self.assertEqual(r.flags, ["UT"])

    def test_no_route(self):
        harness = replying(LocalReply(404, b"", flag=ResponseFlag.NO_ROUTE))
        r = harness.request("POST", "/pkg.Svc/Call", headers=GRPC)
        self.assertEqual((r.status, r.headers.get(b"grpc-status")), (200, b"12"))
        self.assertIsNone(r.headers.get(b"grpc-message"))

    def test_message_percent_encoded_and_headers_kept(self):
        reply = LocalReply(403, "denied: caf\u00e9 100%\n".encode(), ((b"X-Why", b"policy"),), flag="RBACD")
        r = replying(reply).request("POST", "/pkg.Svc/Call", headers=GRPC)
        self.assertEqual(r.headers.get(b"grpc-status"), b"7")
        self.assertEqual(r.headers.get(b"grpc-message"), b"denied: caf%C3%A9 100%25")
        self.assertEqual(r.headers.get(b"x-why"), b"policy")
        self.assertEqual(grpc.decode_grpc_message(r.headers.get(b"grpc-message")), "denied: caf\u00e9 100%")

    def test_filter_error(self):
        r = FilterHarness([(_Factory(_Raise), {})]).request("POST", "/pkg.Svc/Call", headers=GRPC)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual((r.status, r.headers.get(b"grpc-status")), (200, b"2"))
        self.assertEqual(r.headers.get(b"grpc-message"), b"filter error")

    def test_filter_grpc_status_kept(self):
        """
        The fault filter's gRPC abort carries its own grpc-status: kept.
        """
        harness = FilterHarness([(FaultFactory(), {"abort_grpc_status": 8, "abort_percent": 100})])
        r = harness.request("POST", "/pkg.Svc/Call", headers=GRPC)
        self.assertEqual((r.status, r.headers.get(b"grpc-status")), (200, b"8"))
        self.assertEqual(r.headers.get_all(b"grpc-status"), [b"8"])
        self.assertEqual(r.headers.get(b"content-type"), b"application/grpc")

    def test_http_request_unchanged(self):
        harness = replying(LocalReply(503, b"no healthy upstream", flag=ResponseFlag.NO_HEALTHY_UPSTREAM))
        r = harness.request("GET", "/", headers={"content-type": "application/json"})
        self.assertEqual(r.status, 503)
        self.assertEqual(r.body, b"no healthy upstream")
        self.assertIsNone(r.headers.get(b"grpc-status"))
        self.assertEqual(r.headers.get(b"content-type"), b"text/plain")

    def test_upstream_response_unchanged(self):
        """
        Responses from the upstream are not touched, errors included.
        """
        upstream = StubUpstream(status=503, body=b"busy")
        r = FilterHarness([], upstream=upstream).request("POST", "/pkg.Svc/Call", headers=GRPC)
        self.assertEqual((r.status, r.body), (503, b"busy"))
        self.assertIsNone(r.headers.get(b"grpc-status"))


# The real router with a stand-in cluster whose connections never come up,
# on a Clock: its deadlines are deterministic.


class _Writer:
    def __init__(self):
        self.status = 0
        self.headers = None
        self.body = b""
        self.complete = False
        self.reset = False

    def write_informational(self, head):
        pass

    def write_head(self, head, end_stream):
        self.status, self.headers, self.complete = head.status, head.headers, end_stream

    def write_data(self, data, end_stream):
        self.body += data
        self.complete = end_stream

    def write_trailers(self, trailers):
        self.complete = True

    def reset_stream(self):
        self.reset = True

    def flush(self):
        pass

    def pause_reading(self, reason):
        pass

    def resume_reading(self, reason):
        pass

    def set_response_producer(self, producer):
        pass

    request_producer = None


class _Breaker:
    def try_start_request(self):
        return True

    def finish_request(self):
        pass


class _Pool:
    endpoint = "127.0.0.1:1"
    active_requests = 0

    def __init__(self):
        self.acquiring: list[Deferred] = []

    def acquire(self):
        d = Deferred()
        self.acquiring.append(d)
        return d


class _Config:
    hash_policy = None


class _Cluster:
    name = "grpc"
    config = _Config()
    upstream_requests = 0

    def __init__(self):
        self.breaker = _Breaker()
        self.pool = _Pool()

    def pick(self, subset=None, hash_key=None, tried=frozenset()):
        return self.pool

    def record_result(self, endpoint, status):
        pass


class RouterDeadlineTests(unittest.SynchronousTestCase):
    """
    C{grpc-timeout} on a gRPC request bounds the upstream exchange, beside
    the route timeout: the shorter wins; expiry is DEADLINE_EXCEEDED, UT.
    """

    def run_request(self, headers, route_timeout=15.0, end_stream=True):
        clock = Clock()
        cluster = _Cluster()
        route = Route(name="r", match=RouteMatch(), cluster="grpc", timeout=route_timeout)
        writer = _Writer()
        chain = FilterChain(writer, clock, "test", IPv4Address("TCP", "127.0.0.1", 1), b"id",
                            lambda head: route, {"grpc": cluster}, (FilterConfig("router", RouterFactory()),))
        head = RequestHead(b"POST", b"/pkg.Svc/Call", b"h", Headers.from_pairs(headers.items()), version=b"2")
        chain.request_headers(head, end_stream)
        return clock, chain, writer, cluster

    def test_grpc_timeout_expires(self):
        clock, chain, writer, cluster = self.run_request(dict(GRPC, **{"grpc-timeout": "100m"}))
        clock.advance(0.099)
        self.assertEqual(writer.status, 0)
        clock.advance(0.002)
        self.assertEqual(writer.status, 200)
        self.assertTrue(writer.complete)
        self.assertEqual(writer.headers.get(b"grpc-status"), b"4")
        self.assertEqual(writer.headers.get(b"grpc-message"), b"upstream request timeout")
        self.assertEqual(chain.response_flags, ["UT"])
        self.assertTrue(chain.complete)
        # The pending connection attempt was given up, and no timer is left.
        self.assertTrue(cluster.pool.acquiring[0].called)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline_counts_from_request_head(self):
        """
        A client stream's deadline runs while the request is still open.
        """
        clock, chain, writer, _ = self.run_request(dict(GRPC, **{"grpc-timeout": "1S"}), end_stream=False)
        clock.advance(1.001)
        self.assertEqual(writer.headers.get(b"grpc-status"), b"4")

    def test_route_timeout_shorter(self):
        clock, chain, writer, _ = self.run_request(dict(GRPC, **{"grpc-timeout": "10S"}), route_timeout=0.5)
        clock.advance(0.501)
        self.assertEqual(writer.headers.get(b"grpc-status"), b"4")
        self.assertEqual(chain.response_flags, ["UT"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_route_timeout(self):
        """
        A route timeout of 0 (none) leaves the gRPC deadline in charge.
        """
        clock, chain, writer, _ = self.run_request(dict(GRPC, **{"grpc-timeout": "2S"}), route_timeout=0)
        clock.advance(1.9)
        self.assertEqual(writer.status, 0)
        clock.advance(0.2)
        self.assertEqual(writer.headers.get(b"grpc-status"), b"4")

    def test_ignored_when_not_grpc_or_malformed(self):
        for headers in ({"grpc-timeout": "100m"}, dict(GRPC, **{"grpc-timeout": "100x"})):
            clock, chain, writer, _ = self.run_request(headers, route_timeout=0)
            clock.advance(10)
            self.assertEqual(writer.status, 0, headers)
            chain.downstream_reset()

    def test_connect_failure_unavailable(self):
        from twisted.internet.error import ConnectionRefusedError

        clock, chain, writer, cluster = self.run_request(dict(GRPC, **{"grpc-timeout": "5S"}))
        cluster.pool.acquiring[0].errback(ConnectionRefusedError())
        self.assertEqual(writer.status, 200)
        self.assertEqual(writer.headers.get(b"grpc-status"), b"14")
        self.assertIn(b"connection failure", writer.headers.get(b"grpc-message"))
        self.assertEqual(chain.response_flags, ["UF"])
        self.assertEqual(clock.getDelayedCalls(), [])


# Real sockets, HTTP/1.1 on both sides (no HTTP/2 needed): the router's
# deadline, the forwarded grpc-timeout, and the trailers-only reply on the wire.

HTTP1 = """
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        routes: [{match: {prefix: /}, cluster: app, timeout: {timeout}}]
    clusters:
      - {name: app, endpoints: ["127.0.0.1:{up}"]}
    """


class DeadlineOverSocketsTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def exchange(self, up: int, headers: bytes, route_timeout: str = "15s") -> Any:
        proxy = ProxyHarness(self)
        yield proxy.start(HTTP1, up=up, timeout=route_timeout)
        client = yield raw_connect(self, proxy.port())
        body = grpc.frame_message(b"hello")
        client.transport.write(
            b"POST /pkg.Svc/Call HTTP/1.1\r\nHost: svc\r\ncontent-type: application/grpc\r\n" + headers
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        started = reactor.seconds()
        data = yield client.wait_for(lambda d: b"\r\n\r\n" in d, timeout=10)
        return data, reactor.seconds() - started

    @defer.inlineCallbacks
    def test_grpc_timeout_over_http1(self):
        silent = RecordingFactory()
        up = yield listen_upstream(self, silent)
        data, took = yield self.exchange(up, b"grpc-timeout: 200m\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertIn(b"grpc-status: 4\r\n", data)
        self.assertIn(b"x-txmesh-flags: UT\r\n", data)
        self.assertGreater(took, 0.1)
        self.assertLess(took, 5)
        # Forwarded unchanged, as Envoy does.
        self.assertIn(b"grpc-timeout: 200m\r\n", silent.all_received())

    @defer.inlineCallbacks
    def test_route_timeout_over_http1(self):
        up = yield listen_upstream(self, RecordingFactory())
        data, took = yield self.exchange(up, b"grpc-timeout: 30S\r\n", route_timeout="300ms")
        self.assertIn(b"grpc-status: 4\r\n", data)
        self.assertLess(took, 5)

    @defer.inlineCallbacks
    def test_dead_upstream_over_http1(self):
        data, _ = yield self.exchange(free_port(), b"")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertIn(b"grpc-status: 14\r\n", data)
        self.assertIn(b"grpc-message: upstream connect error", data)
        self.assertIn(b"x-txmesh-flags: UF\r\n", data)


# End to end with grpcio.

_generated: dict[str, Any] = {}


def _http2_missing(upstream: bool = True) -> str | None:
    """
    @param upstream: whether HTTP/2 to upstreams is needed too (not only
        from clients).
    @return: why the proxy cannot carry gRPC yet, or C{None}.
    """
    from txmesh.config.model import ClusterConfig

    modules = ("txmesh.proxy.http2_server", "txmesh.proxy.http2_client") if upstream else (
        "txmesh.proxy.http2_server",)
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError as e:
        return f"HTTP/2 is not available in txmesh yet ({e})"
    if upstream and "http2" not in attrs_fields(ClusterConfig):
        return "clusters have no http2 flag yet"
    return None


def attrs_fields(cls: Any) -> set[str]:
    import attrs

    return {f.name for f in attrs.fields(cls)}


def _grpcio_missing() -> str | None:
    try:
        for name in ("grpc", "grpc_tools"):
            importlib.import_module(name)
    except ImportError:
        return "grpcio and grpcio-tools are not installed (pip install -e .[test])"
    return None


@defer.inlineCallbacks
def generated() -> Any:
    """
    @return: a directory with code generated from echo.proto (once per run).
    """
    if "dir" not in _generated:
        outdir = tempfile.mkdtemp(prefix="txmesh-grpc-")
        atexit.register(shutil.rmtree, outdir, True)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, (RUNNER, "generate", outdir), env=os.environ).addTimeout(60, reactor)
        if code != 0:
            raise RuntimeError(f"protoc failed: {err.decode(errors='replace')}")
        _generated["dir"] = outdir
    return _generated["dir"]


class GrpcServer:
    """
    The grpcio echo server, in a child process.
    """

    def __init__(self, testcase: Any, gen: str):
        self._dir = tempfile.mkdtemp(prefix="txmesh-grpcsrv-")
        self.portfile = os.path.join(self._dir, "port")
        self.process = subprocess.Popen(
            [sys.executable, RUNNER, "server", gen, self.portfile],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        testcase.addCleanup(self.stop)

    @defer.inlineCallbacks
    def port(self, timeout: float = 30.0) -> Any:
        deadline = reactor.seconds() + timeout
        while not os.path.exists(self.portfile):
            if self.process.poll() is not None:
                raise RuntimeError("grpc server exited: " + self.process.stderr.read().decode(errors="replace"))
            if reactor.seconds() > deadline:
                raise RuntimeError("grpc server did not start")
            yield sleep(0.05)
        with open(self.portfile) as f:
            return int(f.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stderr.close()
        shutil.rmtree(self._dir, True)


@defer.inlineCallbacks
def run_client(gen: str, port: int, *scenarios: str, timeout: float = 120) -> Any:
    """
    Run the grpcio client against 127.0.0.1:C{port}.

    @return: its results, by scenario.
    """
    out, err, code = yield getProcessOutputAndValue(
        "timeout", ("-k", "5", str(timeout), sys.executable, RUNNER, "client", gen, f"127.0.0.1:{port}")
        + scenarios, env=os.environ).addTimeout(timeout + 15, reactor)
    if code != 0:
        raise RuntimeError(f"grpc client failed ({code}): {err.decode(errors='replace')[-3000:]}")
    return json.loads(out)


H2 = """
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        routes: [{match: {prefix: /}, cluster: grpc}]
    clusters:
      - {name: grpc, http2: true, endpoints: ["127.0.0.1:{up}"]}
    """


class EndToEndTests(unittest.TestCase):
    """
    A real grpcio client and server, with txmesh-proxy between them
    (plaintext HTTP/2 with prior knowledge on both sides).
    """

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        reason = _grpcio_missing() or _http2_missing()
        if reason:
            raise unittest.SkipTest(reason)
        self.gen = yield generated()
        self.server = GrpcServer(self, self.gen)
        up = yield self.server.port()
        self.proxy = ProxyHarness(self)
        yield self.proxy.start(H2, up=up)

    def call(self, *scenarios: str, timeout: float = 120) -> Deferred:
        return run_client(self.gen, self.proxy.port(), *scenarios, timeout=timeout)

    @defer.inlineCallbacks
    def test_four_kinds_of_call(self):
        r = yield self.call("unary", "client_stream", "server_stream", "bidi")
        self.assertEqual(r["unary"]["status"], "OK", r["unary"])
        self.assertEqual(r["unary"]["payload"], "ping")
        self.assertEqual((r["client_stream"]["status"], r["client_stream"]["received"],
                          r["client_stream"]["count"]), ("OK", 100000, 100))
        self.assertEqual(r["server_stream"]["status"], "OK", r["server_stream"])
        self.assertEqual(r["server_stream"]["counts"], list(range(50)))
        self.assertEqual(r["bidi"]["status"], "OK", r["bidi"])
        self.assertEqual(r["bidi"]["counts"], list(range(20)))

    @defer.inlineCallbacks
    def test_metadata_both_ways(self):
        r = yield self.call("unary", "server_stream")
        for name in ("unary", "server_stream"):
            self.assertEqual(r[name]["initial"].get("x-client-echo"), "hello", r[name])
            self.assertEqual(r[name]["trailing"].get("x-client-trailer"), "hello", r[name])
            self.assertEqual(r[name]["trailing"].get("x-served-by"), "grpcio", r[name])

    @defer.inlineCallbacks
    def test_large_messages(self):
        r = yield self.call("large")
        self.assertEqual(r["large"]["status"], "OK", r["large"])
        self.assertTrue(r["large"]["same"])
        self.assertEqual(r["large"]["received"], 8 << 20)
        self.assertEqual(r["large"]["down"], [4 << 20] * 3)
        self.assertTrue(r["large"]["down_same"])

    @defer.inlineCallbacks
    def test_thousand_concurrent_streams(self):
        r = yield self.call("concurrent", timeout=90)
        self.assertEqual(r["concurrent"]["status"], "OK", r["concurrent"])
        self.assertEqual(r["concurrent"]["ok"], 1000)
        self.assertLess(r["concurrent"]["seconds"], 60)

    @defer.inlineCallbacks
    def test_deadline(self):
        r = yield self.call("deadline")
        self.assertEqual(r["deadline"]["status"], "DEADLINE_EXCEEDED", r["deadline"])
        self.assertLess(r["deadline"]["seconds"], 2.5)

    @defer.inlineCallbacks
    def test_server_errors_intact(self):
        r = yield self.call("error", "stream_error")
        self.assertEqual(r["error"]["status"], "NOT_FOUND", r["error"])
        self.assertEqual(r["error"]["details"], "no such thing: caf\u00e9 100% gone")
        self.assertEqual(r["error"]["trailing"].get("x-client-trailer"), "hello")
        self.assertEqual(r["stream_error"]["status"], "FAILED_PRECONDITION", r["stream_error"])
        self.assertEqual(r["stream_error"]["details"], "half way")
        self.assertEqual(r["stream_error"]["counts"], [0, 1, 2])


class ProxyRepliesTests(unittest.TestCase):
    """
    The proxy's own answers reach a real gRPC client as gRPC statuses with
    messages a person can read.  Nothing here needs HTTP/2 to upstreams.
    """

    timeout = 60

    @defer.inlineCallbacks
    def call(self, yaml_text: str, **values: Any) -> Any:
        reason = _grpcio_missing() or _http2_missing(upstream=False)
        if reason:
            raise unittest.SkipTest(reason)
        gen = yield generated()
        proxy = ProxyHarness(self)
        yield proxy.start(yaml_text, **values)
        r = yield run_client(gen, proxy.port(), "plain", timeout=40)
        return r["plain"]

    @defer.inlineCallbacks
    def test_dead_upstream_unavailable(self):
        r = yield self.call(HTTP1, up=free_port(), timeout="15s")
        self.assertEqual(r["status"], "UNAVAILABLE", r)
        self.assertIn("upstream connect error", r["details"])
        self.assertIn("connection failure", r["details"])

    @defer.inlineCallbacks
    def test_route_timeout_deadline_exceeded(self):
        up = yield listen_upstream(self, RecordingFactory())
        r = yield self.call(HTTP1, up=up, timeout="300ms")
        self.assertEqual(r["status"], "DEADLINE_EXCEEDED", r)
        self.assertEqual(r["details"], "upstream request timeout")

    @defer.inlineCallbacks
    def test_no_route_unimplemented(self):
        r = yield self.call("""
            listeners:
              - name: http
                address: "tcp:0:interface=127.0.0.1"
                routes: [{match: {prefix: /elsewhere}, cluster: app}]
            clusters:
              - {name: app, endpoints: ["127.0.0.1:1"]}
            """)
        self.assertEqual(r["status"], "UNIMPLEMENTED", r)


class GrpcHealthCheckConfigTests(unittest.SynchronousTestCase):
    def load(self, health_check: str) -> Any:
        from txmesh.config.loader import ConfigLoader
        from txmesh.filters.registry import FilterRegistry

        text = (
            "listeners:\n"
            "  - {name: l, address: \"tcp:8080\", routes: [{cluster: app}]}\n"
            "clusters:\n"
            "  - {name: app, http2: true, endpoints: [\"127.0.0.1:9001\"], health_check: " + health_check + "}\n"
        )
        loader = ConfigLoader(FilterRegistry(http=[RouterFactory()]))
        return loader.load_bytes(text.encode(), "grpc.yaml").cluster("app").health_check

    def test_grpc_kind(self):
        from txmesh.config.model import HealthCheckConfig

        self.assertEqual(self.load("{kind: grpc, grpc_service: echo, interval: 2s}"),
                         HealthCheckConfig(kind="grpc", interval=2.0, grpc_service="echo"))
        self.assertEqual(self.load("{kind: grpc}").grpc_service, "")

    def test_bad_service(self):
        from txmesh.config.errors import ConfigError

        with self.assertRaises(ConfigError) as cm:
            self.load("{kind: grpc, grpc_service: 7}")
        self.assertEqual(cm.exception.field, "clusters[0].health_check.grpc_service")


class GrpcHealthCheckTests(unittest.TestCase):
    """
    C{kind: grpc} health checks against a real grpcio server's
    C{grpc.health.v1.Health/Check}, over the proxy's HTTP/2 client.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        reason = _grpcio_missing() or _http2_missing()
        if reason:
            raise unittest.SkipTest(reason)
        self.gen = yield generated()

    @defer.inlineCallbacks
    def check(self, port: int, service: str = "", timeout: float = 2.0) -> Any:
        """
        Run checks until one is decided.

        @return: the checker's stats of the endpoint and the health changes.
        """
        from txmesh.config.model import Endpoint, HealthCheckConfig
        from txmesh.proxy.health import HealthChecker

        endpoint = Endpoint("127.0.0.1", port)
        changes: list[bool] = []
        config = HealthCheckConfig(kind="grpc", grpc_service=service, interval=0.05, timeout=timeout,
                                   unhealthy_threshold=1)
        checker = HealthChecker(config, [endpoint], reactor, lambda ep, healthy: changes.append(healthy))
        checker.start()
        try:
            deadline = reactor.seconds() + timeout + 10
            while checker.stats()[str(endpoint)]["checks"] < 1:
                if reactor.seconds() > deadline:
                    self.fail("no health check was decided")
                yield sleep(0.02)
        finally:
            yield checker.stop().addTimeout(10, reactor)
        return checker.stats()[str(endpoint)], changes

    @defer.inlineCallbacks
    def serving_port(self) -> Any:
        server = GrpcServer(self, self.gen)
        port = yield server.port()
        return port

    @defer.inlineCallbacks
    def test_serving(self):
        port = yield self.serving_port()
        for service in ("", "echo"):
            stats, changes = yield self.check(port, service)
            self.assertIsNone(stats["last_failure"], service)
            self.assertTrue(stats["healthy"])
            self.assertEqual(changes, [])

    @defer.inlineCallbacks
    def test_not_serving(self):
        port = yield self.serving_port()
        stats, changes = yield self.check(port, "sick")
        self.assertEqual(stats["last_failure"], "NOT_SERVING")
        self.assertEqual(changes, [False])

    @defer.inlineCallbacks
    def test_unknown_service(self):
        port = yield self.serving_port()
        stats, changes = yield self.check(port, "nope")
        self.assertEqual(stats["last_failure"], "grpc-status 5: unknown service")
        self.assertEqual(changes, [False])

    @defer.inlineCallbacks
    def test_timeout(self):
        port = yield self.serving_port()
        stats, changes = yield self.check(port, "slow", timeout=0.3)
        # The probe sends its timeout as grpc-timeout, so grpcio's own
        # deadline races the probe's timer: either way it is a timeout.
        self.assertIn(stats["last_failure"], ("timed out after 0.3s", "grpc-status 4: Deadline Exceeded"))
        self.assertEqual(changes, [False])

    @defer.inlineCallbacks
    def test_dead_endpoint(self):
        stats, changes = yield self.check(free_port())
        self.assertIn("connect failed", stats["last_failure"])
        self.assertEqual(changes, [False])

    @defer.inlineCallbacks
    def test_not_grpc(self):
        """
        An h2c server that is not gRPC (here: the proxy's own listener,
        with no route) fails the check with its status.
        """
        proxy = ProxyHarness(self)
        yield proxy.start("""
            listeners:
              - name: http
                address: "tcp:0:interface=127.0.0.1"
                routes: [{match: {prefix: /elsewhere}, cluster: app}]
            clusters:
              - {name: app, endpoints: ["127.0.0.1:1"]}
            """)
        stats, changes = yield self.check(proxy.port())
        self.assertEqual(stats["last_failure"], "grpc-status 12")
        self.assertEqual(changes, [False])
