"""
A protocol that holds a new connection until its first bytes decide which
protocol serves it, then hands the connection over (the capture listener's
sniffing, the SNI router): the shared plumbing of the hand-off.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["HandOffProtocol"]


@implementer(IHalfCloseableProtocol)
class HandOffProtocol(Protocol):
    """
    Subclasses buffer what arrives until they know, then call
    L{hand_off}; from then on every event goes to the chosen protocol,
    half-closes included (a client that ends before anything was decided is
    closed).  C{_timer}, if set, is a pending decision deadline, cancelled
    on hand-off and on close.
    """

    _inner: Protocol | None = None
    _timer: Any = None

    def cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def hand_off(self, inner: Protocol, data: bytes) -> None:
        """
        Give the connection, and the bytes read so far, to C{inner}.
        """
        self.cancel_timer()
        self._inner = inner
        inner.makeConnection(self.transport)
        if data:
            inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self._inner, None)
        if half is not None:
            half.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self._inner, None)
        if half is not None:
            half.writeConnectionLost()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.cancel_timer()
        if self._inner is not None:
            self._inner.connectionLost(reason)
