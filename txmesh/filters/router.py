"""
The router: the last filter of every HTTP chain.

It takes the route matched for the stream, picks one of its weighted
destinations (cluster and subset), applies rewrites and header changes,
and runs the exchange on a pooled upstream connection, relaying the
response back through the chain.  With a retry policy it buffers the
request body (up to a limit) so it can try again on another host, with
jittered backoff, per-try timeouts and the cluster's retry budget.  It
honours the cluster's circuit breaker, reports every outcome to outlier
detection, and can mirror requests to a shadow cluster.

Failures become Envoy-shaped local replies with a response flag: C{NR}
(404, no route), C{UH} (503, no healthy upstream), C{UO} (503, circuit
breaker overflow), C{UF} (503, connect failure), C{UC} (503, upstream
closed before answering), C{UPE} (502, malformed upstream response),
C{UT} (504, timeout), plus C{URX} when retries were exhausted.  On a gRPC
request the chain sends these as gRPC statuses (L{txmesh.proxy.grpc}), and
the client's C{grpc-timeout} is a deadline beside the route timeout.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.config.model import HeaderOps, Redirect, Route, WeightedDestination
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, LocalReply
from txmesh.proxy.cluster import NoHealthyUpstream, UpstreamOverflow
from txmesh.proxy.grpc import is_grpc, parse_grpc_timeout
from txmesh.proxy.lb import hash_key_for
from txmesh.proxy.retry import Outcome, backoff_delay, should_retry
from txmesh.proxy.stream import Headers, RequestHead, ResponseFlag, ResponseHead

log = Logger()

# Request bytes buffered while the upstream connection is being set up;
# beyond this the client is paused rather than buffered without bound.
PENDING_BODY_LIMIT = 1 << 20

# Mirrored request bodies are copied only up to this size.
MIRROR_BODY_LIMIT = 64 * 1024

_CONNECT_FAILURE = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
_TERMINATED = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
_OVERFLOW = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"

_DATA, _TRAILERS = 0, 1


def apply_header_ops(headers: Headers, ops: HeaderOps) -> None:
    """
    Apply Istio-style header changes: remove, then set, then add.
    """
    for name in ops.remove:
        headers.remove(name)
    for name, value in ops.set:
        headers.set(name, value)
    for name, value in ops.add:
        headers.add(name, value)


def choose_destination(route: Route, rng: Any) -> WeightedDestination | None:
    """
    @return: one of C{route}'s destinations, drawn by weight, or C{None}
        when the route names a single C{cluster}.
    """
    destinations = route.destinations
    if not destinations:
        return None
    if len(destinations) == 1:
        return destinations[0]
    total = 0
    for d in destinations:
        total += d.weight
    point = rng.random() * total
    for d in destinations:
        point -= d.weight
        if point < 0:
            return d
    return destinations[-1]


def redirect_location(head: RequestHead, redirect: Redirect) -> bytes:
    """
    @return: the C{Location} of a redirect for C{head}.
    """
    scheme = redirect.scheme or head.scheme
    authority = redirect.authority or head.authority
    if redirect.port is not None:
        host = authority
        if not host.endswith(b"]") and b":" in host:
            host = host.rsplit(b":", 1)[0]
        authority = host + b":" + str(redirect.port).encode("ascii")
    path = redirect.uri if redirect.uri is not None else head.path
    return scheme + b"://" + authority + path


def _shadow_authority(authority: bytes) -> bytes:
    # Envoy's convention: "reviews:9080" is mirrored as "reviews-shadow:9080".
    if b":" in authority and not authority.endswith(b"]"):
        host, port = authority.rsplit(b":", 1)
        return host + b"-shadow:" + port
    return authority + b"-shadow"


class _Discard:
    """
    The response handler of a mirrored request: everything is dropped.
    """

    def response_informational(self, head: ResponseHead) -> None:
        pass

    def response_head(self, head: ResponseHead, end_stream: bool) -> None:
        pass

    def response_data(self, data: bytes, end_stream: bool) -> None:
        pass

    def response_trailers(self, trailers: Headers) -> None:
        pass

    def upstream_reset(self, flag: str, reason: str) -> None:
        pass

    def flush(self) -> None:
        pass


def send_mirror(cluster: Any, subset: str | None, head: RequestHead, events: list) -> None:
    """
    Fire and forget a copy of a complete request to C{cluster}.
    """
    try:
        pool = cluster.pick(subset)
        conn = pool.acquire()
    except (NoHealthyUpstream, UpstreamOverflow):
        return
    copy = RequestHead(head.method, head.path, _shadow_authority(head.authority), head.headers.copy(),
                       head.scheme, head.version)

    def send(conn: Any) -> None:
        conn.start(copy, not events, _Discard())
        for kind, arg, end in events:
            if kind == _DATA:
                conn.send_data(arg, end)
            else:
                conn.send_trailers(arg)

    if isinstance(conn, Deferred):
        conn.addCallbacks(send, lambda f: None)
    else:
        send(conn)


class RouterFilter(HTTPFilter):
    """
    One stream's upstream exchange, over one or more tries.
    """

    # Per-request state lives in class-level defaults, overridden per
    # instance only when it changes: most requests touch few of them.
    _route: Route | None = None
    _cluster: Any = None
    _subset: str | None = None
    _dest: WeightedDestination | None = None
    _head: RequestHead | None = None
    _end_stream = False
    _request_done = False
    _events: list | None = None
    _events_bytes = 0
    _replayable = True
    _paused_client = False
    _conn: Any = None
    _pool: Any = None
    _acquiring: Deferred | None = None
    _timer: Any = None
    _try_timer: Any = None
    _deadline: Any = None
    _backoff: Any = None
    _retries = 0
    _tried: set | None = None
    _hash_key: bytes | None = None
    _committed = False
    _finished = False
    _counted = False
    _breaker_slot = False
    _budget_slot = False
    _stale_retried = False
    _mirror_too_big = False

    def __init__(self, stream: Any):
        self._stream = stream

    def _rng(self) -> Any:
        proxy = self._stream.proxy
        rng = getattr(proxy, "rng", None) if proxy is not None else None
        return rng if rng is not None else random

    # Request path

    def request_headers(self, head: RequestHead, end_stream: bool) -> Any:
        stream = self._stream
        route = stream.route
        if route is None:
            return LocalReply(404, b"", flag=ResponseFlag.NO_ROUTE)
        direct = route.direct_response
        if direct is not None:
            return LocalReply(direct.status, direct.body, flag=direct.flag)
        if route.redirect is not None:
            return LocalReply(route.redirect.code, b"", ((b"location", redirect_location(head, route.redirect)),),
                              flag="")
        dest = choose_destination(route, self._rng()) if route.destinations else None
        cluster_name = dest.cluster if dest is not None else route.cluster
        cluster = stream.cluster_manager.get(cluster_name)
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
        headers = head.headers
        ops = route.request_headers
        if ops.set or ops.add or ops.remove:
            apply_header_ops(headers, ops)
        if dest is not None:
            ops = dest.request_headers
            if ops.set or ops.add or ops.remove:
                apply_header_ops(headers, ops)
        for name, value in route.request_headers_to_add:
            headers.add(name, value)
        if not cluster.breaker.try_start_request():
            return self._overflow(cluster)
        self._breaker_slot = True
        self._route = route
        self._cluster = cluster
        self._dest = dest
        stream.upstream_cluster = cluster.name
        if dest is not None:
            self._subset = dest.subset
        hash_policy = route.hash_policy or cluster.config.hash_policy
        if hash_policy is not None:
            peer = getattr(stream.downstream_address, "host", "")
            self._hash_key = hash_key_for(hash_policy, headers, head.path, peer.encode("ascii", "replace"))
        self._head = head
        self._end_stream = end_stream
        grpc_timeout = headers.get(b"grpc-timeout")
        if grpc_timeout is not None and is_grpc(head):
            self._arm_grpc_deadline(grpc_timeout)
        if end_stream:
            self._request_done = True
            self._arm_timeout()
            if route.mirror is not None:
                self._mirror()
        self._start_try()
        return None

    def request_data(self, data: bytes, end_stream: bool) -> Any:
        if self._finished:
            return None
        self._event((_DATA, data, end_stream), len(data))
        return None

    def request_trailers(self, trailers: Headers) -> Any:
        if self._finished:
            return None
        self._event((_TRAILERS, trailers, True), 0)
        return None

    def _event(self, event: tuple[int, Any, bool], size: int) -> None:
        route = self._route
        conn = self._conn
        mirror_fits = route.mirror is not None and self._events_bytes + size <= MIRROR_BODY_LIMIT
        if route.mirror is not None and not mirror_fits:
            self._mirror_too_big = True
        keep = conn is None or (self._replayable and (route.retry is not None or mirror_fits))
        if keep:
            if self._events is None:
                self._events = []
            self._events.append(event)
            self._events_bytes += size
            if self._replayable and route.retry is not None and self._events_bytes > route.retry.max_buffered_body:
                # Too big to keep for a replay: this request will not be retried.
                self._replayable = False
            if conn is None and self._events_bytes > PENDING_BODY_LIMIT and not self._paused_client:
                self._paused_client = True
                self._stream.request_producer.pauseProducing()
        if conn is not None:
            if event[0] == _DATA:
                conn.send_data(event[1], event[2])
            else:
                conn.send_trailers(event[1])
            if not self._replayable or (not keep and route.retry is None):
                self._events = None
        if event[2]:
            self._request_done = True
            self._arm_timeout()
            if conn is not None:
                self._arm_try_timeout()
            if route.mirror is not None:
                self._mirror()

    def _mirror(self) -> None:
        route = self._route
        mirror = route.mirror
        if mirror.percent < 100 and self._rng().random() * 100 >= mirror.percent:
            return
        if self._mirror_too_big or (self._events is None and not self._end_stream):
            return
        cluster = self._stream.cluster_manager.get(mirror.cluster)
        if cluster is not None:
            send_mirror(cluster, mirror.subset, self._head, list(self._events or ()))

    # Timers

    def _arm_timeout(self) -> None:
        stream = self._stream
        route = stream.route
        if self._timer is None and route is not None and route.timeout > 0:
            deadlines = stream.proxy.deadlines if stream.proxy is not None else None
            if deadlines is not None:
                self._timer = (deadlines, deadlines.add(self, route.timeout, self._timed_out))
            else:
                self._timer = stream.clock.callLater(route.timeout, self._timed_out)

    def _arm_grpc_deadline(self, value: bytes) -> None:
        # The client's deadline bounds the whole call, from the request
        # head on (client streams too), beside the route timeout, which
        # starts when the request is complete: whichever is shorter wins.
        # It is forwarded unchanged, as Envoy does: the upstream's own
        # deadline is the client's, less at most the time spent here.
        timeout = parse_grpc_timeout(value)
        if timeout is None:
            return
        stream = self._stream
        delay = max(0.0, stream.start_time + timeout - stream.clock.seconds())
        self._deadline = stream.clock.callLater(delay, self._deadline_expired)

    def _deadline_expired(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._disarm()
        self._timed_out()

    def _arm_try_timeout(self) -> None:
        retry = self._route.retry if self._route is not None else None
        if retry is not None and retry.per_try_timeout > 0 and self._try_timer is None and not self._committed:
            self._try_timer = self._stream.clock.callLater(retry.per_try_timeout, self._try_timed_out)

    def _disarm(self) -> None:
        timer, self._timer = self._timer, None
        if type(timer) is tuple:
            timer[0].cancel(self, timer[1])
        elif timer is not None and timer.active():
            timer.cancel()

    def _disarm_try(self) -> None:
        timer, self._try_timer = self._try_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # Tries

    def _start_try(self) -> None:
        self._backoff = None
        cluster = self._cluster
        try:
            pool = cluster.pick(self._subset, self._hash_key, self._tried or frozenset())
        except NoHealthyUpstream:
            self._fail(503, b"no healthy upstream", ResponseFlag.NO_HEALTHY_UPSTREAM)
            return
        self._pool = pool
        self._counted = True
        pool.active_requests += 1
        cluster.upstream_requests += 1
        self._stream.upstream_host = pool.endpoint
        if not self._head.authority:
            # An HTTP/1.0 client sent no Host and the listener names no
            # default: the upstream still needs one.
            self._head.authority = str(pool.endpoint).encode("ascii")
        try:
            conn = pool.acquire()
        except UpstreamOverflow:
            self._try_over()
            self._fail(503, _OVERFLOW, ResponseFlag.UPSTREAM_OVERFLOW)
            return
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
        events = self._events
        connect = self._head.method == b"CONNECT"
        if connect:
            # A forward proxy's tunnel (see txmesh.proxy.forward_proxy): the
            # connection itself is the answer.
            conn.start_tunnel(self)
        else:
            conn.start(self._head, self._end_stream, self)
        if not self._request_done:
            conn.set_request_producer(stream.request_producer)
        stream.set_response_producer(conn)
        if events:
            for kind, arg, end in events:
                if self._conn is None:
                    break
                if kind == _DATA:
                    conn.send_data(arg, end)
                else:
                    conn.send_trailers(arg)
            if not self._replayable or (self._route.retry is None and self._route.mirror is None):
                self._events = None
                self._events_bytes = 0
            if self._paused_client:
                self._paused_client = False
                stream.request_producer.resumeProducing()
        if self._request_done:
            self._arm_try_timeout()
        if connect and self._conn is conn:
            self.response_head(ResponseHead(200, Headers(), b"Connection Established"), False)

    def _connect_failed(self, failure: Failure) -> None:
        self._acquiring = None
        if failure.check(CancelledError) or self._finished:
            return
        self._record(None)
        self._try_over()
        if self._retry_after(Outcome.CONNECT_FAILURE):
            return
        # A tunnel that cannot be opened is a bad gateway, as forward
        # proxies answer; a request is a 503, as Envoy answers.
        status = 502 if self._head.method == b"CONNECT" else 503
        self._fail(status, _CONNECT_FAILURE, ResponseFlag.UPSTREAM_CONNECTION_FAILURE)

    def _record(self, status: int | None) -> None:
        pool = self._pool
        if pool is not None:
            self._cluster.record_result(pool.endpoint, status)

    def _try_over(self) -> None:
        self._disarm_try()
        if self._counted:
            self._counted = False
            self._pool.active_requests -= 1
        if self._budget_slot:
            self._budget_slot = False
            self._cluster.retry_budget.finish()

    def _retry_after(self, outcome: str | None = None, status: int | None = None,
                     grpc_status: int | None = None) -> bool:
        """
        Start another try if the policy, the buffered body and the retry
        budget allow; the current try must already be over.

        @return: whether a retry was scheduled.
        """
        route = self._route
        policy = route.retry if route is not None else None
        if policy is None or self._committed or self._finished:
            return False
        if not should_retry(policy, status, outcome, grpc_status):
            return False
        if self._retries >= policy.attempts or not self._replayable or not self._request_done:
            if self._retries:
                self._stream.add_response_flag(ResponseFlag.UPSTREAM_RETRY_LIMIT)
            return False
        cluster = self._cluster
        if not cluster.retry_budget.try_start(sum(p.active_requests for p in cluster.pools())):
            self._stream.add_response_flag(ResponseFlag.UPSTREAM_RETRY_LIMIT)
            return False
        self._budget_slot = True
        self._retries += 1
        proxy = self._stream.proxy
        if proxy is not None and proxy.metrics is not None:
            proxy.metrics.count_retry(cluster.name)
        if self._tried is None:
            self._tried = set()
        if self._pool is not None:
            self._tried.add(self._pool.endpoint)
        delay = backoff_delay(policy, self._retries, self._rng())
        self._backoff = self._stream.clock.callLater(delay, self._start_try)
        return True

    # UpstreamResponseHandler

    def response_informational(self, head: ResponseHead) -> None:
        self._stream.encode_informational(head)

    def response_head(self, head: ResponseHead, end_stream: bool) -> None:
        status = head.status
        self._record(status)
        route = self._route
        if route.retry is not None and not self._committed:
            grpc = head.headers.get(b"grpc-status")
            grpc_status = int(grpc) if grpc is not None and grpc.isdigit() else None
            if ((status >= 400 or grpc_status) and self._retries and self._retries >= route.retry.attempts
                    and should_retry(route.retry, status, None, grpc_status)):
                # The last try failed as the ones before it, and no try is left.
                self._stream.add_response_flag(ResponseFlag.UPSTREAM_RETRY_LIMIT)
            elif (status >= 400 or grpc_status) and self._retry_ready():
                conn, self._conn = self._conn, None
                self._try_over()
                if self._retry_after(None, status, grpc_status):
                    # A complete response has already given its connection
                    # back to the pool, maybe to another request: aborting
                    # it would kill that request's exchange.
                    if conn is not None and not end_stream:
                        conn.abort()
                    return
                # Not retried after all: hand this response on.
                self._conn = conn
        self._committed = True
        headers = head.headers
        ops = route.response_headers
        if ops.set or ops.add or ops.remove:
            apply_header_ops(headers, ops)
        if self._dest is not None:
            ops = self._dest.response_headers
            if ops.set or ops.add or ops.remove:
                apply_header_ops(headers, ops)
        for name, value in route.response_headers_to_add:
            headers.add(name, value)
        if end_stream:
            self._exchange_over()
        self._stream.encode_headers(head, end_stream)

    def _retry_ready(self) -> bool:
        policy = self._route.retry
        return self._retries < policy.attempts and self._replayable and self._request_done

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
        if self._committed:
            self._exchange_over()
            self._log_failure(stream.response_head.status if stream.response_head else 0, flag,
                              f"{reason} after the response started; client connection reset")
            stream.add_response_flag(flag)
            stream.reset()
            return
        if (conn is not None and conn.reused and not conn.response_started and self._events is None
                and self._end_stream and not self._stale_retried):
            # A pooled keep-alive connection the upstream had already closed:
            # nothing reached the application, so one more try is safe.
            self._stale_retried = True
            self._try_over()
            self._start_try()
            return
        self._record(None)
        self._try_over()
        if flag != ResponseFlag.UPSTREAM_PROTOCOL_ERROR and self._retry_after(Outcome.RESET):
            return
        if flag == ResponseFlag.UPSTREAM_PROTOCOL_ERROR:
            self._fail(502, b"upstream protocol error: " + reason.encode("utf-8", "replace"), flag)
        else:
            self._fail(503, _TERMINATED, flag)

    # Endings

    def _try_timed_out(self) -> None:
        self._try_timer = None
        if self._finished or self._committed:
            return
        self._abort_upstream()
        self._record(None)
        self._try_over()
        if self._retry_after(Outcome.TIMEOUT):
            return
        self._fail(504, b"upstream request timeout", ResponseFlag.UPSTREAM_TIMEOUT)

    def _timed_out(self) -> None:
        self._timer = None
        if self._finished:
            return
        self._abort_upstream()
        stream = self._stream
        if self._committed:
            self._log_failure(stream.response_head.status if stream.response_head else 0,
                              ResponseFlag.UPSTREAM_TIMEOUT, "route timeout after the response started; reset")
            self._exchange_over()
            stream.add_response_flag(ResponseFlag.UPSTREAM_TIMEOUT)
            stream.reset()
        else:
            self._fail(504, b"upstream request timeout", ResponseFlag.UPSTREAM_TIMEOUT)

    def _overflow(self, cluster: Any) -> LocalReply:
        self._log_failure(503, ResponseFlag.UPSTREAM_OVERFLOW, f"circuit breaker of {cluster.name} is open")
        return LocalReply(503, _OVERFLOW, flag=ResponseFlag.UPSTREAM_OVERFLOW)

    def _fail(self, status: int, body: bytes, flag: str) -> None:
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
        if self._backoff is not None:
            backoff, self._backoff = self._backoff, None
            if backoff.active():
                backoff.cancel()

    def _exchange_over(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._conn = None
        self._events = None
        self._try_over()
        if self._timer is not None:
            self._disarm()
        if self._deadline is not None:
            deadline, self._deadline = self._deadline, None
            if deadline.active():
                deadline.cancel()
        if self._backoff is not None:
            backoff, self._backoff = self._backoff, None
            if backoff.active():
                backoff.cancel()
        if self._breaker_slot:
            self._breaker_slot = False
            self._cluster.breaker.finish_request()
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
