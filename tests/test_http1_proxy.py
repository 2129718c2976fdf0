"""
Integration tests of the HTTP/1.1 proxy path: real loopback sockets between
a raw client, an in-process L{txmesh.proxy.service.ProxyService} and Twisted
upstreams (L{tests.support.RecordingFactory} with an HTTP parser on top).

The client side is parsed by a small, strict parser written here, so every
assertion about framing (content-length, chunked, close-delimited) is about
the bytes on the wire, not about what a library tolerates.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

import httptools
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from tests.support import (
    ProxyHarness,
    RawClient,
    RecordingFactory,
    RecordingProtocol,
    fixed_response,
    free_port,
    listen_upstream,
    raw_connect,
    raw_exchange,
)
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, LocalReply
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory
from txmesh.observability.metrics import MetricsFactory
from txmesh.proxy.http1_client import HTTP1ClientConnection
from txmesh.proxy.request_rate import RequestRate
from txmesh.proxy.stream import Headers, RequestHead

UUID4 = re.compile(rb"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

BASIC = """
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        routes: [{match: {prefix: /}, cluster: app}]
    clusters:
      - {name: app, endpoints: ["127.0.0.1:{up}"]}
    """

WAIT = 5.0


# The client side: a strict parser of what the proxy sends.


class Response:
    """
    One response as the client received it.

    @ivar headers: C{(lower-case name, value)} pairs, in order.
    @ivar framing: C{"length"}, C{"chunked"}, C{"close"} or C{"none"}.
    @ivar chunks: the chunk sizes, for chunked bodies.
    """

    def __init__(self, status: int, reason: bytes, headers: list, body: bytes, trailers: list,
                 framing: str, chunks: list):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.trailers = trailers
        self.framing = framing
        self.chunks = chunks

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def all(self, name: bytes) -> list:
        return [v for n, v in self.headers if n == name]

    def names(self) -> set:
        return {n for n, _ in self.headers}

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers!r} {self.body[:80]!r} ({self.framing})>"


class Incomplete(Exception):
    pass


def _read_chunked(buf: bytes) -> tuple[bytes, list, list, bytes]:
    body = []
    sizes = []
    pos = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise Incomplete()
        line = buf[pos:eol]
        size = int(line.split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            break
        if len(buf) < pos + size + 2:
            raise Incomplete()
        body.append(buf[pos:pos + size])
        sizes.append(size)
        assert buf[pos + size:pos + size + 2] == b"\r\n", buf[pos:pos + size + 2]
        pos += size + 2
    trailers = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise Incomplete()
        line = buf[pos:eol]
        pos = eol + 2
        if not line:
            break
        name, _, value = line.partition(b":")
        trailers.append((name.strip().lower(), value.strip()))
    return b"".join(body), sizes, trailers, buf[pos:]


def read_response(buf: bytes, head_request: bool = False, eof: bool = False) -> tuple[Response, bytes]:
    """
    Parse one response from the start of C{buf}.

    @return: the response and the bytes after it.
    @raise Incomplete: if C{buf} does not hold all of it yet.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        raise Incomplete()
    lines = buf[:end].split(b"\r\n")
    rest = buf[end + 4:]
    parts = lines[0].split(b" ", 2)
    assert parts[0] == b"HTTP/1.1", lines[0]
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else b""
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep and name == name.strip(), line
        headers.append((name.lower(), value.strip()))
    names = {n for n, _ in headers}
    te = [v for n, v in headers if n == b"transfer-encoding"]
    cl = [v for n, v in headers if n == b"content-length"]
    assert not (te and cl), headers
    trailers: list = []
    chunks: list = []
    if status < 200 or status in (204, 304) or head_request:
        body, framing = b"", "none"
    elif te:
        assert te == [b"chunked"], te
        body, chunks, trailers, rest = _read_chunked(rest)
        framing = "chunked"
    elif cl:
        assert len(cl) == 1, cl
        n = int(cl[0])
        if len(rest) < n:
            raise Incomplete()
        body, rest, framing = rest[:n], rest[n:], "length"
    else:
        assert b"connection" in names, headers  # close-delimited must say so
        if not eof:
            raise Incomplete()
        body, rest, framing = rest, b"", "close"
    return Response(status, reason, headers, body, trailers, framing, chunks), rest


def read_responses(data: bytes, head_requests: tuple = (), eof: bool = False) -> list[Response]:
    """
    @return: every complete response at the start of C{data}, 1xx included;
        C{head_requests} holds the indexes of final responses to HEAD.
    """
    out = []
    finals = 0
    while data:
        try:
            r, data = read_response(data, finals in head_requests, eof)
        except Incomplete:
            break
        out.append(r)
        if r.status >= 200 or r.status == 101:
            finals += 1
    return out


def finals(responses: list[Response]) -> list[Response]:
    return [r for r in responses if r.status >= 200]


def n_finals(n: int, head_requests: tuple = ()) -> Callable[[bytes], bool]:
    return lambda data: len(finals(read_responses(data, head_requests))) >= n


@defer.inlineCallbacks
def get_responses(client: RawClient, n: int = 1, head_requests: tuple = (), timeout: float = WAIT) -> Any:
    """
    Wait for C{n} final responses on C{client}.
    """
    data = yield client.wait_for(n_finals(n, head_requests), timeout)
    return finals(read_responses(data, head_requests))


def wait_closed(client: RawClient, timeout: float = WAIT) -> defer.Deferred:
    """
    @return: a Deferred firing with everything received once C{client}'s
        connection is closed (fails after C{timeout}).
    """
    d: defer.Deferred = defer.Deferred()

    def fire(result: Any) -> Any:
        if not d.called:
            d.callback(client.data)
        return result

    client.closed.addBoth(fire)
    return d.addTimeout(timeout, reactor)


def with_timeout(d: defer.Deferred, timeout: float = WAIT) -> defer.Deferred:
    return d.addTimeout(timeout, reactor)


def wait_until(cond: Callable[[], bool], timeout: float = WAIT, interval: float = 0.01) -> defer.Deferred:
    """
    Poll C{cond} on the reactor; for states no callback reports (a
    transport's pause, a socket's close seen from the other side).
    """
    d: defer.Deferred = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if cond():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(defer.TimeoutError(f"condition not met in {timeout}s"))
        else:
            reactor.callLater(interval, check)

    check()
    return d


# The upstream side: HTTP parsed with httptools on a RecordingFactory.


class UpstreamRequest:
    """
    A request as an upstream received it.
    """

    def __init__(self) -> None:
        self.method = b""
        self.path = b""
        self.version = ""
        self.headers: list = []
        self.trailers: list = []
        self.body = b""
        self.complete = False
        self.head_complete = False
        self.proto: RecordingProtocol | None = None

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def all(self, name: bytes) -> list:
        return [v for n, v in self.headers if n == name]

    def names(self) -> set:
        return {n for n, _ in self.headers}


class _UpstreamParser:
    def __init__(self, upstream: HTTPUpstream, proto: RecordingProtocol):
        self._upstream = upstream
        self._proto = proto
        self._parser = httptools.HttpRequestParser(self)
        self._req: UpstreamRequest | None = None
        self.upgraded = False

    def feed(self, data: bytes) -> None:
        if self.upgraded:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgraded = True
        except httptools.HttpParserError as e:
            self._upstream.errors.append(e)

    def on_message_begin(self) -> None:
        self._req = UpstreamRequest()
        self._req.proto = self._proto
        self._upstream.started.append(self._req)
        self._upstream._check()

    def on_url(self, url: bytes) -> None:
        self._req.path += url

    def on_header(self, name: bytes, value: bytes) -> None:
        target = self._req.trailers if self._req.head_complete else self._req.headers
        target.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req = self._req
        req.head_complete = True
        req.method = self._parser.get_method()
        req.version = self._parser.get_http_version()
        if self._upstream.on_head is not None:
            self._upstream.on_head(self._proto, req)
        self._upstream._check()

    def on_body(self, body: bytes) -> None:
        self._req.body += body
        self._upstream._check()

    def on_message_complete(self) -> None:
        req = self._req
        req.complete = True
        self._upstream.requests.append(req)
        self._upstream._check()
        if self._upstream.answer is not None:
            self._upstream.answer(self._proto, req)


def send_response(proto: Protocol, status: bytes = b"200 OK", body: bytes = b"", headers: tuple = ()) -> None:
    """
    Write a content-length response.
    """
    head = b"HTTP/1.1 " + status + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n"
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    proto.transport.write(head + b"\r\n" + body)


def echo(proto: Protocol, req: UpstreamRequest) -> None:
    """
    Answer with the method, path and body of the request.
    """
    send_response(proto, body=req.method + b" " + req.path + (b"\n" + req.body if req.body else b""),
                  headers=((b"x-seen-path", req.path),))


class HTTPUpstream:
    """
    An HTTP/1.1 upstream: parses what arrives, records requests, and
    answers each complete one with C{answer(proto, request)}.

    @ivar started: requests whose first byte arrived.
    @ivar requests: complete requests.
    """

    def __init__(self, answer: Callable | None = echo,
                 on_head: Callable | None = None):
        self.answer = answer
        self.on_head = on_head
        self.started: list[UpstreamRequest] = []
        self.requests: list[UpstreamRequest] = []
        self.errors: list = []
        self._waiters: list = []
        self.factory = RecordingFactory(self._data)

    def _data(self, proto: RecordingProtocol, data: bytes) -> None:
        parser = getattr(proto, "_http_parser", None)
        if parser is None:
            parser = proto._http_parser = _UpstreamParser(self, proto)
        parser.feed(data)

    def _check(self) -> None:
        for cond, d in list(self._waiters):
            if cond():
                self._waiters.remove((cond, d))
                d.callback(None)

    def wait(self, cond: Callable[[], bool], timeout: float = WAIT) -> defer.Deferred:
        """
        @return: a Deferred firing once C{cond()} holds after some request event.
        """
        if cond():
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((cond, d))
        return d.addTimeout(timeout, reactor)

    def wait_requests(self, n: int) -> defer.Deferred:
        return self.wait(lambda: len(self.requests) >= n)

    def wait_heads(self, n: int) -> defer.Deferred:
        return self.wait(lambda: sum(r.head_complete for r in self.started) >= n)


# Test filters.


class ProbeFilter(HTTPFilter):
    """
    Adds C{x-filter-added} to every request; C{x-test} selects more:
    C{deny} answers 403, C{delay} waits 50 ms, C{raise} raises.
    """

    def __init__(self, stream: Any, factory: ProbeFilterFactory):
        self._stream = stream
        self._factory = factory

    def request_headers(self, head: Any, end_stream: bool) -> Any:
        head.headers.add(b"x-filter-added", b"1")
        mode = head.headers.get(b"x-test")
        if mode == b"deny":
            return LocalReply(403, b"denied by test filter\n")
        if mode == b"raise":
            raise RuntimeError("test filter failure")
        if mode == b"delay":
            d: defer.Deferred = defer.Deferred()
            self._stream.clock.callLater(0.05, d.callback, None)
            self._factory.delayed.append(self._stream.clock.seconds())
            return d
        return None

    def response_headers(self, head: Any, end_stream: bool) -> Any:
        head.headers.add(b"x-filter-response", b"1")
        return None


@implementer(IHTTPFilterFactory)
class ProbeFilterFactory:
    name = "test"

    def __init__(self) -> None:
        self.delayed: list[float] = []

    def parse_config(self, raw: Any) -> Any:
        return dict(raw)

    def create_filter(self, config: Any, stream: Any) -> ProbeFilter:
        return ProbeFilter(stream, self)


# Large responses, written as a push producer.


@implementer(IPushProducer)
class BulkSender:
    """
    Writes C{total} bytes to a transport as fast as it will take them,
    pausing when the transport says so.
    """

    def __init__(self, transport: Any, total: int, chunk: int = 64 * 1024):
        self.transport = transport
        self.total = total
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self._block = b"x" * chunk
        self._call: Any = None
        self.done: defer.Deferred = defer.Deferred()

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self.paused and self.sent < self.total:
            self._call = reactor.callLater(0, self._send)

    def _send(self) -> None:
        self._call = None
        while not self.paused and self.sent < self.total:
            n = min(len(self._block), self.total - self.sent)
            self.sent += n
            self.transport.write(self._block[:n])
        if self.sent >= self.total and not self.done.called:
            self.transport.unregisterProducer()
            self.done.callback(self.sent)

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.paused = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class BulkUpstream(Protocol):
    """
    Answers the first request head with C{factory.size} bytes of body.
    """

    sender: BulkSender | None = None

    def connectionMade(self) -> None:
        self.factory.protocols.append(self)
        self.buf = b""
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if self.sender is None and b"\r\n\r\n" in self.buf:
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.factory.size)
            self.sender = BulkSender(self.transport, self.factory.size)
            self.factory.senders.append(self.sender)
            self.sender.start()

    def connectionLost(self, reason: Any = None) -> None:
        if self.sender is not None:
            self.sender.stopProducing()


class BulkFactory(Factory):
    protocol = BulkUpstream
    noisy = False

    def __init__(self, size: int):
        self.size = size
        self.protocols: list[BulkUpstream] = []
        self.senders: list[BulkSender] = []


class _Base(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self._factories: list = []
        # Registered first, so it runs last: after the proxy and the
        # upstream ports are gone, drop upstream-side connections the
        # proxy's close has not reached yet.
        self.addCleanup(self._close_upstreams)

    @defer.inlineCallbacks
    def _close_upstreams(self) -> Any:
        open_ = []
        for f in self._factories:
            for p in list(getattr(f, "connections", [])) + list(getattr(f, "protocols", [])):
                if p.transport is not None and p.transport.connected:
                    open_.append(p)
        for p in open_:
            p.transport.abortConnection()
        if open_:
            yield wait_until(lambda: not any(p.transport.connected for p in open_), 2)

    @defer.inlineCallbacks
    def upstream(self, factory: Any) -> Any:
        """
        Listen with C{factory} (an L{HTTPUpstream}'s, or any); returns the port.
        """
        self._factories.append(factory)
        port = yield listen_upstream(self, factory)
        return port

    @defer.inlineCallbacks
    def proxy(self, yaml_text: str = BASIC, registry: FilterRegistry | None = None, **values: Any) -> Any:
        h = ProxyHarness(self, registry=registry)
        yield h.start(yaml_text, **values)
        return h

    @defer.inlineCallbacks
    def basic(self, upstream: HTTPUpstream | None = None, yaml_text: str = BASIC, **values: Any) -> Any:
        """
        An L{HTTPUpstream} behind a proxy; returns C{(upstream, harness)}.
        """
        up = upstream if upstream is not None else HTTPUpstream()
        port = yield self.upstream(up.factory)
        h = yield self.proxy(yaml_text, up=port, **values)
        return up, h

    @defer.inlineCallbacks
    def exchange(self, h: ProxyHarness, data: bytes, n: int = 1, head_requests: tuple = ()) -> Any:
        """
        Send C{data} on a new connection; wait for C{n} final responses.

        @return: C{(client, responses)}.
        """
        client = yield raw_connect(self, h.port())
        client.transport.write(data)
        responses = yield get_responses(client, n, head_requests)
        return client, responses

    @defer.inlineCallbacks
    def rejected(self, h: ProxyHarness, data: bytes) -> Any:
        """
        Send C{data}; the proxy must answer one response and close.
        """
        client = yield raw_connect(self, h.port())
        client.transport.write(data)
        received = yield wait_closed(client)
        responses = read_responses(received)
        self.assertEqual(len(responses), 1, received)
        r = responses[0]
        self.assertEqual(r.header(b"connection"), b"close", received)
        rest = received[received.index(b"\r\n\r\n") + 4 + len(r.body):]
        self.assertEqual(rest, b"", "bytes after the error response")
        return r


class ForwardingTests(_Base):
    """
    Requests and responses through the proxy, with every body framing.
    """

    @defer.inlineCallbacks
    def test_get(self):
        up, h = yield self.basic()
        _, [r] = yield self.exchange(h, b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\n\r\n")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"GET /a/b?c=d")
        req = up.requests[0]
        self.assertEqual((req.method, req.path, req.version), (b"GET", b"/a/b?c=d", "1.1"))
        self.assertEqual(req.all(b"host"), [b"example.com:8080"])
        self.assertEqual(req.body, b"")
        self.assertNotIn(b"transfer-encoding", req.names())
        self.assertNotIn(b"content-length", req.names())

    @defer.inlineCallbacks
    def test_post_content_length_streamed(self):
        """
        A content-length body goes upstream as it arrives, with the same
        framing: the upstream sees the first half before the client has
        sent the second.
        """
        up, h = yield self.basic()
        client = yield raw_connect(self, h.port())
        first, second = b"a" * 3000, b"b" * 2000
        client.transport.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n"
                               b"Content-Type: application/octet-stream\r\n\r\n" + first)
        yield up.wait(lambda: up.started and len(up.started[0].body) >= 3000)
        self.assertFalse(up.started[0].complete)
        self.assertEqual(up.started[0].header(b"content-length"), b"5000")
        self.assertNotIn(b"transfer-encoding", up.started[0].names())
        client.transport.write(second)
        [r] = yield get_responses(client)
        self.assertEqual(r.body, b"POST /upload\n" + first + second)
        self.assertEqual(up.requests[0].body, first + second)

    @defer.inlineCallbacks
    def test_chunked_request_forwarded_chunked(self):
        """
        A chunked request body reaches the upstream as a valid chunked
        body, trailers included.
        """
        up, h = yield self.basic()
        client = yield raw_connect(self, h.port())
        client.transport.write(b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"5\r\nhello\r\n")
        yield up.wait(lambda: up.started and up.started[0].body == b"hello")
        client.transport.write(b"7;ext=1\r\n, world\r\n0\r\nx-sum: 42\r\n\r\n")
        [r] = yield get_responses(client)
        self.assertEqual(r.body, b"POST /c\nhello, world")
        req = up.requests[0]
        self.assertEqual(req.all(b"transfer-encoding"), [b"chunked"])
        self.assertNotIn(b"content-length", req.names())
        self.assertEqual(req.trailers, [(b"x-sum", b"42")])
        self.assertEqual(up.errors, [])
        raw = up.factory.all_received()
        self.assertTrue(raw.endswith(b"0\r\nx-sum: 42\r\n\r\n"), raw)

    @defer.inlineCallbacks
    def test_chunked_response_forwarded_chunked(self):
        def answer(proto, req):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            reactor.callLater(0.02, proto.transport.write, b"6\r\n world\r\n0\r\n\r\n")

        _up, h = yield self.basic(HTTPUpstream(answer))
        client, [r] = yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.framing, "chunked")
        self.assertEqual(r.body, b"hello world")
        self.assertEqual(r.chunks, [5, 6])
        # Still usable: the chunked framing ended exactly.
        client.transport.write(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        responses = yield get_responses(client, 2)
        self.assertEqual(responses[1].body, b"hello world")

    @defer.inlineCallbacks
    def test_response_trailers(self):
        def answer(proto, req):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
                                  b"4\r\ndata\r\n0\r\ngrpc-status: 0\r\nx-checksum: abc\r\n\r\n")

        up, h = yield self.basic(HTTPUpstream(answer))
        _, [r] = yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
        self.assertEqual(r.framing, "chunked")
        self.assertEqual(r.body, b"data")
        self.assertEqual(r.trailers, [(b"grpc-status", b"0"), (b"x-checksum", b"abc")])
        self.assertEqual(up.requests[0].all(b"te"), [b"trailers"])

    def _close_delimited(self, proto, req):
        proto.transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
        reactor.callLater(0.02, proto.transport.write, b"second part")
        reactor.callLater(0.04, proto.transport.loseConnection)

    @defer.inlineCallbacks
    def test_close_delimited_to_http11_client_is_chunked(self):
        up, h = yield self.basic(HTTPUpstream(self._close_delimited))
        client, [r] = yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.framing, "chunked")
        self.assertEqual(r.body, b"first part, second part")
        self.assertIsNone(r.header(b"connection"))
        # Keep-alive survives on the client side.
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        responses = yield get_responses(client, 2)
        self.assertEqual(responses[1].body, b"first part, second part")
        self.assertEqual(len(up.factory.connections), 2)

    @defer.inlineCallbacks
    def test_close_delimited_to_http10_client(self):
        _up, h = yield self.basic(HTTPUpstream(self._close_delimited))
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        data = yield wait_closed(client)
        [r] = read_responses(data, eof=True)
        self.assertEqual(r.framing, "close")
        self.assertEqual(r.header(b"connection"), b"close")
        self.assertEqual(r.body, b"first part, second part")

    @defer.inlineCallbacks
    def test_keep_alive(self):
        up, h = yield self.basic()
        client = yield raw_connect(self, h.port())
        for i in range(4):
            client.transport.write(b"GET /k%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            responses = yield get_responses(client, i + 1)
            self.assertEqual(responses[i].body, b"GET /k%d" % i)
        self.assertEqual(len(up.factory.connections), 1)
        self.assertEqual(len(h.service._listeners["http"].factory.inner.connections), 1)

    @defer.inlineCallbacks
    def test_pipelining_in_order(self):
        """
        Ten requests in one write are answered in order, though the first
        is answered late.
        """
        def answer(proto, req):
            if req.path == b"/p0":
                reactor.callLater(0.1, echo, proto, req)
            else:
                echo(proto, req)

        up, h = yield self.basic(HTTPUpstream(answer))
        data = b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(10))
        _, responses = yield self.exchange(h, data, 10)
        self.assertEqual([r.body for r in responses], [b"GET /p%d" % i for i in range(10)])
        self.assertEqual([r.path for r in up.requests], [b"/p%d" % i for i in range(10)])
        self.assertEqual(len(up.factory.connections), 1)

    @defer.inlineCallbacks
    def test_pipelined_posts_in_order(self):
        _up, h = yield self.basic()
        data = b"".join(b"POST /q%d HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nb%02d" % (i, i)
                        for i in range(5))
        _, responses = yield self.exchange(h, data, 5)
        self.assertEqual([r.body for r in responses], [b"POST /q%d\nb%02d" % (i, i) for i in range(5)])

    @defer.inlineCallbacks
    def test_upstream_connection_pooled(self):
        """
        Sequential requests from two client connections share one upstream
        connection.
        """
        up, h = yield self.basic()
        for i in range(2):
            client, [r] = yield self.exchange(h, b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            self.assertEqual(r.status, 200)
            client.transport.loseConnection()
            yield wait_closed(client)
        self.assertEqual(len(up.factory.connections), 1)
        self.assertEqual(len(up.requests), 2)

    @defer.inlineCallbacks
    def test_head(self):
        def answer(proto, req):
            body = b"0123456789"
            head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\ncontent-type: text/plain\r\n\r\n"
            proto.transport.write(head if req.method == b"HEAD" else head + body)

        up, h = yield self.basic(HTTPUpstream(answer))
        client = yield raw_connect(self, h.port())
        client.transport.write(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n")
        [r] = yield get_responses(client, 1, head_requests=(0,))
        self.assertEqual(r.header(b"content-length"), b"10")
        self.assertEqual(r.body, b"")
        self.assertTrue(client.data.endswith(b"\r\n\r\n"), client.data)
        # The next request on both connections (client and pooled upstream) works.
        client.transport.write(b"GET /h HTTP/1.1\r\nHost: a\r\n\r\n")
        responses = yield get_responses(client, 2, head_requests=(0,))
        self.assertEqual(responses[1].body, b"0123456789")
        client.transport.write(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\nGET /h HTTP/1.1\r\nHost: a\r\n\r\n")
        responses = yield get_responses(client, 4, head_requests=(0, 2))
        self.assertEqual([r.body for r in responses], [b"", b"0123456789", b"", b"0123456789"])
        self.assertEqual(read_responses(client.data, (0, 2))[-1].body, b"0123456789")
        self.assertEqual(len(up.factory.connections), 1)

    @defer.inlineCallbacks
    def test_204_and_304(self):
        def answer(proto, req):
            if req.path == b"/204":
                proto.transport.write(b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n")
            elif req.path == b"/304":
                proto.transport.write(b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n")
            else:
                echo(proto, req)

        up, h = yield self.basic(HTTPUpstream(answer))
        client = yield raw_connect(self, h.port())
        client.transport.write(b"DELETE /204 HTTP/1.1\r\nHost: a\r\n\r\n"
                               b"GET /304 HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"v1\"\r\n\r\n"
                               b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        responses = yield get_responses(client, 3)
        self.assertEqual([r.status for r in responses], [204, 304, 200])
        for r in responses[:2]:
            self.assertIsNone(r.header(b"transfer-encoding"))
            self.assertIsNone(r.header(b"content-length"))
        self.assertEqual(responses[1].header(b"etag"), b"\"v1\"")
        self.assertEqual(responses[2].body, b"GET /after")
        self.assertEqual(len(up.factory.connections), 1)

    @defer.inlineCallbacks
    def test_expect_100_continue(self):
        """
        The client waits for the upstream's C{100 Continue} before sending
        its body; the final response follows.
        """
        def on_head(proto, req):
            if req.header(b"expect") == b"100-continue":
                proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        up, h = yield self.basic(HTTPUpstream(echo, on_head))
        client = yield raw_connect(self, h.port())
        client.transport.write(b"PUT /e HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n")
        data = yield client.wait_for(lambda d: b"\r\n\r\n" in d, WAIT)
        self.assertEqual(data, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(up.started[0].body, b"")
        client.transport.write(b"payload")
        [r] = yield get_responses(client)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"PUT /e\npayload")
        self.assertEqual([x.status for x in read_responses(client.data)], [100, 200])


class HeaderTests(_Base):
    @defer.inlineCallbacks
    def test_hop_by_hop_request_headers_stripped(self):
        up, h = yield self.basic()
        _, [r] = yield self.exchange(
            h, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-foo\r\nX-Foo: secret\r\n"
               b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\n"
               b"Trailer: x-t\r\nX-Keep: yes\r\n\r\n")
        self.assertEqual(r.status, 200)
        names = up.requests[0].names()
        for name in (b"connection", b"x-foo", b"keep-alive", b"proxy-connection", b"te", b"trailer"):
            self.assertNotIn(name, names)
        self.assertEqual(up.requests[0].header(b"x-keep"), b"yes")

    @defer.inlineCallbacks
    def test_hop_by_hop_response_headers_stripped(self):
        def answer(proto, req):
            send_response(proto, body=b"ok", headers=(
                (b"Connection", b"x-bar"), (b"X-Bar", b"internal"), (b"Keep-Alive", b"timeout=5, max=100"),
                (b"Proxy-Connection", b"keep-alive"), (b"Proxy-Authenticate", b"Basic"),
                (b"Upgrade", b"h2c"), (b"X-Keep", b"yes")))

        _up, h = yield self.basic(HTTPUpstream(answer))
        _, [r] = yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.body, b"ok")
        for name in (b"connection", b"x-bar", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                     b"upgrade"):
            self.assertNotIn(name, r.names())
        self.assertEqual(r.header(b"x-keep"), b"yes")

    @defer.inlineCallbacks
    def test_forwarding_headers_added(self):
        up, h = yield self.basic()
        yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n")
        req = up.requests[0]
        self.assertEqual(req.all(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(req.all(b"x-forwarded-proto"), [b"http"])
        [rid] = req.all(b"x-request-id")
        self.assertRegex(rid, UUID4)
        self.assertEqual(req.all(b"host"), [b"svc.local"])

    @defer.inlineCallbacks
    def test_forwarding_headers_kept_and_appended(self):
        up, h = yield self.basic()
        yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: svc.local\r\nX-Forwarded-For: 203.0.113.9\r\n"
                               b"X-Request-Id: my-request-1\r\nX-Forwarded-Proto: https\r\n\r\n")
        req = up.requests[0]
        self.assertEqual(req.all(b"x-forwarded-for"), [b"203.0.113.9, 127.0.0.1"])
        self.assertEqual(req.all(b"x-request-id"), [b"my-request-1"])
        # The proxy is the edge: the scheme it saw replaces what the client claims.
        self.assertEqual(req.all(b"x-forwarded-proto"), [b"http"])

    @defer.inlineCallbacks
    def test_request_ids_differ(self):
        up, h = yield self.basic()
        yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 2)
        ids = [r.header(b"x-request-id") for r in up.requests]
        self.assertNotEqual(ids[0], ids[1])

    @defer.inlineCallbacks
    def test_route_rewrites_and_added_headers(self):
        yaml_text = """
            listeners:
              - name: http
                address: "tcp:0:interface=127.0.0.1"
                routes:
                  - match: {prefix: /api/}
                    cluster: app
                    prefix_rewrite: /v2/
                    host_rewrite: backend.internal
                    request_headers_to_add: {x-route: api, x-env: test}
                    response_headers_to_add: {x-served-by: txmesh}
                  - match: {prefix: /old/}
                    cluster: app
                    prefix_rewrite: /
                  - {match: {prefix: /}, cluster: app}
            clusters:
              - {name: app, endpoints: ["127.0.0.1:{up}"]}
            """
        up, h = yield self.basic(yaml_text=yaml_text)
        _, responses = yield self.exchange(
            h, b"GET /api/users?id=1 HTTP/1.1\r\nHost: front.example\r\nX-Route: client\r\n\r\n"
               b"GET /old/thing HTTP/1.1\r\nHost: front.example\r\n\r\n"
               b"GET /other HTTP/1.1\r\nHost: front.example\r\n\r\n", 3)
        api, old, other = up.requests
        self.assertEqual(api.path, b"/v2/users?id=1")
        self.assertEqual(api.all(b"host"), [b"backend.internal"])
        self.assertEqual(api.all(b"x-route"), [b"client", b"api"])
        self.assertEqual(api.all(b"x-env"), [b"test"])
        self.assertEqual(responses[0].all(b"x-served-by"), [b"txmesh"])
        self.assertEqual(old.path, b"/thing")
        self.assertEqual(old.all(b"host"), [b"front.example"])
        self.assertEqual(other.path, b"/other")
        self.assertIsNone(responses[2].header(b"x-served-by"))
        self.assertIsNone(other.header(b"x-env"))

    @defer.inlineCallbacks
    def test_http10_client_gets_connection_close(self):
        up, h = yield self.basic()
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET /ten HTTP/1.0\r\nHost: a\r\n\r\n")
        data = yield wait_closed(client)
        [r] = read_responses(data, eof=True)
        self.assertEqual(r.header(b"connection"), b"close")
        self.assertEqual(r.body, b"GET /ten")
        self.assertEqual(up.requests[0].version, "1.1")

    @defer.inlineCallbacks
    def test_http10_client_keep_alive(self):
        _up, h = yield self.basic()
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET /k1 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        [r] = yield get_responses(client)
        self.assertEqual(r.header(b"connection"), b"keep-alive")
        self.assertEqual(r.framing, "length")
        client.transport.write(b"GET /k2 HTTP/1.0\r\nHost: a\r\n\r\n")
        data = yield wait_closed(client)
        responses = read_responses(data, eof=True)
        self.assertEqual([x.body for x in responses], [b"GET /k1", b"GET /k2"])
        self.assertEqual(responses[1].header(b"connection"), b"close")

    @defer.inlineCallbacks
    def test_http10_client_without_host(self):
        _up, h = yield self.basic()
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET /nohost HTTP/1.0\r\n\r\n")
        data = yield wait_closed(client)
        [r] = read_responses(data, eof=True)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"GET /nohost")
        # The upstream still gets a Host: the endpoint's address.
        hosts = [v for n, v in _up.requests[0].headers if n.lower() == b"host"]
        self.assertEqual(len(hosts), 1)
        self.assertTrue(hosts[0].startswith(b"127.0.0.1:"), hosts)


class FailureTests(_Base):
    """
    Failures become Envoy-shaped local replies with a response flag.
    """

    @defer.inlineCallbacks
    def test_no_route(self):
        yaml_text = """
            listeners:
              - name: http
                address: "tcp:0:interface=127.0.0.1"
                virtual_hosts:
                  - name: only
                    domains: [only.example]
                    routes: [{match: {prefix: /api}, cluster: app}]
            clusters:
              - {name: app, endpoints: ["127.0.0.1:{up}"]}
            """
        up, h = yield self.basic(yaml_text=yaml_text)
        _client, responses = yield self.exchange(
            h, b"GET /other HTTP/1.1\r\nHost: only.example\r\n\r\n"
               b"GET /api HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"
               b"GET /api/x HTTP/1.1\r\nHost: only.example\r\n\r\n", 3)
        self.assertEqual([r.status for r in responses], [404, 404, 200])
        self.assertEqual(responses[0].header(b"x-txmesh-flags"), b"NR")
        self.assertEqual(responses[1].header(b"x-txmesh-flags"), b"NR")
        self.assertIsNone(responses[2].header(b"x-txmesh-flags"))
        self.assertEqual([r.path for r in up.requests], [b"/api/x"])

    @defer.inlineCallbacks
    def test_connect_refused(self):
        h = yield self.proxy(BASIC, up=free_port())
        client, [r] = yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.status, 503)
        self.assertEqual(r.header(b"x-txmesh-flags"), b"UF")
        # The client connection stays usable.
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        responses = yield get_responses(client, 2)
        self.assertEqual(responses[1].status, 503)

    @defer.inlineCallbacks
    def test_connect_refused_with_body(self):
        h = yield self.proxy(BASIC, up=free_port())
        _client, responses = yield self.exchange(
            h, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
               b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 2)
        self.assertEqual([r.status for r in responses], [503, 503])

    @defer.inlineCallbacks
    def test_upstream_closes_before_answering(self):
        _up, h = yield self.basic(HTTPUpstream(lambda proto, req: proto.transport.loseConnection()))
        _, [r] = yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.status, 503)
        self.assertEqual(r.header(b"x-txmesh-flags"), b"UC")

    @defer.inlineCallbacks
    def test_upstream_garbage(self):
        up, h = yield self.basic(HTTPUpstream(lambda proto, req: proto.transport.write(b"SSH-2.0-OpenSSH\r\n\r\n")))
        _client, [r] = yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.status, 502)
        self.assertEqual(r.header(b"x-txmesh-flags"), b"UPE")
        # The connection that spoke garbage is closed, never pooled.
        yield wait_until(lambda: len(up.factory.closed) == 1)

    @defer.inlineCallbacks
    def test_upstream_timeout(self):
        yaml_text = BASIC.replace("cluster: app}", "cluster: app, timeout: 200ms}")
        up, h = yield self.basic(HTTPUpstream(answer=None), yaml_text=yaml_text)
        closed = up.factory.next_close()
        started = reactor.seconds()
        _client, [r] = yield self.exchange(h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        elapsed = reactor.seconds() - started
        self.assertEqual(r.status, 504)
        self.assertEqual(r.header(b"x-txmesh-flags"), b"UT")
        self.assertTrue(0.15 <= elapsed < 3, elapsed)
        # The abandoned upstream connection is closed, not pooled.
        yield with_timeout(closed)

    @defer.inlineCallbacks
    def test_upstream_dies_mid_response(self):
        """
        After the head and half the body, the upstream is killed: the client
        gets exactly what was sent, then the connection closes.
        """
        protos = []

        def answer(proto, req):
            protos.append(proto)
            proto.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"z" * 50)

        _up, h = yield self.basic(HTTPUpstream(answer))
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        yield client.wait_for(lambda d: d.endswith(b"z" * 50), WAIT)
        protos[0].transport.abortConnection()
        data = yield wait_closed(client)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"content-length: 100", head)
        self.assertEqual(body, b"z" * 50)

    @defer.inlineCallbacks
    def test_upstream_dies_mid_chunked_response(self):
        protos = []

        def answer(proto, req):
            protos.append(proto)
            proto.transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")

        _up, h = yield self.basic(HTTPUpstream(answer))
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        yield client.wait_for(lambda d: d.endswith(b"hello\r\n"), WAIT)
        protos[0].transport.loseConnection()
        data = yield wait_closed(client)
        # No last chunk: the client can tell the body is incomplete.
        self.assertTrue(data.endswith(b"\r\n5\r\nhello\r\n"), data)

    @defer.inlineCallbacks
    def test_direct_response(self):
        yaml_text = """
            listeners:
              - name: http
                address: "tcp:0:interface=127.0.0.1"
                routes:
                  - {match: {path: /healthz}, direct_response: {status: 200, body: "ok\\n"}}
                  - {match: {path: /gone}, direct_response: {status: 410}}
                  - {match: {prefix: /}, cluster: app}
            clusters:
              - {name: app, endpoints: ["127.0.0.1:{up}"]}
            """
        up, h = yield self.basic(yaml_text=yaml_text)
        _, responses = yield self.exchange(
            h, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /gone HTTP/1.1\r\nHost: a\r\n\r\n"
               b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", 3)
        self.assertEqual([(r.status, r.body) for r in responses], [(200, b"ok\n"), (410, b""), (200, b"GET /x")])
        self.assertEqual(responses[1].header(b"content-length"), b"0")
        self.assertEqual([r.path for r in up.requests], [b"/x"])

    @defer.inlineCallbacks
    def test_client_disconnects_mid_body(self):
        """
        A client that goes away mid-body cancels the upstream request: its
        connection is closed, not returned to the pool.
        """
        up, h = yield self.basic()
        client = yield raw_connect(self, h.port())
        client.transport.write(b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"q" * 1000)
        yield up.wait(lambda: up.started and len(up.started[0].body) >= 1000)
        closed = up.factory.next_close()
        client.transport.abortConnection()
        yield with_timeout(closed)
        self.assertEqual(up.requests, [])
        pools = [p for c in h.service._clusters.clusters() for p in c.pools()]
        yield wait_until(lambda: all(p.connections == 0 and p.active_requests == 0 for p in pools))

    @defer.inlineCallbacks
    def test_client_disconnects_while_waiting(self):
        up, h = yield self.basic(HTTPUpstream(answer=None))
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        yield up.wait_requests(1)
        closed = up.factory.next_close()
        client.transport.loseConnection()
        yield with_timeout(closed)


class BadRequestTests(_Base):
    """
    Malformed requests get a 4xx with C{connection: close}, and nothing of
    them reaches the upstream.
    """

    @defer.inlineCallbacks
    def setUp(self):
        _Base.setUp(self)
        self.up, self.h = yield self.basic(yaml_text=BASIC.replace(
            'address: "tcp:0:interface=127.0.0.1"',
            'address: "tcp:0:interface=127.0.0.1"\n        max_request_headers_bytes: 4096'))

    @defer.inlineCallbacks
    def check_rejected(self, data: bytes, status: int = 400) -> Any:
        r = yield self.rejected(self.h, data)
        self.assertEqual(r.status, status)
        self.assertEqual(r.header(b"x-txmesh-flags"), b"DPE")
        self.assertEqual(self.up.factory.received, [])
        return r

    def test_malformed_request_line(self):
        return self.check_rejected(b"GET\x01/ HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_garbage(self):
        return self.check_rejected(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")

    def test_bad_header(self):
        return self.check_rejected(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")

    def test_header_space_before_colon(self):
        return self.check_rejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-A : x\r\n\r\n")

    def test_content_length_and_transfer_encoding(self):
        return self.check_rejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")

    def test_duplicate_content_length(self):
        return self.check_rejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                                   b"Content-Length: 6\r\n\r\nhello!")

    def test_missing_host(self):
        return self.check_rejected(b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n")

    def test_invalid_chunk_size_same_packet(self):
        return self.check_rejected(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"zz\r\nhello\r\n0\r\n\r\n")

    def test_oversize_headers(self):
        return self.check_rejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431)

    @defer.inlineCallbacks
    def test_oversize_headers_in_pieces(self):
        client = yield raw_connect(self, self.h.port())
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
        for i in range(10):
            client.transport.write(b"X-H%d: " % i + b"v" * 500 + b"\r\n")
        data = yield wait_closed(client)
        [r] = read_responses(data)
        self.assertEqual(r.status, 431)
        self.assertEqual(self.up.factory.received, [])

    @defer.inlineCallbacks
    def test_good_request_before_bad_one_is_answered(self):
        """
        Pipelined: the complete request before the malformed one is
        answered, then the error, then the close.
        """
        client = yield raw_connect(self, self.h.port())
        client.transport.write(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /bad HTTP/1.1\r\nHost a\r\n\r\n")
        data = yield wait_closed(client)
        responses = read_responses(data)
        self.assertEqual([r.status for r in responses], [200, 400])
        self.assertEqual(responses[0].body, b"GET /ok")
        self.assertEqual(responses[1].header(b"connection"), b"close")
        self.assertEqual([r.path for r in self.up.started], [b"/ok"])

    @defer.inlineCallbacks
    def test_several_good_requests_before_bad_one(self):
        client = yield raw_connect(self, self.h.port())
        client.transport.write(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                               b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
                               b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
                               b"GET /4 HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
        data = yield wait_closed(client)
        responses = read_responses(data)
        self.assertEqual([r.status for r in responses], [200, 200, 200, 400])
        self.assertEqual([r.body for r in responses[:3]], [b"GET /1", b"POST /2\nhi", b"GET /3"])
        self.assertEqual([r.header(b"connection") for r in responses], [None, None, None, b"close"])
        self.assertEqual([r.path for r in self.up.started], [b"/1", b"/2", b"/3"])

    @defer.inlineCallbacks
    def test_bad_request_while_response_in_flight(self):
        """
        A malformed pipelined request arriving while the one before it is
        being answered: that answer completes, then the 400.
        """
        self.up.answer = lambda proto, req: reactor.callLater(0.05, echo, proto, req)
        client = yield raw_connect(self, self.h.port())
        client.transport.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        yield self.up.wait_requests(1)
        client.transport.write(b"BAD\x00 / HTTP/1.1\r\n\r\n")
        data = yield wait_closed(client)
        responses = read_responses(data)
        self.assertEqual([r.status for r in responses], [200, 400])
        self.assertEqual(responses[0].body, b"GET /slow")

    @defer.inlineCallbacks
    def test_invalid_chunk_size_later_packet(self):
        """
        The head and a good chunk went upstream already; a bad chunk size
        later abandons the upstream request (it never completes there) and
        the client gets a 400 and a close.
        """
        client = yield raw_connect(self, self.h.port())
        client.transport.write(b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        up = self.up
        yield up.wait(lambda: up.started and up.started[0].body == b"hello")
        closed = up.factory.next_close()
        client.transport.write(b"zz\r\nmore\r\n0\r\n\r\n")
        data = yield wait_closed(client)
        [r] = read_responses(data)
        self.assertEqual(r.status, 400)
        self.assertEqual(r.header(b"connection"), b"close")
        yield with_timeout(closed)
        self.assertEqual(up.requests, [])
        self.assertFalse(up.factory.all_received().endswith(b"0\r\n\r\n"))


class UpgradeTests(_Base):
    @defer.inlineCallbacks
    def test_websocket_upgrade(self):
        def respond(proto, data):
            if not getattr(proto, "upgraded", False):
                proto.head = getattr(proto, "head", b"") + data
                if b"\r\n\r\n" in proto.head:
                    proto.upgraded = True
                    proto.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n")
                    rest = proto.head.split(b"\r\n\r\n", 1)[1]
                    if rest:
                        proto.transport.write(b"echo:" + rest)
            else:
                proto.transport.write(b"echo:" + data)

        up = RecordingFactory(respond)
        port = yield self.upstream(up)
        h = yield self.proxy(BASIC, up=port)
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        data = yield client.wait_for(lambda d: b"\r\n\r\n" in d, WAIT)
        head = data.split(b"\r\n\r\n")[0].lower()
        self.assertTrue(head.startswith(b"http/1.1 101 "), head)
        self.assertIn(b"upgrade: websocket", head)
        self.assertIn(b"connection: upgrade", head)
        received = up.connections[0].received.lower()
        self.assertIn(b"upgrade: websocket", received)
        self.assertIn(b"connection: upgrade", received)
        self.assertIn(b"sec-websocket-key: dghlihnhbxbszsbub25jzq==", received)
        base = len(client.data)
        client.transport.write(b"\x81\x05hello")
        yield client.wait_for(lambda d: d[base:] == b"echo:\x81\x05hello", WAIT)
        client.transport.write(b"second")
        yield client.wait_for(lambda d: d.endswith(b"echo:second"), WAIT)
        # Closing the tunnel from the client closes it upstream.
        closed = up.next_close()
        client.transport.loseConnection()
        yield with_timeout(closed)

    @defer.inlineCallbacks
    def test_upgrade_refused(self):
        """
        An upstream that answers an upgrade request with a normal response
        is forwarded as such.
        """
        _up, h = yield self.basic(HTTPUpstream(lambda proto, req: send_response(
            proto, b"426 Upgrade Required", b"no", ((b"connection", b"close"),))))
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        data = yield wait_closed(client)
        [r] = read_responses(data)
        self.assertEqual((r.status, r.body), (426, b"no"))


class BackpressureTests(_Base):
    @defer.inlineCallbacks
    def test_slow_client_pauses_upstream(self):
        """
        A client that stops reading a 20 MB response makes the proxy stop
        reading the upstream (the proxy does not buffer the body); when the
        client reads again every byte arrives.
        """
        size = 20 * 1024 * 1024
        up = BulkFactory(size)
        port = yield self.upstream(up)
        h = yield self.proxy(BASIC, up=port)
        client = yield raw_connect(self, h.port())
        received = [0]
        head = [b""]

        def count(data: bytes) -> None:
            if received[0] == 0 and not head[0].endswith(b"\r\n\r\n"):
                buf = head[0] + data
                if b"\r\n\r\n" in buf:
                    head[0], _, rest = buf.partition(b"\r\n\r\n")
                    head[0] += b"\r\n\r\n"
                    received[0] += len(rest)
                else:
                    head[0] = buf
                return
            received[0] += len(data)

        client.dataReceived = count
        # Small kernel buffers at both ends, so what the sockets hold is far
        # below the body size wherever this runs.
        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.transport.pauseProducing()
        client.transport.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        yield wait_until(lambda: up.senders)
        sender = up.senders[0]
        [server] = h.service._listeners["http"].factory.inner.connections

        # Wait until the upstream stops making progress.
        last = [-1, 0]

        def stalled() -> bool:
            if sender.sent == last[0]:
                last[1] += 1
            else:
                last[:] = [sender.sent, 0]
            return last[1] >= 10

        yield wait_until(stalled, 15, 0.03)
        self.assertLess(sender.sent, size)
        self.assertTrue(sender.paused)
        upstream_conn = server._response_producer
        self.assertIsNotNone(upstream_conn)
        self.assertTrue(upstream_conn._paused, "the proxy did not pause reading the upstream")
        transport = server.transport
        buffered = len(transport.dataBuffer) + transport._tempDataLen
        self.assertLess(buffered, 1024 * 1024, "the proxy buffers the response")

        client.transport.resumeProducing()
        yield with_timeout(sender.done, 30)
        yield wait_until(lambda: received[0] >= size, 30)
        self.assertEqual(received[0], size)
        self.assertIn(b"content-length: %d" % size, head[0])


class FilterTests(_Base):
    YAML = """
        listeners:
          - name: http
            address: "tcp:0:interface=127.0.0.1"
            http_filters: [{name: metrics}, {name: test}, {name: router}]
            routes: [{match: {prefix: /}, cluster: app}]
        clusters:
          - {name: app, endpoints: ["127.0.0.1:{up}"]}
        """

    @defer.inlineCallbacks
    def setUp(self):
        _Base.setUp(self)
        self.filter = ProbeFilterFactory()
        self.up = HTTPUpstream()
        port = yield self.upstream(self.up.factory)
        registry = FilterRegistry(http=[RouterFactory(), MetricsFactory(), self.filter])
        self.h = yield self.proxy(self.YAML, registry=registry, up=port)

    @defer.inlineCallbacks
    def test_filter_adds_request_header(self):
        _, [r] = yield self.exchange(self.h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.status, 200)
        self.assertEqual(self.up.requests[0].all(b"x-filter-added"), [b"1"])
        self.assertEqual(r.header(b"x-filter-response"), b"1")

    @defer.inlineCallbacks
    def test_filter_local_reply(self):
        _client, responses = yield self.exchange(
            self.h, b"GET / HTTP/1.1\r\nHost: a\r\nX-Test: deny\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n", 2)
        self.assertEqual(responses[0].status, 403)
        self.assertEqual(responses[0].body, b"denied by test filter\n")
        self.assertEqual(responses[0].header(b"x-txmesh-flags"), b"LR")
        self.assertEqual(responses[1].status, 200)
        self.assertEqual([r.path for r in self.up.started], [b"/next"])

    @defer.inlineCallbacks
    def test_filter_local_reply_with_body(self):
        """
        A local reply to a request with a body: the body is not sent
        upstream, and the connection stays in sync.
        """
        _, responses = yield self.exchange(
            self.h, b"POST / HTTP/1.1\r\nHost: a\r\nX-Test: deny\r\nContent-Length: 5\r\n\r\nhello"
                    b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n", 2)
        self.assertEqual([r.status for r in responses], [403, 200])
        self.assertEqual([r.path for r in self.up.started], [b"/next"])

    @defer.inlineCallbacks
    def test_filter_local_reply_chunked_body(self):
        _, responses = yield self.exchange(
            self.h, b"POST / HTTP/1.1\r\nHost: a\r\nX-Test: deny\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n", 2)
        self.assertEqual([r.status for r in responses], [403, 200])
        self.assertEqual([r.path for r in self.up.started], [b"/next"])

    @defer.inlineCallbacks
    def test_filter_local_reply_body_still_coming(self):
        """
        A local reply before the request body has arrived: the rest of the
        body cannot be told from a next request, so the connection closes
        after the reply.
        """
        client = yield raw_connect(self, self.h.port())
        client.transport.write(b"POST / HTTP/1.1\r\nHost: a\r\nX-Test: deny\r\nContent-Length: 100\r\n\r\nab")
        data = yield wait_closed(client)
        [r] = read_responses(data)
        self.assertEqual(r.status, 403)
        self.assertEqual(self.up.factory.received, [])

    @defer.inlineCallbacks
    def test_filter_deferred(self):
        started = reactor.seconds()
        _, responses = yield self.exchange(
            self.h, b"POST /d HTTP/1.1\r\nHost: a\r\nX-Test: delay\r\nContent-Length: 4\r\n\r\nbody"
                    b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n", 2)
        self.assertGreaterEqual(reactor.seconds() - started, 0.045)
        self.assertEqual(len(self.filter.delayed), 1)
        self.assertEqual([r.body for r in responses], [b"POST /d\nbody", b"GET /after"])
        self.assertEqual(self.up.requests[0].all(b"x-filter-added"), [b"1"])

    @defer.inlineCallbacks
    def test_filter_raises(self):
        _client, responses = yield self.exchange(
            self.h, b"GET / HTTP/1.1\r\nHost: a\r\nX-Test: raise\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n", 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([r.status for r in responses], [500, 200])
        _, [r] = yield self.exchange(self.h, b"GET /new HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.status, 200)
        self.assertEqual([r.path for r in self.up.started], [b"/next", b"/new"])

    @defer.inlineCallbacks
    def test_metrics_counted(self):
        yield self.exchange(self.h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nX-Test: deny\r\n\r\n",
                            2)
        _, text = self.h.service.metrics_text()
        self.assertRegex(text, rb'istio_requests_total\{[^}]*response_code="200"[^}]*\} 1\.0')
        self.assertRegex(text, rb'istio_requests_total\{[^}]*response_code="403"[^}]*response_flags="LR"[^}]*\} 1\.0')


class ReloadTests(_Base):
    TWO = """
        listeners:
          - name: http
            address: "tcp:0:interface=127.0.0.1"
            routes: [{match: {prefix: /}, cluster: {target}}]
        clusters:
          - {name: a, endpoints: ["127.0.0.1:{a}"]}
          - {name: b, endpoints: ["127.0.0.1:{b}"]}
        """

    @defer.inlineCallbacks
    def setUp(self):
        _Base.setUp(self)
        self.a = HTTPUpstream(lambda proto, req: self.answer_a(proto, req))
        self.b = HTTPUpstream(lambda proto, req: send_response(proto, body=b"from b"))
        self.answer_a = lambda proto, req: send_response(proto, body=b"from a")
        self.ports = {"a": (yield self.upstream(self.a.factory)), "b": (yield self.upstream(self.b.factory))}
        self.h = yield self.proxy(self.TWO, target="a", **self.ports)

    @defer.inlineCallbacks
    def get(self) -> Any:
        _, [r] = yield self.exchange(self.h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        return r.body

    @defer.inlineCallbacks
    def test_reload_switches_routes(self):
        self.assertEqual((yield self.get()), b"from a")
        self.h.write(self.TWO, target="b", **self.ports)
        applied = yield self.h.service.reload()
        self.assertTrue(applied)
        self.assertEqual((yield self.get()), b"from b")

    @defer.inlineCallbacks
    def test_reload_switches_routes_on_open_connection(self):
        """
        A kept-alive client connection picks up the new routes for its next
        request.
        """
        client = yield raw_connect(self, self.h.port())
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        yield get_responses(client, 1)
        self.h.write(self.TWO, target="b", **self.ports)
        self.assertTrue((yield self.h.service.reload()))
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        responses = yield get_responses(client, 2)
        self.assertEqual([r.body for r in responses], [b"from a", b"from b"])

    @defer.inlineCallbacks
    def test_invalid_reload_keeps_old_routes(self):
        self.h.write("listeners: [\n")
        self.assertFalse((yield self.h.service.reload()))
        self.assertEqual((yield self.get()), b"from a")
        self.h.write(self.TWO, target="nosuchcluster", **self.ports)
        self.assertFalse((yield self.h.service.reload()))
        self.assertEqual((yield self.get()), b"from a")
        self.assertEqual(self.h.service.version, 1)

    @defer.inlineCallbacks
    def test_in_flight_request_finishes_on_old_route(self):
        pending = []
        self.answer_a = lambda proto, req: pending.append(proto)
        client = yield raw_connect(self, self.h.port())
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        yield self.a.wait_requests(1)
        self.h.write(self.TWO, target="b", **self.ports)
        self.assertTrue((yield self.h.service.reload()))
        self.assertEqual((yield self.get()), b"from b")
        send_response(pending[0], body=b"late from a")
        [r] = yield get_responses(client)
        self.assertEqual(r.body, b"late from a")
        # The same connection's next request takes the new route.
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        responses = yield get_responses(client, 2)
        self.assertEqual(responses[1].body, b"from b")

    @defer.inlineCallbacks
    def test_replaced_listener_drains_its_connections(self):
        """
        A config that replaces a listener (here: a new address) closes the
        old listener's idle connections at once and its busy ones after
        their response, so nothing keeps being served under the old
        listener's settings.
        """
        pending = []
        self.answer_a = lambda proto, req: pending.append(proto)
        idle = yield raw_connect(self, self.h.port())
        idle.transport.write(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        yield wait_until(lambda: pending)
        send_response(pending.pop(), body=b"first")
        yield get_responses(idle, 1)
        busy = yield raw_connect(self, self.h.port())
        busy.transport.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        yield wait_until(lambda: pending)
        self.h.write(self.TWO.replace('interface=127.0.0.1"', 'interface=127.0.0.1:backlog=64"'),
                     target="b", **self.ports)
        self.assertTrue((yield self.h.service.reload()))
        yield wait_closed(idle)
        send_response(pending.pop(), body=b"slow")
        data = yield wait_closed(busy)
        [r] = finals(read_responses(data))
        self.assertEqual((r.body, dict(r.headers).get(b"connection")), (b"slow", b"close"))
        self.assertEqual((yield self.get()), b"from b")


class ReviewFixTests(unittest.TestCase):
    """
    Regressions found in review: per-route filter overrides, rewrites of
    exact paths, local-reply headers, and independent listener timeouts.
    """

    @defer.inlineCallbacks
    def _proxy(self, routes, listener_extra=""):
        up = RecordingFactory(fixed_response(b"ok"))
        upport = yield listen_upstream(self, up)
        h = ProxyHarness(self)
        yield h.start("""
            listeners:
              - name: http
                address: "tcp:0:interface=127.0.0.1"
                http_filters: [{name: metrics}]
                """ + listener_extra + """
                routes: """ + routes + """
            clusters:
              - {name: app, endpoints: ["127.0.0.1:{up}"]}
            """, up=upport)
        return h, up

    @defer.inlineCallbacks
    def test_override_with_empty_config_keeps_filter(self):
        """
        C{filters: {metrics: {}}} configures the filter on the route; it
        does not turn it off (only C{null} does).
        """
        h, up = yield self._proxy('[{match: {prefix: /}, cluster: app, filters: {metrics: {}}}]')
        yield raw_exchange(self, h.port(), b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        series = h.service.metrics.http.table.series
        self.assertEqual(sum(s.count for s in series.values()), 1)

    @defer.inlineCallbacks
    def test_exact_path_rewrite(self):
        h, up = yield self._proxy('[{match: {path: /old}, cluster: app, prefix_rewrite: /new}]')
        yield raw_exchange(self, h.port(), b"GET /old?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        self.assertTrue(up.all_received().startswith(b"GET /new?q=1 HTTP/1.1\r\n"), up.all_received())

    @defer.inlineCallbacks
    def test_zero_headers_timeout_keeps_idle_timeout(self):
        """
        Disabling the request-headers timeout (0) leaves the idle timeout on.
        """
        h, up = yield self._proxy('[{match: {prefix: /}, cluster: app}]',
                                  "idle_timeout: 200ms\n                request_headers_timeout: 0")
        client = yield raw_connect(self, h.port())
        data = yield client.closed.addTimeout(5, reactor)
        self.assertEqual(data, b"")


class _Pool:
    """
    The least a L{HTTP1ClientConnection} needs of its pool.
    """

    def __init__(self) -> None:
        self.released: list[Any] = []

    def connection_lost(self, connection: Any) -> None:
        pass

    def release(self, connection: Any) -> None:
        self.released.append(connection)


class _Handler:
    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.ended = False

    def response_informational(self, head: Any) -> None:
        pass

    def response_head(self, head: Any, end_stream: bool) -> None:
        pass

    def response_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self.ended = True
            # What the downstream transport does when this last write
            # fills its buffer: it pauses its registered producer.
            self.connection.pauseProducing()

    def response_trailers(self, trailers: Any) -> None:
        pass

    def upstream_reset(self, flag: str, reason: str) -> None:
        raise AssertionError(reason)

    def flush(self) -> None:
        pass


class PooledConnectionPauseTests(unittest.TestCase):
    """
    A pooled upstream connection is never left paused: the downstream that
    paused it on its last write unregisters it before it drains.
    """

    def connection(self) -> tuple[Any, Any, Any]:
        pool = _Pool()
        connection = HTTP1ClientConnection(pool, "127.0.0.1:80")
        transport = StringTransport()
        connection.makeConnection(transport)
        handler = _Handler(connection)
        connection.start(RequestHead(b"GET", b"/", b"a", Headers([(b"host", b"a")])), True, handler)
        return connection, transport, handler

    def test_pause_after_the_response_ends_is_ignored(self) -> None:
        """
        A pause that arrives with the response's last byte leaves the
        released connection reading.
        """
        connection, transport, handler = self.connection()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        self.assertTrue(handler.ended)
        self.assertEqual(connection._pool.released, [connection])
        self.assertEqual(transport.producerState, "producing")

    def test_next_request_resumes_a_paused_connection(self) -> None:
        """
        A connection paused during one exchange reads again when the next
        request starts on it.
        """
        connection, transport, handler = self.connection()
        connection.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        connection.start(RequestHead(b"GET", b"/", b"a", Headers([(b"host", b"a")])), True, handler)
        self.assertEqual(transport.producerState, "producing")


class RequestRateTests(_Base):
    """
    C{max_requests_per_second}: one connection's requests beyond the rate
    get 429 with flag RL; other connections are not affected.
    """

    LIMITED = """
        listeners:
          - name: http
            address: "tcp:0:interface=127.0.0.1"
            max_requests_per_second: 2
            routes: [{match: {prefix: /}, cluster: app}]
        clusters:
          - {name: app, endpoints: ["127.0.0.1:{up}"]}
        """

    def test_token_bucket(self) -> None:
        rate = RequestRate(2)
        self.assertEqual([rate.allow(0.0) for _ in range(3)], [True, True, False])
        self.assertFalse(rate.allow(0.4))  # 0.8 of a token
        self.assertTrue(rate.allow(0.5))
        self.assertTrue(rate.allow(10.0))  # refilled, capped at the burst
        self.assertTrue(rate.allow(10.0))
        self.assertFalse(rate.allow(10.0))
        self.assertRaises(ValueError, RequestRate, 0)

    @defer.inlineCallbacks
    def test_excess_gets_429(self):
        up = HTTPUpstream(lambda proto, req: send_response(proto, body=b"ok"))
        port = yield self.upstream(up.factory)
        h = yield self.proxy(self.LIMITED, up=port)
        client = yield raw_connect(self, h.port())
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 4)
        responses = yield get_responses(client, 4)
        self.assertEqual([r.status for r in responses], [200, 200, 429, 429])
        self.assertEqual(dict(responses[2].headers).get(b"x-txmesh-flags"), b"RL")
        other = yield raw_connect(self, h.port())
        other.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        [r] = yield get_responses(other, 1)
        self.assertEqual(r.status, 200)
