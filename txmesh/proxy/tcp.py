"""
The L4 (opaque TCP) proxy: each accepted downstream connection is paired
with one upstream connection and bytes are relayed both ways, through the
listener's network filters.

The relay keeps TCP's semantics end to end:

  - I{backpressure}: each side's transport is registered as the streaming
    producer of the other, so a slow reader on one side stops the proxy
    reading from the other side, and the proxy holds at most about one
    transport buffer (Twisted's is 64 KiB) plus one read per direction;
  - I{half-close}: end-of-file read from one side shuts down only the write
    half of the other, so request/response protocols that signal the end
    of a request with C{shutdown(SHUT_WR)} keep working; the connection is
    closed once both directions have seen end-of-file;
  - I{idle timeout}: a connection on which no byte moved in either
    direction for C{idle_timeout} seconds is aborted.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.config.model import Endpoint, FilterConfig
from txmesh.filters.api import CLOSE, CONTINUE, ConnectionInfo, INetworkFilter
from txmesh.proxy.open_set import OpenSet

NO_HEALTHY_UPSTREAM = "UH"
"""
Response flag: the load balancer had no endpoint to offer.
"""

UPSTREAM_CONNECTION_FAILURE = "UF"
"""
Response flag: connecting to the chosen upstream failed.
"""

DOWNSTREAM_CONNECTION_TERMINATION = "DC"
"""
Response flag: the downstream went away before the upstream connected.
"""

IDLE_TIMEOUT = "SI"
"""
Response flag: the connection was aborted by the idle timeout.
"""


@attrs.frozen
class TCPConnectionStats:
    """
    What happened on one proxied connection, reported once it is closed.

    Byte counts are taken on the downstream socket, as Envoy's
    C{%BYTES_RECEIVED%} and C{%BYTES_SENT%} are: after network filters
    for bytes sent, before them for bytes received.

    @ivar listener_name: the listener that accepted the connection.
    @ivar downstream_address: the client's address (an L{IAddress}).
    @ivar upstream_endpoint: the endpoint chosen by the load balancer, or
        C{None} if none was chosen.
    @ivar upstream_connected: whether the upstream connection was made.
    @ivar bytes_received: bytes read from the downstream client.
    @ivar bytes_sent: bytes written to the downstream client.
    @ivar start_time: C{clock.seconds()} when the downstream was accepted.
    @ivar duration: seconds from acceptance until both sides were closed.
    @ivar response_flags: Envoy-style flags (C{UH}, C{UF}, C{DC}, C{SI})
        explaining an abnormal end; empty for an ordinary close.
    """

    listener_name: str
    downstream_address: Any
    upstream_endpoint: Endpoint | None
    upstream_connected: bool
    bytes_received: int
    bytes_sent: int
    start_time: float
    duration: float
    response_flags: tuple[str, ...] = ()


class TCPProxyFactory(ServerFactory):
    """
    Builds one L4 proxy session per accepted downstream connection.

    Network filters are synchronous: their hooks must return C{None} (or
    L{CONTINUE}), C{bytes} or L{CLOSE} right away.  Pausing a byte stream
    on a L{Deferred} would need its own buffering and flow control; a
    filter that needs to wait (an external authorization call, say) belongs
    at L7.  A hook that raises, or returns anything else (a L{Deferred} or
    a coroutine included), closes the connection: a broken filter must not
    let traffic through unfiltered.

    Order: C{connection_made} and C{downstream_data} run in chain order,
    C{upstream_data} in reverse chain order (as Envoy's write filters and
    txmesh's HTTP response hooks do, so the filter nearest the client sees
    upstream bytes last), C{connection_closed} in chain order.  A data hook
    that returns C{b""} swallows the chunk: later filters do not see it.
    """

    def __init__(
        self,
        *,
        listener_name: str,
        pick_endpoint: Callable[[], Endpoint | None],
        connector: Callable[[Endpoint], IStreamClientEndpoint],
        clock: IReactorTime,
        idle_timeout: float,
        filters: Sequence[FilterConfig] = (),
        on_connection_closed: Callable[[TCPConnectionStats], None] | None = None,
        observer: Any = None,
        sessions: OpenSet[_ProxySession] | None = None,
    ) -> None:
        """
        @param listener_name: the listener's name, for logs, stats and
            L{ConnectionInfo}.
        @param pick_endpoint: the cluster's load balancer, called once per
            connection; C{None} means no healthy upstream, and the
            downstream connection is closed at once.
        @param connector: turns the chosen endpoint into a client endpoint
            to connect with.  The connect timeout lives here, e.g.
            C{lambda ep: TCP4ClientEndpoint(reactor, ep.host, ep.port,
            timeout=cluster.connect_timeout)}; tests may pass in-memory
            endpoints.
        @param clock: the clock the idle timeout runs on.
        @param idle_timeout: seconds without a byte moving in either
            direction before the connection is aborted; C{0} disables it.
            The timer starts when the upstream connects (the connect
            timeout bounds the wait before that).
        @param filters: the listener's network filters, in chain order;
            each C{factory.create_filter(config, connection_info)} must
            return an L{INetworkFilter}.
        @param on_connection_closed: called with a L{TCPConnectionStats}
            once both sides of a connection are closed.
        @param observer: metrics hooks (e.g.
            L{txmesh.observability.metrics.TCPListenerMetrics}), or C{None}:
            C{observer.connection_opened(connection)} when a downstream
            connection is accepted, C{observer.connection_secured(connection)}
            (if the observer has it) once a TLS downstream's handshake is
            done, and C{observer.connection_closed(connection, stats)} once
            it is closed, where C{connection} has C{bytes_received} and
            C{bytes_sent} (so far) and C{downstream_transport}, and C{stats}
            is the L{TCPConnectionStats}.
        @param sessions: where sessions are kept while open (a shutdown
            waits for them, then calls their C{abort}), or C{None}.

        @raise ValueError: if C{idle_timeout} is negative.
        """
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must be >= 0 seconds, not {idle_timeout!r}")
        self.listener_name = listener_name
        self.pick_endpoint = pick_endpoint
        self.connector = connector
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.filters = tuple(filters)
        self.on_connection_closed = on_connection_closed
        self.observer = observer
        self.sessions = sessions

    def buildProtocol(self, addr: IAddress) -> Protocol:
        """
        @return: the downstream protocol of a new proxy session.
        """
        session = _ProxySession(self)
        if self.sessions is not None:
            self.sessions.add(session)
        protocol = session.downstream_protocol
        protocol.factory = self
        return protocol


class _State(enum.Enum):
    # Downstream accepted; the upstream is not connected yet and reading
    # from the downstream is paused.
    CONNECTING = "connecting"
    # Both sides connected; bytes flow (perhaps in one direction only,
    # after a half-close).
    OPEN = "open"
    # Both sides are being closed; bytes are no longer relayed.
    CLOSING = "closing"
    # Both sides are gone and the stats were reported.
    CLOSED = "closed"


@attrs.define(eq=False)
class _Side:
    """
    One side (downstream or upstream) of a session.

    @ivar hooks: the filter hooks that bytes read from this side pass
        through, as C{(filter name, bound hook)} pairs.
    @ivar bytes_read: bytes read from this side's peer.
    @ivar bytes_written: bytes written to this side's peer.
    @ivar has_producer: whether the other side's transport is registered as
        this transport's producer.
    """

    name: str
    hooks: list[tuple[str, Callable[[bytes], Any]]] = attrs.Factory(list)
    transport: ITransport | None = None
    read_closed: bool = False
    lost: bool = False
    has_producer: bool = False
    bytes_read: int = 0
    bytes_written: int = 0

    def release_producer(self) -> None:
        """
        Unregister this transport's producer.

        Needed before closing our write half: a Twisted transport whose
        buffer drains while its streaming producer is paused resumes the
        producer instead of finishing a pending close, so the close would
        never happen.
        """
        if self.has_producer and self.transport is not None:
            self.has_producer = False
            self.transport.unregisterProducer()

    def shutdown_write(self) -> None:
        """
        Send end-of-file to this side's peer once buffered bytes are written.
        """
        if self.transport is None or self.lost:
            return
        self.release_producer()
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is None:
            # No half-close on this transport: a full close is the nearest
            # thing that still delivers end-of-file.
            self.transport.loseConnection()
        else:
            lose_write()

    def close(self, abort: bool) -> None:
        """
        Close this side: flush buffered bytes first unless C{abort}.
        """
        if self.transport is None or self.lost:
            return
        if abort:
            abort_connection = getattr(self.transport, "abortConnection", None)
            if abort_connection is not None:
                abort_connection()
                return
        self.release_producer()
        self.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class _PeerProtocol(Protocol):
    """
    The protocol on one side of a session: a shell that hands every event
    to the session.
    """

    def __init__(self, session: _ProxySession, side: _Side) -> None:
        self._session = session
        self._side = side

    def connectionMade(self) -> None:
        self._session.side_connected(self._side, self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._session.data_received(self._side, data)

    def readConnectionLost(self) -> None:
        self._session.read_closed(self._side)

    def writeConnectionLost(self) -> None:
        self._session.write_closed(self._side)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._session.side_lost(self._side, reason)


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class _DownstreamProtocol(_PeerProtocol):
    """
    The downstream side's protocol, which also hears when a TLS listener's
    handshake is done (the peer's certificate can be read then).

    Only the downstream side: Twisted's client endpoints wrap the upstream
    protocol in one that re-declares its interfaces one at a time with
    C{directlyProvides}, keeping only the last, so an upstream protocol
    providing L{IHandshakeListener} would lose L{IHalfCloseableProtocol}.
    """

    def handshakeCompleted(self) -> None:
        # Only under TLS (TLSMemoryBIOProtocol calls it once).
        self._session.downstream_secured()


class _ProxySession:
    """
    One downstream connection, its upstream connection, and the filters,
    timer and counters that belong to them.

    Calls into code that is not ours (the load balancer, the connector,
    filters, the stats callback) catch every L{Exception}: a bug there is
    logged and ends this one connection instead of escaping into the
    reactor, and a failing filter closes the connection rather than let
    bytes pass unfiltered.
    """

    _log = Logger()

    def __init__(self, factory: TCPProxyFactory) -> None:
        self._factory = factory
        self._clock = factory.clock
        self._idle_timeout = factory.idle_timeout
        self._state = _State.CONNECTING
        self._down = _Side("downstream")
        self._up = _Side("upstream")
        self.downstream_protocol = _DownstreamProtocol(self, self._down)
        self._info: ConnectionInfo | None = None
        self._filters: list[tuple[str, INetworkFilter]] = []
        self._endpoint: Endpoint | None = None
        self._connecting: Deferred[Any] | None = None
        # Bytes the downstream sent before the upstream connected; only
        # possible with transports that ignore pauseProducing.
        self._pending: list[bytes] = []
        self._flags: list[str] = []
        self._start_time = 0.0
        # Instead of resetting a timer for every chunk, the timer checks the
        # time of the last activity when it fires and re-arms itself.
        self._last_activity = 0.0
        self._idle_call: IDelayedCall | None = None

    @property
    def bytes_received(self) -> int:
        """
        Bytes read from the downstream client so far.
        """
        return self._down.bytes_read

    @property
    def bytes_sent(self) -> int:
        """
        Bytes written to the downstream client so far.
        """
        return self._down.bytes_written

    @property
    def downstream_transport(self) -> ITransport | None:
        """
        The downstream client's transport (a TLS one on a TLS listener, to
        read the peer's certificate from), or C{None} before it connected.
        """
        return self._down.transport

    # Events from the two protocols.

    def downstream_secured(self) -> None:
        factory = self._factory
        secured = getattr(factory.observer, "connection_secured", None)
        if secured is not None:
            try:
                secured(self)
            except Exception:  # noqa: BLE001 (see _ProxySession)
                self._log.failure("{listener}: metrics observer failed", listener=factory.listener_name)

    def side_connected(self, side: _Side, transport: ITransport) -> None:
        if side is self._down:
            self._downstream_connected(transport)
        else:
            self._upstream_connected(transport)

    def data_received(self, side: _Side, data: bytes) -> None:
        side.bytes_read += len(data)
        if self._state is _State.OPEN:
            self._relay(side, data)
        elif self._state is _State.CONNECTING:
            self._pending.append(data)

    def read_closed(self, side: _Side) -> None:
        # A transport resumed after end-of-file reports end-of-file again.
        if side.read_closed:
            return
        side.read_closed = True
        if self._state is _State.OPEN:
            self._relay_eof(side)

    def write_closed(self, side: _Side) -> None:
        self._log.debug(
            "{listener}: end-of-file sent to {side}",
            listener=self._factory.listener_name,
            side=side.name,
        )

    def side_lost(self, side: _Side, reason: Failure) -> None:
        if side.lost:
            return
        side.lost = True
        if self._state is _State.CONNECTING:
            self._flags.append(DOWNSTREAM_CONNECTION_TERMINATION)
        # One side gone means the session is over; the other side still
        # gets what was already relayed to it.
        self._close(abort=False)
        if self._down.lost and (self._up.transport is None or self._up.lost):
            self._finish()

    # Opening.

    def _downstream_connected(self, transport: ITransport) -> None:
        factory = self._factory
        self._down.transport = transport
        self._start_time = self._clock.seconds()
        if factory.observer is not None:
            try:
                factory.observer.connection_opened(self)
            except Exception:  # noqa: BLE001 (see _ProxySession)
                self._log.failure("{listener}: metrics observer failed", listener=factory.listener_name)
        # Nothing may be read from the client until there is somewhere to
        # send it; buffering it instead would defeat backpressure.
        transport.pauseProducing()
        self._info = ConnectionInfo(
            listener_name=factory.listener_name,
            downstream_address=transport.getPeer(),
        )
        if not self._start_filters():
            self._close(abort=False)
            return
        try:
            endpoint = factory.pick_endpoint()
        except Exception:  # noqa: BLE001 (see _ProxySession)
            self._log.failure(
                "{listener}: load balancer failed", listener=factory.listener_name
            )
            endpoint = None
        if endpoint is None:
            self._log.warn(
                "{listener}: no healthy upstream for {downstream}",
                listener=factory.listener_name,
                downstream=self._info.downstream_address,
            )
            self._flags.append(NO_HEALTHY_UPSTREAM)
            self._close(abort=False)
            return
        self._endpoint = endpoint
        upstream_protocol = _PeerProtocol(self, self._up)
        try:
            connecting = connectProtocol(factory.connector(endpoint), upstream_protocol)
        except Exception:  # noqa: BLE001 (see _ProxySession)
            connecting = Deferred()
            connecting.errback(Failure())
        # Stored before callbacks are added: an endpoint may fire at once.
        self._connecting = connecting
        connecting.addCallbacks(self._connect_succeeded, self._connect_failed)

    def _start_filters(self) -> bool:
        """
        Build the filters and run their C{connection_made} hooks.

        @return: whether the connection may proceed.
        """
        assert self._info is not None
        for config in self._factory.filters:
            try:
                network_filter = config.factory.create_filter(config.config, self._info)
            except Exception:  # noqa: BLE001 (see _ProxySession)
                self._log.failure(
                    "{listener}: network filter {filter} could not be built",
                    listener=self._factory.listener_name,
                    filter=config.name,
                )
                return False
            self._filters.append((config.name, network_filter))
            try:
                verdict = network_filter.connection_made(self._info)
            except Exception:  # noqa: BLE001 (see _ProxySession)
                self._log.failure(
                    "{listener}: network filter {filter} failed in connection_made",
                    listener=self._factory.listener_name,
                    filter=config.name,
                )
                return False
            if verdict is CLOSE:
                self._log.info(
                    "{listener}: network filter {filter} refused {downstream}",
                    listener=self._factory.listener_name,
                    filter=config.name,
                    downstream=self._info.downstream_address,
                )
                return False
            if verdict is not None and verdict is not CONTINUE:
                self._log.error(
                    "{listener}: network filter {filter} returned {verdict!r} from"
                    " connection_made; expected None, CONTINUE or CLOSE",
                    listener=self._factory.listener_name,
                    filter=config.name,
                    verdict=verdict,
                )
                return False
        self._down.hooks = [(name, f.downstream_data) for name, f in self._filters]
        self._up.hooks = [(name, f.upstream_data) for name, f in reversed(self._filters)]
        return True

    def _connect_succeeded(self, protocol: object) -> None:
        self._connecting = None

    def _connect_failed(self, reason: Failure) -> None:
        self._connecting = None
        if self._state is not _State.CONNECTING:
            # We cancelled it because the session is already closing.
            return
        self._log.warn(
            "{listener}: connecting to upstream {endpoint} failed: {reason}",
            listener=self._factory.listener_name,
            endpoint=str(self._endpoint),
            reason=reason.getErrorMessage(),
        )
        self._flags.append(UPSTREAM_CONNECTION_FAILURE)
        self._close(abort=False)

    def _upstream_connected(self, transport: ITransport) -> None:
        if self._state is not _State.CONNECTING:
            # The downstream left and the endpoint ignored cancellation.
            abort = getattr(transport, "abortConnection", transport.loseConnection)
            abort()
            return
        self._connecting = None
        self._state = _State.OPEN
        down, up = self._down, self._up
        up.transport = transport
        assert self._info is not None and down.transport is not None
        self._info.upstream_address = transport.getPeer()
        self._log.debug(
            "{listener}: {downstream} connected to upstream {endpoint}",
            listener=self._factory.listener_name,
            downstream=self._info.downstream_address,
            endpoint=str(self._endpoint),
        )
        # Each transport stops reading whenever the other one's write
        # buffer is full: end-to-end backpressure in both directions.
        down.transport.registerProducer(transport, True)
        down.has_producer = True
        transport.registerProducer(down.transport, True)
        up.has_producer = True
        if self._idle_timeout > 0:
            self._last_activity = self._clock.seconds()
            self._idle_call = self._clock.callLater(self._idle_timeout, self._idle_check)
        pending, self._pending = self._pending, []
        for data in pending:
            if self._state is not _State.OPEN:
                return
            self._relay(down, data)
        if self._state is not _State.OPEN:
            return
        if down.read_closed:
            self._relay_eof(down)
        else:
            down.transport.resumeProducing()

    # Relaying.

    def _relay(self, source: _Side, data: bytes) -> None:
        if self._idle_call is not None:
            self._last_activity = self._clock.seconds()
        if source.hooks:
            verdict = self._run_hooks(source, data)
            if verdict is CLOSE:
                self._close(abort=False)
                return
            data = verdict
            if not data:
                return
        target = self._up if source is self._down else self._down
        target.bytes_written += len(data)
        assert target.transport is not None
        target.transport.write(data)

    def _run_hooks(self, source: _Side, data: bytes) -> Any:
        """
        Pass C{data} through C{source}'s filter hooks.

        @return: the bytes to relay, or L{CLOSE}.
        """
        for name, hook in source.hooks:
            try:
                verdict = hook(data)
            except Exception:  # noqa: BLE001 (see _ProxySession)
                self._log.failure(
                    "{listener}: network filter {filter} failed on {side} data",
                    listener=self._factory.listener_name,
                    filter=name,
                    side=source.name,
                )
                return CLOSE
            if verdict is None or verdict is CONTINUE:
                continue
            if type(verdict) is bytes:
                data = verdict
                if not data:
                    return data
                continue
            if verdict is CLOSE:
                self._log.info(
                    "{listener}: network filter {filter} closed the connection",
                    listener=self._factory.listener_name,
                    filter=name,
                )
                return CLOSE
            synchronous = not (isinstance(verdict, Deferred) or inspect.isawaitable(verdict))
            self._log.error(
                "{listener}: network filter {filter} returned {verdict!r} on {side}"
                " data; expected None, CONTINUE, bytes or CLOSE{hint}",
                listener=self._factory.listener_name,
                filter=name,
                side=source.name,
                verdict=verdict,
                hint="" if synchronous else " (network filters are synchronous)",
            )
            if inspect.iscoroutine(verdict):
                verdict.close()
            return CLOSE
        return data

    def _relay_eof(self, source: _Side) -> None:
        target = self._up if source is self._down else self._down
        if self._down.read_closed and self._up.read_closed:
            # Both directions are finished: nothing more can flow.
            self._close(abort=False)
        else:
            target.shutdown_write()

    # Closing.

    def _idle_check(self) -> None:
        self._idle_call = None
        now = self._clock.seconds()
        deadline = self._last_activity + self._idle_timeout
        if now < deadline:
            self._idle_call = self._clock.callLater(deadline - now, self._idle_check)
            return
        self._log.info(
            "{listener}: {downstream} idle for {timeout}s, closing",
            listener=self._factory.listener_name,
            downstream=self._info.downstream_address if self._info else None,
            timeout=self._idle_timeout,
        )
        self._flags.append(IDLE_TIMEOUT)
        # Abort, not close: a peer that stopped reading would otherwise keep
        # a graceful close waiting for its buffer to drain forever.
        self._close(abort=True)

    def _close(self, abort: bool) -> None:
        """
        Close both sides (flushing buffered bytes unless C{abort}); once
        both are lost, L{_finish} runs.
        """
        if self._state is _State.CLOSED:
            return
        if self._state is not _State.CLOSING:
            self._state = _State.CLOSING
            self._pending = []
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        # The idle timer stays armed while closing so a peer that never
        # drains its buffer cannot hold a graceful close open forever.
        self._down.close(abort)
        self._up.close(abort)

    def abort(self) -> None:
        """
        End the session now, both sides, without flushing.
        """
        self._close(abort=True)

    def _finish(self) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._factory.sessions is not None:
            self._factory.sessions.discard(self)
        if self._idle_call is not None:
            if self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
        for name, network_filter in self._filters:
            try:
                network_filter.connection_closed()
            except Exception:  # noqa: BLE001 (see _ProxySession)
                self._log.failure(
                    "{listener}: network filter {filter} failed in connection_closed",
                    listener=self._factory.listener_name,
                    filter=name,
                )
        stats = TCPConnectionStats(
            listener_name=self._factory.listener_name,
            downstream_address=self._info.downstream_address if self._info else None,
            upstream_endpoint=self._endpoint,
            upstream_connected=self._up.transport is not None,
            bytes_received=self._down.bytes_read,
            bytes_sent=self._down.bytes_written,
            start_time=self._start_time,
            duration=self._clock.seconds() - self._start_time,
            response_flags=tuple(self._flags),
        )
        self._log.debug(
            "{listener}: closed {downstream}: received {stats.bytes_received}"
            " bytes, sent {stats.bytes_sent} bytes in {stats.duration:.3f}s"
            " {stats.response_flags}",
            listener=self._factory.listener_name,
            downstream=stats.downstream_address,
            stats=stats,
        )
        observer = self._factory.observer
        if observer is not None:
            try:
                observer.connection_closed(self, stats)
            except Exception:  # noqa: BLE001 (see _ProxySession)
                self._log.failure("{listener}: metrics observer failed", listener=self._factory.listener_name)
        callback = self._factory.on_connection_closed
        if callback is not None:
            try:
                callback(stats)
            except Exception:  # noqa: BLE001 (see _ProxySession)
                self._log.failure(
                    "{listener}: on_connection_closed callback failed",
                    listener=self._factory.listener_name,
                )
