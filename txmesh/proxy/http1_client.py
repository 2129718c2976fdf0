"""
The client half of HTTP/1.1: one pooled connection to an upstream, carrying
one request at a time.

A thin Twisted protocol around L{txmesh.proxy.http1.ResponseParser}.  The
router hands it a request with L{HTTP1ClientConnection.start} and receives
the response through an L{UpstreamResponseHandler}; when both halves are
done and the upstream allows it, the connection goes back to its pool.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.proxy.http1 import (
    ProtocolError,
    ResponseParser,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
)
from txmesh.proxy.stream import Headers, RequestHead, ResponseFlag, ResponseHead

log = Logger()


class UpstreamResponseHandler(TypingProtocol):
    """
    Receives one upstream exchange's response events.
    """

    def response_informational(self, head: ResponseHead) -> None: ...

    def response_head(self, head: ResponseHead, end_stream: bool) -> None: ...

    def response_data(self, data: bytes, end_stream: bool) -> None: ...

    def response_trailers(self, trailers: Headers) -> None: ...

    def upstream_reset(self, flag: str, reason: str) -> None: ...

    def flush(self) -> None: ...


class ConnectionReleaser(TypingProtocol):
    """
    Where a connection goes when its exchange is over (its pool).
    """

    def release(self, connection: HTTP1ClientConnection) -> None: ...

    def connection_lost(self, connection: HTTP1ClientConnection) -> None: ...


@implementer(IPushProducer)
class HTTP1ClientConnection(Protocol):
    """
    One HTTP/1.1 connection to an upstream endpoint.

    @ivar endpoint: the L{Endpoint} it is connected to.
    @ivar reused: it has served an earlier exchange (a failure before any
        response byte may then be a stale keep-alive, and worth one retry).
    @ivar idle_since: C{clock.seconds()} when it was last released.
    @ivar response_started: bytes of the current response have arrived.
    """

    def __init__(self, pool: ConnectionReleaser, endpoint: Any):
        self._pool = pool
        self.endpoint = endpoint
        self._parser = ResponseParser(self)
        self._handler: UpstreamResponseHandler | None = None
        self._chunked = False
        self._tunnel = False
        self._request_done = True
        self._response_done = True
        self._paused = False
        self._request_producer: Any = None
        self.reused = False
        self.requests_served = 0
        self.idle_since = 0.0
        self.connected = False
        self.response_started = False

    # Twisted protocol

    def connectionMade(self) -> None:
        self.connected = True
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not TCP (in-memory transports, UNIX sockets)
        self._write = self.transport.write
        if self.factory is not None:
            self.factory.connected(self)

    def dataReceived(self, data: bytes) -> None:
        handler = self._handler
        if handler is None:
            # Bytes on an idle connection: the upstream is confused or is
            # closing; this connection cannot be trusted for a new request.
            self.transport.loseConnection()
            return
        self.response_started = True
        if self._tunnel:
            handler.response_data(data, False)
            return
        try:
            tail = self._parser.receive_data(data)
        except ProtocolError as e:
            log.info("upstream {endpoint} protocol error: {reason}", endpoint=str(self.endpoint), reason=e.reason)
            self._fail(ResponseFlag.UPSTREAM_PROTOCOL_ERROR, e.reason)
            return
        if tail is not None and self._handler is not None:
            self._tunnel = True
            if tail:
                self._handler.response_data(tail, False)
        if self._handler is not None:
            self._handler.flush()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        handler = self._handler
        if handler is not None:
            if self._tunnel:
                self._handler = None
                handler.response_data(b"", True)
            elif not self._parser.connection_lost():
                self._handler = None
                handler.upstream_reset(ResponseFlag.UPSTREAM_CONNECTION_TERMINATION,
                                       "upstream connection closed")
        self._handler = None
        self._pool.connection_lost(self)

    # Sending a request

    def start(self, head: RequestHead, end_stream: bool, handler: UpstreamResponseHandler) -> None:
        """
        Send a request head; the response will go to C{handler}.
        """
        if self._paused:
            self.resumeProducing()
        self._handler = handler
        self._request_done = end_stream
        self._response_done = False
        self.response_started = False
        upgrade = b"upgrade" in head.headers
        self._tunnel = False
        self._parser.expect_response(head.method == b"HEAD")
        self._chunked = not end_stream and not upgrade and b"content-length" not in head.headers
        self._write(encode_request_head(head, self._chunked, upgrade))

    def start_tunnel(self, handler: UpstreamResponseHandler) -> None:
        """
        Make this fresh connection a C{CONNECT} tunnel: no request head is
        sent, and bytes go both ways unparsed until either side closes;
        C{send_data(b"", True)} half-closes it.  It never returns to the pool.
        """
        self._handler = handler
        self._request_done = False
        self._response_done = False
        self._chunked = False
        self._tunnel = True
        self.response_started = True

    def send_data(self, data: bytes, end_stream: bool) -> None:
        """
        Send a piece of the request body.
        """
        if self._request_done or self._handler is None:
            return
        if end_stream:
            self._request_done = True
        write = self._write
        if self._chunked:
            if data:
                write(encode_chunk(data))
            if end_stream:
                write(encode_last_chunk())
        elif data:
            write(data)
        if self._tunnel and end_stream:
            # A paused producer would hold the half-close back until it is
            # resumed: Twisted resumes it instead of closing when the
            # buffer drains.
            if self._request_producer is not None:
                self._request_producer = None
                self.transport.unregisterProducer()
            self.transport.loseWriteConnection()
        if end_stream:
            self._maybe_done()

    def send_trailers(self, trailers: Headers) -> None:
        """
        End the request body with trailers (sent only with chunked framing).
        """
        if self._request_done or self._handler is None:
            return
        self._request_done = True
        if self._chunked:
            self._write(encode_last_chunk(trailers))
        self._maybe_done()

    def set_request_producer(self, producer: Any) -> None:
        """
        Let this connection's write buffer pause the downstream reading.
        """
        if self._request_producer is None and self.transport is not None:
            self._request_producer = producer
            self.transport.registerProducer(producer, True)

    def abort(self) -> None:
        """
        Abandon the exchange: nothing more is delivered, the connection closes.
        """
        self._handler = None
        if self.transport is not None:
            self.transport.abortConnection()

    # Response events from the parser

    def response_informational(self, head: ResponseHead) -> None:
        if self._handler is not None:
            self._handler.response_informational(head)

    def response_head(self, head: ResponseHead, end_stream: bool) -> None:
        handler = self._handler
        if handler is None:
            return
        if end_stream:
            self._response_done = True
            # Pooled before the handler hears: it may start the next
            # (pipelined) request at once, which should reuse this connection.
            self._maybe_done()
        handler.response_head(head, end_stream)

    def response_data(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.response_data(data, False)

    def response_end(self, trailers: Headers | None, last_data: bytes = b"") -> None:
        handler = self._handler
        self._response_done = True
        if handler is not None and trailers and last_data:
            handler.response_data(last_data, False)
        self._maybe_done()  # first, as in response_head
        if handler is not None:
            if trailers:
                handler.response_trailers(trailers)
            else:
                handler.response_data(last_data, True)

    def _maybe_done(self) -> None:
        if not self._response_done:
            return
        if not self._request_done:
            # The upstream answered before reading the whole request (e.g. a
            # 413): the rest of the body has nowhere to go on this connection.
            self._handler = None
            self._request_done = True
            self.transport.loseConnection()
            return
        self._handler = None
        if self._request_producer is not None:
            self.transport.unregisterProducer()
            self._request_producer = None
        if self._paused:
            self.resumeProducing()
        if self._parser.keep_alive and not self._tunnel and self.connected:
            self._pool.release(self)
        else:
            self.transport.loseConnection()

    def _fail(self, flag: str, reason: str) -> None:
        handler = self._handler
        self._handler = None
        if handler is not None:
            handler.upstream_reset(flag, reason)
        self.transport.abortConnection()

    # IPushProducer: the downstream's write buffer throttles our reading.

    def pauseProducing(self) -> None:
        # The downstream may ask after the exchange ended (its last write
        # filled its buffer, and it unregisters us before it drains, so it
        # would never resume us): a pooled connection must keep reading.
        if self._handler is None:
            return
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # The downstream connection went away; the router's reset handles it.
        pass
