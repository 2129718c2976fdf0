"""
Where a redirected connection was going: Linux's C{SO_ORIGINAL_DST}.

When netfilter C{REDIRECT}s a connection to the proxy's capture port (see
L{txmesh.capture.iptables}), the accepted socket's local address is the
proxy's; the destination the client asked for is kept by conntrack and read
back with C{getsockopt}:

  - IPv4: level C{SOL_IP} (0), option C{SO_ORIGINAL_DST} (80), a
    C{struct sockaddr_in} (16 bytes);
  - IPv6: level C{SOL_IPV6} (41), option C{IP6T_SO_ORIGINAL_DST} (80), a
    C{struct sockaddr_in6} (28 bytes).

An IPv6 socket may carry an IPv4 connection (a dual-stack listener, with
C{::ffff:a.b.c.d} peers); its original destination is asked at the IPv4
level.

Integration point: wrap a listener's factory in
L{OriginalDestinationFactory} (e.g. the L{txmesh.proxy.tcp.TCPProxyFactory}
of the outbound capture listener on 15001); its protocols' C{transport} then
answers L{original_destination} without another system call, and a
listener can pick its upstream by it (an C{ORIGINAL_DST} cluster, or the
matching outbound listener, as Envoy does).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

SOL_IP = 0
SOL_IPV6 = 41
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

_SOCKADDR_IN = struct.Struct("!2xH4s8x")
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")

# getsockopt errors that mean "no original destination here": no conntrack
# entry (ENOENT), no netfilter for this family (ENOPROTOOPT, EOPNOTSUPP), or
# not an IP socket at all.
_NOT_REDIRECTED = {errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSOCK}

_log = Logger()


def _socket_of(transport: Any) -> socket.socket | None:
    # TLS and other wrappers keep the TCP transport as their own .transport.
    for _ in range(8):
        if transport is None:
            return None
        handle = getattr(transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
    return None


def _ask(sock: socket.socket, level: int) -> tuple[str, int] | None:
    try:
        if level == SOL_IP:
            port, packed = _SOCKADDR_IN.unpack(sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size))
            return str(ipaddress.IPv4Address(packed)), port
        port, _, packed6, _ = _SOCKADDR_IN6.unpack(sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST,
                                                                   _SOCKADDR_IN6.size))
        return str(ipaddress.IPv6Address(packed6)), port
    except OSError as e:
        if e.errno in _NOT_REDIRECTED:
            return None
        raise
    except struct.error:
        return None


def _local(sock: socket.socket) -> tuple[str, int] | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    address = ipaddress.ip_address(name[0].split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), name[1]


def original_destination(transport: Any) -> tuple[str, int] | None:
    """
    The address a redirected connection was going to.

    @param transport: the transport of an accepted TCP connection (a
        Twisted C{tcp.Server}, a TLS transport over one, or the transport
        L{OriginalDestinationFactory} gives its protocols).
    @return: C{(host, port)} with C{host} a textual IPv4 or IPv6 address, or
        C{None} if the connection was not redirected (its original
        destination is the local address itself, or conntrack does not know
        it), or the transport has no IP socket.
    @raise OSError: C{getsockopt} failed for another reason.
    """
    known = getattr(transport, "original_destination", _UNKNOWN)
    if known is not _UNKNOWN:
        return known
    sock = _socket_of(transport)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    found = None
    if sock.family == socket.AF_INET6:
        found = _ask(sock, SOL_IPV6)
    if found is None:
        found = _ask(sock, SOL_IP)  # also an IPv4 connection on a dual-stack socket
    if found is None or found == _local(sock):
        return None
    return found


_UNKNOWN: Any = object()


@implementer(IHalfCloseableProtocol)
class _OriginalDestinationProtocol(ProtocolWrapper):
    """
    Looks the original destination up once, when the connection is made, and
    keeps it as C{original_destination} (the wrapped protocol's transport is
    this object).
    """

    original_destination: tuple[str, int] | None = None
    _refused = False

    def makeConnection(self, transport: Any) -> None:
        self.original_destination = original_destination(transport)
        if self.original_destination is None and self.factory.require:
            # The wrapped protocol never sees it: no upstream is picked for it.
            self._refused = True
            self.transport = transport
            self.connected = 1
            _log.info("closing a connection to {listener} that was not redirected (no original destination)",
                      listener=self.factory.name)
            transport.loseConnection()
            return
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().dataReceived(data)

    def readConnectionLost(self) -> None:
        # End-of-file is passed on to a protocol that can half-close (an L4
        # relay); any other is closed, as its TCP transport would close it.
        half = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if half is not None and not self._refused:
            half.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if half is not None and not self._refused:
            half.writeConnectionLost()

    def connectionLost(self, reason: Any = None) -> None:
        if self._refused:
            self.connected = 0
            return
        super().connectionLost(reason)


class OriginalDestinationFactory(WrappingFactory):
    """
    Wraps a listener's factory so that each protocol's C{transport} carries
    C{original_destination}: the C{(host, port)} the client asked for before
    C{REDIRECT}, or C{None}.

    @ivar require: close connections that were not redirected (a client
        connecting to the capture port directly would otherwise make the
        proxy call itself).
    @ivar name: the listener's name, for logs.
    """

    protocol = _OriginalDestinationProtocol

    def __init__(self, wrappedFactory: Factory, require: bool = False, name: str = "") -> None:
        """
        @param wrappedFactory: the listener's factory.
        @param require: see L{require}.
        @param name: see L{name}.
        """
        super().__init__(wrappedFactory)
        self.require = require
        self.name = name
