"""
C{-r txmesh} (L{TxmeshReactor}): lean dispatch, and the writes of one
reactor iteration leave in one send per transport, before the next poll,
without registering the socket for writability unless the kernel's buffer
is full.

The reactor under test is a private instance driven by hand over real
loopback sockets (L{_Loop}), not trial's global reactor.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial import unittest

from txmesh.reactor import TxmeshReactor


class _Reader:
    """
    A readable descriptor for a L{TxmeshReactor}: one end of a socket pair.
    """

    def __init__(self, sock: socket.socket, seen: list[bytes]):
        self._sock = sock
        self._seen = seen

    def fileno(self) -> int:
        return self._sock.fileno()

    def doRead(self) -> None:
        self._seen.append(self._sock.recv(100))

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "reader"


class _Writer(_Reader):
    """
    A connected descriptor that asks to write; its C{doWrite} runs
    C{on_write} and then stops writing, as a transport that sent everything.
    """

    connected = True

    def __init__(self, reactor: TxmeshReactor, sock: socket.socket, on_write: Any = None):
        super().__init__(sock, [])
        self._reactor = reactor
        self._on_write = on_write
        self.writes = 0

    def doWrite(self) -> None:
        self.writes += 1
        if self._on_write is not None:
            self._on_write()
        self._reactor.removeWriter(self)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class _Loop:
    """
    A private L{TxmeshReactor}, iterated by hand, with one real loopback TCP
    connection: C{server} (the accepted side's protocol) and C{client}.
    """

    def __init__(self, case: unittest.TestCase):
        self.reactor = reactor = TxmeshReactor()
        case.addCleanup(self.close)
        self.server: Protocol | None = None
        loop = self

        class Server(_Collect):
            def connectionMade(self) -> None:
                loop.server = self

        port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
        self._port = port
        self.client = _Collect()
        factory = ClientFactory.forProtocol(lambda: self.client)
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        self.until(lambda: self.server is not None and self.client.transport is not None
                   and self.client.transport.connected)

    def close(self) -> None:
        for selectable in self.reactor.removeAll():
            if selectable is not self._port:
                selectable.socket.close()
        self._port.socket.close()
        self.reactor._poller.close()

    def turn(self) -> None:
        """
        One iteration of the reactor's main loop.
        """
        self.reactor.runUntilCurrent()
        self.reactor.doPoll(0.01)

    def until(self, condition: Any, turns: int = 500) -> None:
        for _ in range(turns):
            if condition():
                return
            self.turn()
        raise AssertionError("condition not reached")


class DispatchTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = TxmeshReactor()
        self.addCleanup(self._close)

    def _close(self) -> None:
        self.reactor.removeAll()
        self.reactor._poller.close()

    def socketpair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return a, b

    def test_dispatches_ready_descriptors(self) -> None:
        """
        A poll calls C{doRead} of each ready descriptor, without Twisted's
        per-event logging context.
        """
        a, b = self.socketpair()
        seen: list[bytes] = []
        reader = _Reader(a, seen)
        self.reactor.addReader(reader)
        self.addCleanup(self.reactor.removeReader, reader)
        b.send(b"x")
        self.reactor.doPoll(5)
        self.assertEqual(seen, [b"x"])

    def test_pending_writer_is_not_polled(self) -> None:
        """
        A connected descriptor asking to write waits in the reactor, not in
        C{epoll}; the reactor still lists it; removing it before the poll
        means it is never called.
        """
        a, _ = self.socketpair()
        writer = _Writer(self.reactor, a)
        self.reactor.addWriter(writer)
        self.reactor.addWriter(writer)
        self.assertNotIn(a.fileno(), self.reactor._writes)
        self.assertIn(writer, self.reactor.getWriters())
        self.reactor.removeWriter(writer)
        self.assertNotIn(writer, self.reactor.getWriters())
        self.reactor.doPoll(0)
        self.assertEqual(writer.writes, 0)

    def test_unconnected_writer_goes_to_epoll(self) -> None:
        """
        A descriptor that is not connected (a client waiting to learn
        whether its connect succeeded) is registered for writability at once.
        """
        a, _ = self.socketpair()
        writer = _Writer(self.reactor, a)
        writer.connected = False
        self.reactor.addWriter(writer)
        self.assertIn(a.fileno(), self.reactor._writes)
        self.reactor.doPoll(5)
        self.assertEqual(writer.writes, 1)
        self.assertNotIn(a.fileno(), self.reactor._writes)

    def test_removeAll_includes_pending(self) -> None:
        a, _ = self.socketpair()
        writer = _Writer(self.reactor, a)
        self.reactor.addWriter(writer)
        self.assertIn(writer, self.reactor.removeAll())
        self.assertEqual(self.reactor.getWriters(), [])

    def poll_timeouts(self) -> list[Any]:
        timeouts: list[Any] = []
        poll = self.reactor._poller.poll

        def recording(timeout: Any, *args: Any) -> Any:
            timeouts.append(timeout)
            return poll(0, *args)

        self.reactor._poller = _Poller(self.reactor._poller, recording)
        return timeouts

    def test_flush_scheduling_a_call_does_not_block(self) -> None:
        """
        A flush runs protocol code; a call it schedules is due before the
        timeout the main loop computed, so the poll waits no longer than it.
        """
        a, _ = self.socketpair()
        called: list[bool] = []
        writer = _Writer(self.reactor, a, lambda: self.reactor.callLater(0, called.append, True))
        self.reactor.addWriter(writer)
        timeouts = self.poll_timeouts()
        self.reactor.doPoll(None)
        self.assertEqual(writer.writes, 1)
        self.assertEqual(timeouts, [0])
        self.reactor.runUntilCurrent()
        self.assertEqual(called, [True])

    def test_flush_scheduling_nothing_keeps_timeout(self) -> None:
        """
        A flush that schedules nothing leaves the poll the timeout the main
        loop computed.
        """
        a, _ = self.socketpair()
        writer = _Writer(self.reactor, a)
        self.reactor.addWriter(writer)
        timeouts = self.poll_timeouts()
        self.reactor.doPoll(0.25)
        self.assertEqual(writer.writes, 1)
        self.assertEqual(timeouts, [0.25])

    def test_writer_added_by_flush_does_not_wait(self) -> None:
        """
        A descriptor written to by another's flush is sent on the next
        turn, and that poll does not wait.
        """
        a, b = self.socketpair()
        second = _Writer(self.reactor, b)
        first = _Writer(self.reactor, a, lambda: self.reactor.addWriter(second))
        self.reactor.addWriter(first)
        timeouts = self.poll_timeouts()
        self.reactor.doPoll(None)
        self.assertEqual((first.writes, second.writes), (1, 0))
        self.assertEqual(timeouts, [0])
        self.reactor.doPoll(None)
        self.assertEqual(second.writes, 1)
        self.assertEqual(timeouts, [0, -1])


class _Poller:
    """
    An C{epoll} object whose C{poll} is replaced, for recording timeouts.
    """

    def __init__(self, real: Any, poll: Any):
        self._real = real
        self.poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class BatchedWritesTests(unittest.TestCase):
    """
    Twisted's own TCP transports on a L{TxmeshReactor}, over real sockets.
    """

    def test_writes_of_an_iteration_leave_in_one_send(self) -> None:
        loop = _Loop(self)
        transport = loop.server.transport
        sends: list[int] = []
        send = transport.writeSomeData

        def counting(data: Any) -> Any:
            sends.append(len(data))
            return send(data)

        transport.writeSomeData = counting
        transport.write(b"one ")
        transport.writeSequence([b"two ", b"three"])
        self.assertEqual(sends, [])
        self.assertNotIn(transport.fileno(), loop.reactor._writes)
        loop.until(lambda: loop.client.data == b"one two three")
        self.assertEqual(sends, [13])
        # Everything went: the socket was never registered for writability.
        self.assertNotIn(transport.fileno(), loop.reactor._writes)
        self.assertNotIn(transport, loop.reactor.getWriters())

    def test_full_socket_buffer_waits_for_writability(self) -> None:
        """
        What the kernel does not take at the flush waits in C{epoll} the
        usual way, and arrives whole.
        """
        loop = _Loop(self)
        transport = loop.server.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        blob = bytes(range(256)) * 4096
        transport.write(blob)
        loop.turn()
        self.assertIn(transport.fileno(), loop.reactor._writes)
        loop.until(lambda: len(loop.client.data) == len(blob), turns=5000)
        self.assertEqual(loop.client.data, blob)
        loop.turn()
        self.assertNotIn(transport.fileno(), loop.reactor._writes)

    def test_lose_connection_after_write(self) -> None:
        """
        C{loseConnection} after a write: the bytes arrive, then the close.
        """
        loop = _Loop(self)
        loop.server.transport.write(b"last words")
        loop.server.transport.loseConnection()
        loop.until(lambda: loop.client.lost)
        self.assertEqual(loop.client.data, b"last words")
        self.assertTrue(loop.server.lost)

    def test_abort_drops_pending_write(self) -> None:
        """
        C{abortConnection} before the flush: nothing is sent, the
        transport leaves the pending set, the peer sees the connection end.
        """
        loop = _Loop(self)
        transport = loop.server.transport
        transport.write(b"never sent")
        transport.abortConnection()
        loop.until(lambda: loop.client.lost)
        self.assertEqual(loop.client.data, b"")
        self.assertNotIn(transport, loop.reactor.getWriters())


class ProxyReactorTests(unittest.TestCase):
    def test_installed_reactor_is_kept(self) -> None:
        """
        The plugin's C{txmesh-proxy} uses the reactor twistd installed
        (C{-r}); it installs L{TxmeshReactor} only when none is.
        """
        from twisted.internet import reactor

        from twisted.plugins.txmesh_plugins import _proxy_reactor

        self.assertIs(_proxy_reactor(), reactor)
