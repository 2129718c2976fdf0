"""
The HTTP filter chain: runs one stream's events through its filters.

Request events run through the filters in order; the last filter (the
router) sends them upstream.  Response events -- from the router, or a
L{LocalReply} from any filter -- run back through the filters before the one
that produced them, in reverse order, and reach the downstream codec.

A hook that returns a L{Deferred} (or a coroutine) pauses its direction of
the stream: later events of that direction queue behind it, in order, and the
downstream stops being read until it resolves.  Hooks that return plain
values cost a function call and nothing more.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from inspect import iscoroutine
from typing import Any, Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.config.model import DISABLED
from txmesh.filters.api import CONTINUE, IStreamContext, LocalReply
from txmesh.proxy.grpc import has_grpc_status, is_grpc, local_reply_grpc_status, trailers_only_headers
from txmesh.proxy.stream import FLAGS_HEADER, Headers, RequestHead, ResponseFlag, ResponseHead

log = Logger()

_HEADERS, _DATA, _TRAILERS = 0, 1, 2

# Headers of an HTTP local reply that a gRPC trailers-only reply replaces.
_GRPC_REPLACED = frozenset({b"content-type", b"content-length", b"grpc-message"})


class ResponseWriter(Protocol):
    """
    What a codec offers the chain for one stream: the downstream half.
    """

    def write_informational(self, head: ResponseHead) -> None: ...

    def write_head(self, head: ResponseHead, end_stream: bool) -> None: ...

    def write_data(self, data: bytes, end_stream: bool) -> None: ...

    def write_trailers(self, trailers: Headers) -> None: ...

    def reset_stream(self) -> None: ...

    def flush(self) -> None: ...

    def pause_reading(self, reason: object) -> None: ...

    def resume_reading(self, reason: object) -> None: ...

    def set_response_producer(self, producer: Any) -> None: ...

    @property
    def request_producer(self) -> Any: ...


@implementer(IStreamContext)
class FilterChain:
    """
    One stream's filters, and the stream's context as filters see it.

    @ivar route: the matched route, or C{None}.
    @ivar response_flags: Envoy-style flags set on this stream.
    @ivar response_started: the response head has gone to the codec.
    @ivar complete: the stream is over.
    """

    def __init__(
        self,
        writer: ResponseWriter,
        clock: Any,
        listener_name: str,
        downstream_address: Any,
        request_id: bytes,
        route_lookup: Callable[[RequestHead], Any],
        cluster_manager: Any,
        filter_configs: tuple,
    ):
        """
        @param writer: the codec's downstream half for this stream.
        @param route_lookup: finds the route for a request head.
        @param filter_configs: the listener's L{FilterConfig}s, router last.
        """
        self._writer = writer
        self.clock = clock
        self.listener_name = listener_name
        self.downstream_address = downstream_address
        self.request_id = request_id
        self.cluster_manager = cluster_manager
        self.start_time = clock.seconds()
        self.response_flags: list[str] = []
        self._route_lookup = route_lookup
        self._filter_configs = filter_configs
        self._filters: list[Any] = []

    # Per-stream state with class-level defaults: set on the instance only
    # when it changes, which keeps stream creation cheap.
    proxy: Any = None
    downstream_principal: str | None = None
    downstream_port: int | None = None
    _metadata: dict | None = None
    upstream_host: Any = None
    upstream_cluster: str | None = None
    route: Any = None
    request_head: RequestHead | None = None
    response_head: ResponseHead | None = None
    response_started = False
    request_complete = False
    complete = False
    bytes_received = 0
    bytes_sent = 0
    _req_paused = False
    _req_queue: Any = None
    _resp_paused = False
    _resp_queue: Any = None
    _resp_origin = 0

    # IStreamContext

    @property
    def metadata(self) -> dict:
        # Made on first use: most streams carry none.
        if self._metadata is None:
            self._metadata = {}
        return self._metadata

    def add_response_flag(self, flag: str) -> None:
        if flag and flag not in self.response_flags:
            self.response_flags.append(flag)

    def clear_route_cache(self) -> None:
        if self.request_head is not None:
            self.route = self._route_lookup(self.request_head)

    def filter_config(self, name: str) -> Any:
        route = self.route
        if route is not None:
            for fname, cfg in route.filter_overrides:
                if fname == name:
                    return None if cfg is DISABLED else cfg
        for fc in self._filter_configs:
            if fc.name == name:
                return fc.config
        return None

    def encode_informational(self, head: ResponseHead) -> None:
        if not self.response_started and not self.complete:
            self._writer.write_informational(head)

    def encode_headers(self, head: ResponseHead, end_stream: bool) -> None:
        self._response(_HEADERS, head, end_stream, len(self._filters) - 1)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        self._response(_DATA, data, end_stream, len(self._filters) - 1)

    def encode_trailers(self, trailers: Headers) -> None:
        self._response(_TRAILERS, trailers, True, len(self._filters) - 1)

    def send_local_reply(self, reply: LocalReply) -> None:
        # As if from the terminal filter (like encode_headers): its own
        # response hooks never run -- the router's response_data and
        # response_trailers are its upstream handler, and would loop.
        self._local_reply(reply, len(self._filters) - 1)

    def flush(self) -> None:
        if not self.complete:
            self._writer.flush()

    def reset(self) -> None:
        if not self.complete:
            self._writer.reset_stream()
            self._finish()

    def set_response_producer(self, producer: Any) -> None:
        """
        Let the downstream's write buffer pause C{producer} (the upstream
        connection) when the client reads slowly.
        """
        if not self.complete:
            self._writer.set_response_producer(producer)

    @property
    def request_producer(self) -> Any:
        """
        An C{IPushProducer} that pauses reading the request from the client;
        register it with the upstream transport for request backpressure.
        """
        return self._writer.request_producer

    # Request path, driven by the codec.

    def request_headers(self, head: RequestHead, end_stream: bool) -> None:
        """
        The request head arrived: match the route, build the filters, run.
        """
        self.request_head = head
        self.route = self._route_lookup(head)
        route = self.route
        filters = self._filters
        for fc in self._filter_configs:
            config = fc.config
            if route is not None and route.filter_overrides:
                disabled = False
                for fname, cfg in route.filter_overrides:
                    if fname == fc.name:
                        if cfg is DISABLED:
                            disabled = True
                        config = cfg
                if disabled:
                    continue
            try:
                filters.append(fc.factory.create_filter(config, self))
            except Exception:
                log.failure("filter {name} could not be created", name=fc.name)
                self._internal_error(len(filters))
                return
        if end_stream:
            self.request_complete = True
        self._request(_HEADERS, head, end_stream)

    def request_data(self, data: bytes, end_stream: bool) -> None:
        """
        A piece of the request body arrived.
        """
        self.bytes_received += len(data)
        if end_stream:
            self.request_complete = True
        self._request(_DATA, data, end_stream)

    def request_trailers(self, trailers: Headers) -> None:
        """
        The request ended with trailers.
        """
        self.request_complete = True
        self._request(_TRAILERS, trailers, True)

    def downstream_reset(self) -> None:
        """
        The client went away before the stream finished.
        """
        if not self.complete:
            self.add_response_flag(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
            self._finish()

    def _request(self, kind: int, arg: Any, end_stream: bool) -> None:
        if self.complete:
            return
        if self._req_paused:
            if self._req_queue is None:
                self._req_queue = deque()
            self._req_queue.append((kind, arg, end_stream))
            return
        self._run_request(kind, arg, end_stream, 0)

    def _run_request(self, kind: int, arg: Any, end_stream: bool, start: int) -> bool:
        filters = self._filters
        i = start
        n = len(filters)
        while i < n:
            f = filters[i]
            try:
                if kind == _HEADERS:
                    r = f.request_headers(arg, end_stream)
                elif kind == _DATA:
                    r = f.request_data(arg, end_stream)
                else:
                    r = f.request_trailers(arg)
            except Exception:
                log.failure("filter {filter!r} failed on the request", filter=f)
                self._internal_error(i)
                return False
            if r is None or r is CONTINUE:
                i += 1
                continue
            if type(r) is bytes and kind == _DATA:
                arg = r
                i += 1
                continue
            if isinstance(r, LocalReply):
                self._local_reply(r, i)
                return False
            d = _as_deferred(r)
            if d is None:
                log.error("filter {filter!r} returned {result!r} from a request hook", filter=f, result=r)
                self._internal_error(i)
                return False
            self._req_paused = True
            self._req_event = (kind, arg, end_stream)
            self._writer.pause_reading(self)
            d.addCallbacks(self._request_resumed, self._request_hook_failed,
                           callbackArgs=(i,), errbackArgs=(i,))
            return False
        return True

    def _request_resumed(self, r: Any, i: int) -> None:
        kind, arg, end_stream = self._req_event
        self._req_paused = False
        if self.complete:
            return
        if type(r) is bytes and kind == _DATA:
            arg = r
        elif isinstance(r, LocalReply):
            self._local_reply(r, i)
            return
        elif not (r is None or r is CONTINUE):
            log.error("filter {filter!r} resolved to {result!r}", filter=self._filters[i], result=r)
            self._internal_error(i)
            return
        if self._run_request(kind, arg, end_stream, i + 1):
            queue = self._req_queue or ()
            while queue and not self._req_paused and not self.complete:
                kind, arg, end_stream = queue.popleft()
                self._run_request(kind, arg, end_stream, 0)
        if not self._req_paused and not self.complete:
            self._writer.resume_reading(self)

    def _request_hook_failed(self, failure: Failure, i: int) -> None:
        self._req_paused = False
        log.failure("filter {filter!r} failed on the request", failure, filter=self._filters[i])
        self._internal_error(i)

    # Response path.

    def _response(self, kind: int, arg: Any, end_stream: bool, origin: int) -> None:
        if self.complete:
            return
        if kind == _HEADERS:
            self._resp_origin = origin
        if self._resp_paused:
            if self._resp_queue is None:
                self._resp_queue = deque()
            self._resp_queue.append((kind, arg, end_stream))
            return
        self._run_response(kind, arg, end_stream, self._resp_origin - 1)

    def _run_response(self, kind: int, arg: Any, end_stream: bool, start: int) -> None:
        filters = self._filters
        i = start
        while i >= 0:
            f = filters[i]
            try:
                if kind == _HEADERS:
                    r = f.response_headers(arg, end_stream)
                elif kind == _DATA:
                    r = f.response_data(arg, end_stream)
                else:
                    r = f.response_trailers(arg)
            except Exception:
                log.failure("filter {filter!r} failed on the response", filter=f)
                self._internal_error(i)
                return
            if r is None or r is CONTINUE:
                i -= 1
                continue
            if type(r) is bytes and kind == _DATA:
                arg = r
                i -= 1
                continue
            if isinstance(r, LocalReply) and not self.response_started:
                self._replace_response(r, i)
                return
            d = _as_deferred(r)
            if d is None:
                log.error("filter {filter!r} returned {result!r} from a response hook", filter=f, result=r)
                self._internal_error(i)
                return
            self._resp_paused = True
            self._resp_event = (kind, arg, end_stream)
            d.addCallbacks(self._response_resumed, self._response_hook_failed,
                           callbackArgs=(i,), errbackArgs=(i,))
            return
        self._deliver(kind, arg, end_stream)

    def _response_resumed(self, r: Any, i: int) -> None:
        kind, arg, end_stream = self._resp_event
        self._resp_paused = False
        if self.complete:
            return
        if type(r) is bytes and kind == _DATA:
            arg = r
        elif isinstance(r, LocalReply) and not self.response_started:
            self._replace_response(r, i)
            return
        elif not (r is None or r is CONTINUE):
            log.error("filter {filter!r} resolved to {result!r}", filter=self._filters[i], result=r)
            self._internal_error(i)
            return
        self._run_response(kind, arg, end_stream, i - 1)
        queue = self._resp_queue or ()
        while queue and not self._resp_paused and not self.complete:
            kind, arg, end_stream = queue.popleft()
            self._run_response(kind, arg, end_stream, self._resp_origin - 1)

    def _response_hook_failed(self, failure: Failure, i: int) -> None:
        self._resp_paused = False
        log.failure("filter {filter!r} failed on the response", failure, filter=self._filters[i])
        self._internal_error(i)

    def _deliver(self, kind: int, arg: Any, end_stream: bool) -> None:
        writer = self._writer
        if kind == _HEADERS:
            self.response_started = True
            self.response_head = arg
            if self.response_flags:
                arg.headers.set(FLAGS_HEADER, ",".join(self.response_flags))
            writer.write_head(arg, end_stream)
        elif kind == _DATA:
            self.bytes_sent += len(arg)
            writer.write_data(arg, end_stream)
        else:
            writer.write_trailers(arg)
        if end_stream:
            self._finish()

    # Local replies, errors, completion.

    def _local_reply(self, reply: LocalReply, origin: int) -> None:
        if self.response_started:
            self.reset()
            return
        self.add_response_flag(reply.flag)
        # Whatever the request still sends is not wanted any more.
        self._req_queue = None
        self._req_paused = True
        extra = [(n.lower(), v) for n, v in reply.headers]
        request = self.request_head
        if (request is not None and (reply.flag or reply.status >= 400) and is_grpc(request)
                and not has_grpc_status(extra)):
            # A gRPC client cannot read an HTTP error: answer "trailers-only"
            # (200, grpc-status, grpc-message, no body).  A filter that set
            # its own grpc-status (the fault filter) is left alone, and so
            # is a route's own non-error answer (a direct response or a
            # redirect, which carry no flag): the operator wrote those.
            grpc_status = local_reply_grpc_status(reply.status, reply.flag)
            extra = [(n, v) for n, v in extra if n not in _GRPC_REPLACED]
            head = ResponseHead(200, Headers(trailers_only_headers(grpc_status, reply.body) + extra))
            self._resp_paused = False
            self._resp_queue = None
            self._response(_HEADERS, head, True, origin)
            return
        items = [(b"content-length", str(len(reply.body)).encode("ascii"))]
        if not any(n == b"content-type" for n, _ in extra):
            items.append((b"content-type", b"text/plain"))
        head = ResponseHead(reply.status, Headers(items + extra))
        end = not reply.body
        self._resp_paused = False
        self._resp_queue = None
        self._response(_HEADERS, head, end, origin)
        if not end:
            self._response(_DATA, reply.body, True, origin)

    def _replace_response(self, reply: LocalReply, i: int) -> None:
        # A response hook replaced the upstream's response: drop the
        # upstream half (the router resets it when the stream completes).
        self._local_reply(reply, i)

    def _internal_error(self, i: int) -> None:
        if self.complete:
            return
        if self.response_started:
            self.reset()
        else:
            self._local_reply(LocalReply(500, b"filter error\n", flag=""), i)

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        for f in self._filters:
            try:
                f.stream_complete()
            except Exception:
                log.failure("filter {filter!r} failed in stream_complete", filter=f)


def _as_deferred(r: Any) -> Deferred | None:
    if isinstance(r, Deferred):
        return r
    if iscoroutine(r):
        return ensureDeferred(r)
    return None
