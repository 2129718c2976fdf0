"""
C{-r txmesh} (L{TxmeshReactor}) and the write coalescer: writes of one
reactor iteration leave in one send per transport.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.support import poll_until
from txmesh.proxy.write_coalescer import WriteCoalescer
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


class TxmeshReactorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = TxmeshReactor()
        self.addCleanup(self._close)

    def _close(self) -> None:
        self.reactor.removeAll()
        self.reactor._poller.close()

    def test_dispatches_ready_descriptors(self) -> None:
        """
        A poll calls C{doRead} of each ready descriptor, without Twisted's
        per-event logging context.
        """
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        seen: list[bytes] = []
        reader = _Reader(a, seen)
        self.reactor.addReader(reader)
        self.addCleanup(self.reactor.removeReader, reader)
        b.send(b"x")
        self.reactor.doPoll(5)
        self.assertEqual(seen, [b"x"])


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class WriteCoalescerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def connect(self) -> Any:
        """
        @return: a real TCP connection's server-side transport and the
            client protocol collecting what it receives.
        """
        accepted: list[Protocol] = []

        class Server(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Server))
        self.addCleanup(port.stopListening)
        client = _Collect()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        self.addCleanup(client.transport.loseConnection)
        yield poll_until(lambda: defer.succeed(accepted), "the accept", 5)
        self.addCleanup(accepted[0].transport.loseConnection)
        return accepted[0].transport, client

    @defer.inlineCallbacks
    def test_one_flush_per_iteration(self) -> Any:
        """
        Writes to a TCP transport wait in it for the one flush scheduled
        (C{callLater(0)}: the end of the reactor iteration), then leave
        together.
        """
        transport, client = yield self.connect()
        clock = Clock()
        write = WriteCoalescer(clock).writer_for(transport)
        write(b"one ")
        write(b"two")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        yield poll_until(lambda: defer.succeed(client.data == b"one two"), "the flushed bytes", 5)

    def test_other_transports_write_directly(self) -> None:
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        write = WriteCoalescer(Clock()).writer_for(transport)
        write(b"now")
        self.assertEqual(transport.value(), b"now")
