"""
The router: the last filter of every HTTP chain.

It takes the route matched for the stream, applies its rewrites, picks an
endpoint of the route's cluster, and runs the exchange on a pooled upstream
connection, relaying the response back through the chain.  Failures become
Envoy-shaped local replies with a response flag: C{NR} (404, no route),
C{UH} (503, no healthy upstream), C{UF} (503, connect failure), C{UC} (503,
upstream closed before answering), C{UPE} (502, malformed upstream
response), C{UT} (504, route timeout).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, LocalReply
from txmesh.proxy.cluster import NoHealthyUpstream
from txmesh.proxy.stream import Headers, RequestHead, ResponseFlag, ResponseHead

log = Logger()

# Request bytes buffered while the upstream connection is being set up;
# beyond this the client is paused rather than buffered without bound.
PENDING_BODY_LIMIT = 1 << 20

_CONNECT_FAILURE = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
_TERMINATED = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"


class RouterFilter(HTTPFilter):
    """
    One stream's upstream exchange.
    """

    # Per-request state lives in class-level defaults, overridden per
    # instance only when it changes: most requests touch few of them.
    _conn: Any = None
    _pool: Any = None
    _cluster: Any = None
    _head: RequestHead | None = None
    _end_stream = False
    _pending: list | None = None
    _pending_bytes = 0
    _paused_client = False
    _acquiring: Deferred | None = None
    _timer: Any = None
    _body_sent = False
    _finished = False
    _counted = False

    def __init__(self, stream: Any):
        self._stream = stream

    # Request path

    def request_headers(self, head: RequestHead, end_stream: bool) -> Any:
        stream = self._stream
        route = stream.route
        if route is None:
            return LocalReply(404, b"", flag=ResponseFlag.NO_ROUTE)
        direct = route.direct_response
        if direct is not None:
            return LocalReply(direct.status, direct.body, flag="")
        cluster = stream.cluster_manager.get(route.cluster)
        if cluster is None:
            return LocalReply(503, b"no cluster\n", flag="NC")
        if route.prefix_rewrite is not None:
            # An exact-path match rewrites the whole path (keeping the query);
            # a prefix match rewrites the prefix, as Envoy does.
            match = route.match
            prefix = match.path if match.path is not None else (match.prefix or b"")
            if head.path.startswith(prefix):
                head.path = route.prefix_rewrite + head.path[len(prefix):]
                if not head.path.startswith(b"/"):
                    head.path = b"/" + head.path
        if route.host_rewrite is not None:
            head.authority = route.host_rewrite
        for name, value in route.request_headers_to_add:
            head.headers.add(name, value)
        self._head = head
        self._end_stream = end_stream
        self._cluster = cluster
        if end_stream:
            self._arm_timeout()
        self._connect()
        return None

    def request_data(self, data: bytes, end_stream: bool) -> Any:
        if self._finished:
            return None
        conn = self._conn
        if conn is not None:
            self._body_sent = True
            conn.send_data(data, end_stream)
        else:
            self._buffer((0, data, end_stream), len(data))
        if end_stream:
            self._arm_timeout()
        return None

    def request_trailers(self, trailers: Headers) -> Any:
        if self._finished:
            return None
        if self._conn is not None:
            self._conn.send_trailers(trailers)
        else:
            self._buffer((1, trailers, True), 0)
        self._arm_timeout()
        return None

    def _buffer(self, event: tuple[int, Any, bool], size: int) -> None:
        if self._pending is None:
            self._pending = []
        self._pending.append(event)
        self._pending_bytes += size
        if self._pending_bytes > PENDING_BODY_LIMIT and not self._paused_client:
            self._paused_client = True
            self._stream.request_producer.pauseProducing()

    def _arm_timeout(self) -> None:
        stream = self._stream
        route = stream.route
        if self._timer is None and route is not None and route.timeout > 0:
            deadlines = stream.proxy.deadlines if stream.proxy is not None else None
            if deadlines is not None:
                self._timer = (deadlines, deadlines.add(self, route.timeout, self._timed_out))
            else:
                self._timer = stream.clock.callLater(route.timeout, self._timed_out)

    def _disarm_timeout(self) -> None:
        timer, self._timer = self._timer, None
        if type(timer) is tuple:
            timer[0].cancel(self, timer[1])
        elif timer is not None and timer.active():
            timer.cancel()

    # Connecting

    def _connect(self) -> None:
        try:
            pool = self._cluster.pick()
        except NoHealthyUpstream:
            self._local_failure(503, b"no healthy upstream", ResponseFlag.NO_HEALTHY_UPSTREAM)
            return
        self._pool = pool
        if not self._counted:
            self._counted = True
            pool.active_requests += 1
            self._cluster.upstream_requests += 1
        self._stream.upstream_host = pool.endpoint
        conn = pool.acquire()
        if isinstance(conn, Deferred):
            self._acquiring = conn
            conn.addCallbacks(self._connected, self._connect_failed)
        else:
            self._connected(conn)

    def _connected(self, conn: Any) -> None:
        self._acquiring = None
        if self._finished:
            self._pool.release(conn)
            return
        self._conn = conn
        stream = self._stream
        conn.start(self._head, self._end_stream, self)
        if not self._end_stream:
            conn.set_request_producer(stream.request_producer)
        stream.set_response_producer(conn)
        if self._pending:
            pending, self._pending = self._pending, None
            self._pending_bytes = 0
            for kind, arg, end_stream in pending:
                if self._conn is None:
                    break
                if kind == 0:
                    self._body_sent = True
                    conn.send_data(arg, end_stream)
                else:
                    conn.send_trailers(arg)
            if self._paused_client:
                self._paused_client = False
                stream.request_producer.resumeProducing()

    def _connect_failed(self, failure: Failure) -> None:
        self._acquiring = None
        if failure.check(CancelledError) or self._finished:
            return
        self._local_failure(503, _CONNECT_FAILURE, ResponseFlag.UPSTREAM_CONNECTION_FAILURE)

    # UpstreamResponseHandler

    def response_informational(self, head: ResponseHead) -> None:
        self._stream.encode_informational(head)

    def response_head(self, head: ResponseHead, end_stream: bool) -> None:
        route = self._stream.route
        if route is not None:
            for name, value in route.response_headers_to_add:
                head.headers.add(name, value)
        if end_stream:
            self._exchange_over()
        self._stream.encode_headers(head, end_stream)

    def response_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self._exchange_over()
        self._stream.encode_data(data, end_stream)

    def response_trailers(self, trailers: Headers) -> None:
        self._exchange_over()
        self._stream.encode_trailers(trailers)

    def flush(self) -> None:
        self._stream.flush()

    def upstream_reset(self, flag: str, reason: str) -> None:
        conn, self._conn = self._conn, None
        stream = self._stream
        if stream.response_started:
            self._exchange_over()
            self._log_failure(stream.response_head.status if stream.response_head else 0, flag,
                              f"{reason} after the response started; client connection reset")
            stream.add_response_flag(flag)
            stream.reset()
            return
        if conn is not None and conn.reused and not conn.response_started and not self._body_sent:
            # A pooled keep-alive connection the upstream had already closed:
            # nothing reached the application, so one more try is safe.
            self._connect()
            return
        if flag == ResponseFlag.UPSTREAM_PROTOCOL_ERROR:
            self._local_failure(502, b"upstream protocol error: " + reason.encode("utf-8", "replace"), flag)
        else:
            self._local_failure(503, _TERMINATED, flag)

    # Endings

    def _timed_out(self) -> None:
        self._timer = None
        if self._finished:
            return
        self._abort_upstream()
        stream = self._stream
        if stream.response_started:
            self._log_failure(stream.response_head.status if stream.response_head else 0,
                              ResponseFlag.UPSTREAM_TIMEOUT, "route timeout after the response started; reset")
            stream.add_response_flag(ResponseFlag.UPSTREAM_TIMEOUT)
            stream.reset()
        else:
            self._local_failure(504, b"upstream request timeout", ResponseFlag.UPSTREAM_TIMEOUT)

    def _local_failure(self, status: int, body: bytes, flag: str) -> None:
        self._abort_upstream()
        self._exchange_over()
        self._log_failure(status, flag, body.decode("utf-8", "replace"))
        self._stream.send_local_reply(LocalReply(status, body, flag=flag))

    def _log_failure(self, status: int, flag: str, reason: str) -> None:
        stream = self._stream
        head = self._head or stream.request_head
        route = stream.route
        log.info(
            "{status} {flag} {method} {authority}{path} route={route} cluster={cluster} "
            "upstream={upstream} request_id={request_id}: {reason}",
            status=status, flag=flag, reason=reason,
            method=head.method.decode("latin-1") if head else "-",
            authority=head.authority.decode("latin-1") if head else "",
            path=head.path.decode("latin-1") if head else "",
            route=route.name if route is not None else "-",
            cluster=self._cluster.name if self._cluster is not None else "-",
            upstream=str(stream.upstream_host or "-"),
            request_id=stream.request_id.decode("latin-1"),
        )

    def _abort_upstream(self) -> None:
        if self._acquiring is not None:
            d, self._acquiring = self._acquiring, None
            d.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    def _exchange_over(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._conn = None
        if self._timer is not None:
            self._disarm_timeout()
        if self._counted:
            self._counted = False
            self._pool.active_requests -= 1
        if self._paused_client:
            self._paused_client = False
            self._stream.request_producer.resumeProducing()

    def stream_complete(self) -> None:
        if not self._finished:
            # The stream ended first (client gone, local reply, reset): the
            # upstream exchange cannot be finished, so it is abandoned.
            self._abort_upstream()
            self._exchange_over()


@implementer(IHTTPFilterFactory)
class RouterFactory:
    """
    The C{router} filter: always last, added to a chain when not listed.
    """

    name = "router"

    def parse_config(self, raw: Any) -> None:
        return None

    def create_filter(self, config: Any, stream: Any) -> RouterFilter:
        return RouterFilter(stream)
