"""
The server half of HTTP/1.1: the Twisted protocol that accepts clients.

A thin shell around L{txmesh.proxy.http1.RequestParser}: parsed events are
queued, then dispatched one request at a time to a stream from the
listener's L{HTTPConnectionManager}; pipelined requests wait their turn, so
responses leave in request order.  The protocol is also each stream's
L{ResponseWriter}: it frames the response for this client (content-length,
chunked, or close-delimited for HTTP/1.0) and owns keep-alive.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from txmesh.proxy.connection_manager import HTTPConnectionManager, forwarding_headers, request_rate
from txmesh.proxy.http1 import (
    REASONS,
    ProtocolError,
    RequestParser,
    encode_chunk,
    encode_last_chunk,
    encode_response_head,
)
from txmesh.proxy.open_set import OpenSet
from txmesh.proxy.stream import Headers, RequestHead, ResponseFlag, ResponseHead

log = Logger()

_HEAD, _DATA, _END = 0, 1, 2

# Pipelined requests and their bodies queued behind the active one; past
# either limit the client is not read until the queue drains.
DRAIN_IDLE_GRACE = 0.5
"""
Seconds an idle connection stays open once draining starts: a client that
is sending its next request right then gets it answered (with
C{Connection: close}) instead of racing a close; one that stays idle is
closed after this.
"""
QUEUE_EVENTS_LIMIT = 64
QUEUE_BYTES_LIMIT = 1 << 20

# Reasons (besides per-stream ones) for not reading from the client.
_PIPELINE_FULL = "pipeline-full"


@implementer(IPushProducer)
class _RequestReading:
    """
    The client's request stream as a push producer, so an upstream
    transport's full write buffer pauses reading from the client.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: HTTP1ServerProtocol):
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol.pause_reading(self)

    def resumeProducing(self) -> None:
        self._protocol.resume_reading(self)

    def stopProducing(self) -> None:
        pass


def _check_interval(listener: Any) -> float:
    """
    How often a connection checks its timeouts: the shortest of those that
    are enabled (0 disables one, not the others).
    """
    enabled = [t for t in (listener.idle_timeout, listener.request_headers_timeout,
                           listener.request_body_timeout) if t > 0]
    return min(enabled) if enabled else 0.0


class RefusedConnection(Protocol):
    """
    A connection refused as it is accepted (over the listener's
    C{max_connections}, or while the overload manager refuses): closed at
    once, before any byte is read or written.
    """

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class HTTP1ServerProtocol(Protocol):
    """
    One client connection speaking HTTP/1.x.
    """

    def __init__(self) -> None:
        self._queue: deque = deque()
        self._queued_bytes = 0
        self._stream: Any = None
        self._pause_reasons: set = set()
        self._reading = _RequestReading(self)
        self._response_producer: Any = None
        self._draining = False
        self._drain_call: Any = None
        self._closing = False
        self._pending_error: ProtocolError | None = None
        self._timer: Any = None
        self._last_activity = 0.0
        self._message_started = 0.0
        # Per-stream state.
        self._keep_alive = True
        self._request_open = False
        self._head_request = False
        self._http10 = False
        self._chunked = False
        self._close_after = False
        self._tunnel = False
        self._connect = False
        self._held = b""
        # A route's own max_request_bytes (the listener's is the parser's).
        self._body_limit = 0
        self._body_count = 0

    def start_drain(self) -> None:
        """
        End the connection after the current response (the factory is
        draining); an idle one after L{DRAIN_IDLE_GRACE} unless a request
        comes first.
        """
        if self._stream is None and self._drain_call is None and not self._closing:
            self._drain_call = self._clock.callLater(DRAIN_IDLE_GRACE, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._drain_call = None
        if self._stream is None and not self._queue:
            self._close()

    # Connection lifecycle

    def connectionMade(self) -> None:
        manager: HTTPConnectionManager = self.factory.manager
        listener = manager.listener
        self._clock = manager.clock
        self._peer = self.transport.getPeer()
        self._peer_ip = getattr(self._peer, "host", "").encode("ascii")
        # Learnt at the first request: with TLS the handshake is done by then.
        self._peer_info: tuple | None = None
        self._rate = request_rate(listener)
        self._forward_proxy = listener.forward_proxy is not None
        self._parser = RequestParser(
            self, listener.max_request_headers_bytes, listener.scheme, listener.default_host,
            self._forward_proxy, listener.max_request_headers, listener.max_request_bytes,
            listener.allow_bare_lf)
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not TCP (tests, UNIX sockets)
        self._write = self.transport.write
        self._last_activity = self._message_started = self._clock.seconds()
        self._schedule_check(_check_interval(listener))
        self.factory.connection_opened(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        self._queue.clear()
        stream = self._abandon_stream()
        if stream is not None:
            stream.downstream_reset()
        self.factory.connection_closed(self)

    def readConnectionLost(self) -> None:
        """
        The client half-closed a C{CONNECT} tunnel (only a tunnel provides
        C{IHalfCloseableProtocol}, see L{write_head}): end the request
        stream, which half-closes the upstream; the other direction
        carries on until the upstream closes.
        """
        if self._request_open and not self._closing:
            self._queue.append((_END, None))
            self._drain()

    def writeConnectionLost(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._pending_error is not None:
            return
        now = self._clock.seconds()
        self._last_activity = now
        parser = self._parser
        if not parser.in_message and not parser.upgraded:
            self._message_started = now
        try:
            tail = parser.receive_data(data)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if tail:
            self._enqueue((_DATA, tail, False), len(tail))
        self._drain()

    # RequestSink: the parser's events are queued, then dispatched in order.

    def request_head(self, head: RequestHead, end_stream: bool, keep_alive: bool) -> None:
        self._queue.append((_HEAD, head, end_stream, keep_alive))

    def request_data(self, data: bytes) -> None:
        self._enqueue((_DATA, data, False), len(data))

    def request_end(self, trailers: Headers | None) -> None:
        self._queue.append((_END, trailers))

    def _enqueue(self, event: tuple, size: int) -> None:
        self._queue.append(event)
        self._queued_bytes += size

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        queue = self._queue
        try:
            while queue and not self._closing:
                event = queue[0]
                kind = event[0]
                if kind == _HEAD:
                    if self._stream is not None:
                        break  # pipelined: wait for the active response
                    queue.popleft()
                    self._start_stream(event[1], event[2], event[3])
                elif kind == _DATA:
                    queue.popleft()
                    self._queued_bytes -= len(event[1])
                    if self._stream is not None and self._request_open:
                        if self._body_limit:
                            self._body_count += len(event[1])
                            if self._body_count > self._body_limit:
                                self._body_too_large()
                                break
                        self._stream.request_data(event[1], False)
                else:
                    queue.popleft()
                    stream = self._stream
                    if self._request_open:
                        # Also when the stream already ended (a local reply
                        # before the body): the body is consumed, in sync.
                        self._request_open = False
                        if stream is None:
                            pass
                        elif event[1]:
                            stream.request_trailers(event[1])
                        else:
                            stream.request_data(b"", True)
        finally:
            self._draining = False
        if len(queue) > QUEUE_EVENTS_LIMIT or self._queued_bytes > QUEUE_BYTES_LIMIT:
            self.pause_reading(_PIPELINE_FULL)
        elif _PIPELINE_FULL in self._pause_reasons:
            self.resume_reading(_PIPELINE_FULL)

    def _start_stream(self, head: RequestHead, end_stream: bool, keep_alive: bool) -> None:
        manager: HTTPConnectionManager = self.factory.manager
        self._keep_alive = keep_alive
        self._request_open = not end_stream
        self._head_request = head.method == b"HEAD"
        self._http10 = head.version == b"1.0"
        self._chunked = False
        self._close_after = False
        self._tunnel = False
        self._connect = self._forward_proxy and head.method == b"CONNECT"
        if self._peer_info is None:
            self._peer_info = manager.peer_info(self.transport)
        principal, client_cert, port = self._peer_info
        request_id = forwarding_headers(head, self._peer_ip, client_cert)
        stream = manager.new_stream(self, self._peer, request_id, principal, port, self._rate)
        self._stream = stream
        stream.request_headers(head, end_stream)
        limit = getattr(stream.route, "max_request_bytes", None) if manager.route_body_limits else None
        if limit and not end_stream and head.method != b"CONNECT" and b"upgrade" not in head.headers:
            self._body_limit = limit
            self._body_count = 0
            length = head.headers.get(b"content-length")
            if length is not None and int(length) > limit and self._stream is stream:
                self._body_too_large()
        else:
            self._body_limit = 0

    # ResponseWriter, for the active stream

    def write_informational(self, head: ResponseHead) -> None:
        if not self._http10 and head.status != 101:
            self._write(encode_response_head(head))

    def write_head(self, head: ResponseHead, end_stream: bool) -> None:
        status = head.status
        if status == 101:
            self._tunnel = True
            self._close_after = True
            self._write(encode_response_head(head, connection=b"upgrade"))
            return
        if self._connect and 200 <= status < 300:
            # The forward proxy's tunnel is open (RFC 9110 9.3.6): no body
            # framing, and from now on bytes flow both ways; the client may
            # half-close its side.
            self._tunnel = True
            self._close_after = True
            head.headers.remove(b"content-length")
            head.headers.remove(b"transfer-encoding")
            alsoProvides(self, IHalfCloseableProtocol)
            self._write(encode_response_head(head))
            return
        headers = head.headers
        no_body = self._head_request or status in (204, 304) or status < 200
        has_length = b"content-length" in headers
        # A pending protocol error does not close here: the error response
        # follows this one (see _stream_done).
        close = not self._keep_alive or self.factory.draining
        chunked = False
        if not no_body and not has_length:
            if end_stream:
                headers.add(b"content-length", b"0")
            elif self._http10:
                close = True  # the body ends when the connection does
            else:
                chunked = True
        self._chunked = chunked
        self._close_after = close
        if close:
            connection: bytes | None = b"close"
        elif self._http10:
            connection = b"keep-alive"
        else:
            connection = None
        data = encode_response_head(head, chunked, connection)
        if end_stream:
            self._write(data)
            self._stream_done()
        else:
            # Held until the first body bytes or flush(), so a small
            # response leaves in one send.
            self._held = data

    def write_data(self, data: bytes, end_stream: bool) -> None:
        if self._head_request:
            data = b""
        elif self._chunked:
            data = encode_chunk(data)
            if end_stream:
                data += encode_last_chunk()
        held = self._held
        if held:
            self._held = b""
            data = held + data
        if data:
            self._write(data)
        if end_stream:
            self._stream_done()

    def write_trailers(self, trailers: Headers) -> None:
        data = self._held
        self._held = b""
        if self._chunked and not self._head_request:
            data += encode_last_chunk(trailers)
        if data:
            self._write(data)
        self._stream_done()

    def flush(self) -> None:
        held = self._held
        if held:
            self._held = b""
            self._write(held)

    def reset_stream(self) -> None:
        # HTTP/1.1 has no stream reset: closing the connection is how a
        # client learns the response is incomplete.
        self.flush()
        self._abandon_stream()
        self._close()

    def pause_reading(self, reason: object) -> None:
        if not self._pause_reasons:
            self.transport.pauseProducing()
        self._pause_reasons.add(reason)

    def resume_reading(self, reason: object) -> None:
        reasons = self._pause_reasons
        if reason in reasons:
            reasons.discard(reason)
            if not reasons and not self._closing:
                # Time spent paused is the proxy's, not the client's.
                self._last_activity = self._clock.seconds()
                self.transport.resumeProducing()

    def set_response_producer(self, producer: Any) -> None:
        # A retry brings a new upstream connection: it replaces the old one.
        if self._response_producer is not None:
            if self._response_producer is producer:
                return
            self.transport.unregisterProducer()
        self._response_producer = producer
        self.transport.registerProducer(producer, True)

    @property
    def request_producer(self) -> _RequestReading:
        return self._reading

    def _stream_done(self) -> None:
        stream = self._abandon_stream()
        if stream is not None:
            self.resume_reading(stream)
        self.resume_reading(self._reading)
        queue = self._queue
        # A request body not yet read to its end would desynchronise the
        # connection; one already queued is simply dropped by _drain.
        body_unread = self._request_open and not any(e[0] == _END for e in queue)
        if self._close_after or body_unread or not self._keep_alive or self.factory.draining:
            self._close()
            return
        if self._pending_error is not None and not any(e[0] == _HEAD for e in queue):
            # Complete requests parsed before the error are answered first.
            self._write_error(self._pending_error)
            return
        self._last_activity = self._clock.seconds()
        if not self._draining:
            self._drain()

    def _close(self) -> None:
        if not self._closing:
            self._closing = True
            self._queue.clear()
            self.transport.loseConnection()

    # Errors and timers

    def _protocol_error(self, error: ProtocolError) -> None:
        log.info("bad request from {peer}: {reason}", peer=self._peer_ip.decode(), reason=error.reason)
        self._pending_error = error
        self.pause_reading(error)
        queue = self._queue
        heads = [i for i, e in enumerate(queue) if e[0] == _HEAD]
        if heads:
            # Requests parsed completely before the error are still
            # answered; the one the error cut short is dropped, so nothing
            # of it goes upstream.
            first = heads[-1]
            tail = list(queue)[first:]
            if not (tail[0][2] or any(e[0] == _END for e in tail)):
                for _ in range(len(queue) - first):
                    queue.pop()
        elif self._request_open and not any(e[0] == _END for e in queue):
            # The active request's body is malformed: its stream cannot
            # complete, and the upstream exchange is abandoned.
            queue.clear()
            stream = self._abandon_stream()
            if stream is not None:
                stream.add_response_flag(ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR)
                started = stream.response_started
                stream.downstream_reset()
                if started:
                    self._close()
                    return
        self._drain()
        if self._stream is None and not self._closing:
            self._write_error(error)

    def _body_too_large(self) -> None:
        """
        The active request's body is over its route's C{max_request_bytes}:
        abandon the upstream exchange and answer 413 (or, if the response
        has begun, close), as for a malformed body.
        """
        self._body_limit = 0
        self._queue.clear()
        self._queued_bytes = 0
        self._protocol_error(ProtocolError(413, "request body too large"))

    def _abandon_stream(self) -> Any:
        stream, self._stream = self._stream, None
        if self._response_producer is not None:
            self._response_producer = None
            self.transport.unregisterProducer()
        return stream

    def _write_error(self, error: ProtocolError) -> None:
        body = error.reason.encode("utf-8", "replace") + b"\n"
        head = ResponseHead(error.status, Headers([
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"x-txmesh-flags", ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR.encode("ascii")),
        ]), REASONS.get(error.status, b"Bad Request"))
        self._write(encode_response_head(head, connection=b"close") + body)
        self._close()

    def _schedule_check(self, delay: float) -> None:
        if delay > 0 and not self._closing:
            self._timer = self._clock.callLater(delay, self._check_timeouts)

    def _check_timeouts(self) -> None:
        self._timer = None
        if self._closing:
            return
        listener = self.factory.manager.listener
        now = self._clock.seconds()
        if self._stream is None:
            headers_timeout = listener.request_headers_timeout
            if self._parser.in_message and headers_timeout > 0:
                waited = now - self._message_started
                if waited >= headers_timeout:
                    self._protocol_error(ProtocolError(408, "request header read timeout"))
                    return
                self._schedule_check(headers_timeout - waited)
                return
            idle_timeout = listener.idle_timeout
            if idle_timeout > 0 and not self._parser.in_message:
                idle = now - self._last_activity
                if idle >= idle_timeout:
                    self._close()
                    return
                self._schedule_check(idle_timeout - idle)
                return
            self._schedule_check(_check_interval(listener))
            return
        # A stream is in flight: its own timeouts govern it, but for the
        # request body, which only the client can send.
        body_timeout = listener.request_body_timeout
        if body_timeout > 0 and self._request_open and not self._pause_reasons:
            waited = now - self._last_activity
            if waited >= body_timeout:
                self._protocol_error(ProtocolError(408, "request body read timeout"))
                return
            self._schedule_check(min(body_timeout - waited, _check_interval(listener)))
            return
        self._schedule_check(_check_interval(listener))


class HTTP1ServerFactory(Factory):
    """
    Accepts HTTP/1.x clients for one listener.

    @ivar manager: the current L{HTTPConnectionManager}; replaced on reload.
    @ivar draining: when true, responses carry C{Connection: close} and
        connections end after their current response.
    """

    protocol = HTTP1ServerProtocol
    noisy = False

    def __init__(self, manager: HTTPConnectionManager):
        self.manager = manager
        self.draining = False
        self.connections: OpenSet[HTTP1ServerProtocol] = OpenSet()
        # Accepted connections whose codec is not chosen yet (see listener).
        self.pending = 0

    def buildProtocol(self, addr: Any) -> Protocol | None:
        """
        A new connection: refused (closed at once, and counted in
        C{txmesh_downstream_connections_overflow}) when the listener
        already has C{max_connections} open.
        """
        listener = self.manager.listener
        limit = listener.max_connections
        if limit and len(self.connections) + self.pending >= limit:
            metrics = self.manager.proxy.metrics
            if metrics is not None:
                metrics.downstream_connections_overflow.labels(listener.name).inc()
            return RefusedConnection()
        return super().buildProtocol(addr)

    def drain(self) -> None:
        """
        Start draining: idle connections close now, busy ones after their
        current response.
        """
        self.draining = True
        for conn in list(self.connections):
            conn.start_drain()

    def connection_opened(self, protocol: HTTP1ServerProtocol) -> None:
        self.connections.add(protocol)
        self._gauge(1)

    def connection_closed(self, protocol: HTTP1ServerProtocol) -> None:
        if protocol in self.connections:
            self.connections.discard(protocol)
            self._gauge(-1)

    def when_idle(self) -> Deferred:
        """
        @return: a L{Deferred} that fires once no connection is open.
        """
        return self.connections.when_empty()

    def _gauge(self, delta: int) -> None:
        metrics = self.manager.proxy.metrics
        if metrics is not None:
            metrics.downstream_connections.labels(self.manager.listener.name).inc(delta)
