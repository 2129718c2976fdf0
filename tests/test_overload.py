"""
Tests of the overload manager (L{txmesh.proxy.overload}): the pure state
machine as tables of measurements, the measuring loop on a L{Clock} with a
fake memory reader, the config section, the HTTP/1 and HTTP/2 hooks driven
in memory, the metrics and, with real sockets, a proxy whose event loop is
made to lag for real.
"""

from __future__ import annotations

import json
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
from prometheus_client.utils import floatToGoString
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from tests.support import ProxyHarness, raw_connect, raw_exchange
from tests.test_http1_proxy import read_responses, wait_until
from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.config.model import NodeConfig, OverloadConfig
from txmesh.filters.api import HTTPFilter
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory
from txmesh.observability.metrics import ProxyMetrics
from txmesh.proxy.cluster import ClusterManager
from txmesh.proxy.connection_manager import HTTPConnectionManager, ProxyContext
from txmesh.proxy.listener import HTTPListenerFactory
from txmesh.proxy.overload import (
    NORMAL,
    REFUSE_CONNECTIONS,
    SHED_REQUESTS,
    OverloadManager,
    OverloadState,
    Thresholds,
    rss_bytes,
    thresholds_of,
)
from txmesh.proxy.service import ListenerPortFactory
from txmesh.proxy.stream import Headers, ResponseHead

MiB = 1 << 20


# The pure state machine


def run(machine: OverloadState, steps: list[tuple[float, float | None, float | None]]) -> list[int]:
    """
    @param steps: C{(now, memory, lag)} measurements.
    @return: the state after each.
    """
    return [machine.update(now, memory, lag) for now, memory, lag in steps]


# Memory thresholds 80 and 95 (hysteresis band: 72 and 85.5), lag
# thresholds 0.5 s and 2 s (0.45 s and 1.8 s), cooldown 1 s.
TABLE = [
    ("quiet stays normal",
     [(0, 10, 0.0), (1, 79, 0.49), (2, 79.9, 0.0)], [NORMAL, NORMAL, NORMAL]),
    ("memory sheds requests from its first threshold",
     [(0, 80, 0.0)], [SHED_REQUESTS]),
    ("memory refuses connections from its second",
     [(0, 95, 0.0)], [REFUSE_CONNECTIONS]),
    ("lag sheds requests from its first threshold",
     [(0, 0, 0.5)], [SHED_REQUESTS]),
    ("lag refuses connections from its second",
     [(0, 0, 2.0)], [REFUSE_CONNECTIONS]),
    ("the measure that asks most wins",
     [(0, 96, 0.6), (0.1, 81, 2.5)], [REFUSE_CONNECTIONS, REFUSE_CONNECTIONS]),
    ("a spike lasts the cooldown, then all is normal at once",
     [(0, 0, 3.0), (0.1, 0, 0.0), (1.0, 0, 0.0), (1.1, 0, 0.0)],
     [REFUSE_CONNECTIONS, REFUSE_CONNECTIONS, REFUSE_CONNECTIONS, NORMAL]),
    ("inside the hysteresis band the state goes on",
     [(0, 80, 0.0), (5, 75, 0.0), (5.9, 71, 0.0), (6.1, 71, 0.0)],
     [SHED_REQUESTS, SHED_REQUESTS, SHED_REQUESTS, NORMAL]),
    ("the band does not start a state",
     [(0, 75, 0.46), (1, 79, 0.0)], [NORMAL, NORMAL]),
    ("refusing steps down to shedding while memory stays high",
     [(0, 95, 0.0), (1, 90, 0.0), (1.5, 85, 0.0), (2.1, 85, 0.0), (3.2, 70, 0.0)],
     [REFUSE_CONNECTIONS, REFUSE_CONNECTIONS, REFUSE_CONNECTIONS, SHED_REQUESTS, NORMAL]),
    ("a higher state starts at once, during a lower one's cooldown",
     [(0, 80, 0.0), (0.2, 0, 0.0), (0.3, 0, 2.0)], [SHED_REQUESTS, SHED_REQUESTS, REFUSE_CONNECTIONS]),
    ("unknown measures shed nothing",
     [(0, None, None), (1, None, 0.1)], [NORMAL, NORMAL]),
]


class StateMachineTests(unittest.TestCase):
    def machine(self, cooldown: float = 1.0) -> OverloadState:
        return OverloadState(Thresholds(80, 95), Thresholds(0.5, 2.0), cooldown)

    def test_table(self) -> None:
        for name, steps, expected in TABLE:
            self.assertEqual(run(self.machine(), steps), expected, name)

    def test_no_cooldown(self) -> None:
        """
        With no cooldown, the first measurement out of the band ends the
        state; the band still holds it.
        """
        steps = [(0, 0, 0.6), (0.1, 0, 0.46), (0.2, 0, 0.1)]
        self.assertEqual(run(self.machine(0.0), steps), [SHED_REQUESTS, SHED_REQUESTS, NORMAL])

    def test_measure_without_thresholds(self) -> None:
        """
        A measure with no thresholds is never acted on, however high.
        """
        machine = OverloadState(None, Thresholds(0.5, 2.0), 1.0)
        self.assertEqual(run(machine, [(0, 10**12, 0.0)]), [NORMAL])
        machine = OverloadState(Thresholds(80, 95), None, 1.0)
        self.assertEqual(run(machine, [(0, 0, 100.0)]), [NORMAL])

    def test_thresholds_of_config(self) -> None:
        memory, lag = thresholds_of(OverloadConfig(memory_limit=1000, memory_shed_requests=0.5,
                                                   memory_refuse_connections=0.75, lag_shed_requests=0.2,
                                                   lag_refuse_connections=1.0))
        self.assertEqual((memory, lag), (Thresholds(500, 750), Thresholds(0.2, 1.0)))
        self.assertEqual(thresholds_of(OverloadConfig()), (None, None))

    def test_thresholds_validated(self) -> None:
        self.assertRaises(ValueError, Thresholds, 0, 1)
        self.assertRaises(ValueError, Thresholds, 2, 1)


# The measuring loop


class _Subscriber:
    def __init__(self) -> None:
        self.states: list[int] = []

    def overload_changed(self, state: int) -> None:
        self.states.append(state)


def manager(clock: Any, memory: list, **config: Any) -> OverloadManager:
    """
    @param memory: a one-item list holding what the memory reader returns.
    """
    defaults: dict[str, Any] = {"interval": 0.1, "cooldown": 0.0, "memory_limit": 100 * MiB}
    return OverloadManager(OverloadConfig(**{**defaults, **config}), clock, lambda: memory[0])


class ManagerTests(unittest.TestCase):
    def test_lag_is_how_late_the_timer_runs(self) -> None:
        clock = Clock()
        m = manager(clock, [0], lag_shed_requests=0.2, lag_refuse_connections=1.0)
        m.start()
        clock.advance(0.1)
        self.assertEqual((m.lag_seconds, m.state), (0.0, NORMAL))
        # The next run was due at 0.2; the loop is busy until 0.45.
        clock.advance(0.35)
        self.assertAlmostEqual(m.lag_seconds, 0.25)
        self.assertEqual(m.state, SHED_REQUESTS)
        clock.advance(0.1)
        self.assertEqual((m.lag_seconds, m.state), (0.0, NORMAL))
        self.assertEqual(m.lag_count, 3)
        self.assertAlmostEqual(m.lag_sum, 0.25)

    def test_memory_reader(self) -> None:
        clock = Clock()
        memory = [50 * MiB]
        m = manager(clock, memory)
        m.start()
        self.assertEqual(m.memory_bytes, 50 * MiB)
        memory[0] = 81 * MiB
        clock.advance(0.1)
        self.assertEqual((m.memory_bytes, m.state, m.shed_requests, m.refuse_connections),
                         (81 * MiB, SHED_REQUESTS, True, False))
        memory[0] = 96 * MiB
        clock.advance(0.1)
        self.assertEqual((m.state, m.shed_requests, m.refuse_connections), (REFUSE_CONNECTIONS, True, True))
        memory[0] = 10 * MiB
        clock.advance(0.1)
        self.assertEqual((m.state, m.shed_requests, m.refuse_connections), (NORMAL, False, False))
        self.assertAlmostEqual(m.changed_at, 0.3)

    def test_unreadable_memory(self) -> None:
        clock = Clock()
        m = manager(clock, [None])
        m.start()
        clock.advance(1)
        self.assertEqual((m.memory_bytes, m.state), (None, NORMAL))
        self.flushLoggedErrors()

    def test_subscribers(self) -> None:
        """
        A subscriber hears the state at once, then every change (and only
        changes); subscribers are held weakly.
        """
        clock = Clock()
        memory = [96 * MiB]
        m = manager(clock, memory)
        sub = _Subscriber()
        m.subscribe(sub)
        m.start()
        for value in (96, 97, 81, 10, 10):
            memory[0] = value * MiB
            clock.advance(0.1)
        self.assertEqual(sub.states, [NORMAL, REFUSE_CONNECTIONS, SHED_REQUESTS, NORMAL])
        del sub
        memory[0] = 96 * MiB
        clock.advance(0.1)
        self.assertEqual(len(m._subscribers), 0)

    def test_stop(self) -> None:
        clock = Clock()
        m = manager(clock, [0])
        m.start()
        m.start()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        m.stop()
        m.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_status(self) -> None:
        clock = Clock()
        m = manager(clock, [90 * MiB], lag_shed_requests=0.5, lag_refuse_connections=2.0)
        m.start()
        clock.advance(0.1)
        m.count_shed_request()
        m.count_refused_connection()
        status = m.status()
        self.assertEqual(status["state"], SHED_REQUESTS)
        self.assertEqual(status["state_name"], "shedding_requests")
        self.assertEqual(status["memory_bytes"], 90 * MiB)
        self.assertEqual(status["thresholds"]["memory_bytes"],
                         {"shed_requests": 80 * MiB, "refuse_connections": 95 * MiB})
        self.assertEqual(status["thresholds"]["event_loop_lag_seconds"],
                         {"shed_requests": 0.5, "refuse_connections": 2.0})
        self.assertEqual(status["shed"], {"request": 1, "connection": 1})
        json.dumps(status)

    def test_rss_bytes(self) -> None:
        rss = rss_bytes()
        if rss is None:
            raise unittest.SkipTest("no /proc/self/statm here")
        self.assertGreater(rss, MiB)
        self.assertIsNone(rss_bytes("/nonexistent/statm"))


# Config


BASE = """
listeners:
  - name: http
    address: "tcp:0"
    routes: [{match: {prefix: /}, direct_response: {status: 200, body: "ok\\n"}}]
"""


class ConfigTests(unittest.TestCase):
    def load(self, section: str) -> Any:
        loader = ConfigLoader(FilterRegistry(http=[RouterFactory()]))
        return loader.load_bytes((BASE + section).encode(), "proxy.yaml").overload

    def error(self, section: str) -> str:
        with self.assertRaises(ConfigError) as e:
            self.load(section)
        return str(e.exception)

    def test_off_by_default(self) -> None:
        self.assertIsNone(self.load(""))

    def test_measure_only(self) -> None:
        """
        An empty section measures (metrics, /overload) and sheds nothing.
        """
        self.assertEqual(self.load("overload: {}"), OverloadConfig())
        self.assertEqual(thresholds_of(OverloadConfig()), (None, None))

    def test_full(self) -> None:
        config = self.load("""
overload:
  interval: 50ms
  cooldown: 2s
  memory: {limit: 512Mi, shed_requests: 70%, refuse_connections: 90%}
  event_loop_lag: {shed_requests: 200ms, refuse_connections: 1s}
""")
        self.assertEqual(config, OverloadConfig(interval=0.05, cooldown=2.0, memory_limit=512 * MiB,
                                                memory_shed_requests=0.7, memory_refuse_connections=0.9,
                                                lag_shed_requests=0.2, lag_refuse_connections=1.0))

    def test_defaults(self) -> None:
        config = self.load("overload: {memory: {limit: 2G}, event_loop_lag: {}}")
        self.assertEqual((config.interval, config.cooldown), (0.1, 1.0))
        self.assertEqual((config.memory_limit, config.memory_shed_requests, config.memory_refuse_connections),
                         (2 * 10**9, 0.8, 0.95))
        self.assertEqual((config.lag_shed_requests, config.lag_refuse_connections), (0.5, 2.0))
        self.assertEqual(self.load("overload: {memory: {limit: 1073741824}}").memory_limit, 1 << 30)
        config = self.load("overload: {memory: {limit: 1Gi, shed_requests: 75, refuse_connections: 92.5}}")
        self.assertEqual((config.memory_shed_requests, config.memory_refuse_connections), (0.75, 0.925))

    def test_errors(self) -> None:
        for section, message in [
            ("overload: 5", "proxy.yaml: overload: expected a mapping"),
            ("overload: {memory: {}}", "proxy.yaml: overload.memory.limit: is required"),
            ("overload: {memory: {limit: 1Gi, shed_requests: 0.8}}",
             "proxy.yaml: overload.memory.shed_requests: must be a percent from 10 to 100, got 0.8"),
            ("overload: {memory: {limit: 1Gi, shed_requests: lots}}",
             "proxy.yaml: overload.memory.shed_requests: expected a percent like 80 or '80%'"),
            ("overload: {memory: {limit: 1Gi, shed_requests: x%}}",
             "proxy.yaml: overload.memory.shed_requests: expected a percent like 80 or '80%'"),
            ("overload: {memory: {limit: 1Gi, refuse_connections: 101%}}",
             "proxy.yaml: overload.memory.refuse_connections: must be a percent from 10 to 100"),
            ("overload: {memory: {limit: 1Gi, shed_requests: 96%}}",
             "proxy.yaml: overload.memory.refuse_connections: must be at least shed_requests"),
            ("overload: {memory: {limit: 1000}}", "proxy.yaml: overload.memory.limit: must be at least 1Mi"),
            ("overload: {memory: {limit: lots}}", "proxy.yaml: overload.memory.limit: expected a number of bytes"),
            ("overload: {event_loop_lag: {shed_requests: 3s}}",
             "proxy.yaml: overload.event_loop_lag.refuse_connections: must be at least shed_requests"),
            ("overload: {event_loop_lag: {shed_requests: 0}}",
             "proxy.yaml: overload.event_loop_lag.shed_requests: must be a positive duration"),
            ("overload: {interval: 0}", "proxy.yaml: overload.interval: must be from 1ms to 1m"),
            ("overload: {cooldown: soon}", "proxy.yaml: overload.cooldown: expected a duration"),
            ("overload: {memory_limit_bytes: 5}", "proxy.yaml: overload.memory_limit_bytes: unknown field"),
            ("overload: {event_loop_lag: {shed: 1s}}", "proxy.yaml: overload.event_loop_lag.shed: unknown field"),
        ]:
            self.assertIn(message, self.error(section), section)

    def test_model_validation(self) -> None:
        for bad in ({"interval": 0}, {"cooldown": -1}, {"memory_limit": 0}, {"memory_shed_requests": 1.5},
                    {"memory_shed_requests": 0.9, "memory_refuse_connections": 0.8},
                    {"lag_shed_requests": 1.0}, {"lag_shed_requests": 2.0, "lag_refuse_connections": 1.0}):
            self.assertRaises(ValueError, OverloadConfig, **bad)


# The hooks, in memory


class _Hold(HTTPFilter):
    """
    Holds every request (the router never sees it) until the test answers.
    """

    def __init__(self, held: list, stream: Any):
        self.stream = stream
        held.append(self)

    def request_headers(self, head: Any, end_stream: bool) -> Any:
        return defer.Deferred()


class _HoldFactory:
    name = "hold"

    def __init__(self) -> None:
        self.held: list[_Hold] = []

    def parse_config(self, raw: Any) -> None:
        return None

    def create_filter(self, config: Any, stream: Any) -> _Hold:
        return _Hold(self.held, stream)


HOLD = """
listeners:
  - name: http
    address: "tcp:0"
    http_filters: [{name: hold}]
    routes:
      - {match: {prefix: /}, direct_response: {status: 200, body: "ok\\n"}}
"""


class InMemoryProxy:
    """
    An HTTP listener whose manager has an L{OverloadManager} with a fake
    memory reader on a L{Clock}: C{set(state)} gets it there.
    """

    def __init__(self, config: str = BASE) -> None:
        self.clock = Clock()
        self.memory = [0]
        self.overload = manager(self.clock, self.memory)
        self.overload.start()
        self.hold = _HoldFactory()
        loaded = ConfigLoader(FilterRegistry(http=[RouterFactory(), self.hold])).load_bytes(config.encode())
        clusters = ClusterManager(self.clock).update(loaded.clusters)
        proxy = ProxyContext(NodeConfig(), self.clock, overload=self.overload)
        self.factory = HTTPListenerFactory(HTTPConnectionManager(loaded.listeners[0], clusters, proxy))
        # What the listener's port accepts with: it refuses while overloaded.
        self.port = ListenerPortFactory(self.factory, self.overload)

    def set(self, state: int) -> None:
        self.memory[0] = {NORMAL: 0, SHED_REQUESTS: 81 * MiB, REFUSE_CONNECTIONS: 96 * MiB}[state]
        self.clock.advance(0.1)
        assert self.overload.state == state

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.port.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
        protocol.makeConnection(transport)
        return protocol, transport


GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


class HTTP1HookTests(unittest.TestCase):
    def test_shed_request(self) -> None:
        """
        While shedding, a new request gets 503 with flag C{OL} and body
        C{overloaded}, without routing, and the connection closes.
        """
        p = InMemoryProxy()
        p.set(SHED_REQUESTS)
        protocol, transport = p.connect()
        protocol.dataReceived(GET)
        [r] = read_responses(transport.value())
        self.assertEqual((r.status, r.body), (503, b"overloaded\n"))
        self.assertEqual(r.header(b"x-txmesh-flags"), b"OL")
        self.assertEqual(r.header(b"connection"), b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(p.overload.requests_shed, 1)

    def test_shed_request_with_body(self) -> None:
        """
        A request with a body is answered at its head; the connection
        closes, since the body was not read.
        """
        p = InMemoryProxy()
        p.set(SHED_REQUESTS)
        protocol, transport = p.connect()
        protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: example.com\r\ncontent-length: 10\r\n\r\nabc")
        [r] = read_responses(transport.value())
        self.assertEqual(r.status, 503)
        self.assertTrue(transport.disconnecting)

    def test_keep_alive_off_while_shedding(self) -> None:
        """
        A request that started before the shedding is served, but its
        response closes the connection; once the state is normal again,
        keep-alive is back.
        """
        p = InMemoryProxy(HOLD)
        protocol, transport = p.connect()
        protocol.dataReceived(GET)
        [held] = p.hold.held
        p.set(SHED_REQUESTS)
        held.stream.encode_headers(ResponseHead(200, Headers([(b"content-length", b"2")])), False)
        held.stream.encode_data(b"ok", True)
        [r] = read_responses(transport.value())
        self.assertEqual((r.status, r.header(b"connection")), (200, b"close"))
        self.assertTrue(transport.disconnecting)
        p.set(NORMAL)
        protocol, transport = p.connect()
        protocol.dataReceived(GET)
        [held] = p.hold.held[1:]
        held.stream.encode_headers(ResponseHead(200, Headers([(b"content-length", b"2")])), False)
        held.stream.encode_data(b"ok", True)
        [r] = read_responses(transport.value())
        self.assertEqual((r.status, r.header(b"connection")), (200, None))
        self.assertFalse(transport.disconnecting)

    def test_recovery(self) -> None:
        p = InMemoryProxy()
        p.set(SHED_REQUESTS)
        p.set(NORMAL)
        protocol, transport = p.connect()
        protocol.dataReceived(GET)
        [r] = read_responses(transport.value())
        self.assertEqual((r.status, r.body, r.header(b"x-txmesh-flags")), (200, b"ok\n", None))

    def test_refuse_connections(self) -> None:
        """
        While refusing, a new connection is closed as soon as it is made,
        and counted; connections made before are served (their requests
        are shed).
        """
        p = InMemoryProxy()
        before, before_transport = p.connect()
        p.set(REFUSE_CONNECTIONS)
        protocol, transport = p.connect()
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(p.overload.connections_refused, 1)
        self.assertEqual(len(p.factory.connections), 0)
        before.dataReceived(GET)
        [r] = read_responses(before_transport.value())
        self.assertEqual((r.status, r.header(b"x-txmesh-flags")), (503, b"OL"))
        p.set(SHED_REQUESTS)
        protocol, transport = p.connect()
        self.assertFalse(transport.disconnected)

    def test_refuse_behind_tls(self) -> None:
        """
        A TLS listener refuses the same way: the TLS layer wraps the
        refusing protocol, and the connection closes before a handshake.
        """
        from tests.test_tls import make_ca, make_server_cert, pem_cert, pem_key
        from txmesh.proxy.tls import TLSListenerFactory, server_options

        ca, ca_key = make_ca()
        cert, key = make_server_cert(ca, ca_key)
        p = InMemoryProxy()
        tls = TLSListenerFactory(server_options(pem_cert(cert), pem_key(key), [b"h2", b"http/1.1"]),
                                 p.port, clock=p.clock)
        p.set(REFUSE_CONNECTIONS)
        protocol = tls.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(p.overload.connections_refused, 1)

    def test_refuse_any_listener(self) -> None:
        """
        A TCP or capture listener's connections are refused the same way:
        the port refuses before its protocol is chosen.
        """
        p = InMemoryProxy()
        built = []

        class Inner(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                built.append(addr)
                return Protocol()

        port = ListenerPortFactory(Inner(), p.overload)
        p.set(REFUSE_CONNECTIONS)
        protocol = port.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnected)
        self.assertEqual((built, p.overload.connections_refused), ([], 1))
        p.set(NORMAL)
        port.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40001))
        self.assertEqual(len(built), 1)

    def test_drain_still_drains(self) -> None:
        """
        The end of an overload does not end a drain.
        """
        p = InMemoryProxy()
        p.set(SHED_REQUESTS)
        p.factory.drain()
        p.set(NORMAL)
        self.assertTrue(p.factory.draining)
        self.assertTrue(p.factory.drain_requested)

    def test_no_overload_manager(self) -> None:
        """
        A listener of a proxy without an overload section never sheds.
        """
        loaded = ConfigLoader(FilterRegistry(http=[RouterFactory()])).load_bytes(BASE.encode())
        clock = Clock()
        factory = HTTPListenerFactory(HTTPConnectionManager(loaded.listeners[0], None, ProxyContext(NodeConfig(), clock)))
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(GET)
        [r] = read_responses(transport.value())
        self.assertEqual(r.status, 200)


class HTTP2HookTests(unittest.TestCase):
    def connect(self, p: InMemoryProxy) -> tuple[h2.connection.H2Connection, StringTransport, Any]:
        protocol, transport = p.connect()
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        return client, transport, protocol

    def exchange(self, client: Any, transport: StringTransport, protocol: Any) -> list:
        events: list = []
        for _ in range(20):
            out = client.data_to_send()
            if out:
                protocol.dataReceived(out)
            back = transport.value()
            transport.clear()
            if back:
                events.extend(client.receive_data(back))
            if not out and not back:
                break
        return events

    def request(self, client: Any, extra: list | None = None) -> int:
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(b":method", b"POST" if extra else b"GET"), (b":scheme", b"http"),
                                  (b":authority", b"example.com"), (b":path", b"/")] + (extra or []),
                            end_stream=True)
        return sid

    def test_shed_stream(self) -> None:
        """
        HTTP/2 goes through the same connection manager: while shedding, a
        new stream gets 503 C{OL}; the connection gets no GOAWAY and its
        next stream is answered normally once the overload is over.
        """
        p = InMemoryProxy()
        client, transport, protocol = self.connect(p)
        self.exchange(client, transport, protocol)
        p.set(SHED_REQUESTS)
        sid = self.request(client)
        events = self.exchange(client, transport, protocol)
        [resp] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        headers = dict(resp.headers)
        self.assertEqual((headers[b":status"], headers[b"x-txmesh-flags"]), (b"503", b"OL"))
        body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
        self.assertEqual(body, b"overloaded\n")
        self.assertFalse([e for e in events if isinstance(e, h2.events.ConnectionTerminated)])
        self.assertFalse(transport.disconnecting)
        p.set(NORMAL)
        sid = self.request(client)
        events = self.exchange(client, transport, protocol)
        [resp] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        self.assertEqual(dict(resp.headers)[b":status"], b"200")
        self.assertEqual(p.overload.requests_shed, 1)

    def test_shed_grpc(self) -> None:
        """
        A gRPC call gets C{UNAVAILABLE} as a trailers-only reply.
        """
        p = InMemoryProxy()
        client, transport, protocol = self.connect(p)
        p.set(SHED_REQUESTS)
        self.request(client, [(b"content-type", b"application/grpc"), (b"te", b"trailers")])
        events = self.exchange(client, transport, protocol)
        [resp] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        headers = dict(resp.headers)
        self.assertEqual((headers[b":status"], headers[b"grpc-status"], headers[b"x-txmesh-flags"]),
                         (b"200", b"14", b"OL"))


class MetricsTests(unittest.TestCase):
    def test_families(self) -> None:
        clock = Clock()
        m = manager(clock, [81 * MiB])
        m.start()
        clock.advance(0.1)
        clock.advance(0.4)
        m.count_shed_request()
        metrics = ProxyMetrics(NodeConfig())
        metrics.watch_overload(m)
        text = metrics.exposition()[1].decode()
        for line in (f"txmesh_overload_memory_bytes {floatToGoString(81 * MiB)}",
                     "txmesh_overload_event_loop_lag_seconds 0.30000000000000004",
                     "txmesh_overload_state 1.0",
                     'txmesh_overload_shed_total{what="request"} 1.0',
                     'txmesh_overload_shed_total{what="connection"} 0.0',
                     'txmesh_event_loop_lag_seconds_bucket{le="0.001"} 1.0',
                     'txmesh_event_loop_lag_seconds_bucket{le="0.25"} 1.0',
                     'txmesh_event_loop_lag_seconds_bucket{le="0.5"} 2.0',
                     'txmesh_event_loop_lag_seconds_bucket{le="+Inf"} 2.0',
                     "txmesh_event_loop_lag_seconds_count 2.0"):
            self.assertIn(line + "\n", text)

    def test_no_samples_without_manager(self) -> None:
        """
        Without an overload section the families are there, empty.
        """
        text = ProxyMetrics(NodeConfig()).exposition()[1].decode()
        self.assertIn("# TYPE txmesh_overload_state gauge\n", text)
        samples = [line for line in text.splitlines() if not line.startswith("#")]
        self.assertEqual([line for line in samples if "overload" in line or "event_loop" in line], [])


# With real sockets: a proxy whose event loop lags for real


LAG = """
admin: {address: "tcp:0:interface=127.0.0.1"}
overload:
  interval: 20ms
  cooldown: {cooldown}
  event_loop_lag: {shed_requests: 300ms, refuse_connections: {refuse}}
listeners:
  - name: http
    address: "tcp:0:interface=127.0.0.1"
    routes: [{match: {prefix: /}, direct_response: {status: 200, body: "ok\\n"}}]
"""

CLOSE = b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"


def block(seconds: float) -> None:
    """
    Keep the reactor busy, as a CPU-bound callback would.
    """
    reactor.callLater(0, time.sleep, seconds)


class RealLagTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def get(self, port: int, request: bytes = CLOSE) -> Any:
        data = yield raw_exchange(self, port, request)
        return read_responses(data, eof=True)

    @defer.inlineCallbacks
    def test_shed_and_recover(self) -> None:
        """
        The event loop is blocked for 0.8 s: the next measurement sees the
        lag and a real client gets 503 C{OL}; the admin endpoint and the
        metrics say so; after the cooldown the proxy serves again.
        """
        h = ProxyHarness(self)
        service = yield h.start(LAG, cooldown="2s", refuse="30s")
        overload = service.overload
        yield wait_until(lambda: overload.state == NORMAL, 15)
        [r] = yield self.get(h.port())
        self.assertEqual(r.status, 200)
        block(0.8)
        yield wait_until(lambda: overload.state == SHED_REQUESTS, 15)
        [r] = yield self.get(h.port())
        self.assertEqual((r.status, r.header(b"x-txmesh-flags"), r.body), (503, b"OL", b"overloaded\n"))
        # The admin endpoint is not an HTTP listener: it still answers.
        data = yield raw_exchange(self, h.admin_port(), b"GET /overload HTTP/1.0\r\n\r\n")
        status = json.loads(data.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(status["state_name"], "shedding_requests")
        self.assertGreaterEqual(overload.lag_sum, 0.3)
        self.assertGreaterEqual(status["shed"]["request"], 1)
        data = yield raw_exchange(self, h.admin_port(), b"GET /stats/prometheus HTTP/1.0\r\n\r\n")
        self.assertIn(b"txmesh_overload_state 1.0\n", data)
        self.assertIn(b'txmesh_overload_shed_total{what="request"} ', data)
        self.assertIn(b"txmesh_overload_memory_bytes ", data)
        yield wait_until(lambda: overload.state == NORMAL, 15)
        [r] = yield self.get(h.port())
        self.assertEqual((r.status, r.body), (200, b"ok\n"))

    @defer.inlineCallbacks
    def test_refuse_and_recover(self) -> None:
        """
        A longer block passes the second threshold: a new connection is
        closed without a byte; then the proxy recovers.
        """
        h = ProxyHarness(self)
        service = yield h.start(LAG, cooldown="2s", refuse="600ms")
        overload = service.overload
        yield wait_until(lambda: overload.state == NORMAL, 15)
        block(1.2)
        yield wait_until(lambda: overload.state == REFUSE_CONNECTIONS, 15)
        client = yield raw_connect(self, h.port())
        client.transport.write(CLOSE)
        data = yield client.closed.addTimeout(10, reactor)
        self.assertEqual(data, b"")
        self.assertGreaterEqual(overload.connections_refused, 1)
        yield wait_until(lambda: overload.state == NORMAL, 15)
        [r] = yield self.get(h.port())
        self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_no_section_no_manager(self) -> None:
        h = ProxyHarness(self)
        service = yield h.start("""
admin: {address: "tcp:0:interface=127.0.0.1"}
listeners:
  - name: http
    address: "tcp:0:interface=127.0.0.1"
    routes: [{match: {prefix: /}, direct_response: {status: 200}}]
""")
        self.assertIsNone(service.overload)
        data = yield raw_exchange(self, h.admin_port(), b"GET /overload HTTP/1.0\r\n\r\n")
        self.assertEqual(data.split(b"\r\n\r\n", 1)[1], b"null\n")
