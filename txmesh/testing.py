"""
Test your filters without sockets, as C{treq.testing} tests web code.

L{FilterHarness} runs requests through the real filter chain (the same code
the proxy runs) with your filters in front and a stub upstream in place of
the router::

    from txmesh.testing import FilterHarness, StubUpstream

    def test_rejects_bad_tenant(self):
        harness = FilterHarness([(RejectByHeaderFactory(), {"header": "x-tenant", "values": ["evil"]})])
        response = harness.request("GET", "/", headers={"x-tenant": "evil"})
        self.assertEqual(response.status, 403)
        self.assertIsNone(response.upstream_request)

Hooks that return Deferreds which wait on time use C{harness.clock} (a
L{twisted.internet.task.Clock}); advance it, then read the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from txmesh.config.model import FilterConfig, NodeConfig, Route, RouteMatch
from txmesh.filters.api import HTTPFilter
from txmesh.filters.chain import FilterChain
from txmesh.proxy.connection_manager import ProxyContext, new_request_id
from txmesh.proxy.stream import Headers, RequestHead, ResponseHead

HeadersInput = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]] | None


@attrs.frozen
class UpstreamRequest:
    """
    What the upstream received: the request as the filters left it.
    """

    head: RequestHead
    body: bytes
    trailers: Headers | None


@attrs.frozen
class StubResponse:
    """
    What a stub upstream answers.
    """

    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    trailers: tuple[tuple[bytes, bytes], ...] = ()


class StubUpstream:
    """
    An upstream that answers every request with the same response, or with
    whatever C{handler(UpstreamRequest)} returns (a L{StubResponse} or a
    Deferred of one).
    """

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: HeadersInput = None,
        trailers: HeadersInput = None,
        handler: Callable[[UpstreamRequest], Any] | None = None,
    ):
        self._response = StubResponse(status, _pairs(headers), body, _pairs(trailers))
        self._handler = handler
        self.requests: list[UpstreamRequest] = []

    def respond(self, request: UpstreamRequest) -> Deferred:
        self.requests.append(request)
        if self._handler is not None:
            return maybeDeferred(self._handler, request)
        return maybeDeferred(lambda: self._response)


@attrs.define
class HarnessResponse:
    """
    The response the client would have received.

    @ivar flags: Envoy-style response flags set on the stream.
    @ivar upstream_request: what the stub upstream got, or C{None} if the
        request never reached it (a filter answered locally).
    @ivar informational: 1xx heads sent before the response.
    """

    status: int = 0
    headers: Headers = attrs.Factory(Headers)
    body: bytes = b""
    trailers: Headers | None = None
    flags: list[str] = attrs.Factory(list)
    upstream_request: UpstreamRequest | None = None
    reset: bool = False
    complete: bool = False
    informational: list[ResponseHead] = attrs.Factory(list)


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _pairs(headers: HeadersInput) -> tuple[tuple[bytes, bytes], ...]:
    if headers is None:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((_b(n).lower(), _b(v)) for n, v in items)


class _Writer:
    """
    The downstream half of the harness: it records what the client gets.
    """

    def __init__(self, response: HarnessResponse):
        self._r = response
        self.paused = 0

    def write_informational(self, head: ResponseHead) -> None:
        self._r.informational.append(head)

    def write_head(self, head: ResponseHead, end_stream: bool) -> None:
        self._r.status = head.status
        self._r.headers = head.headers
        self._r.complete = end_stream

    def write_data(self, data: bytes, end_stream: bool) -> None:
        self._r.body += data
        self._r.complete = end_stream

    def write_trailers(self, trailers: Headers) -> None:
        self._r.trailers = trailers
        self._r.complete = True

    def reset_stream(self) -> None:
        self._r.reset = True

    def flush(self) -> None:
        pass

    def pause_reading(self, reason: object) -> None:
        self.paused += 1

    def resume_reading(self, reason: object) -> None:
        self.paused -= 1

    def set_response_producer(self, producer: Any) -> None:
        pass

    @property
    def request_producer(self) -> Any:
        return None


class _StubRouter(HTTPFilter):
    """
    Stands where the router would: collects the request, asks the stub
    upstream, and plays its response back through the chain.
    """

    def __init__(self, stream: FilterChain, upstream: StubUpstream, response: HarnessResponse):
        self._stream = stream
        self._upstream = upstream
        self._response = response
        self._head: RequestHead | None = None
        self._body: list[bytes] = []

    def request_headers(self, head: RequestHead, end_stream: bool) -> Any:
        self._head = head
        if end_stream:
            self._send(None)

    def request_data(self, data: bytes, end_stream: bool) -> Any:
        self._body.append(data)
        if end_stream:
            self._send(None)

    def request_trailers(self, trailers: Headers) -> Any:
        self._send(trailers)

    def _send(self, trailers: Headers | None) -> None:
        request = UpstreamRequest(self._head, b"".join(self._body), trailers)
        self._response.upstream_request = request
        self._upstream.respond(request).addCallback(self._answer)

    def _answer(self, r: StubResponse) -> None:
        stream = self._stream
        headers = Headers(list(r.headers))
        if b"content-length" not in headers and not r.trailers:
            headers.add(b"content-length", str(len(r.body)).encode("ascii"))
        no_body = not r.body and not r.trailers
        stream.encode_headers(ResponseHead(r.status, headers), no_body)
        if no_body:
            return
        if r.body:
            stream.encode_data(r.body, not r.trailers)
        if r.trailers:
            stream.encode_trailers(Headers(list(r.trailers)))


class _StubRouterFactory:
    name = "router"

    def __init__(self, upstream: StubUpstream, response: HarnessResponse):
        self._upstream = upstream
        self._response = response

    def parse_config(self, raw: Any) -> None:
        return None

    def create_filter(self, config: Any, stream: Any) -> _StubRouter:
        return _StubRouter(stream, self._upstream, self._response)


class FilterHarness:
    """
    Runs requests through filters and a stub upstream.

    @ivar clock: the clock filters see (C{stream.clock}); advance it to fire
        timers your filters set.
    @ivar upstream: the L{StubUpstream}; its C{requests} lists what reached it.
    """

    def __init__(
        self,
        filters: Sequence[tuple[Any, Mapping[str, Any]]],
        upstream: StubUpstream | None = None,
        route: Route | None = None,
        node: NodeConfig = NodeConfig(),
        metrics: Any = None,
        clock: Clock | None = None,
        downstream_principal: str | None = None,
        downstream_address: Any = None,
        downstream_port: int | None = 8080,
    ):
        """
        @param filters: C{(factory, raw_config)} pairs in chain order; each
            config goes through the factory's C{parse_config} as it would
            from YAML (so config errors surface here too).
        @param route: the route the request matches (default: any path to
            a cluster named C{test}).
        @param downstream_principal: the caller's verified identity the
            stream reports (as over mutual TLS), or C{None} (plaintext).
        @param downstream_address: the caller's address (default
            C{127.0.0.1:40000}).
        @param downstream_port: the local port the request arrived on.
        """
        self.clock = clock or Clock()
        self.upstream = upstream or StubUpstream()
        self._configs = [FilterConfig(f.name, f, f.parse_config(raw)) for f, raw in filters]
        self._route = route or Route(name="test", match=RouteMatch(), cluster="test")
        self._proxy = ProxyContext(node, self.clock, metrics)
        self._principal = downstream_principal
        self._address = downstream_address or IPv4Address("TCP", "127.0.0.1", 40000)
        self._port = downstream_port

    def start(
        self,
        method: str,
        path: str,
        headers: HeadersInput = None,
        authority: str = "example.com",
        end_stream: bool = True,
    ) -> tuple[FilterChain, HarnessResponse]:
        """
        Start a request and leave the stream open, for tests that send the
        body piece by piece (C{stream.request_data(...)}).

        @return: the stream and the response being collected.
        """
        response = HarnessResponse()
        router = FilterConfig("router", _StubRouterFactory(self.upstream, response))
        route = self._route
        stream = FilterChain(
            _Writer(response), self.clock, "test", self._address,
            new_request_id(), lambda head: route, None, tuple(self._configs) + (router,),
        )
        stream.proxy = self._proxy
        stream.downstream_principal = self._principal
        stream.downstream_port = self._port
        head = RequestHead(_b(method).upper(), _b(path), _b(authority), Headers(list(_pairs(headers))))
        stream.request_headers(head, end_stream)
        response.flags = stream.response_flags
        return stream, response

    def request(
        self,
        method: str,
        path: str,
        headers: HeadersInput = None,
        body: bytes = b"",
        trailers: HeadersInput = None,
        authority: str = "example.com",
    ) -> HarnessResponse:
        """
        Run one complete request.

        @return: the response so far; C{response.complete} tells whether it
            finished (it may wait on C{clock} if a filter waits on time).
        """
        end = not body and not trailers
        stream, response = self.start(method, path, headers, authority, end_stream=end)
        if body:
            stream.request_data(body, not trailers)
        if trailers:
            stream.request_trailers(Headers(list(_pairs(trailers))))
        return response
