"""
Tests for the C{access_log} filter (L{txmesh.filters.access_log}): lines
written by the real filter chain through L{FilterHarness}, by a real
in-process proxy (L{ProxyHarness}) for a 200, a 503 C{UO}, a 504 C{UT} and a
403 C{RBACD}, and by L{TCPAccessLog} for L4 connections.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.address import IPv6Address
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import ProxyHarness, RecordingFactory, fixed_response, listen_upstream, raw_connect, raw_exchange
from tests.test_tcp import lose, make_proxy
from txmesh.config.errors import FilterConfigError
from txmesh.config.model import DISABLED, Route, RouteMatch
from txmesh.filters.access_log import AccessLogFactory, AccessLogFilter, TCPAccessLog, trace_id_of
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, LocalReply
from txmesh.filters.authz import AuthzFactory
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory
from txmesh.observability.log_writer import LogWriters
from txmesh.testing import FilterHarness, StubResponse, StubUpstream

log = Logger()

# 2026-11-25T17:06:08.123Z
START = 1795626368.123

# One Envoy default-format line, split into its fields.
LINE = re.compile(
    r'^\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" (?P<code>\d+) (?P<flags>\S+) '
    r'(?P<received>\d+) (?P<sent>\d+) (?P<duration>\d+) (?P<service_time>\S+) "(?P<xff>[^"]*)" '
    r'"(?P<ua>[^"]*)" "(?P<request_id>[^"]*)" "(?P<authority>[^"]*)" "(?P<upstream>[^"]*)"\n$'
)


def read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return f.readlines()


def log_path(case: Any) -> str:
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    return os.path.join(directory, "access.log")


@attrs.define
class Trace:
    trace_id: Any


class _LocalReplyFilter(HTTPFilter):
    def request_headers(self, head: Any, end_stream: bool) -> Any:
        return LocalReply(429, b"slow down\n", flag="LR")


class _LocalReplyFactory:
    name = "reply"

    def parse_config(self, raw: Any) -> None:
        return None

    def create_filter(self, config: Any, stream: Any) -> HTTPFilter:
        return _LocalReplyFilter()


class _TraceFilter(HTTPFilter):
    def __init__(self, value: Any, stream: Any):
        stream.metadata["trace"] = value


class _TraceFactory:
    name = "trace"

    def __init__(self, value: Any):
        self.value = value

    def parse_config(self, raw: Any) -> None:
        return None

    def create_filter(self, config: Any, stream: Any) -> HTTPFilter:
        return _TraceFilter(self.value, stream)


class HarnessTests(SynchronousTestCase):
    """
    The filter in the real filter chain, with a stub upstream.
    """

    def setUp(self) -> None:
        self.path = log_path(self)
        self.factory = AccessLogFactory()
        self.addCleanup(self.factory.writers.close)

    def harness(self, config: dict[str, Any] | None = None, before: tuple = (), after: tuple = (),
                **kw: Any) -> FilterHarness:
        filters = [(f, {}) for f in before] + [(self.factory, {"path": self.path, **(config or {})})]
        filters += [(f, {}) for f in after]
        h = FilterHarness(filters, **kw)
        h.clock.advance(START)
        return h

    def test_200(self) -> None:
        """
        A request the upstream answers: one line when the stream is over,
        with the request as sent, the status, body sizes and the duration
        from the stream's clock.
        """
        upstream = StubUpstream(handler=lambda r: _later(h, 0.25, StubResponse(200, (), b"hello")))
        h = self.harness(upstream=upstream)
        response = h.request("POST", "/items?page=2", body=b"data",
                             headers={"user-agent": "curl/8.5.0", "x-forwarded-for": "10.0.0.7"})
        self.assertEqual(read_lines(self.path), [])
        h.clock.advance(0.25)
        self.assertTrue(response.complete)
        [line] = read_lines(self.path)
        self.assertEqual(
            line,
            '[2026-11-25T17:06:08.123Z] "POST /items?page=2 HTTP/1.1" 200 - 4 5 250 - "10.0.0.7" "curl/8.5.0" '
            f'"{h_request_id(line)}" "example.com" "-"\n',
        )

    def test_json(self) -> None:
        """
        C{format: json} writes Istio's fields, the route and the peer.
        """
        h = self.harness({"format": "json"}, upstream=StubUpstream(503, b"down"),
                         downstream_principal="spiffe://cluster.local/ns/web/sa/app")
        h.request("GET", "/", headers={"user-agent": "probe"})
        [line] = read_lines(self.path)
        value = json.loads(line)
        self.assertEqual(value["start_time"], "2026-11-25T17:06:08.123Z")
        self.assertEqual((value["method"], value["path"], value["protocol"]), ("GET", "/", "HTTP/1.1"))
        self.assertEqual((value["response_code"], value["response_flags"]), (503, "-"))
        self.assertEqual((value["bytes_received"], value["bytes_sent"], value["duration"]), (0, 4, 0))
        self.assertEqual(value["route_name"], "test")
        self.assertEqual(value["downstream_remote_address"], "127.0.0.1:40000")
        self.assertEqual(value["downstream_peer_principal"], "spiffe://cluster.local/ns/web/sa/app")
        self.assertEqual(value["user_agent"], "probe")
        self.assertIsNone(value["x_forwarded_for"])
        self.assertEqual(len(value["request_id"]), 36)

    def test_local_reply_of_a_later_filter(self) -> None:
        """
        A filter after this one answers: the line has its status and flag.
        """
        h = self.harness(after=(_LocalReplyFactory(),))
        h.request("GET", "/limited")
        [line] = read_lines(self.path)
        m = LINE.match(line)
        self.assertEqual((m["code"], m["flags"], m["sent"], m["upstream"]), ("429", "LR", "10", "-"))

    def test_local_reply_of_an_earlier_filter(self) -> None:
        """
        A filter before this one answers: the access log filter's request
        hooks never run, and the line is written all the same.
        """
        h = self.harness(before=(_LocalReplyFactory(),))
        h.request("GET", "/limited")
        [line] = read_lines(self.path)
        m = LINE.match(line)
        self.assertEqual((m["method"], m["path"], m["code"], m["flags"]), ("GET", "/limited", "429", "LR"))

    def test_path_before_rewrites(self) -> None:
        """
        The path is the one the client sent, even if a filter changes it.
        """

        class Rewrite(HTTPFilter):
            def request_headers(self, head: Any, end_stream: bool) -> Any:
                head.path = b"/internal" + head.path

        class RewriteFactory(_LocalReplyFactory):
            name = "rewrite"

            def create_filter(self, config: Any, stream: Any) -> HTTPFilter:
                return Rewrite()

        h = self.harness(after=(RewriteFactory(),))
        h.request("GET", "/public")
        self.assertEqual(h.upstream.requests[0].head.path, b"/internal/public")
        self.assertEqual(LINE.match(read_lines(self.path)[0])["path"], "/public")

    def test_reset_before_response(self) -> None:
        """
        A client that goes away before the response: code 0 and C{DC}.
        """
        h = self.harness(upstream=StubUpstream(handler=lambda r: defer.Deferred()))
        stream, response = h.start("GET", "/hang")
        h.clock.advance(1.5)
        stream.downstream_reset()
        m = LINE.match(read_lines(self.path)[0])
        self.assertEqual((m["code"], m["flags"], m["duration"]), ("0", "DC", "1500"))

    def test_upstream_service_time(self) -> None:
        """
        The upstream's C{x-envoy-upstream-service-time} is logged.
        """
        h = self.harness(upstream=StubUpstream(200, headers={"x-envoy-upstream-service-time": "42"}))
        h.request("GET", "/")
        self.assertEqual(LINE.match(read_lines(self.path)[0])["service_time"], "42")

    def test_filter(self) -> None:
        """
        With C{filter: {errors_only: true}} only errors are written.
        """
        h = self.harness({"filter": {"errors_only": True}}, upstream=StubUpstream(200))
        h.request("GET", "/ok")
        self.assertEqual(read_lines(self.path), [])
        h2 = self.harness({"filter": {"errors_only": True}}, after=(_LocalReplyFactory(),))
        h2.request("GET", "/no")
        self.assertEqual(len(read_lines(self.path)), 1)

    def test_trace_id(self) -> None:
        """
        A trace id another filter left in C{metadata["trace"]} is logged,
        from an object or a mapping; an integer as 32 hex digits.
        """
        for value, expected in [
            (Trace("4bf92f3577b34da6a3ce929d0e0e4736"), "4bf92f3577b34da6a3ce929d0e0e4736"),
            ({"trace_id": b"abc"}, "abc"),
            (Trace(0x4BF92F3577B34DA6A3CE929D0E0E4736), "4bf92f3577b34da6a3ce929d0e0e4736"),
            (object(), None),
            ("not a context", None),
        ]:
            h = self.harness({"format": "json"}, before=(_TraceFactory(value),))
            h.request("GET", "/")
            self.assertEqual(json.loads(read_lines(self.path)[-1])["trace_id"], expected, value)
        self.assertIsNone(trace_id_of(None))
        self.assertEqual(trace_id_of({"tracing.context": Trace("ab" * 16)}), "ab" * 16)
        self.assertEqual(trace_id_of({"trace": Trace("cd" * 16), "tracing.context": Trace("ab" * 16)}), "cd" * 16)

    def test_ipv6_peer(self) -> None:
        """
        An IPv6 peer is written C{[host]:port}.
        """
        h = self.harness({"format": "json"}, downstream_address=IPv6Address("TCP", "::1", 5000))
        h.request("GET", "/")
        self.assertEqual(json.loads(read_lines(self.path)[0])["downstream_remote_address"], "[::1]:5000")

    def test_disabled_on_route(self) -> None:
        """
        A route can turn the access log off.
        """
        route = Route(name="quiet", match=RouteMatch(), cluster="test",
                      filter_overrides=(("access_log", DISABLED),))
        self.harness(route=route).request("GET", "/")
        self.assertEqual(read_lines(self.path), [])

    def test_broken_stream_never_raises(self) -> None:
        """
        If the record cannot be built, the failure is logged and nothing is
        written: the stream is not failed.
        """
        config = self.factory.parse_config({"path": self.path})
        f = AccessLogFilter(config, _BrokenStream())
        f.stream_complete()
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual(read_lines(self.path), [])

    def test_provides_interface(self) -> None:
        """
        The factory is an L{IHTTPFilterFactory} named C{access_log}.
        """
        self.assertTrue(IHTTPFilterFactory.providedBy(self.factory))
        self.assertEqual(self.factory.name, "access_log")

    def test_plugin(self) -> None:
        """
        The filter is installed as a plugin.
        """
        self.assertIsInstance(FilterRegistry.from_plugins().http("access_log"), AccessLogFactory)


class _BrokenStream:
    request_head = None
    # No clock, no flags: building the record fails.


def h_request_id(line: str) -> str:
    m = LINE.match(line)
    assert m is not None, line
    return m["request_id"]


def _later(h: FilterHarness, delay: float, result: Any) -> defer.Deferred:
    from twisted.internet.task import deferLater

    return deferLater(h.clock, delay, lambda: result)


class ConfigTests(SynchronousTestCase):
    """
    L{AccessLogFactory.parse_config}.
    """

    def setUp(self) -> None:
        self.factory = AccessLogFactory()
        self.addCleanup(self.factory.writers.close)

    def test_defaults(self) -> None:
        """
        No config: text to standard output, everything written.
        """
        config = self.factory.parse_config({})
        self.assertEqual(config.format, "text")
        self.assertIsNone(config.filter)
        self.assertEqual(config.writer.name, "<stdout>")

    def test_shared_writer_across_reloads(self) -> None:
        """
        Parsing the same path again (a reload) reuses the open file.
        """
        path = log_path(self)
        first = self.factory.parse_config({"path": path})
        second = self.factory.parse_config({"path": path, "format": "json"})
        self.assertIs(first.writer, second.writer)

    def test_errors(self) -> None:
        """
        Bad config is refused, naming the field.
        """
        cases = [
            ({"format": "xml"}, "format"),
            ({"path": ""}, "path"),
            ({"path": 3}, "path"),
            ({"path": "/nonexistent-dir/x/access.log"}, "path"),
            ({"filter": {"status": {"min": 9}}}, "filter.status.min"),
            ({"filter": {"flags": ["UO", "NOPE"]}}, "filter.flags[1]"),
            ({"filter": []}, "filter"),
            ({"fmt": "json"}, "fmt"),
        ]
        for raw, field in cases:
            with self.assertRaises(FilterConfigError, msg=repr(raw)) as raised:
                self.factory.parse_config(raw)
            self.assertEqual(raised.exception.field, field, raw)

    def test_shared_writers(self) -> None:
        """
        A factory can be given the writers to use.
        """
        writers = LogWriters()
        self.assertIs(AccessLogFactory(writers).writers, writers)


PROXY = """
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        http_filters:
          - name: access_log
            config: {path: "{log}"}
          - name: authz
            config:
              policies:
                - name: deny-admin
                  namespace: web
                  action: DENY
                  rules: [{to: [{operation: {paths: [/admin, /admin/*]}}]}]
        routes:
          - {name: slow, match: {prefix: /slow}, cluster: hanging, timeout: 200ms}
          - {name: limited, match: {prefix: /limited}, cluster: limited, timeout: 0}
          - {name: app, match: {prefix: /}, cluster: app}
    clusters:
      - {name: app, endpoints: ["127.0.0.1:{app}"]}
      - {name: hanging, endpoints: ["127.0.0.1:{hanging}"]}
      - name: limited
        endpoints: ["127.0.0.1:{hanging}"]
        circuit_breaker: {max_requests: 1}
    """


class ProxyTests(TestCase):
    """
    The filter in a real proxy on loopback: the four lines the issue asks
    for (a 200, a 503 C{UO}, a 504 C{UT} and a 403 C{RBACD}).
    """

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.path = log_path(self)
        self.app = RecordingFactory(fixed_response(b"hello"))
        self.hanging = RecordingFactory()
        app = yield listen_upstream(self, self.app)
        hanging = yield listen_upstream(self, self.hanging)
        factory = AccessLogFactory()
        self.addCleanup(factory.writers.close)
        registry = FilterRegistry([RouterFactory(), AuthzFactory(), factory])
        self.proxy = ProxyHarness(self, registry=registry)
        yield self.proxy.start(PROXY, log=self.path, app=app, hanging=hanging)
        self.app_port, self.hanging_port = app, hanging

    @defer.inlineCallbacks
    def get(self, path: str, extra: bytes = b"") -> Any:
        reply = yield raw_exchange(
            self, self.proxy.port(),
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: web.example.com\r\nUser-Agent: curl/8.5.0\r\n"
            + extra + b"Connection: close\r\n\r\n")
        return reply

    def only_line(self) -> re.Match:
        lines = read_lines(self.path)
        self.assertEqual(len(lines), 1, lines)
        m = LINE.match(lines[0])
        self.assertIsNotNone(m, lines[0])
        # For people reading the test log.
        log.info("access log line: {line}", line=lines[0].rstrip("\n"))
        return m

    def check(self, m: re.Match, **expected: str) -> None:
        self.assertEqual({k: m[k] for k in expected}, expected)
        self.assertRegex(m["start"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertRegex(m["request_id"], r"^[0-9a-f-]{36}$")

    @defer.inlineCallbacks
    def test_200(self) -> Any:
        """
        A request the upstream answers: C{200 -}, the body size, the
        upstream host, and this proxy's hop in C{x-forwarded-for}.
        """
        reply = yield self.get("/hello?x=1")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "))
        m = self.only_line()
        self.check(m, method="GET", path="/hello?x=1", protocol="HTTP/1.1", code="200", flags="-",
                   received="0", sent="5", service_time="-", xff="127.0.0.1", ua="curl/8.5.0",
                   authority="web.example.com", upstream=f"127.0.0.1:{self.app_port}")

    @defer.inlineCallbacks
    def test_503_uo(self) -> Any:
        """
        The circuit breaker refuses a request (C{max_requests: 1}, one in
        flight): C{503 UO}, and no upstream host.
        """
        first = yield raw_connect(self, self.proxy.port())
        first.transport.write(b"GET /limited/first HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
        yield _wait(lambda: self.hanging.received)
        reply = yield self.get("/limited/second")
        self.assertTrue(reply.startswith(b"HTTP/1.1 503 "), reply)
        m = self.only_line()
        self.check(m, path="/limited/second", code="503", flags="UO", upstream="-")

    @defer.inlineCallbacks
    def test_504_ut(self) -> Any:
        """
        The route timeout expires before a slow upstream answers: C{504
        UT}, a duration of at least the timeout, and the upstream host.
        """
        reply = yield self.get("/slow")
        self.assertTrue(reply.startswith(b"HTTP/1.1 504 "), reply)
        m = self.only_line()
        self.check(m, path="/slow", code="504", flags="UT", upstream=f"127.0.0.1:{self.hanging_port}")
        self.assertGreaterEqual(int(m["duration"]), 200)

    @defer.inlineCallbacks
    def test_403_rbacd(self) -> Any:
        """
        An authorization policy denies the request: C{403 RBACD}; the
        upstream never sees it.
        """
        reply = yield self.get("/admin/users", b"X-Forwarded-For: 203.0.113.9\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 403 "), reply)
        m = self.only_line()
        self.check(m, path="/admin/users", code="403", flags="RBACD", sent="19",
                   xff="203.0.113.9, 127.0.0.1", upstream="-")
        self.assertEqual(self.app.received, [])


def _wait(cond: Any, timeout: float = 10.0) -> defer.Deferred:
    from tests.test_http1_proxy import wait_until

    return wait_until(cond, timeout)


class TCPTests(SynchronousTestCase):
    """
    L{TCPAccessLog} as a TCP proxy's C{on_connection_closed}.
    """

    def setUp(self) -> None:
        self.path = log_path(self)
        self.factory = AccessLogFactory()
        self.addCleanup(self.factory.writers.close)

    def proxy(self, config: dict[str, Any] | None = None, **kw: Any) -> Any:
        proxy = make_proxy(**kw)
        proxy.clock.advance(START)
        parsed = self.factory.parse_config({"path": self.path, **(config or {})})
        proxy.factory.on_connection_closed = TCPAccessLog(parsed, upstream_cluster="db")
        return proxy

    def test_connection(self) -> None:
        """
        An ordinary connection: bytes each way, the duration, the upstream.
        """
        proxy = self.proxy()
        c = proxy.open()
        c.down.dataReceived(b"ping")
        c.up.dataReceived(b"pong!")
        proxy.clock.advance(2.5)
        lose(c.down)
        lose(c.up)
        self.assertEqual(
            read_lines(self.path),
            ['[2026-11-25T17:06:08.123Z] "- - -" 0 - 4 5 2500 - "-" "-" "-" "-" "10.1.1.1:9000"\n'],
        )

    def test_no_healthy_upstream_json(self) -> None:
        """
        No endpoint: C{UH}, in JSON with the listener and cluster.
        """
        proxy = self.proxy({"format": "json"}, endpoint=None)
        c = proxy.accept()
        lose(c.down)
        value = json.loads(read_lines(self.path)[0])
        self.assertEqual(value["response_flags"], "UH")
        self.assertEqual(value["response_code"], 0)
        self.assertIsNone(value["upstream_host"])
        self.assertEqual(value["upstream_cluster"], "db")
        self.assertEqual(value["route_name"], "tcp-in")
        self.assertEqual(value["downstream_remote_address"], "192.0.2.7:40000")

    def test_filter(self) -> None:
        """
        C{errors_only} skips ordinary connections.
        """
        proxy = self.proxy({"filter": {"errors_only": True}})
        c = proxy.open()
        lose(c.down)
        lose(c.up)
        self.assertEqual(read_lines(self.path), [])


class TCPListenerAccessLogTests(TestCase):
    """
    A TCP listener's C{access_log}: one line per connection, from the real
    proxy.
    """

    @defer.inlineCallbacks
    def test_connection_line(self) -> Any:
        upstream = yield listen_upstream(self, RecordingFactory(fixed_response(b"pong")))
        fd, path = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        self.addCleanup(os.remove, path)
        h = ProxyHarness(self)
        yield h.start(f"""
            listeners:
              - name: db
                address: "tcp:0:interface=127.0.0.1"
                protocol: tcp
                cluster: db
                access_log: {{format: json, path: "{path}"}}
            clusters: [{{name: db, endpoints: ["127.0.0.1:{upstream}"]}}]
            """)
        client = yield raw_connect(self, h.port("db"))
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = yield client.wait_for(lambda d: d.endswith(b"pong"))
        self.assertTrue(data.endswith(b"pong"))
        client.transport.loseConnection()
        deadline = reactor.seconds() + 5
        while not open(path).read() and reactor.seconds() < deadline:
            yield deferLater(reactor, 0.02, lambda: None)
        with open(path) as f:
            [line] = f.read().splitlines()
        record = json.loads(line)
        self.assertEqual(record["upstream_host"], f"127.0.0.1:{upstream}")
        self.assertGreater(record["bytes_received"], 0)
        self.assertGreater(record["bytes_sent"], 0)
