"""
Opening one upstream connection for a pool, in cleartext or over TLS, with
a L{Deferred} that fires with the connected protocol.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure


class UpstreamConnectError(Exception):
    """
    Connecting to the chosen endpoint failed or timed out (Envoy's C{UF}).
    """


class ConnectFactory(ClientFactory):
    """
    Builds one upstream connection of C{protocol_class} for C{pool}.

    The protocol calls L{connected} from its C{connectionMade}.

    @ivar deferred: fires with the protocol once connected, or fails with
        L{UpstreamConnectError}; C{None} once it has fired (or been given up
        by the pool).
    """

    noisy = False

    def __init__(self, pool: Any, protocol_class: Any):
        self._pool = pool
        self._protocol_class = protocol_class
        self.deferred: Deferred | None = Deferred()

    def buildProtocol(self, addr: Any) -> Any:
        conn = self._protocol_class(self._pool, self._pool.endpoint)
        conn.factory = self
        return conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.errback(UpstreamConnectError(f"{self._pool.endpoint}: {reason.getErrorMessage()}"))

    def connected(self, conn: Any) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.callback(conn)


def connect(reactor: Any, host: str, port: int, factory: ClientFactory, timeout: float,
            tls_creator: Any = None) -> Any:
    """
    Connect to an upstream: over TLS when C{tls_creator} (from
    L{txmesh.proxy.tls.client_options}) is given, else in cleartext.

    @return: the connector.
    """
    if tls_creator is None:
        return reactor.connectTCP(host, port, factory, timeout=timeout)
    return reactor.connectSSL(host, port, factory, tls_creator, timeout=timeout)
