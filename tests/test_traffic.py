"""
Traffic management end to end: an in-process proxy configured with Istio
documents (ServiceEntry with STATIC endpoints on 127.0.0.1, DestinationRule,
VirtualService), several real Twisted upstreams on loopback ports that name
themselves in every response, and keep-alive clients pushing many requests
over a few connections.

Covered: weighted canary splits and header-based A/B routing, retries that
hide a failing or hanging host, the circuit breaker's overflow, outlier
ejection and return, consistent hashing on a header and on a cookie, fault
injection, header operations, redirects, rewrites, direct responses,
mirroring, and (from a native cluster: Istio has none) active health checks.

Every loop is bounded in count and in time; timing assertions are lower
bounds only.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import httptools
import yaml
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.trial import unittest

from tests.support import ProxyHarness, sleep

REQUEST_TIMEOUT = 10.0
LOAD_TIMEOUT = 40.0

# Measured numbers (split counts, overflow counts...) go to the test log.
log = Logger()

PROXY = """
    istio:
      files: [mesh.yaml]
      namespace: default
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        istio_routes: true
        http_filters: [{name: fault}]
    """


# Upstreams


class Request:
    """
    One request as an upstream received it.
    """

    def __init__(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes, at: float):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.at = at

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


class _UpstreamProtocol(Protocol):
    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self.upstream._opened(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.abortConnection()

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        request = Request(self._parser.get_method(), self._url, self._headers, self._body, reactor.seconds())
        self.upstream._handle(self, request)

    def connectionLost(self, reason: Any = None) -> None:
        self.upstream._closed(self)
        self.lost.callback(None)


class Upstream(Factory):
    """
    A named HTTP/1.1 upstream on 127.0.0.1 that answers every request with
    its name in the body and in C{x-upstream}.

    @ivar mode: C{ok} (answer), C{hang} (never answer) or C{reset} (abort
        the connection on each request); may change while running.
    @ivar status: the status of its answers, or a function of the
        L{Request} returning it.
    @ivar bodyless_errors: answer statuses other than 200 with no body.
    @ivar health_status: the status of answers to C{GET /healthz}, which
        are kept in C{probes}, not in C{requests}.
    @ivar delay: seconds before each answer.
    @ivar requests: every request received, in order.
    @ivar responded_at: when each answer was written.
    @ivar max_open: the most connections it had open at once.
    """

    noisy = False

    def __init__(self, name: str, version: str = "v1", status: int | Callable[[Request], int] = 200,
                 delay: float = 0.0,
                 mode: str = "ok", extra_headers: tuple[tuple[bytes, bytes], ...] = (),
                 bodyless_errors: bool = False):
        self.name = name
        self.version = version
        self.status = status
        self.bodyless_errors = bodyless_errors
        self.health_status = 200
        self.probes: list[Request] = []
        self.delay = delay
        self.mode = mode
        self.extra_headers = extra_headers
        self.requests: list[Request] = []
        self.responded_at: list[float] = []
        self.connections = 0
        self.max_open = 0
        self._open: set[_UpstreamProtocol] = set()
        self._calls: list[Any] = []
        self.port = 0
        self._listening: Any = None

    def buildProtocol(self, addr: Any) -> _UpstreamProtocol:
        return _UpstreamProtocol(self)

    @defer.inlineCallbacks
    def listen(self, testcase: unittest.TestCase) -> Any:
        self._listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self)
        self.port = self._listening.getHost().port
        testcase.addCleanup(self.stop)
        return self

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for call in self._calls:
            if call.active():
                call.cancel()
        yield self._listening.stopListening()
        waits = []
        for proto in list(self._open):
            waits.append(proto.lost)
            proto.transport.abortConnection()
        if waits:
            yield defer.DeferredList(waits).addTimeout(5, reactor)

    def _opened(self, proto: _UpstreamProtocol) -> None:
        self.connections += 1
        self._open.add(proto)
        self.max_open = max(self.max_open, len(self._open))

    def _closed(self, proto: _UpstreamProtocol) -> None:
        self._open.discard(proto)

    def _handle(self, proto: _UpstreamProtocol, request: Request) -> None:
        if request.path == b"/healthz":
            self.probes.append(request)
            status = self.health_status
            proto.transport.write(b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\n\r\n"
                                  % (status, HTTPStatus(status).phrase.encode("ascii")))
            return
        self.requests.append(request)
        if self.mode == "hang":
            return
        if self.mode == "reset":
            proto.transport.abortConnection()
            return
        name = self.name.encode("ascii")
        status = self.status
        if callable(status):
            status = status(request)
        body = b"" if self.bodyless_errors and status != 200 else name
        head = [b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode("ascii")),
                b"content-length: %d" % len(body),
                b"x-upstream: " + name,
                b"x-version: " + self.version.encode("ascii")]
        head += [n + b": " + v for n, v in self.extra_headers]
        data = b"\r\n".join(head) + b"\r\n\r\n" + body
        if self.delay > 0:
            self._calls = [c for c in self._calls if c.active()]
            self._calls.append(reactor.callLater(self.delay, self._write, proto, data))
        else:
            self._write(proto, data)

    def _write(self, proto: _UpstreamProtocol, data: bytes) -> None:
        if proto in self._open:
            self.responded_at.append(reactor.seconds())
            proto.transport.write(data)


# Clients


class Reply:
    """
    One response as a client received it.

    @ivar status: the status code; 0 when the connection closed first.
    @ivar elapsed: seconds from writing the request to the response's end.
    @ivar at: when the response ended.
    """

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, elapsed: float, at: float):
        self.status = status
        self.headers = headers
        self.body = body
        self.elapsed = elapsed
        self.at = at

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def upstream(self) -> str | None:
        value = self.header(b"x-upstream")
        return value.decode("ascii") if value is not None else None

    @property
    def flags(self) -> bytes:
        return self.header(b"x-txmesh-flags") or b""

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.upstream} {self.flags!r} {self.body[:60]!r}>"


class KeepAliveClient(Protocol):
    """
    An HTTP/1.1 client on one keep-alive connection; requests may be
    pipelined, responses are matched in order.
    """

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._waiting: deque[tuple[defer.Deferred, float]] = deque()
        self.connected_ = False
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.connected_ = True

    def request(self, path: bytes = b"/", host: bytes = b"reviews",
                headers: tuple[tuple[bytes, bytes], ...] = (), method: bytes = b"GET",
                body: bytes | None = None) -> defer.Deferred:
        """
        Send a request (after any still unanswered: pipelining).

        @return: a L{Deferred} firing with a L{Reply}.
        """
        lines = [method + b" " + path + b" HTTP/1.1", b"host: " + host]
        lines += [n + b": " + v for n, v in headers]
        if body is not None:
            lines.append(b"content-length: %d" % len(body))
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((d, reactor.seconds()))
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + (body or b""))
        return d.addTimeout(REQUEST_TIMEOUT, reactor)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.abortConnection()

    def on_message_begin(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        now = reactor.seconds()
        reply = Reply(self._parser.get_status_code(), self._headers, self._body, 0.0, now)
        if self._waiting:
            d, started = self._waiting.popleft()
            reply.elapsed = now - started
            if not d.called:
                d.callback(reply)

    def connectionLost(self, reason: Any = None) -> None:
        self.connected_ = False
        now = reactor.seconds()
        waiting, self._waiting = self._waiting, deque()
        for d, started in waiting:
            if not d.called:
                d.callback(Reply(0, [], b"", now - started, now))
        self.lost.callback(None)


class Clients:
    """
    Connects L{KeepAliveClient}s to a proxy port and closes them all at
    the test's cleanup.
    """

    def __init__(self, testcase: unittest.TestCase, port: int):
        self.port = port
        self._all: list[KeepAliveClient] = []
        testcase.addCleanup(self.close)

    @defer.inlineCallbacks
    def connect(self) -> Any:
        client = KeepAliveClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5), client)
        self._all.append(client)
        return client

    @defer.inlineCallbacks
    def close(self) -> Any:
        waits = []
        for client in self._all:
            if client.connected_:
                waits.append(client.lost)
                client.transport.abortConnection()
        if waits:
            yield defer.DeferredList(waits).addTimeout(5, reactor)

    @defer.inlineCallbacks
    def one(self, path: bytes = b"/", host: bytes = b"reviews",
            headers: tuple[tuple[bytes, bytes], ...] = (), body: bytes | None = None) -> Any:
        """
        One request on a fresh connection (a POST when there is a body).
        """
        client = yield self.connect()
        reply = yield client.request(path, host, headers, b"GET" if body is None else b"POST", body)
        client.transport.loseConnection()
        return reply

    @defer.inlineCallbacks
    def pipelined(self, total: int, request_for: Callable[[int], dict] = lambda i: {}) -> Any:
        """
        Write C{total} requests at once on one connection.

        @return: the L{Reply}s, in order.
        """
        client = yield self.connect()
        replies = yield defer.gatherResults([client.request(**request_for(i)) for i in range(total)])
        client.transport.loseConnection()
        return replies

    @defer.inlineCallbacks
    def load(self, total: int, concurrency: int,
             request_for: Callable[[int], dict] = lambda i: {}) -> Any:
        """
        Send C{total} requests over C{concurrency} keep-alive connections,
        each sending its next request when the last one is answered.

        @param request_for: the keyword arguments of
            L{KeepAliveClient.request} for request number C{i}.
        @return: the L{Reply}s, in request-number order.
        """
        replies: list[Reply | None] = [None] * total
        counter = iter(range(total))
        deadline = reactor.seconds() + LOAD_TIMEOUT

        @defer.inlineCallbacks
        def worker() -> Any:
            client = None
            for i in counter:
                if reactor.seconds() > deadline:
                    raise AssertionError(f"load took more than {LOAD_TIMEOUT}s")
                if client is None or not client.connected_:
                    client = yield self.connect()
                reply = yield client.request(**request_for(i))
                replies[i] = reply
                if reply.status == 0 or reply.header(b"connection") == b"close":
                    client.transport.loseConnection()
                    client = None
            if client is not None:
                client.transport.loseConnection()

        results = yield defer.DeferredList([worker() for _ in range(concurrency)], consumeErrors=True)
        for ok, value in results:
            if not ok:
                value.raiseException()
        return replies


# Istio documents


def service_entry(host: str, upstreams: list[Upstream], port: int = 80) -> dict:
    """
    A ServiceEntry with one STATIC endpoint per upstream, labelled with the
    upstream's C{version} and C{name}.
    """
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": host},
        "spec": {
            "hosts": [f"{host}.default.svc.cluster.local"],
            "location": "MESH_INTERNAL",
            "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
            "resolution": "STATIC",
            "endpoints": [{"address": "127.0.0.1", "ports": {"http": u.port},
                           "labels": {"version": u.version, "instance": u.name}} for u in upstreams],
        },
    }


def destination_rule(host: str, versions: tuple[str, ...] = (), **traffic_policy: Any) -> dict:
    spec: dict[str, Any] = {"host": host}
    if versions:
        spec["subsets"] = [{"name": v, "labels": {"version": v}} for v in versions]
    if traffic_policy:
        spec["trafficPolicy"] = traffic_policy
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": host}, "spec": spec}


def virtual_service(host: str, *http: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": host}, "spec": {"hosts": [host], "http": list(http)}}


def dest(host: str, subset: str | None = None, weight: int | None = None, **extra: Any) -> dict:
    d: dict[str, Any] = {"host": host}
    if subset is not None:
        d["subset"] = subset
    out: dict[str, Any] = {"destination": d}
    if weight is not None:
        out["weight"] = weight
    out.update(extra)
    return out


class TrafficTestCase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def upstreams(self, *specs: tuple) -> Any:
        """
        Start upstreams from C{(name, version, keyword arguments...)} tuples.
        """
        out = []
        for spec in specs:
            name, version = spec[0], spec[1]
            kwargs = spec[2] if len(spec) > 2 else {}
            up = yield Upstream(name, version, **kwargs).listen(self)
            out.append(up)
        return out

    @defer.inlineCallbacks
    def mesh(self, *documents: dict, expect_warnings: bool = False) -> Any:
        """
        Start a proxy routing by C{documents}.

        @return: L{Clients} connecting to its HTTP listener.
        """
        harness = ProxyHarness(self)
        with open(os.path.join(os.path.dirname(harness.path), "mesh.yaml"), "w") as f:
            yaml.safe_dump_all(documents, f, sort_keys=False)
        self.harness = harness
        yield harness.start(PROXY)
        if not expect_warnings:
            self.assertEqual(harness.service.config.warnings, ())
        return Clients(self, harness.port())

    def cluster(self, host: str, port: int = 80) -> Any:
        return self.harness.service._cluster_set.get(f"outbound|{port}||{host}.default.svc.cluster.local")


def _share(counts: Counter, key: Any, total: int) -> float:
    return counts[key] / total


def assert_near(case: unittest.TestCase, value: float, expected: float, tolerance: float, msg: Any = "") -> None:
    """
    C{value} is within C{tolerance} of C{expected} (trial's
    C{assertAlmostEqual} ignores C{delta}).
    """
    if abs(value - expected) > tolerance:
        case.fail(f"{value!r} is not within {tolerance} of {expected!r}: {msg}")


# 1. Splits and A/B


class SplitTests(TrafficTestCase):
    @defer.inlineCallbacks
    def test_canary_90_10(self):
        """
        A VirtualService splitting 90/10 between subsets v1 (two hosts) and
        v2 (one host) sends 90% +- 2% of 10,000 requests to v1; inside v1
        both hosts share the load.
        """
        ups = yield self.upstreams(("v1-a", "v1"), ("v1-b", "v1"), ("v2-a", "v2"))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            destination_rule("reviews", ("v1", "v2")),
            virtual_service("reviews", {"route": [dest("reviews", "v1", 90), dest("reviews", "v2", 10)]}),
        )
        total = 10000
        replies = yield clients.load(total, 8)
        self.assertEqual(Counter(r.status for r in replies), {200: total})
        versions = Counter(r.header(b"x-version") for r in replies)
        hosts = Counter(r.upstream for r in replies)
        assert_near(self, _share(versions, b"v1", total), 0.90, 0.02, str(versions))
        assert_near(self, _share(versions, b"v2", total), 0.10, 0.02, str(versions))
        # Round robin inside the v1 subset: the two hosts are near equal.
        assert_near(self, hosts["v1-a"] / versions[b"v1"], 0.5, 0.02, str(hosts))
        # What the upstreams saw agrees with what the clients saw.
        self.assertEqual([len(u.requests) for u in ups], [hosts["v1-a"], hosts["v1-b"], hosts["v2-a"]])
        log.info("{measured}", measured=f"canary 90/10 over {total}: {dict(versions)} {dict(hosts)}")

    @defer.inlineCallbacks
    def test_percentage_rollout_50_50(self):
        """
        A 50/50 rollout splits 10,000 requests within +- 2%.
        """
        ups = yield self.upstreams(("v1-a", "v1"), ("v2-a", "v2"))
        clients = yield self.mesh(
            service_entry("ratings", ups),
            destination_rule("ratings", ("v1", "v2")),
            virtual_service("ratings", {"route": [dest("ratings", "v1", 50), dest("ratings", "v2", 50)]}),
        )
        total = 10000
        replies = yield clients.load(total, 8, lambda i: {"host": b"ratings"})
        self.assertEqual(Counter(r.status for r in replies), {200: total})
        versions = Counter(r.header(b"x-version") for r in replies)
        assert_near(self, _share(versions, b"v1", total), 0.5, 0.02, str(versions))
        assert_near(self, _share(versions, b"v2", total), 0.5, 0.02, str(versions))
        log.info("{measured}", measured=f"rollout 50/50 over {total}: {dict(versions)}")

    @defer.inlineCallbacks
    def test_ab_by_header(self):
        """
        C{end-user: jason} goes to v2, every other request to v1, whatever
        the host name form the client uses.
        """
        ups = yield self.upstreams(("v1-a", "v1"), ("v2-a", "v2"))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            destination_rule("reviews", ("v1", "v2")),
            virtual_service(
                "reviews",
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [dest("reviews", "v2")]},
                {"route": [dest("reviews", "v1")]},
            ),
        )
        hosts = [b"reviews", b"reviews:80", b"reviews.default", b"reviews.default.svc.cluster.local:80"]

        def request_for(i: int) -> dict:
            user = [b"jason", b"alice", b"Jason", b"jason2"][i % 4]
            return {"host": hosts[i // 4 % len(hosts)], "headers": ((b"end-user", user),)}

        replies = yield clients.load(400, 4, request_for)
        # Pipelined on one connection, the answers come back in order.
        replies += yield clients.pipelined(200, request_for)
        for i, reply in enumerate(replies):
            self.assertEqual(reply.status, 200, reply)
            expected = b"v2" if i % 4 == 0 else b"v1"
            self.assertEqual(reply.header(b"x-version"), expected, (i, request_for(i), reply))
        self.assertEqual(len(ups[1].requests), 150)
        self.assertTrue(all(r.header(b"end-user") == b"jason" for r in ups[1].requests))


# 2. Retries


class RetryTests(TrafficTestCase):
    def _retry_mesh(self, ups: list[Upstream], retries: dict) -> defer.Deferred:
        return self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {"route": [dest("reviews")], "retries": retries}),
        )

    @defer.inlineCallbacks
    def test_retries_hide_503(self):
        """
        With one of two hosts answering 503 to everything, C{retries:
        {attempts: 3, retryOn: 5xx,reset}} turns every request into a 200
        from the good host, though the bad one keeps getting first tries.
        """
        ups = yield self.upstreams(("good", "v1"), ("bad", "v1", {"status": 503}))
        clients = yield self._retry_mesh(ups, {"attempts": 3, "retryOn": "5xx,reset"})
        total = 300
        replies = yield clients.load(total, 3)
        statuses = Counter(r.status for r in replies)
        self.assertEqual(statuses, {200: total}, [r for r in replies if r.status != 200][:5])
        self.assertEqual({r.upstream for r in replies}, {"good"})
        self.assertGreater(len(ups[1].requests), total // 4)
        log.info("{measured}",
                 measured=f"retries over {total}: bad host got {len(ups[1].requests)} first tries, all hidden")

    @defer.inlineCallbacks
    def test_retries_hide_503_under_concurrency(self):
        """
        With 8 connections in flight, retries hide the bad host once
        C{connectionPool.http.maxRetries} allows that many retries at once
        (the budget otherwise allows max(3, 20% of active requests), as
        Envoy's retry budget does, so retries cannot multiply load).
        """
        ups = yield self.upstreams(("good", "v1"), ("bad", "v1", {"status": 503}))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            destination_rule("reviews", connectionPool={"http": {"maxRetries": 100}}),
            virtual_service("reviews", {"route": [dest("reviews")],
                                        "retries": {"attempts": 3, "retryOn": "5xx,reset"}}),
        )
        total = 400
        replies = yield clients.load(total, 8)
        failed = [r for r in replies if r.status != 200]
        log.info("{measured}", measured=f"retries, 8 connections, over {total}: {len(failed)} failed "
                                        f"{Counter(r.flags for r in failed)}; bad host got "
                                        f"{len(ups[1].requests)}; budget {self.cluster('reviews').retry_budget}")
        self.assertEqual(failed, [])
        self.assertEqual(self.cluster("reviews").retry_budget.min_concurrency, 100)

    @defer.inlineCallbacks
    def test_default_retries_hide_connect_failure(self):
        """
        With no C{retries} on the route, Istio's default policy (2 attempts
        on connect failures) hides an endpoint nothing listens on.
        """
        ups = yield self.upstreams(("good", "v1"), ("dead", "v1"))
        yield ups[1]._listening.stopListening()
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {"route": [dest("reviews")]}),
        )
        replies = yield clients.load(40, 2)
        self.assertEqual(Counter((r.status, r.upstream) for r in replies), {(200, "good"): 40})
        [dead] = [p for p in self.cluster("reviews").pools() if p.endpoint.port == ups[1].port]
        self.assertGreater(dead.connect_failures, 0)

    @defer.inlineCallbacks
    def test_default_retry_policy_is_istios(self):
        """
        Istio's default retry policy (no C{retries} on the route) is 2
        attempts on C{connect-failure,refused-stream,unavailable,cancelled,
        retriable-status-codes} with 503 as the retriable status: a 503 is
        tried three times, a 504 once.
        """
        ups = yield self.upstreams(("a", "v1", {"status": 503}))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {"route": [dest("reviews")]}),
        )
        reply = yield clients.one()
        self.assertEqual((reply.status, len(ups[0].requests)), (503, 3))
        ups[0].status = 504
        reply = yield clients.one()
        self.assertEqual((reply.status, len(ups[0].requests)), (504, 4))


    @defer.inlineCallbacks
    def test_route_timeout(self):
        """
        C{timeout: 300ms} on the route: a slower upstream gets 504 C{UT}
        after at least that long.
        """
        ups = yield self.upstreams(("slow", "v1", {"delay": 2.0}))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {"timeout": "300ms", "route": [dest("reviews")]}),
        )
        replies = yield clients.load(4, 2)
        for r in replies:
            self.assertEqual((r.status, r.flags), (504, b"UT"))
            self.assertGreaterEqual(r.elapsed, 0.3)

    @defer.inlineCallbacks
    def test_retry_limit_flag(self):
        """
        When every try fails, the client gets the last 503 with C{URX}: the
        retry limit was reached; the upstream saw 1 + attempts tries.
        """
        ups = yield self.upstreams(("bad", "v1", {"status": 503}))
        clients = yield self._retry_mesh(ups, {"attempts": 2, "retryOn": "5xx"})
        replies = yield clients.load(10, 2)
        for r in replies:
            self.assertEqual((r.status, r.upstream, r.flags), (503, "bad", b"URX"))
        self.assertEqual(len(ups[0].requests), 30)

    @defer.inlineCallbacks
    def test_retry_after_bodyless_503_with_waiters(self):
        """
        A 503 without a body is complete when its head arrives, so its
        connection is back in the pool, possibly handed to a request
        waiting for the one connection allowed, before the router decides
        to retry: the retry must not abort it.
        """
        seen: set[bytes] = set()

        def fail_first(request: Request) -> int:
            if request.path in seen:
                return 200
            seen.add(request.path)
            return 503

        ups = yield self.upstreams(("flaky", "v1", {"status": fail_first, "bodyless_errors": True}))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            destination_rule("reviews", connectionPool={"tcp": {"maxConnections": 1},
                                                        "http": {"http1MaxPendingRequests": 10}}),
            virtual_service("reviews", {"route": [dest("reviews")], "retries": {"attempts": 3, "retryOn": "5xx"}}),
        )
        total = 60
        replies = yield clients.load(total, 3, lambda i: {"path": b"/r/%d" % i})
        self.assertEqual(Counter((r.status, r.flags) for r in replies), {(200, b""): total})
        self.assertEqual(len(ups[0].requests), 2 * total)
        self.assertEqual(ups[0].connections, 1)

    @defer.inlineCallbacks
    def test_retry_replays_body(self):
        """
        A POST retried after a 503 reaches the good host with its whole
        body.
        """
        ups = yield self.upstreams(("good", "v1"), ("bad", "v1", {"status": 503}))
        clients = yield self._retry_mesh(ups, {"attempts": 3, "retryOn": "5xx,reset"})
        total = 60
        replies = yield clients.load(total, 3, lambda i: {
            "method": b"POST", "path": b"/post/%d" % i, "body": b"payload-%d-" % i + b"x" * (i * 97)})
        self.assertEqual(Counter(r.status for r in replies), {200: total})
        good, bad = ups
        self.assertGreater(len(bad.requests), 0)
        self.assertEqual(len(good.requests), total)
        for request in good.requests + bad.requests:
            i = int(request.path.rsplit(b"/", 1)[1])
            self.assertEqual(request.body, b"payload-%d-" % i + b"x" * (i * 97))

    @defer.inlineCallbacks
    def test_retries_hide_reset(self):
        """
        A host that resets every connection is hidden by C{retryOn: reset}.
        """
        ups = yield self.upstreams(("good", "v1"), ("bad", "v1", {"mode": "reset"}))
        clients = yield self._retry_mesh(ups, {"attempts": 3, "retryOn": "5xx,reset"})
        total = 200
        replies = yield clients.load(total, 3)
        self.assertEqual(Counter(r.status for r in replies), {200: total},
                         [r for r in replies if r.status != 200][:5])
        self.assertGreater(len(ups[1].requests), 0)

    @defer.inlineCallbacks
    def test_without_retries_some_fail(self):
        """
        With C{attempts: 0} the bad host's 503s reach the clients.
        """
        ups = yield self.upstreams(("good", "v1"), ("bad", "v1", {"status": 503}))
        clients = yield self._retry_mesh(ups, {"attempts": 0})
        total = 200
        replies = yield clients.load(total, 3)
        statuses = Counter(r.status for r in replies)
        self.assertEqual(set(statuses), {200, 503})
        self.assertEqual(statuses[503], len(ups[1].requests))
        assert_near(self, statuses[503] / total, 0.5, 0.1)

    @defer.inlineCallbacks
    def test_per_try_timeout(self):
        """
        A host that never answers is given up on after C{perTryTimeout} and
        the request is retried on the other host; the requests that met the
        hanging host took at least the per-try timeout.
        """
        ups = yield self.upstreams(("good", "v1"), ("hang", "v1", {"mode": "hang"}))
        clients = yield self._retry_mesh(ups, {"attempts": 2, "perTryTimeout": "200ms", "retryOn": "5xx,reset"})
        total = 12
        # Three connections: see test_retries_hide_503_under_concurrency.
        replies = yield clients.load(total, 3)
        self.assertEqual(Counter(r.status for r in replies), {200: total})
        self.assertEqual({r.upstream for r in replies}, {"good"})
        hung = len(ups[1].requests)
        self.assertGreater(hung, 0)
        slow = [r for r in replies if r.elapsed >= 0.2]
        self.assertGreaterEqual(len(slow), hung)


# 3. Circuit breaker


class CircuitBreakerTests(TrafficTestCase):
    @defer.inlineCallbacks
    def test_overflow_answers_uo_at_once(self):
        """
        With one connection and one pending request allowed, a burst of 20
        concurrent requests to a slow upstream: the overflow is answered
        503 C{UO} before the upstream has answered anything, the rest 200,
        and the upstream never sees more than one connection.
        """
        ups = yield self.upstreams(("slow", "v1", {"delay": 0.2}))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            destination_rule("reviews", connectionPool={"tcp": {"maxConnections": 1},
                                                        "http": {"http1MaxPendingRequests": 1}}),
            virtual_service("reviews", {"route": [dest("reviews")], "retries": {"attempts": 0}}),
        )
        conns = []
        for _ in range(20):
            conns.append((yield clients.connect()))
        replies = yield defer.gatherResults([c.request() for c in conns])
        statuses = Counter(r.status for r in replies)
        overflowed = [r for r in replies if r.status == 503]
        ok = [r for r in replies if r.status == 200]
        log.info("{measured}", measured=f"breaker burst of 20: {dict(statuses)}")
        self.assertEqual(len(overflowed) + len(ok), 20, replies)
        self.assertGreater(len(overflowed), 0)
        self.assertGreater(len(ok), 0)
        for r in overflowed:
            self.assertEqual(r.flags, b"UO")
            self.assertIsNone(r.upstream)
            # Answered before the slow upstream wrote its first response.
            self.assertLess(r.at, ups[0].responded_at[0])
        self.assertTrue(all(r.upstream == "slow" for r in ok))
        self.assertEqual(ups[0].max_open, 1)
        self.assertEqual(len(ups[0].requests), len(ok))
        breaker = self.cluster("reviews").breaker
        self.assertEqual((breaker.active_requests, breaker.pending_requests), (0, 0))

    @defer.inlineCallbacks
    def test_overflow_with_warm_connection(self):
        """
        With the one allowed connection already open and idle, a burst of
        20: one request takes the connection, one waits for it as the one
        pending request, the other 18 are answered 503 C{UO} at once.
        """
        ups = yield self.upstreams(("slow", "v1", {"delay": 0.2}))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            destination_rule("reviews", connectionPool={"tcp": {"maxConnections": 1},
                                                        "http": {"http1MaxPendingRequests": 1}}),
            virtual_service("reviews", {"route": [dest("reviews")], "retries": {"attempts": 0}}),
        )
        warm = yield clients.one()
        self.assertEqual(warm.status, 200)
        conns = []
        for _ in range(20):
            conns.append((yield clients.connect()))
        replies = yield defer.gatherResults([c.request() for c in conns])
        statuses = Counter(r.status for r in replies)
        log.info("{measured}", measured=f"breaker burst of 20 on a warm pool: {dict(statuses)}")
        self.assertEqual(statuses, {200: 2, 503: 18})
        first_answer = ups[0].responded_at[1]
        for r in replies:
            if r.status == 503:
                self.assertEqual(r.flags, b"UO")
                self.assertLess(r.at, first_answer)
        self.assertEqual((ups[0].connections, ups[0].max_open), (1, 1))

    @defer.inlineCallbacks
    def test_max_requests(self):
        """
        C{http2MaxRequests: 3} (requests in flight, whatever the protocol):
        of a burst of 20 to a slow upstream, 3 are served and 17 answered
        503 C{UO}; the breaker's counts go back to zero.
        """
        ups = yield self.upstreams(("slow", "v1", {"delay": 0.2}))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            destination_rule("reviews", connectionPool={"http": {"http2MaxRequests": 3}}),
            virtual_service("reviews", {"route": [dest("reviews")], "retries": {"attempts": 0}}),
        )
        conns = []
        for _ in range(20):
            conns.append((yield clients.connect()))
        replies = yield defer.gatherResults([c.request() for c in conns])
        self.assertEqual(Counter((r.status, r.flags) for r in replies), {(200, b""): 3, (503, b"UO"): 17})
        self.assertEqual(len(ups[0].requests), 3)
        stats = self.cluster("reviews").breaker.stats()
        self.assertEqual((stats["rq_active"], stats["upstream_rq_overflow"]), (0, 17))

    @defer.inlineCallbacks
    def test_connection_limit_spans_endpoints(self):
        """
        C{maxConnections: 1} over two endpoints, one request at a time:
        round robin alternates, and a request for one endpoint does not
        wait on the connection idling to the other (it is closed to free
        the cluster's one connection slot).
        """
        ups = yield self.upstreams(("a", "v1"), ("b", "v1"))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            destination_rule("reviews", connectionPool={"tcp": {"maxConnections": 1},
                                                        "http": {"http1MaxPendingRequests": 10}}),
            virtual_service("reviews", {"route": [dest("reviews")], "retries": {"attempts": 0}}),
        )
        replies = yield clients.load(20, 1)
        self.assertEqual(Counter(r.status for r in replies), {200: 20})
        self.assertEqual(Counter(r.upstream for r in replies), {"a": 10, "b": 10})
        self.assertEqual([u.max_open for u in ups], [1, 1])
        breaker = self.cluster("reviews").breaker
        self.assertEqual((breaker.active_requests, breaker.pending_requests), (0, 0))
        self.assertLessEqual(self.cluster("reviews").open_connections(), 1)


# 4. Outlier detection


class OutlierTests(TrafficTestCase):
    @defer.inlineCallbacks
    def test_eject_and_return(self):
        """
        With C{consecutive5xxErrors: 2}, the host answering 500 is ejected
        after two errors: it gets no traffic for the base ejection time,
        then comes back.
        """
        ups = yield self.upstreams(("a", "v1"), ("b", "v1"), ("bad", "v1", {"status": 500}))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            destination_rule("reviews", outlierDetection={
                "consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "1s", "maxEjectionPercent": 100}),
            virtual_service("reviews", {"route": [dest("reviews")], "retries": {"attempts": 0}}),
        )
        bad = ups[2]
        replies = yield clients.load(30, 1)
        self.assertEqual(len(bad.requests), 2)
        self.assertEqual(Counter(r.status for r in replies), {200: 28, 500: 2})
        ejected_at = bad.requests[-1].at
        # While ejected: nothing reaches it.
        replies = yield clients.load(60, 2)
        self.assertEqual(Counter(r.status for r in replies), {200: 60})
        self.assertEqual(len(bad.requests), 2)
        # Back after the base ejection time (at most ~3s of trying).
        deadline = reactor.seconds() + 3.5
        while len(bad.requests) == 2 and reactor.seconds() < deadline:
            yield sleep(0.1)
            yield clients.load(3, 1)
        self.assertGreater(len(bad.requests), 2, "the ejected host never came back")
        back = bad.requests[2].at - ejected_at
        self.assertGreaterEqual(back, 1.0)
        # Back, and still failing: its errors count again at once, so two
        # more eject it again (for twice the base time).
        self.assertEqual(len(bad.requests), 3)
        replies = yield clients.load(90, 1)
        self.assertEqual(len(bad.requests), 4)
        self.assertEqual(Counter(r.status for r in replies), {200: 89, 500: 1})
        cluster = self.cluster("reviews")
        [endpoint] = [ep for ep in cluster.config.endpoints if ep.port == bad.port]
        state = cluster.outlier.host_state(endpoint)
        self.assertEqual((state.ejected, state.times_ejected, state.multiplier), (True, 2, 2))
        log.info("{measured}", measured=f"outlier: back after {back:.2f}s, ejected again after 2 more errors")


# 5. Consistent hashing


class ConsistentHashTests(TrafficTestCase):
    @defer.inlineCallbacks
    def _sticky(self, hash_key: dict, headers_for: Callable[[str], tuple]) -> Any:
        ups = yield self.upstreams(("a", "v1"), ("b", "v1"), ("c", "v1"), ("d", "v1"))
        clients = yield self.mesh(
            service_entry("cart", ups),
            destination_rule("cart", loadBalancer={"consistentHash": hash_key}),
            virtual_service("cart", {"route": [dest("cart")]}),
        )
        users = [f"user-{n}" for n in range(8)]
        per_user = 200
        replies = yield clients.load(
            per_user * len(users), 8,
            lambda i: {"host": b"cart", "headers": headers_for(users[i % len(users)])})
        placement: dict[str, Counter] = {u: Counter() for u in users}
        for i, reply in enumerate(replies):
            self.assertEqual(reply.status, 200, reply)
            placement[users[i % len(users)]][reply.upstream] += 1
        for user, hosts in placement.items():
            self.assertEqual(len(hosts), 1, (user, hosts))
            self.assertEqual(sum(hosts.values()), per_user)
        used = {next(iter(h)) for h in placement.values()}
        self.assertGreaterEqual(len(used), 2, placement)
        return placement

    @defer.inlineCallbacks
    def test_header(self):
        """
        C{consistentHash: {httpHeaderName: x-user}}: 200 requests of each of
        8 users each land on one host; the users spread over hosts.
        """
        placement = yield self._sticky({"httpHeaderName": "x-user"},
                                       lambda u: ((b"x-user", u.encode()),))
        log.info("{measured}", measured=f"hash on x-user: { {u: next(iter(h)) for u, h in placement.items()} }")

    @defer.inlineCallbacks
    def test_cookie(self):
        """
        C{consistentHash: {httpCookie: {name: session}}} does the same on a
        cookie among others.
        """
        placement = yield self._sticky(
            {"httpCookie": {"name": "session"}},
            lambda u: ((b"cookie", b"theme=dark; session=" + u.encode() + b"; lang=en"),))
        log.info("{measured}", measured=f"hash on cookie: { {u: next(iter(h)) for u, h in placement.items()} }")


# 6. Fault injection


class FaultTests(TrafficTestCase):
    @defer.inlineCallbacks
    def test_delay(self):
        """
        C{fault.delay.fixedDelay: 300ms} at 100% holds every request for at
        least 0.3 s, then it reaches the upstream; flag C{DI}.
        """
        ups = yield self.upstreams(("a", "v1"))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {"route": [dest("reviews")], "fault": {
                "delay": {"fixedDelay": "300ms", "percentage": {"value": 100}}}}),
        )
        replies = yield clients.load(4, 4)
        for r in replies:
            self.assertEqual((r.status, r.upstream, r.flags), (200, "a", b"DI"))
            self.assertGreaterEqual(r.elapsed, 0.3)
        self.assertEqual(len(ups[0].requests), 4)

    @defer.inlineCallbacks
    def test_abort(self):
        """
        C{fault.abort.httpStatus: 503} at 100%: every request is answered
        503 C{FI} by the proxy and the upstream sees nothing.
        """
        ups = yield self.upstreams(("a", "v1"))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {"route": [dest("reviews")], "fault": {
                "abort": {"httpStatus": 503, "percentage": {"value": 100}}}}),
        )
        replies = yield clients.load(50, 4)
        for r in replies:
            self.assertEqual((r.status, r.flags), (503, b"FI"))
            self.assertIsNone(r.upstream)
        self.assertEqual(ups[0].requests, [])
        self.assertEqual(ups[0].connections, 0)


# 7. Header operations, redirect, rewrite, direct response, mirroring


class RequestShapingTests(TrafficTestCase):
    @defer.inlineCallbacks
    def test_header_operations(self):
        """
        Route and destination C{headers}: request set replaces, add appends,
        remove deletes; the same on the response.
        """
        ups = yield self.upstreams(("a", "v1", {"extra_headers": (
            (b"x-upstream-secret", b"s"), (b"x-resp", b"from-upstream"))}))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {
                "route": [dest("reviews", headers={"request": {"set": {"x-dest": "d"}},
                                                   "response": {"add": {"x-dest-resp": "dr"}}})],
                "headers": {
                    "request": {"set": {"x-env": "canary"}, "add": {"x-added": "one"}, "remove": ["x-secret"]},
                    "response": {"set": {"x-resp": "set"}, "add": {"x-resp-add": "a"},
                                 "remove": ["x-upstream-secret"]},
                },
            }),
        )
        reply = yield clients.one(headers=((b"x-env", b"prod"), (b"x-added", b"zero"), (b"x-secret", b"pw")))
        self.assertEqual(reply.status, 200)
        seen = ups[0].requests[0]
        self.assertEqual(seen.header_values(b"x-env"), [b"canary"])
        self.assertEqual(seen.header_values(b"x-added"), [b"zero", b"one"])
        self.assertEqual(seen.header_values(b"x-secret"), [])
        self.assertEqual(seen.header_values(b"x-dest"), [b"d"])
        self.assertIsNone(reply.header(b"x-upstream-secret"))
        self.assertEqual([v for n, v in reply.headers if n == b"x-resp"], [b"set"])
        self.assertEqual(reply.header(b"x-resp-add"), b"a")
        self.assertEqual(reply.header(b"x-dest-resp"), b"dr")

    @defer.inlineCallbacks
    def test_redirect(self):
        """
        C{redirect}: 301 with the new C{Location}; nothing goes upstream.
        """
        ups = yield self.upstreams(("a", "v1"))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service(
                "reviews",
                {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new", "authority": "web.example"}},
                {"route": [dest("reviews")]},
            ),
        )
        reply = yield clients.one(b"/old")
        self.assertEqual(reply.status, 301)
        self.assertEqual(reply.header(b"location"), b"http://web.example/new")
        self.assertEqual(ups[0].requests, [])
        reply = yield clients.one(b"/other")
        self.assertEqual((reply.status, reply.upstream), (200, "a"))

    @defer.inlineCallbacks
    def test_redirect_scheme_port_code(self):
        """
        C{redirect} with C{scheme}, C{port} and C{redirectCode}: the port
        replaces the one in the request's host; path and query are kept.
        """
        ups = yield self.upstreams(("a", "v1"))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {"redirect": {"scheme": "https", "port": 8443, "redirectCode": 308}}),
        )
        for host, location in ((b"reviews", b"https://reviews:8443/s/x?y=1"),
                               (b"reviews.default.svc.cluster.local:80",
                                b"https://reviews.default.svc.cluster.local:8443/s/x?y=1")):
            reply = yield clients.one(b"/s/x?y=1", host)
            self.assertEqual((reply.status, reply.header(b"location")), (308, location))
        self.assertEqual(ups[0].requests, [])

    @defer.inlineCallbacks
    def test_rewrite(self):
        """
        C{rewrite: {uri, authority}} on a prefix match: the upstream sees
        the new prefix (rest of the path and query kept) and host.
        """
        ups = yield self.upstreams(("a", "v1"))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {"match": [{"uri": {"prefix": "/api/"}}],
                                        "rewrite": {"uri": "/v2/", "authority": "backend.internal"},
                                        "route": [dest("reviews")]}),
        )
        reply = yield clients.one(b"/api/items/7?full=1")
        self.assertEqual(reply.status, 200)
        seen = ups[0].requests[0]
        self.assertEqual(seen.path, b"/v2/items/7?full=1")
        self.assertEqual(seen.header(b"host"), b"backend.internal")

    @defer.inlineCallbacks
    def test_direct_response(self):
        """
        C{directResponse}: the proxy answers with the status and body.
        """
        ups = yield self.upstreams(("a", "v1"))
        clients = yield self.mesh(
            service_entry("reviews", ups),
            virtual_service("reviews", {"match": [{"uri": {"exact": "/teapot"}}],
                                        "directResponse": {"status": 418, "body": {"string": "short and stout"}}},
                            {"route": [dest("reviews")]}),
        )
        reply = yield clients.one(b"/teapot")
        self.assertEqual((reply.status, reply.body), (418, b"short and stout"))
        self.assertEqual(ups[0].requests, [])

    @defer.inlineCallbacks
    def test_mirror(self):
        """
        C{mirror}: the shadow service receives a copy of each request with
        C{-shadow} appended to the host; the client gets the primary's
        answer, even though the shadow answers 500.
        """
        primary, shadow = yield self.upstreams(("primary", "v1"), ("shadow", "v1", {"status": 500}))
        clients = yield self.mesh(
            service_entry("web", [primary]),
            service_entry("web-mirror", [shadow]),
            virtual_service("web", {"route": [dest("web")], "mirror": {"host": "web-mirror"},
                                    "mirrorPercentage": {"value": 100}}),
        )
        replies = yield clients.load(20, 2, lambda i: {"host": b"web:80", "path": b"/m/%d" % i})
        for r in replies:
            self.assertEqual((r.status, r.upstream), (200, "primary"))
        deadline = reactor.seconds() + 5
        while len(shadow.requests) < 20 and reactor.seconds() < deadline:
            yield sleep(0.02)
        self.assertEqual(sorted(r.path for r in shadow.requests), sorted(b"/m/%d" % i for i in range(20)))
        self.assertEqual({r.header(b"host") for r in shadow.requests}, {b"web-shadow:80"})
        self.assertEqual({r.header(b"host") for r in primary.requests}, {b"web:80"})
        # Bodies are mirrored too.
        reply = yield clients.one(b"/upload", b"web", body=b"a body to copy")
        self.assertEqual((reply.status, reply.upstream), (200, "primary"))
        deadline = reactor.seconds() + 5
        while len(shadow.requests) < 21 and reactor.seconds() < deadline:
            yield sleep(0.02)
        self.assertEqual((shadow.requests[-1].method, shadow.requests[-1].body), (b"POST", b"a body to copy"))
        self.assertEqual(shadow.requests[-1].header(b"host"), b"web-shadow")
        self.assertEqual(primary.requests[-1].body, b"a body to copy")
        # A body past the mirror limit reaches the primary whole; the shadow
        # gets no truncated copy (and the proxy keeps no copy of it).
        from txmesh.filters.router import MIRROR_BODY_LIMIT

        big = b"x" * (MIRROR_BODY_LIMIT + 4096)
        reply = yield clients.one(b"/big", b"web", body=big)
        self.assertEqual((reply.status, reply.upstream), (200, "primary"))
        self.assertEqual(primary.requests[-1].body, big)
        marker = yield clients.one(b"/after", b"web")
        self.assertEqual(marker.status, 200)
        deadline = reactor.seconds() + 5
        while not any(r.path == b"/after" for r in shadow.requests) and reactor.seconds() < deadline:
            yield sleep(0.02)
        self.assertNotIn(b"/big", [r.path for r in shadow.requests])


# 8. Active health checks


class HealthCheckTests(TrafficTestCase):
    @defer.inlineCallbacks
    def test_failing_health_endpoint_leaves_rotation(self):
        """
        Istio has no active health check, so this one is a native cluster
        with C{health_check}: when one upstream's C{/healthz} starts failing
        it leaves rotation after C{unhealthy_threshold} probes, and comes
        back once it passes again.
        """
        ups = yield self.upstreams(("a", "v1"), ("b", "v1"), ("c", "v1"))
        harness = ProxyHarness(self)
        self.harness = harness
        yield harness.start("""
            clusters:
              - name: app
                endpoints: ["127.0.0.1:{a}", "127.0.0.1:{b}", "127.0.0.1:{c}"]
                health_check: {kind: http, path: /healthz, interval: 50ms, timeout: 1s,
                               unhealthy_threshold: 2, healthy_threshold: 1}
            listeners:
              - name: http
                address: "tcp:0:interface=127.0.0.1"
                routes: [{match: {prefix: /}, cluster: app}]
            """, a=ups[0].port, b=ups[1].port, c=ups[2].port)
        clients = Clients(self, harness.port())
        cluster = harness.service._cluster_set.get("app")
        replies = yield clients.load(30, 2)
        self.assertEqual(Counter(r.upstream for r in replies), {"a": 10, "b": 10, "c": 10})

        @defer.inlineCallbacks
        def wait_for(condition: Callable[[], bool], what: str) -> Any:
            deadline = reactor.seconds() + 3
            while not condition():
                if reactor.seconds() > deadline:
                    self.fail(f"waited 3s for {what}")
                yield sleep(0.02)

        bad = ups[1]
        probed = len(bad.probes)
        bad.health_status = 503
        yield wait_for(lambda: len(cluster.unhealthy) == 1, "the failing host to leave")
        [gone] = cluster.unhealthy
        self.assertEqual(gone.port, bad.port)
        self.assertGreaterEqual(len(bad.probes) - probed, 2)
        before = len(bad.requests)
        replies = yield clients.load(60, 2)
        self.assertEqual(Counter(r.upstream for r in replies), {"a": 30, "c": 30})
        self.assertEqual(len(bad.requests), before)
        bad.health_status = 200
        yield wait_for(lambda: not cluster.unhealthy, "the host to come back")
        replies = yield clients.load(30, 2)
        self.assertEqual(Counter(r.status for r in replies), {200: 30})
        self.assertGreater(len(bad.requests), before)
