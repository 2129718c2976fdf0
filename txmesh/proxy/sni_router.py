"""
L4 routing of TLS connections by the server name in their ClientHello,
without terminating TLS (a gateway's C{PASSTHROUGH} servers, Envoy's
C{tls_inspector} with filter chains matched on C{server_names}).

The protocol holds a new connection until its first TLS record is
complete, reads the SNI (L{txmesh.capture.sniff.server_name}), asks the
factory for the relay of the matching route, and hands it the connection
with the bytes read so far.  A client that sends no ClientHello within the
timeout, or one no route takes, is closed.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import Logger

from txmesh.capture.sniff import server_name
from txmesh.proxy.handoff import HandOffProtocol

__all__ = ["CLIENT_HELLO_LIMIT", "SNIRouterFactory", "client_hello_state"]

_log = Logger()

CLIENT_HELLO_LIMIT = 16 * 1024 + 5
"""
A TLS record is at most 16 KB: a ClientHello longer than that is not read.
"""


def client_hello_state(data: bytes) -> bool | None:
    """
    @return: C{True} once C{data} holds a whole first TLS record, C{False}
        if it cannot be a TLS handshake, C{None} while more bytes are
        needed.
    """
    if not data:
        return None
    if data[0] != 0x16 or (len(data) > 1 and data[1] != 0x03):
        return False
    if len(data) < 5:
        return None
    return True if len(data) >= 5 + int.from_bytes(data[3:5], "big") else None


class _SNIRoutingProtocol(HandOffProtocol):
    def __init__(self) -> None:
        self._buffer = b""
        self._closed = False

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._decide, None)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._closed:
            return
        self._buffer += data
        state = client_hello_state(self._buffer)
        if state is None and len(self._buffer) < CLIENT_HELLO_LIMIT:
            return
        self._decide(server_name(self._buffer) if state else None)

    def _decide(self, sni: str | None) -> None:
        self.cancel_timer()
        factory: SNIRouterFactory = self.factory
        relay = factory.route(sni)
        if relay is None:
            _log.info("{listener}: no route for TLS server name {sni} from {peer}; closed",
                      listener=factory.listener_name, sni=sni, peer=self.transport.getPeer())
            self._closed = True
            self._buffer = b""
            self.transport.loseConnection()
            return
        data, self._buffer = self._buffer, b""
        self.hand_off(relay.buildProtocol(self.transport.getPeer()), data)


class SNIRouterFactory(ServerFactory):
    """
    The factory of a C{tcp} listener with C{sni_routes}.

    @ivar route: C{route(sni)} returns the relay factory (e.g. a
        L{TCPProxyFactory <txmesh.proxy.tcp.TCPProxyFactory>}) for a
        connection whose ClientHello names C{sni} (C{None}: no SNI, or no
        ClientHello before the timeout), or C{None} to close it.
    @ivar clock: what the timeout runs on.
    @ivar timeout: seconds a client has to send its ClientHello.
    """

    protocol = _SNIRoutingProtocol
    noisy = False

    def __init__(self, route: Callable[[str | None], Factory | None], clock: IReactorTime,
                 timeout: float = 10.0, listener_name: str = "") -> None:
        self.route = route
        self.clock = clock
        self.timeout = timeout
        self.listener_name = listener_name
