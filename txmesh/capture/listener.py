"""
The transparent capture listener: the outbound port (15001) that
C{txmesh iptables} redirects an app's connections to.

Each connection's first bytes are sniffed (L{txmesh.capture.sniff}), for at
most C{capture.sniff_timeout}:

  - HTTP/1.x or the HTTP/2 preface: the listener's HTTP codecs take the
    connection and its routes apply, by C{Host}, as on any outbound HTTP
    listener.  A request no route matches goes to the connection's
    original destination through a passthrough cluster (C{ALLOW_ANY}), or
    gets 502 with flag C{NR} (C{REGISTRY_ONLY}: Envoy's
    C{BlackHoleCluster}).
  - Anything else -- a TLS ClientHello (its SNI is logged), opaque bytes,
    or nothing at all before the timeout (a server-first protocol such as
    SMTP or MySQL) -- is relayed at L4 to the original destination
    (C{ALLOW_ANY}) or closed (C{REGISTRY_ONLY}).

L{OriginalDestinationFactory} (with C{require}) wraps L{CaptureFactory}, so
every protocol here knows its original destination.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.logger import Logger

from txmesh.capture.original_dst import original_destination
from txmesh.capture.sniff import HTTP, TLS, classify, server_name
from txmesh.config.model import DirectResponse, Route, RouteMatch
from txmesh.proxy.cluster import PASSTHROUGH_CLUSTER, passthrough_cluster_name
from txmesh.proxy.handoff import HandOffProtocol
from txmesh.proxy.listener import HTTPListenerFactory

BLACKHOLE_CLUSTER = "BlackHoleCluster"
"""
The name (as Istio's) under which C{REGISTRY_ONLY} refuses traffic.
"""

_log = Logger()


def default_route(mode: str, destination: tuple[str, int]) -> Route:
    """
    @param mode: C{ALLOW_ANY} or C{REGISTRY_ONLY}.
    @param destination: the connection's original C{(host, port)}.
    @return: the route of a captured request that no route matches.
    """
    if mode == "REGISTRY_ONLY":
        return Route(BLACKHOLE_CLUSTER, RouteMatch(),
                     direct_response=DirectResponse(502, b"no route to this destination in the mesh registry\n",
                                                    flag="NR"))
    host, port = destination
    # No timeout, as Istio's PassthroughCluster.
    return Route(f"{PASSTHROUGH_CLUSTER}|http", RouteMatch(), cluster=passthrough_cluster_name("http", host, port),
                 timeout=0.0)


class _CapturedHTTPFactory:
    """
    What the HTTP codecs of one captured connection see as their factory:
    the listener's, with routes that fall back to the connection's
    original destination.
    """

    def __init__(self, listener: HTTPListenerFactory, destination: tuple[str, int]) -> None:
        self._listener = listener
        self._destination = destination
        self._made_from: Any = None
        self._manager: Any = None

    @property
    def manager(self) -> Any:
        # The listener's manager is replaced on reload; follow it.
        current = self._listener.manager
        if current is not self._made_from:
            mode = current.listener.capture.mode if current.listener.capture is not None else "ALLOW_ANY"
            route = default_route(mode, self._destination)
            self._manager = current.with_default_route(lambda head: route)
            self._made_from = current
        return self._manager

    # Everything else (draining, connection bookkeeping, limits) is the
    # listener's own: read from it and written to it.

    def __getattr__(self, name: str) -> Any:
        return getattr(self._listener, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._listener, name, value)


class _CaptureProtocol(HandOffProtocol):
    """
    Holds a captured connection until its first bytes (or the sniff
    timeout) decide what it is, then hands it and every later event to the
    chosen protocol.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._destination: tuple[str, int] | None = None

    def connectionMade(self) -> None:
        self._destination = original_destination(self.transport)
        if self._destination is None:
            # Only without OriginalDestinationFactory(require=True) around us.
            self.transport.loseConnection()
            return
        self._timer = self.factory.clock.callLater(self.factory.sniff_timeout(), self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._destination is None:
            return
        self._buffer += data
        kind = classify(self._buffer)
        if kind is not None:
            self._decide(kind)

    def _timed_out(self) -> None:
        self._timer = None
        if self._inner is None:
            self._decide(None)

    def _decide(self, kind: str | None) -> None:
        self.cancel_timer()
        factory: CaptureFactory = self.factory
        assert self._destination is not None
        data, self._buffer = self._buffer, b""
        if kind == HTTP:
            http = factory.http()
            # The listener's own protocol: it tells HTTP/1.x from HTTP/2.
            inner: Protocol | None = http.protocol()
            inner.factory = _CapturedHTTPFactory(http, self._destination)
        else:
            sni = server_name(data) if kind == TLS else None
            inner = factory.relay(self._destination, kind, sni, self.transport.getPeer())
            if inner is None:
                self._destination = None  # what else comes is dropped
                self.transport.loseConnection()
                return
        self.hand_off(inner, data)


class CaptureFactory(ServerFactory):
    """
    The factory of a capture listener (wrap it in
    L{OriginalDestinationFactory <txmesh.capture.original_dst.OriginalDestinationFactory>}).

    @ivar http: returns the listener's current L{HTTPListenerFactory}.
    @ivar clock: what the sniff timeout runs on.
    """

    protocol = _CaptureProtocol
    noisy = False

    def __init__(self, http: Callable[[], HTTPListenerFactory], tcp: Callable[[tuple[str, int]], Factory],
                 clock: IReactorTime) -> None:
        """
        @param http: returns the listener's current L{HTTPListenerFactory}
            (its manager's C{listener.capture} is the capture config).
        @param tcp: makes the L4 relay (e.g. a
            L{TCPProxyFactory <txmesh.proxy.tcp.TCPProxyFactory>}) to an
            original destination.
        @param clock: see L{clock}.
        """
        self.http = http
        self._tcp = tcp
        self.clock = clock

    def _capture(self) -> Any:
        return self.http().manager.listener.capture

    def sniff_timeout(self) -> float:
        """
        @return: seconds a new connection has to show what it carries.
        """
        capture = self._capture()
        return capture.sniff_timeout if capture is not None else 0.1

    def relay(self, destination: tuple[str, int], kind: str | None, sni: str | None,
              peer: IAddress) -> Protocol | None:
        """
        @param destination: the connection's original C{(host, port)}.
        @param kind: what the first bytes were (C{tls}, C{opaque}), or
            C{None} if none came before the sniff timeout.
        @param sni: the server name of a TLS ClientHello, or C{None}.
        @param peer: the client's address, for the log.
        @return: the protocol relaying the connection at L4, or C{None} if
            it is to be closed (C{REGISTRY_ONLY}).
        """
        capture = self._capture()
        mode = capture.mode if capture is not None else "ALLOW_ANY"
        host, port = destination
        if mode == "REGISTRY_ONLY":
            _log.info("capture: closing {kind} connection from {peer} to {host}:{port} (sni {sni}): "
                      "REGISTRY_ONLY ({cluster})", kind=kind or "silent", peer=peer, host=host, port=port,
                      sni=sni, cluster=BLACKHOLE_CLUSTER)
            return None
        _log.info("capture: relaying {kind} connection from {peer} to {host}:{port} (sni {sni})",
                  kind=kind or "silent", peer=peer, host=host, port=port, sni=sni)
        return self._tcp(destination).buildProtocol(peer)
