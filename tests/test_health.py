"""
Tests for L{txmesh.proxy.health}: the pure threshold state machine, the
checker driven by hand through a L{MemoryReactorClock}, and real loopback
sockets (a twisted.web upstream, a closed port, a server that never
answers) with the real reactor and a short interval.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, UserError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from txmesh.config.model import Endpoint, HealthCheckConfig
from txmesh.proxy.health import HealthChecker, HealthState

EP = Endpoint("10.0.0.1", 8080)
EP2 = Endpoint("10.0.0.2", 8080)

# Every wait in the loopback tests is bounded by this many seconds.
WAIT = 10.0


def free_port() -> int:
    """
    @return: a port on 127.0.0.1 that was free (and so closed) a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HealthStateTests(unittest.TestCase):
    """
    L{HealthState}: runs of results against the thresholds.
    """

    # (healthy_threshold, unhealthy_threshold, results, verdict after each)
    TABLE = [
        (1, 3, "sss", "HHH"),
        (1, 3, "ff", "HH"),
        (1, 3, "fff", "HHU"),
        (1, 3, "ffsff", "HHHHH"),          # a success breaks the run
        (1, 3, "fffs", "HHUH"),
        (2, 3, "fffsfs", "HHUUUU"),        # a failure breaks the run back
        (2, 3, "fffss", "HHUUH"),
        (2, 2, "ffssff", "HUUHHU"),
        (1, 1, "fsfs", "UHUH"),
        (0, 0, "fs", "UH"),                # thresholds below 1 act as 1
        (3, 1, "fsssfsss", "UUUHUUUH"),
    ]

    def test_table(self) -> None:
        for healthy_t, unhealthy_t, results, verdicts in self.TABLE:
            state = HealthState(healthy_t, unhealthy_t)
            seen = []
            changes = []
            for r in results:
                changes.append(state.record(r == "s"))
                seen.append("H" if state.healthy else "U")
            self.assertEqual("".join(seen), verdicts, (healthy_t, unhealthy_t, results))
            expected_changes = [seen[i] != (seen[i - 1] if i else "H") for i in range(len(seen))]
            self.assertEqual(changes, expected_changes, (healthy_t, unhealthy_t, results))

    def test_starts_healthy(self) -> None:
        self.assertTrue(HealthState().healthy)
        self.assertFalse(HealthState(healthy=False).healthy)

    def test_counters(self) -> None:
        state = HealthState(3, 3)
        state.record(False)
        state.record(False)
        self.assertEqual((state.successes, state.failures), (0, 2))
        state.record(True)
        self.assertEqual((state.successes, state.failures), (1, 0))


def config(**kw: Any) -> HealthCheckConfig:
    values: dict[str, Any] = {"kind": "http", "path": b"/healthz", "interval": 5.0, "timeout": 1.0,
                              "healthy_threshold": 1, "unhealthy_threshold": 1}
    values.update(kw)
    return HealthCheckConfig(**values)


class Harness:
    """
    A L{HealthChecker} on a L{MemoryReactorClock}, with its change events.
    """

    def __init__(self, endpoints=(EP,), **kw: Any):
        self.reactor = MemoryReactorClock()
        self.events: list[tuple[Endpoint, bool]] = []
        host_header = kw.pop("host_header", b"")
        self.checker = HealthChecker(config(**kw), list(endpoints), self.reactor,
                                     lambda ep, healthy: self.events.append((ep, healthy)),
                                     host_header=host_header, rng=random.Random(7))

    def start_probe(self) -> Any:
        """
        Run the clock to the next check.

        @return: the factory of the connection attempt it started.
        """
        before = len(self.reactor.tcpClients)
        self.reactor.advance(self.checker.config.interval)
        self.assertStarted(before + 1)
        return self.reactor.tcpClients[-1][2]

    def assertStarted(self, count: int) -> None:
        assert len(self.reactor.tcpClients) == count, self.reactor.tcpClients

    def connect(self, factory: Any) -> tuple[Protocol, StringTransport]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def probe(self, response: bytes | None, close: bool = True) -> StringTransport:
        """
        One whole HTTP check answered with C{response}.
        """
        protocol, transport = self.connect(self.start_probe())
        if response is not None:
            protocol.dataReceived(response)
        if close:
            protocol.connectionLost(Failure(ConnectionDone()))
        return transport


def http_response(status: int, body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%b" % (status, len(body), body)


class CheckerTests(unittest.TestCase):
    """
    L{HealthChecker} driven by hand: what it sends, how it decides, and
    that it leaves no timers or connections behind.
    """

    def test_bad_config(self) -> None:
        for kw in ({"kind": "udp"}, {"interval": 0.0}, {"timeout": 0.0}, {"timeout": -1.0}):
            with self.assertRaises(ValueError) as cm:
                HealthChecker(config(**kw), [EP], MemoryReactorClock(), lambda ep, h: None)
            self.assertIn("health_check." + next(iter(kw)), str(cm.exception))

    def test_jittered_start(self) -> None:
        h = Harness(endpoints=[EP, EP2], interval=5.0)
        h.checker.start()
        h.checker.start()  # idempotent
        delays = sorted(c.getTime() for c in h.reactor.getDelayedCalls())
        rng = random.Random(7)
        self.assertEqual(delays, sorted([rng.uniform(0, 5.0), rng.uniform(0, 5.0)]))
        self.assertTrue(all(0 <= d < 5.0 for d in delays))
        self.assertEqual(h.reactor.tcpClients, [])
        self.successResultOf(h.checker.stop())
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_http_request(self) -> None:
        h = Harness()
        h.checker.start()
        factory = h.start_probe()
        host, port, _, timeout, _ = h.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.1", 8080, 1.0))
        _, transport = h.connect(factory)
        self.assertEqual(transport.value(), b"GET /healthz HTTP/1.1\r\nhost: 10.0.0.1:8080\r\n"
                                            b"user-agent: txmesh-health-check\r\nconnection: close\r\n\r\n")

    def test_host_header(self) -> None:
        h = Harness(host_header=b"reviews.default.svc", path=b"/ready?full=1")
        h.checker.start()
        _, transport = h.connect(h.start_probe())
        self.assertTrue(transport.value().startswith(b"GET /ready?full=1 HTTP/1.1\r\nhost: reviews.default.svc\r\n"))

    def test_statuses(self) -> None:
        table = [
            (http_response(200), True),
            (http_response(204, b""), True),
            (b"HTTP/1.1 204 No Content\r\n\r\n", True),
            (http_response(299), True),
            (http_response(301), False),
            (http_response(404), False),
            (http_response(500), False),
            (http_response(503), False),
            (b"HTTP/1.1 100 Continue\r\n\r\n" + http_response(200), True),
            (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n", False),
            (b"HTTP/1.1 200 OK\r\n\r\nclose-delimited", True),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", False),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", True),
            (b"SMTP ready\r\n", False),
            (b"", False),
        ]
        for response, healthy in table:
            h = Harness()
            h.checker.start()
            h.probe(response)
            self.assertEqual(h.checker.is_healthy(EP), healthy, response)
            self.assertEqual(h.events, [] if healthy else [(EP, False)], response)
            stats = h.checker.stats()["10.0.0.1:8080"]
            self.assertEqual((stats["checks"], stats["failed_checks"]), (1, 0 if healthy else 1), response)
            self.successResultOf(h.checker.stop())

    def test_closes_after_answer(self) -> None:
        h = Harness()
        h.checker.start()
        transport = h.probe(http_response(200), close=False)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)  # a clean close, not an abort

    def test_malformed_response_aborts(self) -> None:
        h = Harness()
        h.checker.start()
        transport = h.probe(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", close=False)
        self.assertTrue(transport.disconnected)
        self.assertIn("malformed", h.checker.stats()["10.0.0.1:8080"]["last_failure"])

    def test_next_check_after_interval(self) -> None:
        """
        The next check of an endpoint starts an interval after the previous
        one was decided; one check at a time.
        """
        h = Harness(interval=5.0, unhealthy_threshold=3, healthy_threshold=2)
        h.checker.start()
        protocol, transport = h.connect(h.start_probe())
        h.reactor.advance(0.5)
        protocol.dataReceived(http_response(500))
        h.reactor.advance(4.9)
        h.assertStarted(1)          # still closing, and not yet due
        protocol.connectionLost(Failure(ConnectionDone()))
        h.reactor.advance(0.1)
        h.assertStarted(2)
        protocol, transport = h.connect(h.reactor.tcpClients[-1][2])
        protocol.dataReceived(http_response(500))
        protocol.connectionLost(Failure(ConnectionDone()))
        h.probe(http_response(503))
        self.assertEqual(h.events, [(EP, False)])
        h.probe(http_response(200))
        self.assertFalse(h.checker.is_healthy(EP))
        h.probe(http_response(200))
        self.assertEqual(h.events, [(EP, False), (EP, True)])
        self.assertTrue(h.checker.is_healthy(EP))

    def test_tcp(self) -> None:
        h = Harness(kind="tcp", unhealthy_threshold=2)
        h.checker.start()
        protocol, transport = h.connect(h.start_probe())
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.checker.stats()["10.0.0.1:8080"]["checks"], 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        for _ in range(2):
            factory = h.start_probe()
            factory.clientConnectionFailed(h.reactor.connectors[-1], Failure(ConnectionRefusedError()))
        self.assertEqual(h.events, [(EP, False)])
        self.assertIn("connect failed", h.checker.stats()["10.0.0.1:8080"]["last_failure"])

    def test_timeout_when_connected(self) -> None:
        h = Harness(timeout=1.0)
        h.checker.start()
        protocol, transport = h.connect(h.start_probe())
        h.reactor.advance(0.999)
        self.assertEqual(h.events, [])
        h.reactor.advance(0.001)
        self.assertEqual(h.events, [(EP, False)])
        self.assertTrue(transport.disconnected)
        self.assertIn("timed out", h.checker.stats()["10.0.0.1:8080"]["last_failure"])
        # A late answer changes nothing.
        protocol.dataReceived(http_response(200))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.checker.stats()["10.0.0.1:8080"]["checks"], 1)
        self.successResultOf(h.checker.stop())
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_timeout_when_connecting(self) -> None:
        h = Harness(timeout=1.0)
        h.checker.start()
        factory = h.start_probe()
        connector = h.reactor.connectors[-1]
        h.reactor.advance(1.0)
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(h.events, [(EP, False)])
        # A real connector reports the failure of the attempt it stopped.
        factory.clientConnectionFailed(connector, Failure(UserError()))
        self.assertEqual(h.checker.stats()["10.0.0.1:8080"]["checks"], 1)
        self.successResultOf(h.checker.stop())

    def test_stop_while_connected(self) -> None:
        h = Harness()
        h.checker.start()
        protocol, transport = h.connect(h.start_probe())
        d = h.checker.stop()
        self.assertTrue(transport.disconnected)
        self.assertNoResult(d)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertEqual(h.checker.stats()["10.0.0.1:8080"]["checks"], 0)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_stop_while_connecting(self) -> None:
        h = Harness()
        h.checker.start()
        factory = h.start_probe()
        d = h.checker.stop()
        self.assertTrue(h.reactor.connectors[-1].stoppedConnecting)
        self.assertNoResult(d)
        factory.clientConnectionFailed(h.reactor.connectors[-1], Failure(UserError()))
        self.successResultOf(d)
        self.assertEqual(h.events, [])
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_broken_callback(self) -> None:
        h = Harness()
        h.checker._on_change = lambda ep, healthy: 1 / 0
        h.checker.start()
        h.probe(http_response(500))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertFalse(h.checker.is_healthy(EP))
        h.start_probe()  # the checks go on

    def test_unknown_endpoint_is_healthy(self) -> None:
        h = Harness()
        self.assertTrue(h.checker.is_healthy(EP2))
        self.assertEqual(h.checker.endpoints, (EP,))


# Loopback tests.


class TrackingFactory(WrappingFactory):
    """
    Wraps a server factory to know its live connections, so a test can
    close them all and wait until they are gone.
    """

    def __init__(self, wrapped: Factory):
        super().__init__(wrapped)
        self.accepted = 0
        self._accept_waiters: list[tuple[int, Deferred]] = []
        self._empty_waiters: list[Deferred] = []

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.accepted += 1
        ready = [d for n, d in self._accept_waiters if self.accepted >= n]
        self._accept_waiters = [(n, d) for n, d in self._accept_waiters if self.accepted < n]
        for d in ready:
            reactor.callLater(0, d.callback, None)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._empty_waiters = self._empty_waiters, []
            for d in waiters:
                d.callback(None)

    def wait_accepted(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        self._accept_waiters.append((count, d))
        return d.addTimeout(WAIT, reactor)

    def close_all(self) -> Deferred:
        if not self.protocols:
            return defer.succeed(None)
        d: Deferred = Deferred()
        self._empty_waiters.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


class SwitchableHealth(Resource):
    """
    Answers C{code}, which the test changes, and records the requests.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.requests: list[dict[str, Any]] = []
        self._waiters: list[tuple[int, Deferred]] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append({
            "path": request.uri,
            "host": request.getHeader(b"host"),
            "connection": request.getHeader(b"connection"),
            "user-agent": request.getHeader(b"user-agent"),
            "code": self.code,
        })
        request.setResponseCode(self.code)
        count = len(self.requests)
        ready = [d for n, d in self._waiters if count >= n]
        self._waiters = [(n, d) for n, d in self._waiters if count < n]
        for d in ready:
            # Not from inside render: the test goes on (and may clean up)
            # when the request is over.
            reactor.callLater(0, d.callback, None)
        return b"ok" if self.code < 300 else b"not ok"

    def wait_requests(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        self._waiters.append((count, d))
        return d.addTimeout(WAIT, reactor)


class Events:
    """
    Records C{on_change} calls; tests wait for the next one.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[Endpoint, bool]] = []
        self._waiters: list[Deferred] = []

    def __call__(self, endpoint: Endpoint, healthy: bool) -> None:
        self.seen.append((endpoint, healthy))
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback((endpoint, healthy))

    def next(self) -> Deferred:
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d.addTimeout(WAIT, reactor)


class LoopbackTests(unittest.TestCase):
    """
    Real sockets on 127.0.0.1 with the real reactor.
    """

    timeout = 30

    def listen(self, factory: Factory) -> tuple[Endpoint, TrackingFactory]:
        tracking = TrackingFactory(factory)
        port = reactor.listenTCP(0, tracking, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(tracking.close_all)
        return Endpoint("127.0.0.1", port.getHost().port), tracking

    def checker(self, endpoint: Endpoint, events: Callable[[Endpoint, bool], None], **kw: Any) -> HealthChecker:
        values: dict[str, Any] = {"interval": 0.05, "timeout": 1.0}
        values.update(kw)
        host_header = values.pop("host_header", b"")
        checker = HealthChecker(config(**values), [endpoint], reactor, events, host_header=host_header,
                                rng=random.Random(1))
        self.addCleanup(checker.stop)  # registered last: runs before the servers close
        checker.start()
        return checker

    @defer.inlineCallbacks
    def test_http_upstream_flaps(self) -> Any:
        resource = SwitchableHealth()
        site = Site(resource)
        site.noisy = False
        endpoint, _ = self.listen(site)
        events = Events()
        checker = self.checker(endpoint, events, unhealthy_threshold=2, healthy_threshold=2,
                               host_header=b"upstream.test")

        yield resource.wait_requests(2)
        self.assertTrue(checker.is_healthy(endpoint))
        self.assertEqual(events.seen, [])
        self.assertEqual(resource.requests[0], {"path": b"/healthz", "host": b"upstream.test",
                                                "connection": b"close", "user-agent": b"txmesh-health-check",
                                                "code": 200})

        resource.code = 500
        before = len(resource.requests)
        change = yield events.next()
        self.assertEqual(change, (endpoint, False))
        self.assertFalse(checker.is_healthy(endpoint))
        self.assertEqual([r["code"] for r in resource.requests[before:]], [500, 500])

        resource.code = 200
        before = len(resource.requests)
        change = yield events.next()
        self.assertEqual(change, (endpoint, True))
        self.assertTrue(checker.is_healthy(endpoint))
        self.assertEqual([r["code"] for r in resource.requests[before:]], [200, 200])
        self.assertEqual(events.seen, [(endpoint, False), (endpoint, True)])
        self.assertEqual(checker.stats()[str(endpoint)]["last_failure"], "status 500")

    @defer.inlineCallbacks
    def test_tcp_closed_port(self) -> Any:
        endpoint = Endpoint("127.0.0.1", free_port())
        events = Events()
        checker = self.checker(endpoint, events, kind="tcp", unhealthy_threshold=3)
        change = yield events.next()
        self.assertEqual(change, (endpoint, False))
        stats = checker.stats()[str(endpoint)]
        self.assertEqual((stats["checks"], stats["failed_checks"]), (3, 3))
        self.assertIn("connect failed", stats["last_failure"])

    @defer.inlineCallbacks
    def test_http_timeout(self) -> Any:
        """
        A server that accepts and never answers fails the check at the
        timeout, and the probe's connection is closed.
        """
        endpoint, tracking = self.listen(Factory.forProtocol(Protocol))
        events = Events()
        started = reactor.seconds()
        checker = self.checker(endpoint, events, timeout=0.2, unhealthy_threshold=1)
        change = yield events.next()
        self.assertEqual(change, (endpoint, False))
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        self.assertEqual(tracking.accepted, 1)
        self.assertIn("timed out", checker.stats()[str(endpoint)]["last_failure"])

    @defer.inlineCallbacks
    def test_tcp_silent_server_is_healthy(self) -> Any:
        endpoint, tracking = self.listen(Factory.forProtocol(Protocol))
        events = Events()
        checker = self.checker(endpoint, events, kind="tcp", unhealthy_threshold=1)
        yield tracking.wait_accepted(3)
        stats = checker.stats()[str(endpoint)]
        self.assertGreaterEqual(stats["checks"], 2)
        self.assertEqual(stats["failed_checks"], 0)
        self.assertEqual(events.seen, [])

    @defer.inlineCallbacks
    def test_stop_with_probe_in_flight(self) -> Any:
        endpoint, tracking = self.listen(Factory.forProtocol(Protocol))
        events = Events()
        checker = self.checker(endpoint, events, timeout=5.0)
        yield tracking.wait_accepted(1)
        yield checker.stop()
        self.assertEqual(checker.stats()[str(endpoint)]["checks"], 0)
        self.assertEqual(events.seen, [])
