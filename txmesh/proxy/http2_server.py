"""
The server half of HTTP/2: the Twisted protocol around a server-side
L{h2.connection.H2Connection}.

Each h2 stream becomes one L{FilterChain} stream from the listener's
L{HTTPConnectionManager}, exactly as an HTTP/1 request does; the
per-stream L{_ServerStream} is that stream's L{ResponseWriter}.  Flow
control goes both ways: response bytes beyond the client's window are
buffered and, past a limit, pause the upstream connection; request bytes
are acknowledged (opening the client's window) only while the stream is
read, so a slow upstream closes the client's window.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.filters.api import LocalReply
from txmesh.proxy.connection_manager import HTTPConnectionManager, body_limit, forwarding_headers, request_rate
from txmesh.proxy.http2 import (
    CONNECTION_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    GracefulH2Connection,
    StreamProtocolError,
    local_settings,
    request_from_h2,
    response_to_h2,
    server_config,
    trailers_from_h2,
    trailers_to_h2,
)
from txmesh.proxy.stream import Headers, RequestHead, ResponseFlag, ResponseHead

log = Logger()

# Response bytes buffered per stream (beyond the client's window) before
# the upstream is paused.
STREAM_BUFFER_LIMIT = 1 << 20

# Rapid-reset defence (CVE-2023-44487): more client resets than this within
# the window and the connection is told to calm down and closed.
RAPID_RESET_LIMIT = 200
RAPID_RESET_WINDOW = 10.0

_DEFAULT_WINDOW = 65535
_TOO_LARGE = LocalReply(413, b"request body too large\n", flag=ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR)


@implementer(IPushProducer)
class _StreamReading:
    """
    One stream's request as a push producer: pausing it stops acknowledging
    the stream's data, so the client's window for it closes.
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: _ServerStream):
        self._stream = stream

    def pauseProducing(self) -> None:
        self._stream.pause_reading(self)

    def resumeProducing(self) -> None:
        self._stream.resume_reading(self)

    def stopProducing(self) -> None:
        pass


class _ServerStream:
    """
    One h2 stream: the L{ResponseWriter} of its L{FilterChain}.
    """

    def __init__(self, protocol: HTTP2ServerProtocol, stream_id: int):
        self._protocol = protocol
        self._conn: H2Connection = protocol._conn
        self.stream_id = stream_id
        self.chain: Any = None
        self.request_open = True
        self.closed = False
        # The request body's limit (0: none) and what has come of it.
        self.body_limit = 0
        self.body_count = 0
        self._pause_reasons: set = set()
        self._unacked = 0
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._end_pending = False
        self._trailers: list | None = None
        self._response_producer: Any = None
        self._producer_paused = False
        self._reading = _StreamReading(self)

    # Request flow control

    def received(self, flow_controlled_length: int) -> None:
        """
        Request data of C{flow_controlled_length} went to the stream.
        """
        if self._pause_reasons and not self.closed:
            self._unacked += flow_controlled_length
        else:
            self._protocol._acknowledge(flow_controlled_length, self.stream_id)

    def pause_reading(self, reason: object) -> None:
        self._pause_reasons.add(reason)

    def resume_reading(self, reason: object) -> None:
        reasons = self._pause_reasons
        if reason in reasons:
            reasons.discard(reason)
            if not reasons and self._unacked:
                n, self._unacked = self._unacked, 0
                self._protocol._acknowledge(n, self.stream_id)
                self._protocol._flush()

    @property
    def request_producer(self) -> _StreamReading:
        return self._reading

    # ResponseWriter

    def write_informational(self, head: ResponseHead) -> None:
        if head.status == 101 or self.closed or self._protocol._closing:
            return
        self._conn.send_headers(self.stream_id, response_to_h2(head), end_stream=False)
        self._protocol._flush()

    def write_head(self, head: ResponseHead, end_stream: bool) -> None:
        if self.closed or self._protocol._closing:
            return
        self._conn.send_headers(self.stream_id, response_to_h2(head), end_stream=end_stream)
        if end_stream:
            self._done()
        self._protocol._flush()

    def write_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed or self._protocol._closing:
            return
        if data:
            self._buffer.append(data)
            self._buffered += len(data)
        if end_stream:
            self._end_pending = True
        self.send_pending()
        self._protocol._flush()

    def write_trailers(self, trailers: Headers) -> None:
        if self.closed or self._protocol._closing:
            return
        self._trailers = trailers_to_h2(trailers)
        self._end_pending = True
        self.send_pending()
        self._protocol._flush()

    def flush(self) -> None:
        self._protocol._flush()

    def reset_stream(self, code: int = ErrorCodes.CANCEL) -> None:
        if self.closed or self._protocol._closing:
            return
        try:
            self._conn.reset_stream(self.stream_id, code)
        except StreamClosedError:
            pass
        self._done()
        self._protocol._flush()

    def set_response_producer(self, producer: Any) -> None:
        if producer is self._response_producer:
            return
        self._response_producer = producer
        self._producer_paused = False
        self.update_producer()

    # Response flow control

    def send_pending(self) -> None:
        """
        Send what the windows allow of the buffered response; end the
        stream when everything has gone.
        """
        conn = self._conn
        buffer = self._buffer
        sid = self.stream_id
        while buffer:
            window = conn.local_flow_control_window(sid)
            if window <= 0:
                break
            chunk = buffer[0]
            size = min(window, conn.max_outbound_frame_size, len(chunk))
            if size < len(chunk):
                buffer[0] = chunk[size:]
                chunk = chunk[:size]
            else:
                buffer.popleft()
            self._buffered -= size
            last = not buffer and self._end_pending and self._trailers is None
            conn.send_data(sid, chunk, end_stream=last)
            if last:
                self._done()
                return
        if not buffer and self._end_pending:
            if self._trailers is not None:
                conn.send_headers(sid, self._trailers, end_stream=True)
            else:
                conn.end_stream(sid)
            self._done()
            return
        self.update_producer()

    def update_producer(self) -> None:
        producer = self._response_producer
        if producer is None:
            return
        want_pause = self._buffered > STREAM_BUFFER_LIMIT or self._protocol._transport_paused
        if want_pause and not self._producer_paused:
            self._producer_paused = True
            producer.pauseProducing()
        elif not want_pause and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()

    def _done(self) -> None:
        """
        The response is complete (or reset): forget the stream.
        """
        if self.closed:
            return
        self.closed = True
        if self.request_open and not self._protocol._closing:
            # The response is complete before the request (a local reply, an
            # early upstream answer): the rest of the body is not wanted
            # (RFC 9113 8.1), and the stream should not hold a slot.
            self.request_open = False
            try:
                self._conn.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
            except (StreamClosedError, H2ProtocolError):
                pass
        self._buffer.clear()
        self._buffered = 0
        producer, self._response_producer = self._response_producer, None
        if producer is not None and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self._protocol._acknowledge(n, self.stream_id)
            # Not necessarily inside dataReceived (which flushes): the
            # connection's window must not wait for another stream's write.
            self._protocol._flush()
        self._protocol._stream_done(self)


@implementer(IPushProducer)
class HTTP2ServerProtocol(Protocol):
    """
    One client connection speaking HTTP/2.

    @ivar streams: the streams in flight, by id.
    """

    rapid_reset_limit = RAPID_RESET_LIMIT
    rapid_reset_window = RAPID_RESET_WINDOW
    max_concurrent_streams = MAX_CONCURRENT_STREAMS

    def __init__(self, upgrade: tuple[RequestHead, bytes] | None = None) -> None:
        """
        @param upgrade: for a connection upgraded from HTTP/1.1
            (C{Upgrade: h2c}, RFC 7540 3.2): the request that asked, which
            becomes stream 1, and its C{HTTP2-Settings} value.
        """
        self._upgrade = upgrade
        self.streams: dict[int, _ServerStream] = {}
        self._closing = False
        self._goaway_sent = False
        self._goaway_received = False
        self._transport_paused = False
        self._resets: deque[float] = deque()
        self._timer: Any = None
        self._last_activity = 0.0
        self._receiving = False

    @property
    def _stream(self) -> Any:
        # What the listener's drain looks at: something in flight, or not.
        return next(iter(self.streams.values()), None)

    # Connection lifecycle

    def connectionMade(self) -> None:
        manager: HTTPConnectionManager = self.factory.manager
        self._clock = manager.clock
        self._peer = self.transport.getPeer()
        self._peer_ip = getattr(self._peer, "host", "").encode("ascii")
        # Learnt at the first request: with TLS the handshake is done by then.
        self._peer_info: tuple | None = None
        self._rate = request_rate(manager.listener)
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self._write = self.transport.write
        conn = self._conn = GracefulH2Connection(server_config())
        self.max_concurrent_streams = manager.listener.max_concurrent_streams
        settings = local_settings(self.max_concurrent_streams)
        limit = settings.pop(SettingCodes.MAX_CONCURRENT_STREAMS)
        conn.local_settings = Settings(client=False, initial_values=settings)
        upgrade = self._upgrade
        if upgrade is not None:
            self._write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n")
            value = upgrade[1].strip()
            conn.initiate_upgrade_connection(value + b"=" * (-len(value) % 4))
        else:
            conn.initiate_connection()
        # Announced in a second SETTINGS frame, in the same write as the
        # first: clients (grpcio among them) learn the limit before they
        # start streams, and h2 enforces it (as a connection error) only
        # once acknowledged, so a client that started streams before it saw
        # our settings has them refused one by one (REFUSED_STREAM, in
        # _request), as RFC 9113 5.1.2 allows.  (h2 applies all pending
        # settings at the first acknowledgement: a client that acknowledges
        # the first frame and opens more streams than the limit before it
        # reads the second, which arrived with it, is the one case left to
        # a connection error.  Announcing the limit only after that
        # acknowledgement instead had grpcio open a thousand streams into
        # an unlimited window and see most of them refused.)
        conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limit})
        conn.increment_flow_control_window(CONNECTION_WINDOW_SIZE - _DEFAULT_WINDOW)
        self.transport.registerProducer(self, True)
        self._last_activity = self._clock.seconds()
        self._schedule_idle_check()
        self.factory.connection_opened(self)
        self._flush()
        if upgrade is not None:
            self._upgrade = None
            self._start(1, upgrade[0], True)

    def _reset_all_streams(self) -> None:
        """
        The connection is going: every stream in flight ends as a client reset.
        """
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.closed = True
            if stream.chain is not None:
                stream.chain.downstream_reset()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._reset_all_streams()
        self.factory.connection_closed(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = self._clock.seconds()
        # Frames the streams produce while this read is handled go out in
        # one write at its end.
        self._receiving = True
        try:
            self._receive(data)
        finally:
            self._receiving = False
        self._flush()

    def _receive(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except H2ProtocolError as e:
            log.info("HTTP/2 protocol error from {peer}: {error}", peer=self._peer_ip.decode(), error=str(e))
            self._goaway(ErrorCodes.PROTOCOL_ERROR)
            return
        for event in events:
            if self._closing:
                return
            kind = type(event)
            if kind is DataReceived:
                self._data(event)
            elif kind is RequestReceived:
                self._request(event)
            elif kind is StreamEnded:
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.request_open:
                    stream.request_open = False
                    if stream.chain is not None:
                        stream.chain.request_data(b"", True)
            elif kind is TrailersReceived:
                self._trailers(event)
            elif kind is WindowUpdated:
                self._window_updated(event.stream_id)
            elif kind is StreamReset:
                self._reset_by_client(event.stream_id)
            elif kind is RemoteSettingsChanged:
                self._window_updated(0)
            elif kind is ConnectionTerminated:
                if event.error_code != ErrorCodes.NO_ERROR or not self.streams:
                    self._flush()
                    self._close()
                    return
                # The client is done starting streams: finish the ones in
                # flight, then close (RFC 9113 6.8).
                self._goaway_received = True
        if self.factory.draining and not self._goaway_sent:
            self.start_drain()

    # Inbound events

    def _request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        if self._goaway_sent or self._goaway_received or len(self.streams) >= self.max_concurrent_streams:
            self._conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        try:
            head = request_from_h2(event.headers, self.factory.manager.listener.scheme)
        except StreamProtocolError as e:
            log.info("bad HTTP/2 request from {peer}: {reason}", peer=self._peer_ip.decode(), reason=str(e))
            self._conn.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        self._start(sid, head, event.stream_ended is not None)

    def _start(self, sid: int, head: RequestHead, end_stream: bool) -> None:
        stream = _ServerStream(self, sid)
        stream.request_open = not end_stream
        self.streams[sid] = stream
        manager = self.factory.manager
        if self._peer_info is None:
            self._peer_info = manager.peer_info(self.transport)
        principal, client_cert, port = self._peer_info
        request_id = forwarding_headers(head, self._peer_ip, client_cert)
        chain = manager.new_stream(stream, self._peer, request_id, principal, port, self._rate)
        stream.chain = chain
        chain.request_headers(head, end_stream)
        if (not end_stream and (manager.listener.max_request_bytes or manager.route_body_limits)
                and stream.chain is chain and not stream.closed):
            limit = body_limit(manager.listener, chain.route)
            if limit:
                stream.body_limit = limit
                length = head.headers.get(b"content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    self._body_too_large(stream)

    def _data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.chain is None:
            self._acknowledge(event.flow_controlled_length, event.stream_id)
            return
        end = event.stream_ended is not None
        if stream.body_limit:
            stream.body_count += len(event.data)
            if stream.body_count > stream.body_limit:
                self._acknowledge(event.flow_controlled_length, event.stream_id)
                self._body_too_large(stream)
                return
        if end:
            stream.request_open = False
        stream.chain.request_data(event.data, end)
        stream.received(event.flow_controlled_length)

    def _body_too_large(self, stream: _ServerStream) -> None:
        """
        A request body over its listener's or route's C{max_request_bytes}:
        413 (the rest of the body is refused with C{RST_STREAM NO_ERROR}),
        or a reset if the response has begun.
        """
        stream.body_limit = 0
        stream.chain.send_local_reply(_TOO_LARGE)

    def _trailers(self, event: TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or not stream.request_open:
            return
        stream.request_open = False
        try:
            trailers = trailers_from_h2(event.headers)
        except StreamProtocolError:
            stream.chain.downstream_reset()
            stream.reset_stream(ErrorCodes.PROTOCOL_ERROR)
            return
        stream.chain.request_trailers(trailers)

    def _window_updated(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.send_pending()
            return
        for stream in list(self.streams.values()):
            if stream._buffer or stream._end_pending:
                stream.send_pending()

    def _reset_by_client(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.closed = True
            if stream.chain is not None:
                stream.chain.add_response_flag(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
                stream.chain.downstream_reset()
        now = self._clock.seconds()
        resets = self._resets
        resets.append(now)
        while resets and resets[0] < now - self.rapid_reset_window:
            resets.popleft()
        if len(resets) > self.rapid_reset_limit:
            log.warn("HTTP/2 rapid reset from {peer}: {n} resets in {window}s; closing",
                     peer=self._peer_ip.decode(), n=len(resets), window=self.rapid_reset_window)
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    # Helpers for the streams

    def _acknowledge(self, size: int, stream_id: int) -> None:
        if size and not self._closing:
            try:
                self._conn.acknowledge_received_data(size, stream_id)
            except (StreamClosedError, H2ProtocolError):
                pass

    def _stream_done(self, stream: _ServerStream) -> None:
        self.streams.pop(stream.stream_id, None)
        self._last_activity = self._clock.seconds()
        if not self.streams and (self._goaway_sent or self._goaway_received or self.factory.draining):
            self._flush()
            self._close()

    def _flush(self) -> None:
        if self._closing or self._receiving:
            return
        data = self._conn.data_to_send()
        if data:
            self._write(data)

    def _goaway(self, code: int) -> None:
        """
        End the connection at once with a GOAWAY carrying C{code}.
        """
        if self._closing:
            return
        self._goaway_sent = True
        self._conn.close_connection(code)
        self._receiving = False
        self._flush()
        self._reset_all_streams()
        self._close()

    def start_drain(self) -> None:
        """
        Tell the client no new streams will be accepted; close once the
        streams in flight finish.
        """
        if self._closing or self._goaway_sent:
            return
        self._goaway_sent = True
        # Written by hand: h2's close_connection() closes its state machine,
        # and the streams in flight must still finish.
        self._receiving = False
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._conn.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self._write(frame.serialize())
        if not self.streams:
            self._close()

    def _close(self) -> None:
        if not self._closing:
            self._receiving = False
            self._flush()
            self._closing = True
            self.transport.loseConnection()

    # Idle timeout

    def _schedule_idle_check(self, delay: float | None = None) -> None:
        idle = self.factory.manager.listener.idle_timeout
        if idle > 0 and not self._closing:
            self._timer = self._clock.callLater(idle if delay is None else delay, self._check_idle)

    def _check_idle(self) -> None:
        self._timer = None
        if self._closing:
            return
        idle = self.factory.manager.listener.idle_timeout
        if self.factory.draining:
            self.start_drain()
        if not self.streams:
            waited = self._clock.seconds() - self._last_activity
            if waited >= idle:
                self.start_drain()
                return
            self._schedule_idle_check(idle - waited)
            return
        self._schedule_idle_check()

    # IPushProducer: the client's TCP window throttles every stream's upstream.

    def pauseProducing(self) -> None:
        self._transport_paused = True
        for stream in self.streams.values():
            stream.update_producer()

    def resumeProducing(self) -> None:
        self._transport_paused = False
        for stream in list(self.streams.values()):
            stream.update_producer()

    def stopProducing(self) -> None:
        pass
