"""
Tests for L{txmesh.observability.zipkin}: a real collector (C{twisted.web}
on 127.0.0.1, port 0) that records and validates the POSTed JSON; the
reporter's timers on a L{task.Clock}.

L{validate_span} checks a span against the Zipkin v2 API model (the
C{Span} and C{Endpoint} definitions of C{zipkin2-api.yaml}).
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from txmesh.observability.zipkin import ReporterSettings, ZipkinReporter

_TRACE_ID = re.compile(r"(?:[0-9a-f]{16}|[0-9a-f]{32})\Z")
_SPAN_ID = re.compile(r"[0-9a-f]{16}\Z")
_KINDS = {"CLIENT", "SERVER", "PRODUCER", "CONSUMER"}
_SPAN_FIELDS = {
    "traceId", "id", "parentId", "name", "kind", "timestamp", "duration", "localEndpoint",
    "remoteEndpoint", "annotations", "tags", "debug", "shared",
}
_ENDPOINT_FIELDS = {"serviceName", "ipv4", "ipv6", "port"}


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_endpoint(endpoint: Any, where: str) -> list[str]:
    if not isinstance(endpoint, dict):
        return [f"{where}: expected an object"]
    errors = [f"{where}.{k}: unknown field" for k in endpoint if k not in _ENDPOINT_FIELDS]
    if "serviceName" in endpoint and not isinstance(endpoint["serviceName"], str):
        errors.append(f"{where}.serviceName: expected a string")
    for field, version in (("ipv4", 4), ("ipv6", 6)):
        if field in endpoint:
            try:
                ok = ipaddress.ip_address(endpoint[field]).version == version
            except (TypeError, ValueError):
                ok = False
            if not ok:
                errors.append(f"{where}.{field}: not an IPv{version} address: {endpoint[field]!r}")
    if "port" in endpoint and not (_integer(endpoint["port"]) and 0 < endpoint["port"] < 65536):
        errors.append(f"{where}.port: expected 1..65535, got {endpoint['port']!r}")
    return errors


def validate_span(span: Any) -> list[str]:
    """
    Check one span against the Zipkin v2 model.

    @return: what is wrong (empty when the span is valid).
    """
    if not isinstance(span, dict):
        return ["span: expected an object"]
    errors = [f"{k}: unknown field" for k in span if k not in _SPAN_FIELDS]
    for field in ("traceId", "id"):
        if field not in span:
            errors.append(f"{field}: required")
    trace_id = span.get("traceId")
    if trace_id is not None and (not isinstance(trace_id, str) or not _TRACE_ID.match(trace_id)
                                 or not trace_id.strip("0")):
        errors.append(f"traceId: expected 16 or 32 lower-hex digits, not all zero: {trace_id!r}")
    for field in ("id", "parentId"):
        value = span.get(field)
        if value is not None and (not isinstance(value, str) or not _SPAN_ID.match(value) or not value.strip("0")):
            errors.append(f"{field}: expected 16 lower-hex digits, not all zero: {value!r}")
    if span.get("parentId") is not None and span.get("parentId") == span.get("id"):
        errors.append("parentId: equals id")
    if "kind" in span and span["kind"] not in _KINDS:
        errors.append(f"kind: expected one of {sorted(_KINDS)}, got {span['kind']!r}")
    if "name" in span and not isinstance(span["name"], str):
        errors.append("name: expected a string")
    # Epoch microseconds: zero is invalid; anything before 2001 is
    # seconds or milliseconds by mistake.
    if "timestamp" in span and not (_integer(span["timestamp"]) and span["timestamp"] >= 10**15):
        errors.append(f"timestamp: expected epoch microseconds, got {span['timestamp']!r}")
    if "duration" in span and not (_integer(span["duration"]) and span["duration"] >= 1):
        errors.append(f"duration: expected microseconds >= 1, got {span['duration']!r}")
    for field in ("localEndpoint", "remoteEndpoint"):
        if field in span:
            errors += _validate_endpoint(span[field], field)
    tags = span.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        errors.append("tags: expected an object of strings")
    annotations = span.get("annotations", [])
    if not isinstance(annotations, list) or not all(
        isinstance(a, dict) and set(a) == {"timestamp", "value"} and _integer(a["timestamp"])
        and isinstance(a["value"], str) for a in annotations
    ):
        errors.append("annotations: expected a list of {timestamp, value}")
    for field in ("debug", "shared"):
        if field in span and not isinstance(span[field], bool):
            errors.append(f"{field}: expected true or false")
    return errors


class Collector(Resource):
    """
    A Zipkin collector's C{/api/v2/spans}: records each POSTed batch and
    what was invalid in it; answers C{code}, or never while C{hang}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 202
        self.hang = False
        self.hits = 0
        self.batches: list[list[dict[str, Any]]] = []
        self.errors: list[str] = []
        self.pending: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        self.hits += 1
        if request.path != b"/api/v2/spans":
            self.errors.append(f"path {request.path!r}")
        if request.getHeader(b"content-type") != b"application/json":
            self.errors.append(f"content-type {request.getHeader(b'content-type')!r}")
        try:
            batch = json.loads(request.content.read())
        except ValueError as e:
            self.errors.append(f"body: {e}")
            batch = []
        if not isinstance(batch, list):
            self.errors.append("body: expected a JSON list of spans")
            batch = []
        for span in batch:
            self.errors += validate_span(span)
        self.batches.append(batch)
        if self.hang:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        return b""

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for request in pending:
            if not request.finished and not request._disconnected:
                request.setResponseCode(self.code)
                request.finish()

    @property
    def spans(self) -> list[dict[str, Any]]:
        return [span for batch in self.batches for span in batch]


def make_span(i: int) -> dict[str, Any]:
    return {
        "traceId": f"{i + 1:032x}",
        "id": f"{i + 1:016x}",
        "kind": "SERVER",
        "name": "get /items",
        "timestamp": 1_700_000_000_000_000 + i,
        "duration": 1500,
        "localEndpoint": {"serviceName": "reviews", "port": 9080},
        "remoteEndpoint": {"ipv4": "10.0.0.1", "port": 40000},
        "tags": {"http.method": "GET", "http.status_code": "200"},
    }


def until(predicate: Any) -> Deferred:
    """
    @return: a L{Deferred} firing once C{predicate()} holds, checked on each
        reactor turn (a real socket needs a few).
    """
    d: Deferred = Deferred()

    def check() -> None:
        if predicate():
            d.callback(None)
        else:
            reactor.callLater(0, check)

    check()
    return d


class ValidatorTests(SynchronousTestCase):
    """
    The validator itself rejects what the model forbids.
    """

    def test_valid(self) -> None:
        self.assertEqual(validate_span(make_span(0)), [])
        self.assertEqual(validate_span({"traceId": "a" * 16, "id": "b" * 16}), [])

    def test_invalid(self) -> None:
        for change in [
            {"traceId": None},
            {"traceId": "A" * 32},
            {"traceId": "a" * 20},
            {"traceId": "0" * 32},
            {"id": "a" * 32},
            {"id": 5},
            {"parentId": "0" * 16},
            {"parentId": f"{1:016x}"},  # itself
            {"kind": "client"},
            {"timestamp": 1.5},
            {"timestamp": 1_700_000_000},  # seconds, not microseconds
            {"duration": 0},
            {"localEndpoint": {"serviceName": "x", "ipv4": "::1"}},
            {"remoteEndpoint": {"port": 0}},
            {"remoteEndpoint": {"host": "x"}},
            {"tags": {"http.status_code": 200}},
            {"debug": "true"},
            {"extra": 1},
        ]:
            with self.subTest(change=change):
                span = make_span(0)
                span.update(change)
                span = {k: v for k, v in span.items() if v is not None}
                self.assertNotEqual(validate_span(span), [])


class ZipkinReporterTests(TestCase):
    """
    L{ZipkinReporter} against a real collector.
    """

    def setUp(self) -> None:
        self.collector = Collector()
        self.port: Any = reactor.listenTCP(0, Site(self.collector), interface="127.0.0.1")
        self.addCleanup(self._stop_port)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        self.clock = Clock()
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/api/v2/spans"

    def _stop_port(self) -> Any:
        self.collector.release()
        if self.port is not None:
            return self.port.stopListening()
        return None

    def reporter(self, **settings: Any) -> ZipkinReporter:
        reporter = ZipkinReporter(self.url, self.clock, ReporterSettings(**settings), client=self.client)
        self.addCleanup(reporter.stop)
        return reporter

    def assertValid(self) -> None:
        self.assertEqual(self.collector.errors, [])

    @inlineCallbacks
    def test_batch_when_full(self) -> Any:
        reporter = self.reporter(batch_size=3, flush_interval=10)
        for i in range(2):
            self.assertTrue(reporter.report(make_span(i)))
        self.assertFalse(reporter.in_flight)
        self.assertEqual(reporter.pending, 2)
        reporter.report(make_span(2))
        self.assertTrue(reporter.in_flight)
        self.assertEqual(reporter.pending, 0)
        yield until(lambda: reporter.sent == 3)
        self.assertEqual([len(b) for b in self.collector.batches], [3])
        self.assertEqual(self.collector.spans, [make_span(i) for i in range(3)])
        self.assertEqual((reporter.queued, reporter.requests, reporter.failures, reporter.dropped), (3, 1, 0, 0))
        self.assertFalse(reporter.in_flight)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertValid()

    @inlineCallbacks
    def test_batch_on_interval(self) -> Any:
        reporter = self.reporter(batch_size=100, flush_interval=2)
        reporter.report(make_span(0))
        self.clock.advance(1)
        reporter.report(make_span(1))
        self.assertFalse(reporter.in_flight)
        self.clock.advance(1)  # two seconds after the first span
        self.assertTrue(reporter.in_flight)
        yield until(lambda: reporter.sent == 2)
        self.assertEqual([len(b) for b in self.collector.batches], [2])
        # Nothing queued: no timer keeps running.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertValid()

    @inlineCallbacks
    def test_large_queue_goes_in_batches(self) -> Any:
        reporter = self.reporter(batch_size=4, max_queue=100, flush_interval=5)
        for i in range(10):
            reporter.report(make_span(i))
        # The first batch left at once; the rest waits behind it.
        self.assertEqual(reporter.pending, 6)
        yield until(lambda: reporter.sent == 4)
        self.clock.advance(0)  # the next full batch goes on the next turn
        yield until(lambda: reporter.sent == 8)
        self.assertEqual(reporter.pending, 2)
        self.clock.advance(5)
        yield until(lambda: reporter.sent == 10)
        self.assertEqual([len(b) for b in self.collector.batches], [4, 4, 2])
        self.assertEqual(self.collector.spans, [make_span(i) for i in range(10)])
        self.assertValid()

    @inlineCallbacks
    def test_queue_bound(self) -> Any:
        self.collector.hang = True
        reporter = self.reporter(batch_size=2, max_queue=4, flush_interval=1)
        reporter.report(make_span(0))
        reporter.report(make_span(1))  # a full batch: in flight, unanswered
        yield until(lambda: self.collector.hits == 1)
        results = [reporter.report(make_span(i)) for i in range(2, 9)]
        self.assertEqual(results, [True] * 4 + [False] * 3)
        self.assertEqual((reporter.pending, reporter.dropped, reporter.queued), (4, 3, 6))
        self.collector.hang = False
        self.collector.release()
        yield until(lambda: reporter.sent == 2)
        self.clock.advance(0)
        yield until(lambda: reporter.sent == 4)
        self.clock.advance(0)
        yield until(lambda: reporter.sent == 6)
        self.assertEqual(self.collector.spans, [make_span(i) for i in range(6)])
        self.assertEqual(reporter.dropped, 3)
        self.assertValid()

    @inlineCallbacks
    def test_collector_down(self) -> Any:
        yield self.port.stopListening()
        self.port = None
        reporter = self.reporter(batch_size=2, flush_interval=1)
        for i in range(2):
            self.assertTrue(reporter.report(make_span(i)))  # never raises
        yield until(lambda: reporter.failures == 1)
        self.assertEqual((reporter.failed_spans, reporter.sent, reporter.pending), (2, 0, 0))
        self.assertFalse(reporter.in_flight)
        # Later spans still queue and are tried again.
        reporter.report(make_span(2))
        self.clock.advance(1)
        yield until(lambda: reporter.failures == 2)
        self.assertEqual((reporter.failed_spans, reporter.dropped), (3, 0))
        # Spans lost in failed POSTs are dropped spans too (the metric).
        self.assertEqual(reporter.spans_dropped, 3)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    @inlineCallbacks
    def test_collector_error_status(self) -> Any:
        self.collector.code = 500
        reporter = self.reporter(batch_size=1)
        reporter.report(make_span(0))
        yield until(lambda: reporter.failures == 1)
        self.assertEqual((reporter.sent, reporter.failed_spans), (0, 1))
        self.collector.code = 202
        reporter.report(make_span(1))
        yield until(lambda: reporter.sent == 1)
        self.assertEqual(reporter.failures, 1)
        self.assertValid()

    @inlineCallbacks
    def test_slow_collector_one_in_flight(self) -> Any:
        self.collector.hang = True
        reporter = self.reporter(batch_size=1, max_queue=10, flush_interval=1, timeout=3)
        for i in range(5):
            reporter.report(make_span(i))
        yield until(lambda: self.collector.hits == 1)
        self.clock.advance(2)
        # Give a second request every chance to show up: it must not.
        for _ in range(20):
            yield _turn()
        self.assertEqual(self.collector.hits, 1)
        self.assertTrue(reporter.in_flight)
        self.assertEqual(reporter.pending, 4)
        self.clock.advance(1)  # the timeout: the POST is cancelled, the next batch goes
        self.assertEqual(reporter.failures, 1)
        self.assertTrue(reporter.in_flight)
        yield until(lambda: self.collector.hits == 2)
        self.assertEqual(self.collector.batches[1], [make_span(1)])
        self.assertEqual((reporter.pending, reporter.failed_spans), (3, 1))
        self.assertEqual(reporter.spans_dropped, 1)
        self.assertValid()

    @inlineCallbacks
    def test_default_client(self) -> Any:
        reporter = ZipkinReporter(self.url, self.clock, ReporterSettings(batch_size=2), reactor=reactor)
        for i in range(4):
            reporter.report(make_span(i))
        yield until(lambda: reporter.sent == 2)
        self.clock.advance(0)
        yield until(lambda: reporter.sent == 4)
        self.assertEqual(len(self.collector.batches), 2)
        self.assertValid()
        yield reporter.stop()

    def test_stop(self) -> None:
        reporter = self.reporter(batch_size=10, flush_interval=1)
        reporter.report(make_span(0))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        reporter.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(reporter.report(make_span(1)))
        self.assertEqual((reporter.dropped, reporter.pending), (2, 0))


def _turn() -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(0, d.callback, None)
    return d


class FakeClient:
    """
    A treq-like client that answers at once, for tests that need no socket.
    """

    def __init__(self, code: int = 202, fail: bool = False) -> None:
        self.code = code
        self.fail = fail
        self.posts: list[list[dict[str, Any]]] = []

    def post(self, url: str, data: bytes, headers: Any) -> Deferred:
        self.posts.append(json.loads(data))
        if self.fail:
            raise ConnectionRefusedError("refused")
        return succeed(self)

    def content(self) -> Deferred:
        return succeed(b"")


class ZipkinReporterUnitTests(SynchronousTestCase):
    """
    L{ZipkinReporter} with a client that answers synchronously.
    """

    def test_client_that_raises(self) -> None:
        clock = Clock()
        client = FakeClient(fail=True)
        reporter = ZipkinReporter("http://z/api/v2/spans", clock, ReporterSettings(max_queue=5000, batch_size=1),
                                  client=client)
        for i in range(3000):
            reporter.report(make_span(i))
        # Each failed batch hands over to the next turn: no deep recursion.
        while clock.getDelayedCalls():
            clock.advance(0)
        self.assertEqual((reporter.failures, reporter.failed_spans, reporter.pending), (3000, 3000, 0))

    def test_flush_result(self) -> None:
        clock = Clock()
        reporter = ZipkinReporter("http://z/api/v2/spans", clock, ReporterSettings(batch_size=10), client=FakeClient())
        self.assertIsNone(reporter.flush())
        reporter.report(make_span(0))
        d = reporter.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(reporter.sent, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_settings(self) -> None:
        for kw in [{"max_queue": 0}, {"batch_size": 0}, {"batch_size": 11, "max_queue": 10},
                   {"flush_interval": 0}, {"timeout": -1}]:
            with self.subTest(kw=kw):
                self.assertRaises(ValueError, ReporterSettings, **kw)


class CollectorOutageThroughProxyTests(TestCase):
    """
    A collector that is down or never answers costs spans, never requests:
    a real L{ProxyService} with the C{tracing} filter (its reporter on the
    default treq client) relays every request on loopback, and the spans
    the collector never got are in C{txmesh_tracing_spans_dropped_total}.
    """

    timeout = 60
    REQUESTS = 30

    @inlineCallbacks
    def proxy(self, collector_url: str) -> Any:
        """
        @return: a started L{tests.support.ProxyHarness} tracing every request
            of listener C{inbound} to C{collector_url} (queue of 2 spans, one
            per POST), routed to an app answering 200.
        """
        from tests.support import ProxyHarness, RecordingFactory, fixed_response, listen_upstream
        from txmesh.filters.registry import FilterRegistry
        from txmesh.filters.router import RouterFactory
        from txmesh.filters.tracing import TracingFactory

        tracing = TracingFactory()
        # Cancels a POST still in flight and closes the reporter's connections.
        self.addCleanup(tracing.stop)
        app = yield listen_upstream(self, RecordingFactory(fixed_response(b"hello")))
        harness = ProxyHarness(self, FilterRegistry(http=[RouterFactory(), tracing]))
        yield harness.start("""
            node: {workload: web-v1, namespace: default, app: web, version: v1}
            listeners:
              - name: inbound
                address: "tcp:0:interface=127.0.0.1"
                http_filters:
                  - name: tracing
                    config: {collector: "{collector}", sampling: 100, max_queue: 2, batch_size: 1,
                             timeout: 60s}
                routes: [{cluster: app}]
            clusters:
              - {name: app, endpoints: ["127.0.0.1:{app}"]}
            """, collector=collector_url, app=app)
        self.tracing = tracing
        return harness

    @inlineCallbacks
    def send_requests(self, harness: Any) -> Any:
        """
        Send L{REQUESTS} requests, one connection each, all at once; each
        must get its 200 (within a generous bound).
        """
        from twisted.internet.defer import gatherResults

        from tests.support import raw_exchange

        request = b"GET /items HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        replies = yield gatherResults([raw_exchange(self, harness.port("inbound"), request, timeout=20)
                                       for _ in range(self.REQUESTS)])
        for reply in replies:
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:200])
            self.assertTrue(reply.endswith(b"hello"), reply[-200:])

    def dropped_metric(self, harness: Any) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = harness.service.metrics.exposition()[1].decode()
        for family in text_string_to_metric_families(text):
            if family.name == "txmesh_tracing_spans_dropped":
                return sum(s.value for s in family.samples if s.name == "txmesh_tracing_spans_dropped_total")
        self.fail(f"no txmesh_tracing_spans_dropped_total in:\n{text}")

    @inlineCallbacks
    def test_collector_down(self) -> Any:
        from tests.support import free_port

        url = f"http://127.0.0.1:{free_port()}/api/v2/spans"
        harness = yield self.proxy(url)
        yield self.send_requests(harness)
        (reporter,) = self.tracing.reporters.values()
        # Every POST is refused at once: each span ends dropped, whether
        # the queue was full or its POST failed.
        yield until(lambda: reporter.pending == 0 and not reporter.in_flight).addTimeout(20, reactor)
        self.assertEqual(reporter.queued + reporter.dropped, self.REQUESTS)
        self.assertGreater(reporter.failures, 0)
        self.assertEqual(reporter.sent, 0)
        self.assertEqual(self.dropped_metric(harness), self.REQUESTS)
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_collector_never_answers(self) -> Any:
        collector = Collector()
        collector.hang = True
        port = reactor.listenTCP(0, Site(collector), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(collector.release)
        harness = yield self.proxy(f"http://127.0.0.1:{port.getHost().port}/api/v2/spans")
        yield self.send_requests(harness)
        (reporter,) = self.tracing.reporters.values()
        # One POST hangs and two spans wait behind it; the rest were
        # refused by the full queue.
        yield until(lambda: collector.hits == 1).addTimeout(20, reactor)
        self.assertTrue(reporter.in_flight)
        self.assertEqual((reporter.pending, reporter.failures, reporter.sent), (2, 0, 0))
        self.assertEqual(reporter.dropped, self.REQUESTS - 3)
        self.assertEqual(self.dropped_metric(harness), self.REQUESTS - 3)
