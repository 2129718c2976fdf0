"""
Tests for L{txmesh.proxy.tcp}, the L4 proxy.

Two kinds: deterministic tests that drive one proxy session by hand through
L{StringTransport}s, a hand-completed client endpoint and a L{Clock}; and
loopback tests that run real sockets on 127.0.0.1 through the proxy, for
what only the kernel can show (half-close, backpressure).
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from tests.support import ProxyHarness, poll_until, raw_connect, sleep
from txmesh.config.model import Endpoint, FilterConfig
from txmesh.filters.api import CLOSE, INetworkFilter, INetworkFilterFactory
from txmesh.proxy.open_set import OpenSet
from txmesh.proxy.tcp import TCPConnectionStats, TCPProxyFactory

UPSTREAM = Endpoint("10.1.1.1", 9000)
CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 40000)
UPSTREAM_ADDRESS = IPv4Address("TCP", "10.1.1.1", 9000)


# Deterministic doubles.


class HalfCloseStringTransport(StringTransport):
    """
    A L{StringTransport} that records half-closes, as a TCP transport has.
    """

    write_closes = 0

    def loseWriteConnection(self) -> None:
        self.write_closes += 1


class _Attempt:
    """
    One connection attempt on a L{ManualEndpoint}, completed by the test.
    """

    def __init__(self, factory: Factory) -> None:
        self.factory = factory
        self.cancelled = False
        self.deferred: Deferred[Protocol] = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred[Protocol]) -> None:
        self.cancelled = True

    def succeed(self, transport: Any = None) -> tuple[Protocol, Any]:
        if transport is None:
            transport = HalfCloseStringTransport(peerAddress=UPSTREAM_ADDRESS)
        protocol = self.factory.buildProtocol(UPSTREAM_ADDRESS)
        protocol.makeConnection(transport)
        self.deferred.callback(protocol)
        return protocol, transport

    def fail(self) -> None:
        self.deferred.errback(Failure(ConnectionRefusedError()))


@implementer(IStreamClientEndpoint)
class ManualEndpoint:
    """
    A client endpoint whose connection attempts the test completes by hand.
    """

    def __init__(self) -> None:
        self.attempts: list[_Attempt] = []

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        attempt = _Attempt(factory)
        self.attempts.append(attempt)
        return attempt.deferred


@implementer(INetworkFilter)
class ScriptedFilter:
    """
    A network filter that records each hook call in a shared list and
    answers from its factory's script.
    """

    def __init__(self, factory: ScriptedFilterFactory) -> None:
        self._factory = factory

    def _hook(self, hook: str, arg: Any) -> Any:
        self._factory.calls.append((self._factory.name, hook, arg))
        answer = self._factory.script.get(hook)
        return None if answer is None else answer(arg)

    def connection_made(self, connection: Any) -> Any:
        return self._hook("connection_made", connection)

    def downstream_data(self, data: bytes) -> Any:
        return self._hook("downstream_data", data)

    def upstream_data(self, data: bytes) -> Any:
        return self._hook("upstream_data", data)

    def connection_closed(self) -> None:
        self._hook("connection_closed", None)


@implementer(INetworkFilterFactory)
@attrs.define
class ScriptedFilterFactory:
    """
    Builds L{ScriptedFilter}s.

    @ivar script: hook name to a function of the hook's argument giving
        the hook's result.
    @ivar calls: C{(filter name, hook name, argument)} for every call.
    """

    name: str
    calls: list[tuple[str, str, Any]]
    script: dict[str, Callable[[Any], Any]] = attrs.Factory(dict)
    connections: list[Any] = attrs.Factory(list)

    def parse_config(self, raw: Any) -> Any:
        return raw

    def create_filter(self, config: Any, connection: Any) -> ScriptedFilter:
        self.connections.append(connection)
        return ScriptedFilter(self)


@attrs.define
class Connection:
    """
    Both ends of one proxied connection, as a test drives them: the
    downstream protocol and its transport, and once connected the upstream
    protocol and its transport.
    """

    down: Protocol
    down_transport: Any
    up: Any = None
    up_transport: Any = None


@attrs.define
class Proxy:
    """
    A L{TCPProxyFactory} wired to a L{ManualEndpoint} and a L{Clock}.
    """

    factory: TCPProxyFactory
    endpoint: ManualEndpoint
    clock: Clock
    picked: list[Endpoint]
    stats: list[TCPConnectionStats]

    def accept(self, transport: Any = None) -> Connection:
        """
        Accept a downstream connection; the upstream attempt stays pending.
        """
        if transport is None:
            transport = HalfCloseStringTransport(peerAddress=CLIENT_ADDRESS)
        protocol = self.factory.buildProtocol(CLIENT_ADDRESS)
        protocol.makeConnection(transport)
        return Connection(protocol, transport)

    def connect_upstream(self, connection: Connection, transport: Any = None) -> None:
        """
        Complete the latest upstream connection attempt.
        """
        attempt = self.endpoint.attempts[-1]
        connection.up, connection.up_transport = attempt.succeed(transport)

    def open(self) -> Connection:
        """
        Accept a downstream connection and connect its upstream.
        """
        connection = self.accept()
        self.connect_upstream(connection)
        return connection


def make_proxy(
    *,
    endpoint: Endpoint | None = UPSTREAM,
    idle_timeout: float = 0.0,
    filters: tuple[ScriptedFilterFactory, ...] = (),
    connector: Callable[[Endpoint], IStreamClientEndpoint] | None = None,
    sessions: OpenSet | None = None,
) -> Proxy:
    clock = Clock()
    manual = ManualEndpoint()
    picked: list[Endpoint] = []
    stats: list[TCPConnectionStats] = []

    def connect_to(chosen: Endpoint) -> IStreamClientEndpoint:
        picked.append(chosen)
        return manual

    factory = TCPProxyFactory(
        listener_name="tcp-in",
        pick_endpoint=lambda: endpoint,
        connector=connector or connect_to,
        clock=clock,
        idle_timeout=idle_timeout,
        filters=[FilterConfig(name=f.name, factory=f) for f in filters],
        on_connection_closed=stats.append,
        sessions=sessions,
    )
    return Proxy(factory, manual, clock, picked, stats)


def lose(protocol: Protocol, reason: type[Exception] = ConnectionDone) -> None:
    protocol.connectionLost(Failure(reason()))


class ConstructionTests(unittest.SynchronousTestCase):
    def test_negative_idle_timeout(self) -> None:
        """
        A negative idle timeout is refused with a message naming the field.
        """
        with self.assertRaises(ValueError) as raised:
            make_proxy(idle_timeout=-1)
        self.assertIn("idle_timeout", str(raised.exception))


class ConnectTests(unittest.SynchronousTestCase):
    """
    From accepting the downstream to the upstream connecting, or not.
    """

    def test_downstream_paused_until_upstream_connects(self) -> None:
        """
        Reading from the downstream stops until the upstream is connected;
        then each transport becomes the other's streaming producer.
        """
        proxy = make_proxy()
        c = proxy.accept()
        self.assertEqual(c.down_transport.producerState, "paused")
        self.assertEqual(proxy.picked, [UPSTREAM])
        self.assertEqual(len(proxy.endpoint.attempts), 1)

        proxy.connect_upstream(c)

        self.assertEqual(c.down_transport.producerState, "producing")
        self.assertIs(c.down_transport.producer, c.up_transport)
        self.assertIs(c.up_transport.producer, c.down_transport)
        self.assertTrue(c.down_transport.streaming)
        self.assertTrue(c.up_transport.streaming)

    def test_relays_both_ways(self) -> None:
        """
        Bytes from each side are written to the other, unchanged.
        """
        c = make_proxy().open()
        c.down.dataReceived(b"GET")
        c.down.dataReceived(b" /")
        c.up.dataReceived(b"200 OK")
        self.assertEqual(c.up_transport.value(), b"GET /")
        self.assertEqual(c.down_transport.value(), b"200 OK")

    def test_data_before_upstream_connects(self) -> None:
        """
        Bytes a transport delivers despite the pause are kept, in order,
        until the upstream connects.
        """
        proxy = make_proxy()
        c = proxy.accept()
        c.down.dataReceived(b"early ")
        c.down.dataReceived(b"bird")
        proxy.connect_upstream(c)
        c.down.dataReceived(b"!")
        self.assertEqual(c.up_transport.value(), b"early bird!")

    def test_no_healthy_upstream(self) -> None:
        """
        When the load balancer has no endpoint the downstream is closed at
        once, nothing is connected, and the stats say C{UH}.
        """
        proxy = make_proxy(endpoint=None)
        c = proxy.accept()
        self.assertTrue(c.down_transport.disconnecting)
        self.assertEqual(proxy.endpoint.attempts, [])
        lose(c.down)
        [stats] = proxy.stats
        self.assertEqual(stats.response_flags, ("UH",))
        self.assertIsNone(stats.upstream_endpoint)
        self.assertFalse(stats.upstream_connected)

    def test_load_balancer_error(self) -> None:
        """
        A load balancer that raises counts as having no healthy upstream.
        """

        def broken() -> Endpoint:
            raise RuntimeError("no table")

        proxy = make_proxy()
        proxy.factory.pick_endpoint = broken
        c = proxy.accept()
        self.assertTrue(c.down_transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        lose(c.down)
        self.assertEqual(proxy.stats[0].response_flags, ("UH",))

    def test_connect_failure(self) -> None:
        """
        A failed upstream connection closes the downstream; the stats say
        C{UF} and name the endpoint.
        """
        proxy = make_proxy()
        c = proxy.accept()
        self.assertFalse(c.down_transport.disconnecting)
        proxy.endpoint.attempts[0].fail()
        self.assertTrue(c.down_transport.disconnecting)
        lose(c.down)
        [stats] = proxy.stats
        self.assertEqual(stats.response_flags, ("UF",))
        self.assertEqual(stats.upstream_endpoint, UPSTREAM)
        self.assertFalse(stats.upstream_connected)

    def test_connector_error(self) -> None:
        """
        A connector that raises is an upstream connection failure.
        """

        def broken(endpoint: Endpoint) -> IStreamClientEndpoint:
            raise ValueError("bad address")

        proxy = make_proxy(connector=broken)
        c = proxy.accept()
        self.assertTrue(c.down_transport.disconnecting)
        lose(c.down)
        self.assertEqual(proxy.stats[0].response_flags, ("UF",))

    def test_downstream_leaves_while_connecting(self) -> None:
        """
        If the downstream goes away before the upstream connects, the
        connection attempt is cancelled and the stats say C{DC}.
        """
        proxy = make_proxy()
        c = proxy.accept()
        attempt = proxy.endpoint.attempts[0]
        lose(c.down, ConnectionLost)
        self.assertTrue(attempt.cancelled)
        [stats] = proxy.stats
        self.assertEqual(stats.response_flags, ("DC",))
        self.assertFalse(stats.upstream_connected)

    def test_upstream_connects_after_downstream_left(self) -> None:
        """
        An endpoint that ignores cancellation and connects anyway has its
        connection dropped; the session reports once.
        """
        proxy = make_proxy()
        c = proxy.accept()
        attempt = proxy.endpoint.attempts[0]
        lose(c.down)
        transport = HalfCloseStringTransport()
        protocol = attempt.factory.buildProtocol(UPSTREAM_ADDRESS)
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnected)
        lose(protocol)
        self.assertEqual(len(proxy.stats), 1)


class CloseTests(unittest.SynchronousTestCase):
    """
    Half-close, full close and the stats reported at the end.
    """

    def test_downstream_eof_half_closes_upstream(self) -> None:
        """
        End-of-file from the downstream shuts down only the upstream's write
        half, after releasing the (now finished) downstream as its
        producer; the answer still flows back.
        """
        c = make_proxy().open()
        c.down.dataReceived(b"request")
        c.down.readConnectionLost()
        self.assertEqual(c.up_transport.write_closes, 1)
        self.assertIsNone(c.up_transport.producer)
        self.assertIs(c.down_transport.producer, c.up_transport)
        self.assertFalse(c.up_transport.disconnecting)
        self.assertFalse(c.down_transport.disconnecting)
        c.up.dataReceived(b"answer")
        self.assertEqual(c.down_transport.value(), b"answer")

    def test_upstream_eof_half_closes_downstream(self) -> None:
        """
        End-of-file from the upstream shuts down the downstream's write half;
        the client may go on sending.
        """
        c = make_proxy().open()
        c.up.readConnectionLost()
        self.assertEqual(c.down_transport.write_closes, 1)
        self.assertIsNone(c.down_transport.producer)
        c.down.dataReceived(b"more")
        self.assertEqual(c.up_transport.value(), b"more")

    def test_repeated_eof_ignored(self) -> None:
        """
        A transport resumed after end-of-file reports it again; that does not
        half-close the other side twice.
        """
        c = make_proxy().open()
        c.down.readConnectionLost()
        c.down.readConnectionLost()
        self.assertEqual(c.up_transport.write_closes, 1)

    def test_eof_both_ways_closes(self) -> None:
        """
        Once both directions have seen end-of-file both sides are closed
        (gracefully), and the stats are reported once, after both are gone.
        """
        proxy = make_proxy()
        c = proxy.open()
        c.down.dataReceived(b"12345")
        c.up.dataReceived(b"123")
        c.down.readConnectionLost()
        c.up.readConnectionLost()
        self.assertTrue(c.down_transport.disconnecting)
        self.assertTrue(c.up_transport.disconnecting)
        self.assertFalse(c.down_transport.disconnected)
        self.assertIsNone(c.down_transport.producer)
        self.assertIsNone(c.up_transport.producer)
        lose(c.up)
        self.assertEqual(proxy.stats, [])
        lose(c.down)
        [stats] = proxy.stats
        self.assertEqual(stats.bytes_received, 5)
        self.assertEqual(stats.bytes_sent, 3)
        self.assertEqual(stats.response_flags, ())
        self.assertTrue(stats.upstream_connected)

    def test_eof_before_upstream_connects(self) -> None:
        """
        End-of-file from the downstream while connecting is passed on after
        the early bytes, and the finished downstream is not resumed.
        """
        proxy = make_proxy()
        c = proxy.accept()
        c.down.dataReceived(b"all of it")
        c.down.readConnectionLost()
        proxy.connect_upstream(c)
        self.assertEqual(c.up_transport.value(), b"all of it")
        self.assertEqual(c.up_transport.write_closes, 1)
        self.assertEqual(c.down_transport.producerState, "paused")

    def test_upstream_lost_closes_downstream(self) -> None:
        """
        Losing the upstream closes the downstream after what was already
        relayed to it is flushed.
        """
        proxy = make_proxy()
        c = proxy.open()
        c.up.dataReceived(b"last words")
        lose(c.up, ConnectionLost)
        self.assertTrue(c.down_transport.disconnecting)
        self.assertFalse(c.down_transport.disconnected)
        self.assertIsNone(c.down_transport.producer)
        self.assertEqual(c.down_transport.value(), b"last words")
        c.down.dataReceived(b"too late")
        self.assertEqual(c.up_transport.value(), b"")
        lose(c.down)
        self.assertEqual(len(proxy.stats), 1)

    def test_downstream_lost_closes_upstream(self) -> None:
        """
        Losing the downstream closes the upstream.
        """
        c = make_proxy().open()
        lose(c.down, ConnectionLost)
        self.assertTrue(c.up_transport.disconnecting)
        self.assertIsNone(c.up_transport.producer)

    def test_stats(self) -> None:
        """
        The stats carry the listener, the addresses, the byte counts taken
        on the downstream socket and the duration by the injected clock.
        """
        proxy = make_proxy()
        proxy.clock.advance(100)
        c = proxy.open()
        c.down.dataReceived(b"x" * 10)
        proxy.clock.advance(2.5)
        c.up.dataReceived(b"y" * 20)
        lose(c.down)
        lose(c.up)
        self.assertEqual(
            proxy.stats,
            [
                TCPConnectionStats(
                    listener_name="tcp-in",
                    downstream_address=CLIENT_ADDRESS,
                    upstream_endpoint=UPSTREAM,
                    upstream_connected=True,
                    bytes_received=10,
                    bytes_sent=20,
                    start_time=100.0,
                    duration=2.5,
                    response_flags=(),
                )
            ],
        )

    def test_stats_callback_error_logged(self) -> None:
        """
        A failing stats callback is logged, not raised into the transport.
        """
        proxy = make_proxy()

        def broken(stats: TCPConnectionStats) -> None:
            raise KeyError("metric")

        proxy.factory.on_connection_closed = broken
        c = proxy.open()
        lose(c.down)
        lose(c.up)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class SessionsTests(unittest.SynchronousTestCase):
    """
    The open sessions (an L{OpenSet}): what a shutdown waits for, and ends.
    """

    def test_counted_while_open(self) -> None:
        sessions: OpenSet = OpenSet()
        proxy = make_proxy(sessions=sessions)
        self.successResultOf(sessions.when_empty())
        first, second = proxy.open(), proxy.accept()
        self.assertEqual(len(sessions), 2)
        idle = sessions.when_empty()
        lose(first.down)
        lose(first.up)
        self.assertNoResult(idle)
        lose(second.down)  # before its upstream connected
        self.assertEqual(len(sessions), 0)
        self.successResultOf(idle)

    def test_abort_all(self) -> None:
        sessions: OpenSet = OpenSet()
        c = make_proxy(sessions=sessions).open()
        c.up_transport.write(b"unsent")
        for session in list(sessions):
            session.abort()
        self.assertTrue(c.down_transport.disconnected)
        self.assertTrue(c.up_transport.disconnected)

    def test_cancelled_wait(self) -> None:
        sessions: OpenSet = OpenSet()
        make_proxy(sessions=sessions).open()
        d = sessions.when_empty()
        d.cancel()
        self.failureResultOf(d)


class IdleTimeoutTests(unittest.SynchronousTestCase):
    def test_fires_after_inactivity(self) -> None:
        """
        With nothing moving for C{idle_timeout} seconds both sides are
        aborted (no flush) and the stats say C{SI}.
        """
        proxy = make_proxy(idle_timeout=10)
        c = proxy.open()
        proxy.clock.advance(9.9)
        self.assertFalse(c.down_transport.disconnecting)
        proxy.clock.advance(0.1)
        self.assertTrue(c.down_transport.disconnected)
        self.assertTrue(c.up_transport.disconnected)
        lose(c.down, ConnectionLost)
        lose(c.up, ConnectionLost)
        self.assertEqual(proxy.stats[0].response_flags, ("SI",))
        self.assertEqual(proxy.clock.getDelayedCalls(), [])

    def test_traffic_either_way_resets(self) -> None:
        """
        Bytes in either direction restart the idle period.
        """
        proxy = make_proxy(idle_timeout=10)
        c = proxy.open()
        proxy.clock.advance(6)
        c.down.dataReceived(b"ping")
        proxy.clock.advance(6)
        c.up.dataReceived(b"pong")
        proxy.clock.advance(9)
        self.assertFalse(c.down_transport.disconnecting)
        proxy.clock.advance(1)
        self.assertTrue(c.down_transport.disconnected)

    def test_steady_traffic_never_times_out(self) -> None:
        """
        A connection with a chunk every second survives far longer than
        the idle timeout.
        """
        proxy = make_proxy(idle_timeout=3)
        c = proxy.open()
        for second in range(100):
            proxy.clock.advance(1)
            (c.down if second % 2 else c.up).dataReceived(b".")
        self.assertFalse(c.down_transport.disconnecting)
        self.assertEqual(len(proxy.clock.getDelayedCalls()), 1)

    def test_zero_disables(self) -> None:
        """
        An idle timeout of 0 schedules nothing.
        """
        proxy = make_proxy(idle_timeout=0)
        c = proxy.open()
        self.assertEqual(proxy.clock.getDelayedCalls(), [])
        proxy.clock.advance(10**6)
        self.assertFalse(c.down_transport.disconnecting)

    def test_not_running_while_connecting(self) -> None:
        """
        The connect timeout, not the idle timeout, bounds connecting.
        """
        proxy = make_proxy(idle_timeout=10)
        proxy.accept()
        self.assertEqual(proxy.clock.getDelayedCalls(), [])

    def test_cancelled_on_close(self) -> None:
        """
        An ordinary close cancels the timer.
        """
        proxy = make_proxy(idle_timeout=10)
        c = proxy.open()
        c.down.readConnectionLost()
        c.up.readConnectionLost()
        lose(c.down)
        lose(c.up)
        self.assertEqual(proxy.clock.getDelayedCalls(), [])

    def test_aborts_stuck_close(self) -> None:
        """
        A graceful close that does not complete (a peer that never reads
        what is buffered for it) is aborted by the idle timeout.
        """
        proxy = make_proxy(idle_timeout=10)
        c = proxy.open()
        lose(c.up, ConnectionLost)
        self.assertTrue(c.down_transport.disconnecting)
        self.assertFalse(c.down_transport.disconnected)
        proxy.clock.advance(10)
        self.assertTrue(c.down_transport.disconnected)


class FilterTests(unittest.SynchronousTestCase):
    """
    Network filters on the data path.
    """

    def test_hook_order(self) -> None:
        """
        C{connection_made} and C{downstream_data} run in chain order,
        C{upstream_data} in reverse, C{connection_closed} in chain order
        once both sides are gone; the filters see the upstream address once
        connected.
        """
        calls: list[tuple[str, str, Any]] = []
        first = ScriptedFilterFactory("first", calls)
        second = ScriptedFilterFactory("second", calls)
        proxy = make_proxy(filters=(first, second))
        c = proxy.open()
        c.down.dataReceived(b"up")
        c.up.dataReceived(b"down")
        lose(c.down)
        lose(c.up)
        self.assertEqual(
            [(name, hook) for name, hook, arg in calls],
            [
                ("first", "connection_made"),
                ("second", "connection_made"),
                ("first", "downstream_data"),
                ("second", "downstream_data"),
                ("second", "upstream_data"),
                ("first", "upstream_data"),
                ("first", "connection_closed"),
                ("second", "connection_closed"),
            ],
        )
        [info] = first.connections
        self.assertEqual(info.listener_name, "tcp-in")
        self.assertEqual(info.downstream_address, CLIENT_ADDRESS)
        self.assertEqual(info.upstream_address, UPSTREAM_ADDRESS)

    def test_replace_downstream_data(self) -> None:
        """
        A downstream hook returning bytes replaces the chunk for later
        filters and the upstream.
        """
        calls: list[tuple[str, str, Any]] = []
        upper = ScriptedFilterFactory("upper", calls, {"downstream_data": bytes.upper})
        seen = ScriptedFilterFactory("seen", calls)
        c = make_proxy(filters=(upper, seen)).open()
        c.down.dataReceived(b"hello")
        self.assertEqual(c.up_transport.value(), b"HELLO")
        self.assertIn(("seen", "downstream_data", b"HELLO"), calls)

    def test_replace_upstream_data(self) -> None:
        """
        An upstream hook returning bytes replaces what the client gets; the
        stats count the bytes actually sent.
        """
        calls: list[tuple[str, str, Any]] = []
        double = ScriptedFilterFactory("double", calls, {"upstream_data": lambda d: d * 2})
        proxy = make_proxy(filters=(double,))
        c = proxy.open()
        c.up.dataReceived(b"ab")
        self.assertEqual(c.down_transport.value(), b"abab")
        lose(c.down)
        lose(c.up)
        self.assertEqual(proxy.stats[0].bytes_sent, 4)

    def test_empty_bytes_swallow(self) -> None:
        """
        A hook returning C{b""} drops the chunk; later filters do not see it.
        """
        calls: list[tuple[str, str, Any]] = []
        drop = ScriptedFilterFactory("drop", calls, {"downstream_data": lambda d: b""})
        after = ScriptedFilterFactory("after", calls)
        c = make_proxy(filters=(drop, after)).open()
        c.down.dataReceived(b"secret")
        self.assertEqual(c.up_transport.value(), b"")
        self.assertNotIn(("after", "downstream_data", b"secret"), calls)
        self.assertNotIn(("after", "downstream_data", b""), calls)

    def test_close_on_downstream_data(self) -> None:
        """
        C{CLOSE} from a data hook closes both sides; the offending chunk and
        anything later are not relayed.
        """
        calls: list[tuple[str, str, Any]] = []
        guard = ScriptedFilterFactory(
            "guard", calls, {"downstream_data": lambda d: CLOSE if b"DROP" in d else None}
        )
        c = make_proxy(filters=(guard,)).open()
        c.down.dataReceived(b"fine;")
        c.down.dataReceived(b"DROP TABLE")
        c.down.dataReceived(b"more")
        c.up.dataReceived(b"late")
        self.assertEqual(c.up_transport.value(), b"fine;")
        self.assertEqual(c.down_transport.value(), b"")
        self.assertTrue(c.down_transport.disconnecting)
        self.assertTrue(c.up_transport.disconnecting)

    def test_close_on_upstream_data(self) -> None:
        """
        C{CLOSE} from an upstream hook closes both sides too.
        """
        calls: list[tuple[str, str, Any]] = []
        guard = ScriptedFilterFactory("guard", calls, {"upstream_data": lambda d: CLOSE})
        c = make_proxy(filters=(guard,)).open()
        c.up.dataReceived(b"leak")
        self.assertEqual(c.down_transport.value(), b"")
        self.assertTrue(c.down_transport.disconnecting)
        self.assertTrue(c.up_transport.disconnecting)

    def test_close_on_connection_made(self) -> None:
        """
        C{CLOSE} from C{connection_made} refuses the connection: no upstream
        is picked, and the filter still hears C{connection_closed}.
        """
        calls: list[tuple[str, str, Any]] = []
        refuse = ScriptedFilterFactory("refuse", calls, {"connection_made": lambda c: CLOSE})
        later = ScriptedFilterFactory("later", calls)
        proxy = make_proxy(filters=(refuse, later))
        c = proxy.accept()
        self.assertTrue(c.down_transport.disconnecting)
        self.assertEqual(proxy.picked, [])
        lose(c.down)
        self.assertEqual(
            [(name, hook) for name, hook, arg in calls],
            [("refuse", "connection_made"), ("refuse", "connection_closed")],
        )
        self.assertEqual(len(proxy.stats), 1)

    def test_hook_error_fails_closed(self) -> None:
        """
        A hook that raises is logged and closes the connection: the chunk
        is not relayed unfiltered.
        """
        calls: list[tuple[str, str, Any]] = []
        broken = ScriptedFilterFactory("broken", calls, {"downstream_data": lambda d: 1 // 0})
        c = make_proxy(filters=(broken,)).open()
        c.down.dataReceived(b"data")
        self.assertEqual(c.up_transport.value(), b"")
        self.assertTrue(c.up_transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_asynchronous_result_fails_closed(self) -> None:
        """
        Network filters are synchronous: a L{Deferred} (or coroutine)
        result is an error that closes the connection.
        """

        async def later(data: bytes) -> bytes:
            return data

        for answer in (lambda d: Deferred(), later):
            calls: list[tuple[str, str, Any]] = []
            slow = ScriptedFilterFactory("slow", calls, {"upstream_data": answer})
            c = make_proxy(filters=(slow,)).open()
            c.up.dataReceived(b"data")
            self.assertEqual(c.down_transport.value(), b"")
            self.assertTrue(c.down_transport.disconnecting)

    def test_wrong_result_type_fails_closed(self) -> None:
        """
        A result that is none of C{None}, C{bytes} or C{CLOSE} closes.
        """
        calls: list[tuple[str, str, Any]] = []
        text = ScriptedFilterFactory("text", calls, {"downstream_data": lambda d: d.decode()})
        c = make_proxy(filters=(text,)).open()
        c.down.dataReceived(b"data")
        self.assertEqual(c.up_transport.value(), b"")
        self.assertTrue(c.up_transport.disconnecting)

    def test_create_filter_error(self) -> None:
        """
        A factory that cannot build its filter refuses the connection.
        """

        class Unbuildable(ScriptedFilterFactory):
            def create_filter(self, config: Any, connection: Any) -> ScriptedFilter:
                raise LookupError("no such policy")

        factory = Unbuildable("unbuildable", [])
        proxy = make_proxy(filters=(factory,))
        c = proxy.accept()
        self.assertTrue(c.down_transport.disconnecting)
        self.assertEqual(proxy.picked, [])
        self.assertEqual(len(self.flushLoggedErrors(LookupError)), 1)


class WireTransport(FileDescriptor):
    """
    Twisted's own write buffering and producer handling (L{FileDescriptor})
    over a pretend socket that accepts C{room} more bytes.
    """

    def __init__(self, reactor: MemoryReactor, peer: IPv4Address) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.room = 0
        self.wire: list[bytes] = []
        self._peer = peer

    def writeSomeData(self, data: bytes) -> int:
        taken = min(len(data), self.room)
        self.wire.append(bytes(data[:taken]))
        self.room -= taken
        return taken

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 15001)


class TwistedTransportTests(unittest.SynchronousTestCase):
    """
    The session against Twisted's real transport logic, where closing with
    a paused streaming producer still registered never completes.
    """

    def test_close_after_upstream_lost_while_paused(self) -> None:
        """
        The upstream is lost while a slow client has it paused; once the
        client catches up, the downstream finishes closing.
        """
        memory = MemoryReactor()
        proxy = make_proxy()
        down = WireTransport(memory, CLIENT_ADDRESS)
        up = WireTransport(memory, UPSTREAM_ADDRESS)
        c = proxy.accept(down)
        proxy.connect_upstream(c, up)
        c.up.dataReceived(b"x" * 100_000)
        self.assertTrue(down.producerPaused)
        self.assertNotIn(up, memory.getReaders())

        # What Twisted does on a reset: the transport stops its producer,
        # then tells its protocol.
        up.connectionLost(Failure(ConnectionLost()))
        lose(c.up, ConnectionLost)
        down.room = 10**6

        self.assertIs(down.doWrite(), CONNECTION_DONE)
        self.assertEqual(b"".join(down.wire), b"x" * 100_000)


class InMemoryEndpointTests(unittest.SynchronousTestCase):
    """
    The proxy with a real L{TCP4ClientEndpoint} on a L{MemoryReactorClock},
    as the proxy service builds it, pumped with L{iosim}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.listenTCP(9000, Factory.forProtocol(Echo))
        self.stats: list[TCPConnectionStats] = []
        self.factory = TCPProxyFactory(
            listener_name="tcp-in",
            pick_endpoint=lambda: UPSTREAM,
            connector=lambda ep: TCP4ClientEndpoint(self.reactor, ep.host, ep.port, timeout=5),
            clock=self.reactor,
            idle_timeout=30,
            on_connection_closed=self.stats.append,
        )
        self.client = Collector()
        server = self.factory.buildProtocol(CLIENT_ADDRESS)
        self.downstream = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            self.client,
            iosim.makeFakeClient(self.client),
            clock=self.reactor,
        )

    def test_round_trip(self) -> None:
        """
        Bytes sent before and after the upstream connects are echoed back.
        """
        self.client.transport.write(b"before ")
        self.downstream.flush()
        upstream = iosim.ConnectionCompleter(self.reactor).succeedOnce()
        assert upstream is not None
        self.client.transport.write(b"after")
        for _ in range(3):
            self.downstream.flush()
            upstream.flush()
        self.assertEqual(self.client.received(), b"before after")

        self.client.transport.loseConnection()
        for _ in range(3):
            self.downstream.flush()
            upstream.flush()
        self.assertEqual(self.stats[0].bytes_received, 12)
        self.assertEqual(self.stats[0].bytes_sent, 12)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connection_refused(self) -> None:
        """
        A refused upstream connection closes the client's connection.
        """
        iosim.ConnectionCompleter(self.reactor).failOnce()
        self.downstream.flush()
        self.assertTrue(self.client.lost.called)
        self.assertEqual(self.client.received(), b"")
        self.assertEqual(self.stats[0].response_flags, ("UF",))


# Loopback doubles.


class Echo(Protocol):
    """
    Writes back what it reads; closes after end-of-file.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Echo):
    """
    L{Echo} that reports end-of-file instead of being closed by it, and then
    closes, so the proxy sees the half-close travel both ways.
    """

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Collector(Protocol):
    """
    Keeps what it reads; C{lost} fires when the connection is gone.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def received(self) -> bytes:
        return b"".join(self.chunks)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class ChunkSource:
    """
    Deterministic, distinct 64 KiB chunks: a reordered, lost or repeated
    chunk changes the digest.
    """

    size = 64 * 1024

    def __init__(self) -> None:
        self._base = random.Random(1234).randbytes(self.size)

    def chunk(self, index: int) -> bytes:
        return struct.pack(">Q", index) + self._base[8:]


@implementer(IPushProducer)
class BulkSender:
    """
    Writes C{total} bytes to a transport as fast as its consumer allows,
    then closes; counts how often it was told to pause.
    """

    def __init__(self, transport: Any, total: int) -> None:
        self.transport = transport
        self.total = total
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.done = False
        self.digest = hashlib.sha256()
        self._source = ChunkSource()

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        # Bounded by total: each turn sends one more chunk.
        while not self.paused and not self.done and self.sent < self.total:
            chunk = self._source.chunk(self.sent // ChunkSource.size)
            self.digest.update(chunk)
            self.sent += len(chunk)
            self.transport.write(chunk)
        if self.sent >= self.total and not self.done:
            self.done = True
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.done = True


class Sink(Protocol):
    """
    Counts and hashes what it reads; may start with reading paused.
    """

    def __init__(self, paused: bool = False) -> None:
        self.start_paused = paused
        self.count = 0
        self.digest = hashlib.sha256()
        self.made: Deferred[Sink] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.start_paused:
            self.transport.pauseProducing()
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class SendingClient(Protocol):
    """
    A client that sends with a L{BulkSender} once connected.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.sender: BulkSender | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.sender = BulkSender(self.transport, self.total)
        self.sender.start()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


def buffered(transport: Any) -> int:
    """
    Bytes waiting in a Twisted TCP transport's user-space write buffer.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class LoopbackTests(unittest.TestCase):
    """
    Real sockets on 127.0.0.1: client -> proxy -> upstream.
    """

    timeout = 60

    def setUp(self) -> None:
        # Everything each test opened must be seen closed before it ends,
        # or trial reports a dirty reactor.
        self.upstream_lost: DeferredQueue[Any] = DeferredQueue()
        self.closed: DeferredQueue[TCPConnectionStats] = DeferredQueue()
        self.accepted: list[Protocol] = []

    def listen(self, factory: Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def upstream(self, build: Callable[[], Protocol]) -> int:
        """
        Listen with C{build}'s protocols; each one's loss is queued.
        """
        test = self

        class Tracked(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                protocol = build()
                lost = protocol.connectionLost

                def connection_lost(reason: Failure) -> None:
                    lost(reason)
                    test.upstream_lost.put(None)

                protocol.connectionLost = connection_lost  # type: ignore[method-assign]
                return protocol

        return self.listen(Tracked())

    def proxy(self, upstream_port: int, idle_timeout: float = 60) -> int:
        factory = TCPProxyFactory(
            listener_name="tcp-in",
            pick_endpoint=lambda: Endpoint("127.0.0.1", upstream_port),
            connector=lambda ep: TCP4ClientEndpoint(reactor, ep.host, ep.port, timeout=5),
            clock=reactor,
            idle_timeout=idle_timeout,
            on_connection_closed=self.closed.put,
        )
        build = factory.buildProtocol

        def record(addr: Any) -> Protocol:
            protocol = build(addr)
            self.accepted.append(protocol)
            return protocol

        factory.buildProtocol = record  # type: ignore[method-assign]
        return self.listen(factory)

    def connect(self, port: int, protocol: Protocol) -> Deferred[Protocol]:
        return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)

    @defer.inlineCallbacks
    def test_echo(self) -> Any:
        """
        A megabyte goes through the proxy to an echo server and back intact,
        and the stats count it both ways.
        """
        payload = b"".join(ChunkSource().chunk(i) for i in range(16))
        port = self.proxy(self.upstream(HalfCloseEcho))

        class Client(Collector):
            def connectionMade(self) -> None:
                self.transport.write(payload)

            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                if sum(map(len, self.chunks)) >= len(payload):
                    self.transport.loseConnection()

        client = Client()
        yield self.connect(port, client)
        yield client.lost
        stats = yield self.closed.get()
        yield self.upstream_lost.get()
        self.assertEqual(client.received(), payload)
        self.assertEqual(stats.bytes_received, len(payload))
        self.assertEqual(stats.bytes_sent, len(payload))
        self.assertEqual(stats.response_flags, ())
        self.assertTrue(stats.upstream_connected)

    @defer.inlineCallbacks
    def test_client_half_close(self) -> Any:
        """
        A client that shuts down its write side still gets the answer the
        upstream writes after seeing end-of-file.
        """
        request = b"q" * 100_000

        @implementer(IHalfCloseableProtocol)
        class Answerer(Protocol):
            def __init__(self) -> None:
                self.count = 0

            def dataReceived(self, data: bytes) -> None:
                self.count += len(data)

            def readConnectionLost(self) -> None:
                self.transport.write(b"read %d bytes until EOF" % (self.count,))
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:
                pass

        class Client(Collector):
            def connectionMade(self) -> None:
                self.transport.write(request)
                self.transport.loseWriteConnection()

        port = self.proxy(self.upstream(Answerer))
        client = Client()
        yield self.connect(port, client)
        yield client.lost
        stats = yield self.closed.get()
        yield self.upstream_lost.get()
        self.assertEqual(client.received(), b"read 100000 bytes until EOF")
        self.assertEqual(stats.bytes_received, len(request))

    @defer.inlineCallbacks
    def test_upstream_half_close(self) -> Any:
        """
        An upstream that speaks first and shuts down its write side still
        hears what the client sends after getting end-of-file.
        """
        heard: Deferred[bytes] = Deferred()

        @implementer(IHalfCloseableProtocol)
        class Greeter(Protocol):
            def __init__(self) -> None:
                self.chunks: list[bytes] = []

            def connectionMade(self) -> None:
                self.transport.write(b"hello; your turn")
                self.transport.loseWriteConnection()

            def dataReceived(self, data: bytes) -> None:
                self.chunks.append(data)

            def readConnectionLost(self) -> None:
                heard.callback(b"".join(self.chunks))
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:
                pass

        @implementer(IHalfCloseableProtocol)
        class Client(Collector):
            def readConnectionLost(self) -> None:
                self.transport.write(b"reply after EOF")
                self.transport.loseWriteConnection()

            def writeConnectionLost(self) -> None:
                # Both halves are done; Twisted leaves the close to us.
                self.transport.loseConnection()

        port = self.proxy(self.upstream(Greeter))
        client = Client()
        yield self.connect(port, client)
        got = yield heard
        yield client.lost
        yield self.closed.get()
        yield self.upstream_lost.get()
        self.assertEqual(client.received(), b"hello; your turn")
        self.assertEqual(got, b"reply after EOF")

    @defer.inlineCallbacks
    def test_upstream_refused(self) -> Any:
        """
        With nothing listening upstream the client's connection is closed
        with nothing sent, and the stats say C{UF}.
        """
        dead = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        dead_port = dead.getHost().port
        yield dead.stopListening()
        port = self.proxy(dead_port)
        client = Collector()
        yield self.connect(port, client)
        yield client.lost
        stats = yield self.closed.get()
        self.assertEqual(client.received(), b"")
        self.assertEqual(stats.response_flags, ("UF",))

    @defer.inlineCallbacks
    def wait_for_stall(self, sender: BulkSender, proxy_transport: Any) -> Any:
        """
        Wait until C{sender} is paused, the proxy has stopped reading from
        it (C{proxy_transport} paused its producer), and no byte moved for
        ten polls in a row.

        @return: the most bytes seen in the proxy's write buffer.
        """
        stable = 0
        last = -1
        most = 0
        # Bounded: 1000 polls of 10 ms each.
        for _ in range(1000):
            yield deferLater(reactor, 0.01, lambda: None)
            most = max(most, buffered(proxy_transport))
            if sender.done:
                self.fail(f"all {sender.sent} bytes were sent: nothing pushed back")
            if sender.paused and proxy_transport.producerPaused and sender.sent == last:
                stable += 1
                if stable >= 10:
                    return most
            else:
                stable = 0
            last = sender.sent
        self.fail(f"no stall after {sender.sent} bytes")

    @defer.inlineCallbacks
    def test_backpressure_download(self) -> Any:
        """
        While the client does not read, the proxy stops reading from the
        upstream, which then stops sending; the proxy's buffer stays small.
        When the client reads again all 64 MiB arrive intact.
        """
        total = 64 * 1024 * 1024
        senders: list[BulkSender] = []

        class Source(Protocol):
            def connectionMade(self) -> None:
                sender = BulkSender(self.transport, total)
                senders.append(sender)
                sender.start()

        port = self.proxy(self.upstream(Source))
        client = Sink(paused=True)
        yield self.connect(port, client)
        # The upstream connection is made after the client's.
        for _ in range(1000):
            if senders:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        [sender] = senders
        proxy_to_client = self.accepted[0].transport

        most = yield self.wait_for_stall(sender, proxy_to_client)

        self.assertLess(sender.sent, total)
        self.assertGreater(sender.pauses, 0)
        self.assertLessEqual(most, 512 * 1024)
        self.assertLessEqual(buffered(proxy_to_client), 512 * 1024)

        client.transport.resumeProducing()
        yield client.lost
        stats = yield self.closed.get()
        yield self.upstream_lost.get()
        self.assertEqual(client.count, total)
        self.assertEqual(client.digest.hexdigest(), sender.digest.hexdigest())
        self.assertEqual(stats.bytes_sent, total)

    @defer.inlineCallbacks
    def test_upstream_reset_while_client_slow(self) -> Any:
        """
        If the upstream resets while the proxy is holding it back for a slow
        client, the client still gets everything the proxy took, and then
        its connection is closed.
        """
        total = 64 * 1024 * 1024
        senders: list[BulkSender] = []

        class Source(Protocol):
            def connectionMade(self) -> None:
                sender = BulkSender(self.transport, total)
                senders.append(sender)
                sender.start()

        port = self.proxy(self.upstream(Source))
        client = Sink(paused=True)
        yield self.connect(port, client)
        for _ in range(1000):
            if senders:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        [sender] = senders
        yield self.wait_for_stall(sender, self.accepted[0].transport)

        sender.transport.abortConnection()
        yield self.upstream_lost.get()
        # The proxy is not reading from the upstream (it is paused), so it
        # learns of the reset when it next writes there.
        client.transport.write(b"anyone there?")
        client.transport.resumeProducing()
        yield client.lost
        stats = yield self.closed.get()
        self.assertEqual(client.count, stats.bytes_sent)
        self.assertLess(client.count, total)

    test_upstream_reset_while_client_slow.timeout = 20  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_backpressure_upload(self) -> Any:
        """
        The same the other way: an upstream that does not read stops the
        client sending, and then gets all 32 MiB intact.
        """
        total = 32 * 1024 * 1024
        sinks: list[Sink] = []

        def paused_sink() -> Sink:
            sink = Sink(paused=True)
            sinks.append(sink)
            return sink

        port = self.proxy(self.upstream(paused_sink))
        client = SendingClient(total)
        yield self.connect(port, client)
        for _ in range(1000):
            if sinks:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        [sink] = sinks
        yield sink.made
        assert client.sender is not None
        # The proxy's upstream transport is not public; reach it through the
        # session the downstream protocol belongs to.
        proxy_to_upstream = self.accepted[0]._session._up.transport

        most = yield self.wait_for_stall(client.sender, proxy_to_upstream)

        self.assertLess(client.sender.sent, total)
        self.assertLessEqual(most, 512 * 1024)

        sink.transport.resumeProducing()
        yield client.lost
        yield self.closed.get()
        yield self.upstream_lost.get()
        self.assertEqual(sink.count, total)
        self.assertEqual(sink.digest.hexdigest(), client.sender.digest.hexdigest())


class ServiceDrainTests(unittest.TestCase):
    """
    A proxy's shutdown waits for its TCP listeners' sessions up to the
    drain timeout, then aborts those still open.
    """

    timeout = 30

    CONFIG = """
        listeners:
          - name: tcp
            address: "tcp:0:interface=127.0.0.1"
            protocol: tcp
            cluster: echo
        clusters:
          - {name: echo, endpoints: [{address: 127.0.0.1, port: {echo}}]}
    """

    @defer.inlineCallbacks
    def start(self) -> Any:
        from twisted.protocols.wire import Echo

        echo = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        h = ProxyHarness(self)
        yield h.start(self.CONFIG, echo=echo.getHost().port)
        client = yield raw_connect(self, h.port("tcp"))
        client.transport.write(b"ping")
        yield poll_until(lambda: defer.succeed(client.data == b"ping"), "the echo", 5)
        return h.service, client

    @defer.inlineCallbacks
    def test_waits_for_the_session(self) -> Any:
        service, client = yield self.start()
        stopped = service.stopService()
        yield sleep(0.3)
        self.assertNoResult(stopped)
        client.transport.loseConnection()
        yield stopped

    @defer.inlineCallbacks
    def test_aborts_after_the_drain_timeout(self) -> Any:
        service, client = yield self.start()
        stopped = service.stopService()
        yield sleep(0.3)
        self.assertNoResult(stopped)
        # ProxyHarness runs with a one-second drain timeout.
        yield stopped
        yield client.closed
