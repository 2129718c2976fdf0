"""
Tests for the C{tracing} filter (L{txmesh.filters.tracing}) through
L{FilterHarness}; spans go to a collector resource behind
L{treq.testing.StubTreq} and are checked against the Zipkin v2 model.
"""

from __future__ import annotations

import random
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from tests.test_zipkin import Collector, validate_span
from txmesh.config.errors import FilterConfigError
from txmesh.config.model import DISABLED, Endpoint, NodeConfig, Route, RouteMatch
from txmesh.filters.api import IHTTPFilterFactory, LocalReply
from txmesh.filters.tracing import METADATA_KEY, TracingConfig, TracingFactory
from txmesh.observability.trace_context import TraceContext, extract
from txmesh.observability.zipkin import ReporterSettings
from txmesh.proxy.stream import Headers, RequestHead
from txmesh.testing import FilterHarness, StubResponse, StubUpstream, UpstreamRequest

COLLECTOR = "http://zipkin.test:9411/api/v2/spans"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = "b7ad6b7169203331"
EPOCH = 1_700_000_000.0
NODE = NodeConfig(id="sidecar~10.0.0.5~reviews-v1.default", workload="reviews-v1", namespace="default")
PROPAGATION = (b"traceparent", b"tracestate", b"b3", b"x-b3-traceid", b"x-b3-spanid",
               b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags")


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.collector = Collector()
        self.stub = StubTreq(self.collector)
        self.clock = Clock()
        self.clock.advance(EPOCH)

    def factory(self, seed: int = 1) -> TracingFactory:
        factory = TracingFactory(rng=random.Random(seed), client=self.stub)
        self.addCleanup(factory.stop)
        return factory

    def harness(self, config: dict[str, Any] | None = None, factory: TracingFactory | None = None,
                **kw: Any) -> FilterHarness:
        raw = {"collector": COLLECTOR, "sampling": 100, "batch_size": 1}
        raw.update(config or {})
        return FilterHarness([(factory or self.factory(), raw)], node=NODE, clock=self.clock, **kw)

    def spans(self) -> list[dict[str, Any]]:
        self.stub.flush()
        self.assertEqual(self.collector.errors, [])
        return self.collector.spans

    def sent(self, harness: FilterHarness) -> Headers:
        return harness.upstream.requests[-1].head.headers

    def assertWellFormed(self, headers: Headers) -> TraceContext:
        """
        The propagation headers for the next hop agree with each other.
        """
        context = extract(headers)
        self.assertIsNotNone(context)
        tp = headers.get(b"traceparent").decode()
        self.assertEqual(tp, f"00-{context.trace_id}-{context.span_id}-{'01' if context.sampled else '00'}")
        self.assertEqual(headers.get(b"x-b3-traceid").decode(), context.trace_id)
        self.assertEqual(headers.get(b"x-b3-spanid").decode(), context.span_id)
        self.assertEqual(headers.get(b"x-b3-sampled"), b"1" if context.sampled else b"0")
        for name in PROPAGATION:
            self.assertLessEqual(len(headers.get_all(name)), 1, name)
        return context


class ServerSpanTests(_Base):
    def test_continues_incoming_trace(self) -> None:
        h = self.harness({"kind": "server"})
        response = h.request("GET", "/reviews/1?user=alice", headers={
            "traceparent": f"00-{TRACE}-{SPAN}-01",
            "tracestate": "rojo=00f067aa0ba902b7",
            "x-request-id": "req-1",
            "user-agent": "curl/8",
        }, authority="reviews:9080")
        self.assertEqual(response.status, 200)
        sent = self.sent(h)
        forwarded = self.assertWellFormed(sent)
        # The next hop's parent is this span: same trace, new span id.
        self.assertEqual(forwarded.trace_id, TRACE)
        self.assertNotEqual(forwarded.span_id, SPAN)
        self.assertEqual(sent.get(b"x-b3-parentspanid").decode(), SPAN)
        self.assertEqual(sent.get(b"tracestate"), b"rojo=00f067aa0ba902b7")
        self.assertEqual(sent.get(b"x-request-id"), b"req-1")

        [span] = self.spans()
        self.assertEqual(span["traceId"], TRACE)
        self.assertEqual(span["id"], forwarded.span_id)
        self.assertEqual(span["parentId"], SPAN)
        self.assertEqual(span["kind"], "SERVER")
        self.assertEqual(span["name"], "reviews:9080/*")
        self.assertEqual(span["timestamp"], int(EPOCH * 1_000_000))
        self.assertEqual(span["localEndpoint"], {"serviceName": "reviews-v1", "port": 8080})
        self.assertEqual(span["remoteEndpoint"], {"ipv4": "127.0.0.1", "port": 40000})
        self.assertEqual(span["tags"], {
            "component": "proxy",
            "http.method": "GET",
            "http.url": "http://reviews:9080/reviews/1",  # no query string
            "http.protocol": "HTTP/1.1",
            "http.status_code": "200",
            "response_flags": "-",
            "upstream_cluster": "-",
            "guid:x-request-id": "req-1",
            "node_id": NODE.id,
            "user_agent": "curl/8",
            "peer.address": "127.0.0.1",
        })
        self.assertNotIn("debug", span)

    def test_duration_from_stream_clock(self) -> None:
        pending: Deferred = Deferred()
        h = self.harness({"kind": "server"}, upstream=StubUpstream(handler=lambda r: pending))
        _, response = h.start("GET", "/slow")
        self.clock.advance(0.25)
        pending.callback(StubResponse(200))
        self.assertTrue(response.complete)
        [span] = self.spans()
        self.assertEqual(span["duration"], 250_000)

    def test_default_kind_by_listener(self) -> None:
        factory = self.factory()
        config = factory.parse_config({"collector": COLLECTOR, "sampling": 100})
        for listener, kind in [("inbound", "SERVER"), ("outbound", "CLIENT"), ("test", "CLIENT")]:
            with self.subTest(listener=listener):
                stream = _FakeStream(listener, self.clock)
                f = factory.create_filter(config, stream)
                f.request_headers(RequestHead(b"GET", b"/", b"a", Headers()), True)
                self.assertEqual(f.zipkin_span()["kind"], kind)


class _FakeStream:
    """
    Just enough of an L{IStreamContext} for a filter built by hand.
    """

    def __init__(self, listener_name: str, clock: Clock) -> None:
        self.listener_name = listener_name
        self.clock = clock
        self.start_time = clock.seconds()
        self.request_id = b"rid"
        self.metadata: dict[str, Any] = {}
        self.proxy = None
        self.response_flags: list[str] = []
        self.upstream_cluster = None
        self.upstream_host = None
        self.downstream_address = None
        self.downstream_port = None


class ClientSpanTests(_Base):
    def test_new_trace_with_upstream(self) -> None:
        pending: Deferred = Deferred()
        h = self.harness({"service_name": "productpage"}, upstream=StubUpstream(handler=lambda r: pending))
        stream, response = h.start("POST", "/api/v1/items?secret=1", headers={"x-request-id": "rid-7"},
                                   authority="reviews.default.svc:9080")
        # What the router would record.
        stream.upstream_cluster = "outbound|9080||reviews.default.svc"
        stream.upstream_host = Endpoint("10.1.2.3", 9080)
        stream.add_response_flag("URX")
        self.clock.advance(0.01)
        pending.callback(StubResponse(503, body=b"no"))
        self.assertEqual(response.status, 503)

        forwarded = self.assertWellFormed(self.sent(h))
        self.assertNotIn(b"x-b3-parentspanid", self.sent(h))
        self.assertEqual(stream.metadata[METADATA_KEY], forwarded)
        [span] = self.spans()
        self.assertEqual((span["traceId"], span["id"]), (forwarded.trace_id, forwarded.span_id))
        self.assertNotIn("parentId", span)
        self.assertEqual(span["kind"], "CLIENT")
        self.assertEqual(span["duration"], 10_000)
        self.assertEqual(span["localEndpoint"], {"serviceName": "productpage"})
        self.assertEqual(span["remoteEndpoint"], {
            "serviceName": "outbound|9080||reviews.default.svc", "ipv4": "10.1.2.3", "port": 9080,
        })
        tags = span["tags"]
        self.assertEqual(tags["http.method"], "POST")
        self.assertEqual(tags["http.url"], "http://reviews.default.svc:9080/api/v1/items")
        self.assertEqual(tags["http.status_code"], "503")
        self.assertEqual(tags["response_flags"], "URX")
        self.assertEqual(tags["upstream_cluster"], "outbound|9080||reviews.default.svc")
        self.assertEqual(tags["upstream_host"], "10.1.2.3:9080")
        self.assertEqual(tags["guid:x-request-id"], "rid-7")
        self.assertEqual(tags["error"], "true")

    def test_local_reply_status_and_flag(self) -> None:
        from txmesh.filters.api import HTTPFilter

        class Deny(HTTPFilter):
            def request_headers(self, head: Any, end_stream: bool) -> Any:
                return LocalReply(403, b"denied", flag="RBACD")

        class DenyFactory:
            name = "deny"

            def parse_config(self, raw: Any) -> None:
                return None

            def create_filter(self, config: Any, stream: Any) -> Deny:
                return Deny()

        h = FilterHarness([(self.factory(), {"collector": COLLECTOR, "sampling": 100, "batch_size": 1}),
                           (DenyFactory(), {})], node=NODE, clock=self.clock)
        response = h.request("GET", "/admin")
        self.assertEqual(response.status, 403)
        [span] = self.spans()
        self.assertEqual(span["tags"]["http.status_code"], "403")
        self.assertEqual(span["tags"]["response_flags"], "RBACD")
        self.assertNotIn("error", span["tags"])
        self.assertNotIn("remoteEndpoint", span)


class SamplingTests(_Base):
    def run_one(self, sampling: float, headers: dict[str, str] | None = None) -> tuple[TraceContext, list]:
        self.collector.batches.clear()
        h = self.harness({"sampling": sampling})
        h.request("GET", "/", headers=headers)
        return extract(self.sent(h)), self.spans()

    def test_table(self) -> None:
        tp = f"00-{TRACE}-{SPAN}-"
        for sampling, headers, sampled in [
            (0, None, False),
            (100, None, True),
            (0, {"traceparent": tp + "01"}, True),  # parent-based: a sampled parent wins
            (100, {"traceparent": tp + "00"}, False),  # and so does an unsampled one
            (0, {"b3": f"{TRACE}-{SPAN}-1"}, True),
            (100, {"b3": "0"}, False),  # a decision without ids
            (0, {"b3": "1"}, True),
            (100, {"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "0"}, False),
            (0, {"x-b3-traceid": TRACE, "x-b3-spanid": SPAN}, False),  # deferred: ours to decide
            (100, {"x-b3-traceid": TRACE, "x-b3-spanid": SPAN}, True),
        ]:
            with self.subTest(sampling=sampling, headers=headers):
                forwarded, spans = self.run_one(sampling, headers)
                self.assertEqual(forwarded.sampled, sampled)
                self.assertEqual(len(spans), 1 if sampled else 0)
                if headers and ("x-b3-traceid" in headers or "traceparent" in headers):
                    self.assertEqual(forwarded.trace_id, TRACE)

    def test_debug(self) -> None:
        h = self.harness({"sampling": 0, "propagate": ["w3c", "b3", "b3-single"]})
        h.request("GET", "/", headers={"b3": f"{TRACE}-{SPAN}-d"})
        sent = self.sent(h)
        self.assertEqual(sent.get(b"x-b3-flags"), b"1")
        self.assertNotIn(b"x-b3-sampled", sent)  # debug implies sampled
        self.assertTrue(sent.get(b"b3").endswith(b"-d-" + SPAN.encode()))
        self.assertTrue(sent.get(b"traceparent").endswith(b"-01"))
        [span] = self.spans()
        self.assertIs(span["debug"], True)
        self.assertEqual(span["parentId"], SPAN)

    def test_percentage(self) -> None:
        h = self.harness({"sampling": 25, "collector": None})
        for _ in range(2000):
            h.request("GET", "/")
        sampled = sum(extract(r.head.headers).sampled for r in h.upstream.requests)
        self.assertTrue(400 <= sampled <= 600, sampled)

    def test_seeded_rng_is_deterministic(self) -> None:
        def decisions() -> list[bool]:
            h = self.harness({"sampling": 50, "collector": None}, factory=self.factory(seed=42))
            for _ in range(50):
                h.request("GET", "/")
            return [extract(r.head.headers).sampled for r in h.upstream.requests]

        self.assertEqual(decisions(), decisions())


class MalformedTests(_Base):
    def test_new_trace_never_forwarded_broken(self) -> None:
        for headers in [
            {"traceparent": "00-garbage"},
            {"traceparent": f"ff-{TRACE}-{SPAN}-01", "tracestate": "rojo=1"},
            {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
            {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},
            {"b3": "not-a-b3-value"},
            {"x-b3-traceid": "xyz", "x-b3-spanid": SPAN, "x-b3-sampled": "1"},
            {"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-parentspanid": "bad"},
            {"x-b3-spanid": SPAN},
        ]:
            with self.subTest(headers=headers):
                self.collector.batches.clear()
                h = self.harness()
                response = h.request("GET", "/", headers=headers)
                self.assertEqual(response.status, 200)
                sent = self.sent(h)
                forwarded = self.assertWellFormed(sent)
                self.assertNotEqual(forwarded.trace_id, TRACE)
                self.assertNotIn(b"b3", sent)
                self.assertNotIn(b"tracestate", sent)
                self.assertNotIn(b"x-b3-parentspanid", sent)
                for name, value in headers.items():
                    if name != "x-b3-sampled":  # a decision of ours may equal the broken one's
                        self.assertNotIn(value.encode(), sent.get_all(name))
                [span] = self.spans()
                self.assertNotIn("parentId", span)
                self.assertEqual(span["traceId"], forwarded.trace_id)


class RequestIdTests(_Base):
    def test_kept(self) -> None:
        h = self.harness()
        h.request("GET", "/", headers={"x-request-id": "abc-123"})
        self.assertEqual(self.sent(h).get_all(b"x-request-id"), [b"abc-123"])
        [span] = self.spans()
        self.assertEqual(span["tags"]["guid:x-request-id"], "abc-123")

    def test_set_when_missing(self) -> None:
        # The harness adds no x-request-id; the stream has one.
        h = self.harness({"sampling": 0})
        stream, _ = h.start("GET", "/")
        self.assertEqual(self.sent(h).get(b"x-request-id"), stream.request_id)


class ChainTests(_Base):
    def test_client_then_server(self) -> None:
        """
        Two proxies: the caller's sidecar (client span) calls the callee's
        sidecar (server span), which calls the app.
        """
        server = self.harness({"kind": "server"}, factory=self.factory(seed=2))

        def hop(request: UpstreamRequest) -> StubResponse:
            r = server.request(request.head.method.decode(), request.head.path.decode(),
                               headers=list(request.head.headers), body=request.body,
                               authority=request.head.authority.decode())
            return StubResponse(r.status, tuple(r.headers), r.body)

        client = self.harness({"kind": "client"}, factory=self.factory(seed=3), upstream=StubUpstream(handler=hop))
        response = client.request("GET", "/productpage", headers={"x-request-id": "chain-1"})
        self.assertEqual(response.status, 200)

        at_app = self.assertWellFormed(self.sent(server))
        spans = self.spans()
        self.assertEqual([s["kind"] for s in spans], ["SERVER", "CLIENT"])  # the inner stream ends first
        server_span, client_span = spans
        self.assertEqual(server_span["traceId"], client_span["traceId"])
        self.assertNotIn("parentId", client_span)
        self.assertEqual(server_span["parentId"], client_span["id"])
        self.assertNotEqual(server_span["id"], client_span["id"])
        # The app sees the server span as its parent.
        self.assertEqual((at_app.trace_id, at_app.span_id), (server_span["traceId"], server_span["id"]))
        self.assertEqual(self.sent(server).get(b"x-b3-parentspanid").decode(), client_span["id"])
        self.assertEqual({s["tags"]["guid:x-request-id"] for s in spans}, {"chain-1"})
        for span in spans:
            self.assertEqual(validate_span(span), [])


class ConfigTests(_Base):
    def test_defaults(self) -> None:
        config = TracingFactory().parse_config({})
        self.assertEqual(config, TracingConfig(
            kind=None, sampling=1.0, collector=None, service_name=None, propagate=("w3c", "b3"),
            reporter=ReporterSettings(max_queue=1000, batch_size=100, flush_interval=1.0, timeout=5.0),
        ))

    def test_full(self) -> None:
        config = TracingFactory().parse_config({
            "kind": "client", "sampling": 12.5, "collector": COLLECTOR, "service_name": "reviews",
            "propagate": ["b3-single", "w3c"], "max_queue": 50, "batch_size": 5,
            "flush_interval": "250ms", "timeout": "2s",
        })
        self.assertEqual(config, TracingConfig(
            kind="client", sampling=12.5, collector=COLLECTOR, service_name="reviews",
            propagate=("b3-single", "w3c"),
            reporter=ReporterSettings(max_queue=50, batch_size=5, flush_interval=0.25, timeout=2.0),
        ))
        self.assertEqual(TracingFactory().parse_config({"max_queue": 10}).reporter.batch_size, 10)

    def test_errors(self) -> None:
        for raw, field in [
            ({"kind": "both"}, "kind"),
            ({"sampling": 101}, "sampling"),
            ({"sampling": -1}, "sampling"),
            ({"sampling": "1%"}, "sampling"),
            ({"sampling": True}, "sampling"),
            ({"collector": "zipkin:9411"}, "collector"),
            ({"service_name": ""}, "service_name"),
            ({"propagate": []}, "propagate"),
            ({"propagate": ["jaeger"]}, "propagate"),
            ({"propagate": "w3c"}, "propagate"),
            ({"max_queue": 0}, "max_queue"),
            ({"batch_size": 11, "max_queue": 10}, "batch_size"),
            ({"flush_interval": "soon"}, "flush_interval"),
            ({"timeout": 0}, "timeout"),
            ({"sample": 1}, "sample"),
        ]:
            with self.subTest(raw=raw):
                e = self.assertRaises(FilterConfigError, TracingFactory().parse_config, raw)
                self.assertEqual(e.field, field)

    def test_propagate_only_without_collector(self) -> None:
        factory = self.factory()
        h = self.harness({"collector": None}, factory=factory)
        h.request("GET", "/")
        self.assertWellFormed(self.sent(h))
        self.assertEqual(factory.reporters, {})

    def test_one_reporter_per_collector_across_reloads(self) -> None:
        factory = self.factory()
        first = self.harness({"batch_size": 1}, factory=factory)
        first.request("GET", "/")
        reporter = factory.reporters[COLLECTOR]
        # A reload: the config is parsed again, with other bounds.
        second = self.harness({"batch_size": 1, "max_queue": 7}, factory=factory)
        second.request("GET", "/")
        self.assertEqual(list(factory.reporters), [COLLECTOR])
        self.assertIs(factory.reporters[COLLECTOR], reporter)
        self.assertEqual(reporter.settings.max_queue, 7)
        self.assertEqual(len(self.spans()), 2)
        self.assertEqual(reporter.sent, 2)

    def test_only_listed_formats(self) -> None:
        h = self.harness({"propagate": ["b3-single"]})
        h.request("GET", "/", headers={"traceparent": f"00-{TRACE}-{SPAN}-01", "x-b3-traceid": TRACE,
                                       "x-b3-spanid": SPAN})
        sent = self.sent(h)
        self.assertEqual([n for n, _ in sent if n in PROPAGATION], [b"b3"])
        context = extract(sent)
        self.assertEqual((context.trace_id, context.parent_id, context.sampled), (TRACE, SPAN, True))

    def test_disabled_on_route(self) -> None:
        route = Route(name="quiet", match=RouteMatch(), cluster="test", filter_overrides=(("tracing", DISABLED),))
        h = self.harness(route=route)
        h.request("GET", "/", headers={"traceparent": "garbage", "x-request-id": "r"})
        self.assertEqual(list(self.sent(h)), [(b"traceparent", b"garbage"), (b"x-request-id", b"r")])
        self.assertEqual(self.spans(), [])

    def test_plugin(self) -> None:
        names = {p.name: p for p in getPlugins(IHTTPFilterFactory)}
        self.assertIsInstance(names["tracing"], TracingFactory)
