"""
Listening with C{SO_REUSEPORT}, so the worker processes of
C{twistd txmesh-proxy --concurrency N} each bind every listener's port
themselves and the kernel spreads new connections between them.

Each worker binds on its own, so listeners the config adds at any time
(a reload) open in every worker with no help from the parent.  Only TCP
listeners on a fixed port can be shared this way: L{shared_address_error}
says why another address cannot.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.tcp import makeBinding
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP server endpoint whose socket has C{SO_REUSEPORT} (and
    C{SO_REUSEADDR}, as Twisted's own TCP ports) set before it binds.
    """

    def __init__(self, reactor: Any, port: int, backlog: int = 50, interface: str = ""):
        """
        @param reactor: provides C{IReactorTCP}.
        @param port: the port to bind (not 0: each process would get its
            own).
        @param interface: the address to bind, IPv4 or IPv6.
        """
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, factory: Any) -> defer.Deferred:
        binding = makeBinding(self._interface, self._port, reuseAddress=True, reusePort=True)
        return defer.execute(self._reactor.listenTCP, binding, factory, backlog=self._backlog,
                             interface=self._interface)


def _tcp_parts(endpoint: Any) -> tuple[int, int, str] | None:
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        return None
    # Twisted's TCP endpoints keep what they were parsed from privately;
    # these names have been stable since endpoints were added (10.1).
    return endpoint._port, endpoint._backlog, endpoint._interface


def shared_address_error(reactor: Any, address: str) -> str | None:
    """
    @param address: a listener's address (a server endpoint string).
    @return: why worker processes cannot share it, or C{None} if they can.
    """
    try:
        parts = _tcp_parts(serverFromString(reactor, address))
    except (ValueError, TypeError, KeyError) as e:
        return f"not an endpoint string ({e})"
    if parts is None:
        return "only tcp: and tcp6: listeners can be shared by worker processes (SO_REUSEPORT)"
    if parts[0] == 0:
        return "port 0 would give each worker process a different port; name a port"
    return None


def listener_endpoint(reactor: Any, address: str, reuse_port: bool = False) -> Any:
    """
    @param address: a listener's address (a server endpoint string).
    @param reuse_port: bind with C{SO_REUSEPORT} (a TCP address only).
    @return: the endpoint to listen on C{address} with.
    @raise ValueError: C{reuse_port} and an address that cannot have it.
    """
    endpoint = serverFromString(reactor, address)
    if not reuse_port:
        return endpoint
    parts = _tcp_parts(endpoint)
    if parts is None:
        raise ValueError(f"{address}: {shared_address_error(reactor, address)}")
    port, backlog, interface = parts
    return ReusePortEndpoint(reactor, port, backlog, interface)
