"""
The client half of HTTP/2: upstream connections speaking h2c with prior
knowledge, one multiplexed connection per endpoint carrying many streams.

The router sees exactly what an HTTP/1.1 pooled connection offers
(L{txmesh.proxy.http1_client.HTTP1ClientConnection}): what the pool hands
out is an L{HTTP2Stream}, a handle on one exchange -- C{start},
C{send_data}, C{send_trailers}, C{set_request_producer}, C{abort} (a
RST_STREAM of that stream only) and C{IPushProducer} for response
backpressure (a paused stream stops acknowledging its data, so the
upstream's window for it closes).  L{HTTP2EndpointPool} replaces
L{txmesh.proxy.cluster.EndpointPool} for clusters with C{http2: true}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.exceptions import StreamClosedError
from h2.settings import Settings
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.config.model import ClusterConfig, Endpoint
from txmesh.proxy.connect import ConnectFactory, UpstreamConnectError, connect
from txmesh.proxy.http2 import (
    CONNECTION_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    GracefulH2Connection,
    StreamProtocolError,
    client_config,
    local_settings,
    request_to_h2,
    response_from_h2,
    trailers_from_h2,
    trailers_to_h2,
)
from txmesh.proxy.stream import Headers, RequestHead, ResponseFlag

# Keepalive of idle upstream connections (Envoy's connection_keepalive).
PING_INTERVAL = 30.0
PING_TIMEOUT = 10.0

log = Logger()

# Request bytes buffered per stream beyond the upstream's window before the
# downstream is paused.
STREAM_BUFFER_LIMIT = 1 << 20

_DEFAULT_WINDOW = 65535


@implementer(IPushProducer)
class HTTP2Stream:
    """
    One exchange on a multiplexed upstream connection: the interface of
    L{txmesh.proxy.http1_client.HTTP1ClientConnection} for one request.

    @ivar reused: the connection carried earlier streams, or the upstream
        refused this one unprocessed (either makes one retry safe).
    @ivar response_started: response bytes of this stream have arrived.
    """

    def __init__(self, connection: HTTP2ClientConnection):
        self.connection = connection
        self.endpoint = connection.endpoint
        self.reused = connection.requests_served > 0
        self.requests_served = connection.requests_served
        self.response_started = False
        self.stream_id = 0
        self._handler: Any = None
        self._request_done = False
        self._response_done = False
        self._released = False
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._end_pending = False
        self._trailers: list | None = None
        self._request_producer: Any = None
        self._producer_paused = False
        self._paused = False
        self._unacked = 0

    # The exchange

    def start(self, head: RequestHead, end_stream: bool, handler: Any) -> None:
        """
        Send a request head; the response will go to C{handler}.
        """
        conn = self.connection
        self._handler = handler
        self._request_done = end_stream
        if not conn.connected or conn.goaway:
            self._fail_unsent()
            return
        self.stream_id = conn.open_stream(self, request_to_h2(head), end_stream)

    def send_data(self, data: bytes, end_stream: bool) -> None:
        """
        Send a piece of the request body, as the upstream's windows allow.
        """
        if self._handler is None or self._end_pending:
            return
        if data:
            self._buffer.append(data)
            self._buffered += len(data)
        if end_stream:
            self._end_pending = True
        self.send_pending()
        self.connection.flush()

    def send_trailers(self, trailers: Headers) -> None:
        """
        End the request with trailers.
        """
        if self._handler is None or self._end_pending:
            return
        self._trailers = trailers_to_h2(trailers)
        self._end_pending = True
        self.send_pending()
        self.connection.flush()

    def set_request_producer(self, producer: Any) -> None:
        """
        Let this stream's send buffer pause the downstream reading.
        """
        self._request_producer = producer

    def abort(self) -> None:
        """
        Abandon the exchange: reset this stream only; the connection stays.
        """
        if self._handler is None and self._released:
            return
        self._handler = None
        self.connection.reset(self, ErrorCodes.CANCEL)
        self._release()

    # Request flow control

    def send_pending(self) -> None:
        conn = self.connection
        h2conn = conn.h2
        sid = self.stream_id
        if not sid or self._request_done or not conn.connected:
            return
        buffer = self._buffer
        try:
            while buffer:
                window = h2conn.local_flow_control_window(sid)
                if window <= 0:
                    break
                chunk = buffer[0]
                size = min(window, h2conn.max_outbound_frame_size, len(chunk))
                if size < len(chunk):
                    buffer[0] = chunk[size:]
                    chunk = chunk[:size]
                else:
                    buffer.popleft()
                self._buffered -= size
                last = not buffer and self._end_pending and self._trailers is None
                h2conn.send_data(sid, chunk, end_stream=last)
                if last:
                    self._request_done = True
            if not buffer and self._end_pending and not self._request_done:
                if self._trailers is not None:
                    h2conn.send_headers(sid, self._trailers, end_stream=True)
                else:
                    h2conn.end_stream(sid)
                self._request_done = True
        except (StreamClosedError, H2ProtocolError):
            buffer.clear()
            self._buffered = 0
            self._request_done = True
        producer = self._request_producer
        if producer is not None:
            if self._buffered > STREAM_BUFFER_LIMIT and not self._producer_paused:
                self._producer_paused = True
                producer.pauseProducing()
            elif self._buffered <= STREAM_BUFFER_LIMIT // 2 and self._producer_paused:
                self._producer_paused = False
                producer.resumeProducing()
        if self._request_done:
            self._maybe_done()

    # IPushProducer: the downstream's buffers throttle this stream.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            if self._unacked:
                n, self._unacked = self._unacked, 0
                self.connection.acknowledge(n, self.stream_id)
                self.connection.flush()

    def stopProducing(self) -> None:
        pass

    # Events from the connection

    def received_data(self, data: bytes, flow_controlled_length: int, end_stream: bool) -> None:
        handler = self._handler
        self.response_started = True
        if self._paused:
            self._unacked += flow_controlled_length
        else:
            self.connection.acknowledge(flow_controlled_length, self.stream_id)
        if end_stream:
            self._response_done = True
            self._maybe_done()
        if handler is not None:
            handler.response_data(data, end_stream)

    def received_head(self, header_list: list, end_stream: bool) -> None:
        handler = self._handler
        self.response_started = True
        try:
            head = response_from_h2(header_list)
        except StreamProtocolError as e:
            self.protocol_error(str(e))
            return
        if head.status < 200:
            if handler is not None:
                handler.response_informational(head)
            return
        if end_stream:
            self._response_done = True
            self._maybe_done()
        if handler is not None:
            handler.response_head(head, end_stream)

    def received_trailers(self, header_list: list) -> None:
        handler = self._handler
        try:
            trailers = trailers_from_h2(header_list)
        except StreamProtocolError as e:
            self.protocol_error(str(e))
            return
        self._response_done = True
        self._maybe_done()
        if handler is not None:
            handler.response_trailers(trailers)

    def received_end(self) -> None:
        if self._response_done:
            return
        handler = self._handler
        self._response_done = True
        self._maybe_done()
        if handler is not None:
            handler.response_data(b"", True)

    def protocol_error(self, reason: str) -> None:
        log.info("upstream {endpoint} HTTP/2 stream error: {reason}", endpoint=str(self.endpoint), reason=reason)
        handler, self._handler = self._handler, None
        self.connection.reset(self, ErrorCodes.PROTOCOL_ERROR)
        self._release()
        if handler is not None:
            handler.upstream_reset(ResponseFlag.UPSTREAM_PROTOCOL_ERROR, reason)

    def reset_by_upstream(self, error_code: int, reason: str) -> None:
        handler, self._handler = self._handler, None
        if error_code == ErrorCodes.REFUSED_STREAM and not self.response_started:
            # Not processed at all (RFC 9113 8.7): as safe to retry as a
            # stale keep-alive connection.
            self.reused = True
        self._release()
        if handler is not None:
            handler.upstream_reset(ResponseFlag.UPSTREAM_CONNECTION_TERMINATION, reason)

    def _fail_unsent(self) -> None:
        handler, self._handler = self._handler, None
        self.reused = True
        self._release()
        if handler is not None:
            handler.upstream_reset(ResponseFlag.UPSTREAM_CONNECTION_TERMINATION, "upstream connection closed")

    def _maybe_done(self) -> None:
        if not self._response_done:
            return
        if not self._request_done:
            # Answered before the whole request was sent: the rest of the
            # body is not wanted (RFC 9113 8.1: reset with NO_ERROR).
            self._buffer.clear()
            self._buffered = 0
            self._request_done = True
            self.connection.reset(self, ErrorCodes.NO_ERROR)
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        producer = self._request_producer
        self._request_producer = None
        if producer is not None and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self.connection.acknowledge(n, self.stream_id)
            # A release may come from the downstream side, outside the
            # connection's dataReceived (which flushes): the connection's
            # window must not wait for another stream's write.
            self.connection.flush()
        self.connection.stream_closed(self)


class HTTP2ClientConnection(Protocol):
    """
    One h2c connection to an upstream endpoint.

    @ivar streams: the exchanges in flight, by stream id.
    @ivar active: handles handed out and not yet released (streams opened
        or about to be).
    @ivar goaway: the upstream (or we) ended the connection for new streams.
    """

    def __init__(self, pool: HTTP2EndpointPool, endpoint: Endpoint):
        self._pool = pool
        self.endpoint = endpoint
        self.h2 = GracefulH2Connection(client_config())
        self.streams: dict[int, HTTP2Stream] = {}
        self.active = 0
        self.goaway = False
        self.connected = False
        self.requests_served = 0
        self.idle_since = 0.0
        self.settings_received = False
        self.ping_sent_at: float | None = None
        self.last_ping = 0.0
        self._write: Callable[[bytes], None] = lambda data: None

    @property
    def capacity(self) -> int:
        """
        @return: how many more streams the upstream allows now.
        """
        if not self.connected or self.goaway:
            return 0
        limit = self.h2.remote_settings.max_concurrent_streams
        if not self.settings_received:
            # h2 assumes no limit until the upstream's SETTINGS arrive;
            # assume the common default instead of risking refused streams.
            limit = min(limit, MAX_CONCURRENT_STREAMS)
        return limit - self.active

    # Twisted protocol

    def connectionMade(self) -> None:
        self.connected = True
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self._write = self.transport.write
        h2conn = self.h2
        h2conn.local_settings = Settings(client=True, initial_values=local_settings())
        h2conn.initiate_connection()
        h2conn.increment_flow_control_window(CONNECTION_WINDOW_SIZE - _DEFAULT_WINDOW)
        self.flush()
        if self.factory is not None:
            self.factory.connected(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2ProtocolError as e:
            log.info("upstream {endpoint} HTTP/2 protocol error: {error}", endpoint=str(self.endpoint), error=str(e))
            self.goaway = True
            try:
                self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            except H2ProtocolError:
                pass
            self.flush()
            self._fail_all(ResponseFlag.UPSTREAM_PROTOCOL_ERROR, f"HTTP/2 protocol error: {e}")
            self.transport.loseConnection()
            return
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                stream = streams.get(event.stream_id)
                if stream is None:
                    self.acknowledge(event.flow_controlled_length, event.stream_id)
                else:
                    stream.received_data(event.data, event.flow_controlled_length, event.stream_ended is not None)
            elif kind is ResponseReceived or kind is InformationalResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.received_head(event.headers, getattr(event, "stream_ended", None) is not None)
            elif kind is TrailersReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.received_trailers(event.headers)
            elif kind is StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.received_end()
            elif kind is StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.reset_by_upstream(event.error_code, f"upstream reset the stream ({event.error_code!r})")
            elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                sid = getattr(event, "stream_id", 0)
                if sid:
                    stream = streams.get(sid)
                    if stream is not None:
                        stream.send_pending()
                else:
                    for stream in list(streams.values()):
                        stream.send_pending()
                    if kind is RemoteSettingsChanged:
                        self.settings_received = True
                        self._pool.capacity_changed(self)
            elif kind is ConnectionTerminated:
                self._goaway_received(event.last_stream_id, event.error_code)
            elif kind is PingAckReceived:
                self.ping_sent_at = None
        for stream in list(streams.values()):
            handler = stream._handler
            if handler is not None:
                handler.flush()
        self.flush()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.goaway = True
        self._fail_all(ResponseFlag.UPSTREAM_CONNECTION_TERMINATION, "upstream connection closed")
        self._pool.connection_lost(self)

    # For the streams and the pool

    def new_stream(self) -> HTTP2Stream:
        """
        @return: a handle on a stream slot of this connection.
        """
        self.active += 1
        return HTTP2Stream(self)

    def open_stream(self, stream: HTTP2Stream, header_list: list, end_stream: bool) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.streams[sid] = stream
        self.h2.send_headers(sid, header_list, end_stream=end_stream)
        self.flush()
        return sid

    def reset(self, stream: HTTP2Stream, code: int) -> None:
        sid = stream.stream_id
        if sid and self.connected and self.streams.get(sid) is stream:
            try:
                self.h2.reset_stream(sid, code)
            except (StreamClosedError, H2ProtocolError):
                pass
            self.flush()

    def acknowledge(self, size: int, stream_id: int) -> None:
        if size and self.connected:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except (StreamClosedError, H2ProtocolError):
                pass

    def stream_closed(self, stream: HTTP2Stream) -> None:
        if stream.stream_id and self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self.active -= 1
        self.requests_served += 1
        self.idle_since = self._pool.now()
        self._pool.release_slot(self)

    def flush(self) -> None:
        if self.connected:
            data = self.h2.data_to_send()
            if data:
                self._write(data)

    def ping(self, now: float) -> None:
        """
        Send a keepalive PING; L{HTTP2EndpointPool.sweep} closes the
        connection if its ACK does not come back in time.
        """
        if self.transport is None or self.goaway:
            return
        self.ping_sent_at = now
        self.h2.ping(b"txmesh\x00\x00")
        self.flush()

    def close(self) -> None:
        """
        No new streams; close once the streams in flight finish.
        """
        self.goaway = True
        if not self.active and self.transport is not None:
            self.transport.loseConnection()

    def _goaway_received(self, last_stream_id: int | None, error_code: int) -> None:
        self.goaway = True
        if last_stream_id is not None:
            # Streams the upstream never processed: safe to retry elsewhere.
            for sid, stream in list(self.streams.items()):
                if sid > last_stream_id:
                    stream.reset_by_upstream(ErrorCodes.REFUSED_STREAM, "upstream sent GOAWAY")
        self._pool.connection_retired(self)
        if not self.active:
            self.transport.loseConnection()

    def _fail_all(self, flag: str, reason: str) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            handler, stream._handler = stream._handler, None
            stream.stream_id = 0
            stream._release()
            if handler is not None:
                handler.upstream_reset(flag, reason)


class HTTP2EndpointPool:
    """
    Multiplexed h2c connections to one endpoint: the L{EndpointPool}
    interface for clusters with C{http2: true}.

    A request gets a stream on an open connection with room (the upstream's
    C{MAX_CONCURRENT_STREAMS}); failing that a new connection, if the
    circuit breaker's C{max_connections} allows; failing that it waits
    (as a pending request) for a stream slot.

    @ivar active_requests: exchanges in flight on this endpoint.
    @ivar connections: open connections (and connecting).
    """

    def __init__(self, endpoint: Endpoint, config: ClusterConfig, reactor: Any, cluster: Any = None):
        self.endpoint = endpoint
        self._config = config
        self._reactor = reactor
        self._cluster = cluster
        from txmesh.proxy.cluster import upstream_tls

        self._tls = upstream_tls(config, endpoint, b"h2", getattr(cluster, "identity", None))
        self._open: list[HTTP2ClientConnection] = []
        self._connecting: Deferred | None = None
        self._waiters: deque[Deferred] = deque()
        self.active_requests = 0
        self.connections = 0
        self.total_connections = 0
        self.connect_failures = 0
        self.closed = False

    def now(self) -> float:
        return self._reactor.seconds()

    def acquire(self) -> HTTP2Stream | Deferred:
        """
        @return: a stream handle, or a L{Deferred} firing with one.
        @raise UpstreamOverflow: if the circuit breaker refuses both a new
            connection and another pending request.
        """
        from txmesh.proxy.cluster import UpstreamOverflow

        for conn in self._open:
            if conn.capacity > 0:
                return conn.new_stream()
        cluster = self._cluster
        if cluster is not None and not cluster.breaker.try_add_pending():
            raise UpstreamOverflow(self.endpoint)
        waiter: Deferred = Deferred(self._cancel_waiter)
        self._waiters.append(waiter)
        if self._connecting is None and (cluster is None
                                         or cluster.breaker.can_open_connection(cluster.open_connections())):
            self._connect()
        return waiter

    def _cancel_waiter(self, waiter: Deferred) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        if self._cluster is not None:
            self._cluster.breaker.remove_pending()

    def _connect(self) -> None:
        factory = ConnectFactory(self, HTTP2ClientConnection)
        self.connections += 1
        self.total_connections += 1
        connect(self._reactor, self.endpoint.host, self.endpoint.port, factory,
                self._config.connect_timeout, self._tls)
        d = self._connecting = factory.deferred
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: HTTP2ClientConnection) -> None:
        self._connecting = None
        conn.idle_since = self.now()
        if self.closed and not self._waiters:
            conn.close()
            return
        self._open.append(conn)
        self._serve()
        if self.closed:
            # A config change closed the pool while these requests waited
            # for this connection: it serves what it can (and retires after
            # them); the pool opens no other, so the rest fail now.
            self._fail_waiters(UpstreamConnectError(f"{self.endpoint}: cluster closed while connecting"))

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self.connections -= 1
        self.connect_failures += 1
        self._fail_waiters(failure.value if failure.check(UpstreamConnectError) else UpstreamConnectError(
            f"{self.endpoint}: {failure.getErrorMessage()}"))
        if self._cluster is not None:
            self._cluster.connection_closed()

    def _fail_waiters(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if self._cluster is not None:
                self._cluster.breaker.remove_pending()
            waiter.errback(error)

    def _serve(self) -> None:
        """
        Give waiting requests stream slots; open another connection when
        every one is full and the breaker allows.
        """
        waiters = self._waiters
        for conn in self._open:
            while waiters and conn.capacity > 0:
                waiter = waiters.popleft()
                if self._cluster is not None:
                    self._cluster.breaker.remove_pending()
                waiter.callback(conn.new_stream())
        if waiters and self._connecting is None and not self.closed:
            cluster = self._cluster
            if cluster is None or cluster.breaker.can_open_connection(cluster.open_connections()):
                self._connect()

    def release(self, stream: HTTP2Stream) -> None:
        """
        The router gives back a stream it never started (its request ended
        while it waited).
        """
        if not stream._released:
            stream._handler = None
            stream._release()

    def release_slot(self, conn: HTTP2ClientConnection) -> None:
        """
        A stream of C{conn} ended: its slot serves a waiter, or the
        connection retires.
        """
        cluster = self._cluster
        if (self.closed or (cluster is not None and cluster.breaker.connection_exhausted(conn.requests_served))) \
                and not conn.goaway:
            conn.goaway = True
            self.connection_retired(conn)
        if conn.goaway:
            if not conn.active and conn.transport is not None:
                conn.transport.loseConnection()
            return
        if self._waiters:
            self._serve()

    def capacity_changed(self, conn: HTTP2ClientConnection) -> None:
        if self._waiters:
            self._serve()

    def connection_retired(self, conn: HTTP2ClientConnection) -> None:
        """
        C{conn} takes no new streams (GOAWAY).
        """
        try:
            self._open.remove(conn)
        except ValueError:
            pass
        if self._waiters:
            self._serve()

    def connection_lost(self, conn: HTTP2ClientConnection) -> None:
        self.connections -= 1
        try:
            self._open.remove(conn)
        except ValueError:
            pass
        if self._cluster is not None:
            self._cluster.connection_closed()
        if self._waiters:
            self._serve()

    def serve_waiter(self) -> bool:
        """
        Open a connection for waiting requests if the breaker allows now.
        """
        if not self._waiters or self._connecting is not None:
            return False
        cluster = self._cluster
        if cluster is not None and not cluster.breaker.can_open_connection(cluster.open_connections()):
            return False
        self._connect()
        return True

    def close_one_idle(self) -> bool:
        for conn in self._open:
            if not conn.active:
                self._open.remove(conn)
                conn.close()
                return True
        return False

    def sweep(self, now: float) -> None:
        """
        Close connections idle past the cluster's idle timeout, and keep the
        others honest: an idle connection is PINGed every
        L{PING_INTERVAL}; one whose PING goes unanswered for L{PING_TIMEOUT}
        is dead (a vanished host, a silent middlebox) and is aborted, so no
        request is sent into it.
        """
        limit = now - self._config.idle_timeout
        for conn in list(self._open):
            if not conn.active and conn.idle_since <= limit:
                self._open.remove(conn)
                conn.close()
            elif conn.ping_sent_at is not None:
                if now - conn.ping_sent_at >= PING_TIMEOUT:
                    log.info("upstream {endpoint} did not answer a PING in {timeout} s; closing",
                             endpoint=str(self.endpoint), timeout=PING_TIMEOUT)
                    self._open.remove(conn)
                    conn.ping_sent_at = None
                    conn.transport.abortConnection()
            elif not conn.active and now - max(conn.idle_since, conn.last_ping) >= PING_INTERVAL:
                conn.last_ping = now
                conn.ping(now)

    def close(self) -> None:
        self.closed = True
        for conn in list(self._open):
            if not conn.active:
                self._open.remove(conn)
                conn.close()

    @property
    def idle_count(self) -> int:
        return sum(1 for conn in self._open if not conn.active)

    @property
    def waiting(self) -> int:
        return len(self._waiters)
