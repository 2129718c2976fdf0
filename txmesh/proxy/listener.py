"""
HTTP listeners: one port, both HTTP versions.

A connection's first bytes decide its codec: the HTTP/2 connection preface
(prior knowledge, C{h2c}) or ALPN C{h2} on TLS selects
L{HTTP2ServerProtocol}; anything else is HTTP/1.x.  The sniffing protocol
then forwards the connection's events to the chosen codec.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from txmesh.proxy.connection_manager import HTTPConnectionManager
from txmesh.proxy.http1_server import HTTP1ServerFactory, HTTP1ServerProtocol
from txmesh.proxy.http2 import PREFACE, parse_h2c_upgrade
from txmesh.proxy.http2_server import HTTP2ServerProtocol
from txmesh.proxy.overload import SHED_REQUESTS
from txmesh.proxy.tls import negotiated_protocol

# How much of a request head is looked at for an h2c upgrade.
_UPGRADE_HEAD_LIMIT = 16 * 1024


def sniff(data: bytes) -> str | None:
    """
    @param data: the first bytes a client sent.
    @return: C{"h2"} for the HTTP/2 preface, C{"http/1.1"} for anything
        else, or C{None} while C{data} is a proper prefix of the preface.
    """
    n = min(len(data), len(PREFACE))
    if data[:n] != PREFACE[:n]:
        return "http/1.1"
    return "h2" if len(data) >= len(PREFACE) else None


class _SniffingProtocol(Protocol):
    """
    Holds a new connection until its protocol is known, then hands every
    event to the codec.
    """

    def __init__(self) -> None:
        self._inner: Any = None
        self._buffer = b""
        self._timer: Any = None
        self._pending = False

    def connectionMade(self) -> None:
        # Counted against the listener's max_connections until the codec,
        # which counts itself, is chosen.
        self._pending = True
        self.factory.pending += 1
        if negotiated_protocol(self.transport) == b"h2":
            self._choose(HTTP2ServerProtocol())
            return
        manager: HTTPConnectionManager = self.factory.manager
        timeout = manager.listener.request_headers_timeout or manager.listener.idle_timeout
        if timeout > 0:
            self._timer = manager.clock.callLater(timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        inner = self._inner
        if inner is not None:
            inner.dataReceived(data)
            return
        data = self._buffer + data
        # With TLS, ALPN is known once application data flows.
        if negotiated_protocol(self.transport) == b"h2":
            kind: str | None = "h2"
        else:
            kind = sniff(data)
        if kind is None:
            self._buffer = data
            return
        # h2c is HTTP/2 over cleartext only (RFC 7540 3.2).
        if (kind == "http/1.1" and self.factory.manager.listener.tls is None
                and b"h2c" in data[:_UPGRADE_HEAD_LIMIT].lower()):
            if b"\r\n\r\n" not in data and len(data) < _UPGRADE_HEAD_LIMIT:
                self._buffer = data  # maybe an upgrade: wait for the whole head
                return
            upgrade = parse_h2c_upgrade(data, self.factory.manager.listener.scheme)
            if upgrade is not None:
                self._buffer = b""
                head, settings, rest = upgrade
                self._choose(HTTP2ServerProtocol(upgrade=(head, settings)))
                if rest:
                    self._inner.dataReceived(rest)
                return
        self._buffer = b""
        self._choose(HTTP2ServerProtocol() if kind == "h2" else HTTP1ServerProtocol())
        self._inner.dataReceived(data)

    def _choose(self, inner: Protocol) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._no_longer_pending()
        # HTTP/2 sees the listener through a view that leaves overload out
        # of draining (see HTTPListenerFactory.overload_changed).
        inner.factory = _HTTP2View(self.factory) if isinstance(inner, HTTP2ServerProtocol) else self.factory
        self._inner = inner
        # The codec talks to the transport directly; a TCP transport also
        # delivers to it directly from now on, other transports (TLS)
        # through this protocol.
        transport = self.transport
        if isinstance(transport, tcp.Connection) and transport.protocol is self:
            transport.protocol = inner
        inner.makeConnection(transport)

    def _timed_out(self) -> None:
        self._timer = None
        if self._inner is None:
            self.transport.loseConnection()

    def _no_longer_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.factory.pending -= 1

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._no_longer_pending()
        if self._inner is not None:
            self._inner.connectionLost(reason)


class HTTPListenerFactory(HTTP1ServerFactory):
    """
    Accepts HTTP/1.x and HTTP/2 clients for one listener.

    @ivar manager: the current L{HTTPConnectionManager}; replaced on reload.
    @ivar draining: when true, HTTP/1 responses carry C{Connection: close}
        and HTTP/2 connections get a GOAWAY; both end after the streams in
        flight.
    @ivar connections: the open codec protocols (of either version).
    @ivar drain_requested: L{drain} was called (C{draining} may also be
        set by the overload manager).
    """

    protocol = _SniffingProtocol
    # What TLS listeners offer in ALPN (see ProxyService._tls_options).
    alpn_protocols = (b"h2", b"http/1.1")

    def __init__(self, manager: HTTPConnectionManager):
        super().__init__(manager)
        self.drain_requested = False
        overload = manager.proxy.overload
        if overload is not None:
            overload.subscribe(self)

    def drain(self) -> None:
        self.drain_requested = True
        super().drain()

    def overload_changed(self, state: int) -> None:
        """
        The overload manager's state changed (see L{txmesh.proxy.overload}).

        While requests are shed, HTTP/1 responses close their connection
        (keep-alive off): C{draining} is set, without closing idle
        connections as a drain does.  HTTP/2 connections are left open (no
        GOAWAY): their new streams get C{503 OL}, which costs less than
        every client reconnecting.
        """
        self.draining = self.drain_requested or state >= SHED_REQUESTS


class _HTTP2View:
    """
    A listener's factory as one HTTP/2 connection sees it: C{draining} only
    when the listener drains, not while overloaded.
    """

    __slots__ = ("_factory",)

    def __init__(self, factory: Any):
        """
        @param factory: the connection's factory: an L{HTTPListenerFactory},
            or a capture listener's view of one.
        """
        self._factory = factory

    @property
    def manager(self) -> HTTPConnectionManager:
        return self._factory.manager

    @property
    def draining(self) -> bool:
        factory = self._factory
        return getattr(factory, "drain_requested", factory.draining)

    def connection_opened(self, protocol: Any) -> None:
        self._factory.connection_opened(protocol)

    def connection_closed(self, protocol: Any) -> None:
        self._factory.connection_closed(protocol)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)
