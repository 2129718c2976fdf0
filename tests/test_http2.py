"""
Tests of HTTP/2: the sans-IO conversions (L{txmesh.proxy.http2}), the
server protocol driven in memory by an h2 client connection, the listener's
protocol sniffing, the upstream h2c pool, and real sockets through the
proxy with curl, nginx and h2load.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import Frame
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support import Nginx, ProxyHarness, curl, free_port, listen_upstream, sleep
from txmesh.config.model import ListenerConfig, NodeConfig
from txmesh.filters.api import LocalReply
from txmesh.proxy import http2
from txmesh.proxy.connection_manager import HTTPConnectionManager, ProxyContext
from txmesh.proxy.http2_server import HTTP2ServerProtocol
from txmesh.proxy.listener import HTTPListenerFactory, sniff
from txmesh.proxy.stream import Headers, RequestHead, ResponseHead

H2LOAD = shutil.which("h2load")


# Sans-IO conversions


class ConversionTests(unittest.TestCase):
    def test_request_from_h2(self) -> None:
        head = http2.request_from_h2([
            (b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"example.com"),
            (b":path", b"/a?b=1"), (b"content-type", b"text/plain"), (b"te", b"trailers"),
        ])
        self.assertEqual((head.method, head.scheme, head.authority, head.path, head.version),
                         (b"POST", b"https", b"example.com", b"/a?b=1", b"2"))
        self.assertEqual(head.headers.items(), [(b"content-type", b"text/plain"), (b"te", b"trailers")])

    def test_host_becomes_authority(self) -> None:
        head = http2.request_from_h2([
            (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h.example")])
        self.assertEqual(head.authority, b"h.example")

    def test_str_headers(self) -> None:
        head = http2.request_from_h2([(":method", "GET"), (":scheme", "http"), (":path", "/"),
                                      (":authority", "a")])
        self.assertEqual(head.path, b"/")

    def test_invalid_requests(self) -> None:
        base = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
        bad = [
            base[1:],  # no :method
            [base[0], base[1], base[3]],  # no :path
            [base[0], base[2], base[3]],  # no :scheme
            base + [(b"connection", b"keep-alive")],
            base + [(b"keep-alive", b"5")],
            base + [(b"transfer-encoding", b"chunked")],
            base + [(b"upgrade", b"websocket")],
            base + [(b"te", b"gzip")],
            base + [(b":bogus", b"x")],
            [base[0], (b"x", b"y")] + base[1:],  # pseudo after regular
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b""), (b":authority", b"a")],
        ]
        for header_list in bad:
            self.assertRaises(http2.StreamProtocolError, http2.request_from_h2, header_list)

    def test_connect(self) -> None:
        head = http2.request_from_h2([(b":method", b"CONNECT"), (b":authority", b"db:5432")])
        self.assertEqual((head.method, head.authority), (b"CONNECT", b"db:5432"))
        self.assertEqual(http2.request_to_h2(head), [(b":method", b"CONNECT"), (b":authority", b"db:5432")])

    def test_response_from_h2(self) -> None:
        head = http2.response_from_h2([(b":status", b"404"), (b"content-length", b"3")])
        self.assertEqual((head.status, head.headers.items()), (404, [(b"content-length", b"3")]))
        for bad in ([(b"content-length", b"3")], [(b":status", b"abc")],
                    [(b":status", b"200"), (b"connection", b"close")], [(b":status", b"200"), (b":path", b"/")]):
            self.assertRaises(http2.StreamProtocolError, http2.response_from_h2, bad)

    def test_request_to_h2(self) -> None:
        head = RequestHead(b"GET", b"/x", b"", Headers([
            (b"host", b"svc:80"), (b"connection", b"keep-alive"), (b"keep-alive", b"5"),
            (b"transfer-encoding", b"chunked"), (b"te", b"trailers, deflate"), (b"x-a", b"1"),
            (b"upgrade", b"h2c"), (b"proxy-connection", b"x")]))
        self.assertEqual(http2.request_to_h2(head), [
            (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc:80"), (b":path", b"/x"),
            (b"x-a", b"1")])
        head.headers = Headers([(b"te", b"Trailers")])
        self.assertEqual(http2.request_to_h2(head)[-1], (b"te", b"trailers"))

    def test_response_to_h2(self) -> None:
        head = ResponseHead(200, Headers([(b"connection", b"close"), (b"content-type", b"a/b")]), b"OK")
        self.assertEqual(http2.response_to_h2(head), [(b":status", b"200"), (b"content-type", b"a/b")])

    def test_trailers(self) -> None:
        self.assertEqual(http2.trailers_from_h2([(b"grpc-status", b"0")]).items(), [(b"grpc-status", b"0")])
        self.assertRaises(http2.StreamProtocolError, http2.trailers_from_h2, [(b":status", b"200")])
        self.assertEqual(http2.trailers_to_h2(Headers([(b"grpc-status", b"0")])), [(b"grpc-status", b"0")])

    def test_settings(self) -> None:
        settings = http2.local_settings()
        codes = h2.settings.SettingCodes
        self.assertEqual(settings[codes.MAX_CONCURRENT_STREAMS], 100)
        self.assertEqual(settings[codes.MAX_HEADER_LIST_SIZE], 65536)

    def test_h2c_upgrade(self) -> None:
        data = (b"GET /u HTTP/1.1\r\nHost: a:1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nAccept: */*\r\n\r\nPRI")
        head, settings, rest = http2.parse_h2c_upgrade(data)
        self.assertEqual((head.method, head.path, head.authority), (b"GET", b"/u", b"a:1"))
        self.assertEqual(head.headers.items(), [(b"host", b"a:1"), (b"accept", b"*/*")])
        self.assertEqual((settings, rest), (b"AAMAAABkAARAAAAAAAIAAAAA", b"PRI"))
        for bad in (data.replace(b"Upgrade: h2c", b"Upgrade: websocket"),
                    data.replace(b", HTTP2-Settings", b""),
                    data.replace(b"Accept: */*", b"Content-Length: 5"),
                    data.replace(b"HTTP/1.1", b"HTTP/1.0"),
                    data.replace(b"\r\n\r\n", b"\r\n"),
                    data.replace(b"AAMAAABkAARAAAAAAAIAAAAA", b"AAMAA!"),
                    data.replace(b"AAMAAABkAARAAAAAAAIAAAAA", b"AAMA")):
            self.assertIsNone(http2.parse_h2c_upgrade(bad), bad)

    def test_sniff(self) -> None:
        self.assertEqual(sniff(http2.PREFACE + b"rest"), "h2")
        self.assertIsNone(sniff(b"PRI * HT"))
        self.assertEqual(sniff(b"PRIX"), "http/1.1")
        self.assertEqual(sniff(b"GET / HTTP/1.1\r\n"), "http/1.1")


# The server protocol, in memory


def frames(data: bytes) -> list:
    """
    @return: the hyperframe frames in C{data}.
    """
    out = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


class _Terminal:
    """
    A last filter that records each stream and lets the test answer it.
    """

    def __init__(self, factory: _TerminalFactory, stream: Any):
        self.factory = factory
        self.stream = stream
        self.head: RequestHead | None = None
        self.body = b""
        self.trailers: Headers | None = None
        self.ended = False
        self.completed = False

    def request_headers(self, head: RequestHead, end_stream: bool) -> Any:
        self.head = head
        self.ended = end_stream
        self.factory.streams.append(self)
        if self.factory.auto is not None:
            return self.factory.auto
        return None

    def request_data(self, data: bytes, end_stream: bool) -> Any:
        self.body += data
        self.ended = end_stream
        return None

    def request_trailers(self, trailers: Headers) -> Any:
        self.trailers = trailers
        self.ended = True
        return None

    def response_headers(self, head: ResponseHead, end_stream: bool) -> Any:
        return None

    def response_data(self, data: bytes, end_stream: bool) -> Any:
        return None

    def response_trailers(self, trailers: Headers) -> Any:
        return None

    def stream_complete(self) -> None:
        self.completed = True


class _TerminalFactory:
    name = "terminal"

    def __init__(self, auto: Any = None):
        self.streams: list[_Terminal] = []
        self.auto = auto

    def parse_config(self, raw: Any) -> None:
        return None

    def create_filter(self, config: Any, stream: Any) -> _Terminal:
        return _Terminal(self, stream)


class _Producer:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class InMemoryServer:
    """
    An L{HTTP2ServerProtocol} behind L{HTTPListenerFactory}, and an h2
    client connection talking to it over L{StringTransport}s.
    """

    def __init__(self, auto: Any = None, client_window: int | None = None, idle_timeout: float = 300.0,
                 max_concurrent_streams: int = 100, max_request_bytes: int = 0):
        from txmesh.config.model import FilterConfig

        self.clock = Clock()
        self.terminal = _TerminalFactory(auto)
        listener = ListenerConfig("h", "tcp:0", http_filters=(FilterConfig("terminal", self.terminal),),
                                  idle_timeout=idle_timeout, max_concurrent_streams=max_concurrent_streams,
                                  max_request_bytes=max_request_bytes)
        manager = HTTPConnectionManager(listener, None, ProxyContext(NodeConfig(), self.clock))
        self.factory = HTTPListenerFactory(manager)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        # Lenient, so tests can send what a broken client would.
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, normalize_outbound_headers=False,
            validate_outbound_headers=False))
        self.client.initiate_connection()
        if client_window is not None:
            self.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: client_window})
        self.events: list = []
        self.pump()

    def pump(self) -> list:
        """
        Exchange bytes until neither side has anything to send.
        """
        new: list = []
        for _ in range(100):
            out = self.client.data_to_send()
            if out:
                self.protocol.dataReceived(out)
            back = self.transport.value()
            self.transport.clear()
            if back:
                new.extend(self.client.receive_data(back))
            if not out and not back:
                break
        self.events.extend(new)
        return new

    @property
    def inner(self) -> HTTP2ServerProtocol:
        return self.protocol._inner

    def request(self, method: bytes = b"GET", path: bytes = b"/", end_stream: bool = True,
                extra: list | None = None) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [(b":method", method), (b":scheme", b"http"),
                                       (b":authority", b"example.com"), (b":path", path)] + (extra or []),
                                 end_stream=end_stream)
        return sid

    def of(self, kind: type, sid: int | None = None) -> list:
        return [e for e in self.events if isinstance(e, kind) and (sid is None or e.stream_id == sid)]

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, sid))


class ServerProtocolTests(unittest.TestCase):
    def test_client_goaway_lets_streams_finish(self) -> None:
        """
        A client's GOAWAY(NO_ERROR) stops new streams, but the one in flight
        still gets its response; then the connection closes.
        """
        from hyperframe.frame import GoAwayFrame

        s = InMemoryServer()
        sid = s.request()
        s.pump()
        [t] = s.terminal.streams
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = 0
        goaway.error_code = 0
        s.protocol.dataReceived(goaway.serialize())
        self.assertFalse(s.transport.disconnecting)
        t.stream.encode_headers(ResponseHead(200, Headers([(b"content-length", b"2")])), False)
        t.stream.encode_data(b"ok", True)
        s.pump()
        self.assertEqual(s.body(sid), b"ok")
        self.assertTrue(s.of(h2.events.StreamEnded, sid))
        self.assertTrue(s.transport.disconnecting)

    def test_client_goaway_with_error_closes_at_once(self) -> None:
        from hyperframe.frame import GoAwayFrame

        s = InMemoryServer()
        s.request()
        s.pump()
        goaway = GoAwayFrame(0)
        goaway.error_code = 2  # INTERNAL_ERROR
        s.protocol.dataReceived(goaway.serialize())
        self.assertTrue(s.transport.disconnecting)

    def test_sniffs_preface(self) -> None:
        s = InMemoryServer()
        self.assertIsInstance(s.inner, HTTP2ServerProtocol)
        self.assertIn(s.inner, s.factory.connections)
        self.assertTrue(s.of(h2.events.RemoteSettingsChanged))

    def test_request_and_response(self) -> None:
        s = InMemoryServer()
        sid = s.request(extra=[(b"x-forwarded-for", b"10.0.0.1")])
        s.pump()
        [t] = s.terminal.streams
        self.assertEqual((t.head.method, t.head.path, t.head.authority, t.head.version, t.ended),
                         (b"GET", b"/", b"example.com", b"2", True))
        self.assertEqual(t.head.headers.get(b"x-forwarded-for"), b"10.0.0.1, 192.168.1.1")
        self.assertEqual(t.head.headers.get(b"x-forwarded-proto"), b"http")
        self.assertTrue(t.head.headers.get(b"x-request-id"))
        t.stream.encode_headers(ResponseHead(200, Headers([(b"content-type", b"text/plain"),
                                                           (b"connection", b"keep-alive")])), False)
        t.stream.encode_data(b"hello", False)
        t.stream.encode_trailers(Headers([(b"x-trailer", b"yes")]))
        s.pump()
        [resp] = s.of(h2.events.ResponseReceived, sid)
        self.assertEqual(resp.headers, [(b":status", b"200"), (b"content-type", b"text/plain")])
        self.assertEqual(s.body(sid), b"hello")
        [trailers] = s.of(h2.events.TrailersReceived, sid)
        self.assertEqual(trailers.headers, [(b"x-trailer", b"yes")])
        self.assertTrue(s.of(h2.events.StreamEnded, sid))
        self.assertTrue(t.completed)
        self.assertEqual(s.inner.streams, {})

    def test_request_body_and_trailers(self) -> None:
        s = InMemoryServer()
        sid = s.request(b"POST", end_stream=False, extra=[(b"te", b"trailers")])
        s.client.send_data(sid, b"abc")
        s.client.send_data(sid, b"def")
        s.client.send_headers(sid, [(b"grpc-timeout", b"1S")], end_stream=True)
        s.pump()
        [t] = s.terminal.streams
        self.assertEqual(t.body, b"abcdef")
        self.assertEqual(t.trailers.items(), [(b"grpc-timeout", b"1S")])

    def test_local_reply(self) -> None:
        s = InMemoryServer(auto=LocalReply(403, b"no\n", flag=""))
        sid = s.request()
        s.pump()
        [resp] = s.of(h2.events.ResponseReceived, sid)
        self.assertEqual(dict(resp.headers)[b":status"], b"403")
        self.assertEqual(s.body(sid), b"no\n")

    def test_early_response_stops_request(self) -> None:
        """
        A response complete before its request body ends the stream with
        RST_STREAM NO_ERROR: the client stops uploading.
        """
        s = InMemoryServer(auto=LocalReply(413, b"too big\n", flag=""))
        sid = s.request(b"POST", end_stream=False)
        s.pump()
        self.assertEqual(s.body(sid), b"too big\n")
        [reset] = s.of(h2.events.StreamReset, sid)
        self.assertEqual(reset.error_code, ErrorCodes.NO_ERROR)
        self.assertEqual(s.inner.streams, {})

    def test_invalid_request_reset(self) -> None:
        s = InMemoryServer()
        sid = s.request(extra=[(b"connection", b"close")])
        s.pump()
        [reset] = s.of(h2.events.StreamReset, sid)
        self.assertEqual(reset.error_code, ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(s.terminal.streams, [])
        # The connection still serves.
        sid = s.request()
        s.pump()
        self.assertEqual(len(s.terminal.streams), 1)

    def test_concurrent_streams(self) -> None:
        s = InMemoryServer()
        sids = [s.request(path=b"/%d" % i) for i in range(50)]
        s.pump()
        self.assertEqual(len(s.terminal.streams), 50)
        for t in s.terminal.streams:
            t.stream.encode_headers(ResponseHead(200, Headers()), False)
            t.stream.encode_data(t.head.path, True)
        s.pump()
        for i, sid in enumerate(sids):
            self.assertEqual(s.body(sid), b"/%d" % i)

    def test_request_body_limit(self) -> None:
        """
        A body over the listener's C{max_request_bytes}: 413, and the rest
        of the stream refused with C{RST_STREAM NO_ERROR}; the filters saw
        at most the limit.  A declared content-length over it is refused
        before any body.
        """
        s = InMemoryServer(max_request_bytes=10)
        sid = s.request(method=b"POST", end_stream=False)
        s.client.send_data(sid, b"x" * 8)
        s.pump()
        s.client.send_data(sid, b"x" * 8)
        s.pump()
        [response] = s.of(h2.events.ResponseReceived, sid)
        self.assertEqual(dict(response.headers)[b":status"], b"413")
        [reset] = s.of(h2.events.StreamReset, sid)
        self.assertEqual(reset.error_code, ErrorCodes.NO_ERROR)
        self.assertLessEqual(len(s.terminal.streams[0].body), 10)
        declared = s.request(method=b"POST", end_stream=False, extra=[(b"content-length", b"50")])
        s.pump()
        [response] = s.of(h2.events.ResponseReceived, declared)
        self.assertEqual(dict(response.headers)[b":status"], b"413")

    def test_listener_stream_limit_announced(self) -> None:
        """
        The listener's C{max_concurrent_streams} is what SETTINGS announce.
        """
        self.assertEqual(InMemoryServer(max_concurrent_streams=3).client.remote_settings.max_concurrent_streams, 3)
        self.assertEqual(InMemoryServer().client.remote_settings.max_concurrent_streams, 100)

    def test_refuses_streams_over_limit(self) -> None:
        """
        Streams over the limit (from a client that ignores SETTINGS) are
        refused.
        """
        s = InMemoryServer()
        s.inner.max_concurrent_streams = 3
        sids = [s.request() for _ in range(5)]
        s.pump()
        self.assertEqual(len(s.terminal.streams), 3)
        for sid in sids[3:]:
            [reset] = s.of(h2.events.StreamReset, sid)
            self.assertEqual(reset.error_code, ErrorCodes.REFUSED_STREAM)

    def test_limit_in_first_write(self) -> None:
        """
        The stream limit reaches the client in the server's first write
        (its answer to the preface), so a client that waits for the server's settings before starting
        streams (grpcio does) never opens more than the limit.
        """
        s = InMemoryServer(max_concurrent_streams=3)
        protocol = s.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        protocol.dataReceived(client.data_to_send())
        client.receive_data(transport.value())
        self.assertEqual(client.remote_settings.max_concurrent_streams, 3)

    def test_response_flow_control(self) -> None:
        """
        A response larger than the client's window is buffered; past the
        buffer limit the upstream is paused, and resumed as the client
        opens its window.
        """
        s = InMemoryServer(client_window=1000)
        sid = s.request()
        s.pump()
        [t] = s.terminal.streams
        producer = _Producer()
        t.stream.set_response_producer(producer)
        t.stream.encode_headers(ResponseHead(200, Headers()), False)
        big = b"x" * (1 << 20)
        t.stream.encode_data(big, False)
        s.pump()
        self.assertEqual(len(s.body(sid)), 1000)
        self.assertFalse(producer.paused)
        t.stream.encode_data(big, True)
        self.assertTrue(producer.paused)
        received = len(s.body(sid))
        for _ in range(200):
            if s.of(h2.events.StreamEnded, sid):
                break
            s.client.acknowledge_received_data(received, sid)
            s.client.increment_flow_control_window(1 << 20, sid)
            s.client.increment_flow_control_window(1 << 20)
            s.pump()
            now = len(s.body(sid))
            received = now
        self.assertEqual(len(s.body(sid)), 2 << 20)
        self.assertTrue(s.of(h2.events.StreamEnded, sid))
        self.assertFalse(producer.paused)

    def test_request_flow_control(self) -> None:
        """
        While a stream's request reading is paused its data is not
        acknowledged: the client's window closes.
        """
        s = InMemoryServer()
        sid = s.request(b"POST", end_stream=False)
        s.pump()
        [t] = s.terminal.streams
        window = s.client.local_flow_control_window(sid)
        t.stream.request_producer.pauseProducing()
        # h2 sends WINDOW_UPDATE once half the window is consumed.
        for _ in range(40):
            s.client.send_data(sid, b"a" * 16000)
        s.pump()
        self.assertEqual(len(t.body), 640000)
        self.assertEqual(s.client.local_flow_control_window(sid), window - 640000)
        t.stream.request_producer.resumeProducing()
        s.pump()
        self.assertEqual(s.client.local_flow_control_window(sid), window)

    def test_client_reset_cancels_stream(self) -> None:
        s = InMemoryServer()
        sid = s.request(b"POST", end_stream=False)
        s.pump()
        [t] = s.terminal.streams
        s.client.reset_stream(sid, ErrorCodes.CANCEL)
        s.pump()
        self.assertTrue(t.completed)
        self.assertIn("DC", t.stream.response_flags)
        self.assertEqual(s.inner.streams, {})

    def test_reset_from_filter(self) -> None:
        s = InMemoryServer()
        sid = s.request()
        s.pump()
        [t] = s.terminal.streams
        t.stream.encode_headers(ResponseHead(200, Headers()), False)
        t.stream.reset()
        s.pump()
        [reset] = s.of(h2.events.StreamReset, sid)
        self.assertEqual(reset.error_code, ErrorCodes.CANCEL)

    def test_rapid_reset(self) -> None:
        s = InMemoryServer()
        s.inner.rapid_reset_limit = 20
        for _ in range(30):
            sid = s.request(end_stream=False)
            s.client.reset_stream(sid, ErrorCodes.CANCEL)
            s.pump()
            if s.transport.disconnecting:
                break
        [goaway] = s.of(h2.events.ConnectionTerminated)
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(s.transport.disconnecting)

    def test_protocol_error_goaway(self) -> None:
        s = InMemoryServer()
        s.protocol.dataReceived(b"\x00\x00\x01\x09\x00\x00\x00\x00\x07x")  # CONTINUATION out of place
        goaway = s.client.receive_data(s.transport.value())
        self.assertEqual([type(e) for e in goaway][-1], h2.events.ConnectionTerminated)
        self.assertEqual(goaway[-1].error_code, ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(s.transport.disconnecting)

    def test_drain(self) -> None:
        s = InMemoryServer()
        sid = s.request()
        s.pump()
        s.factory.drain()
        s.pump()
        [goaway] = s.of(h2.events.ConnectionTerminated)
        self.assertEqual(goaway.error_code, ErrorCodes.NO_ERROR)
        self.assertFalse(s.transport.disconnecting)
        [t] = s.terminal.streams
        t.stream.encode_headers(ResponseHead(204, Headers()), True)
        # The client's h2 refuses frames after a GOAWAY: read them raw.
        sent = frames(s.transport.value())
        self.assertEqual([(type(f).__name__, f.stream_id, "END_STREAM" in f.flags) for f in sent],
                         [("HeadersFrame", sid, True)])
        self.assertTrue(s.transport.disconnecting)

    def test_idle_timeout(self) -> None:
        s = InMemoryServer(idle_timeout=10)
        s.clock.advance(11)
        s.pump()
        self.assertTrue(s.of(h2.events.ConnectionTerminated))
        self.assertTrue(s.transport.disconnecting)

    def test_connection_lost_resets_streams(self) -> None:
        s = InMemoryServer()
        s.request()
        s.pump()
        [t] = s.terminal.streams
        s.protocol.connectionLost(None)
        self.assertTrue(t.completed)
        self.assertEqual(set(s.factory.connections), set())

    def test_http1_still_works(self) -> None:
        from txmesh.config.model import FilterConfig

        terminal = _TerminalFactory(LocalReply(200, b"one\n", flag=""))
        listener = ListenerConfig("h", "tcp:0", http_filters=(FilterConfig("terminal", terminal),))
        factory = HTTPListenerFactory(HTTPConnectionManager(listener, None, ProxyContext(NodeConfig(), Clock())))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"P")
        protocol.dataReceived(b"OST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200"))
        self.assertEqual(terminal.streams[0].head.method, b"POST")


# Real sockets


class _Upstream(Resource):
    """
    An HTTP/1.1 upstream: C{/size/N} answers N bytes, C{/sha} answers the
    SHA-256 and length of the request body, anything else echoes the path
    and the protocol-relevant request headers.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []

    def render(self, request: Any) -> bytes:
        self.requests.append(request)
        path = request.path
        if path.startswith(b"/size/"):
            return b"x" * int(path[6:])
        if path == b"/sha":
            body = request.content.read()
            return b"%s %d" % (hashlib.sha256(body).hexdigest().encode(), len(body))
        if path == b"/hang":
            return NOT_DONE_YET
        via = request.getHeader(b"x-forwarded-proto") or b""
        return b"path=" + path + b" proto=" + via + b" host=" + (request.getHeader(b"host") or b"")


CONFIG = """
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        routes: [{match: {prefix: /}, cluster: app}]
    clusters:
      - {name: app, endpoints: ["127.0.0.1:{up}"]{extra}}
    """


class ProxyTests(unittest.TestCase):
    """
    curl speaking h2c with prior knowledge through the proxy to an HTTP/1.1
    upstream (2 -> 1).
    """

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.upstream = _Upstream()
        port = yield listen_upstream(self, Site(self.upstream))
        self.proxy = ProxyHarness(self)
        yield self.proxy.start(CONFIG, up=port, extra="")
        self.url = f"http://127.0.0.1:{self.proxy.port()}"

    @defer.inlineCallbacks
    def test_curl_prior_knowledge(self) -> Any:
        out, err, code = yield curl("--http2-prior-knowledge", "-i", self.url + "/hello")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/2 200"), out)
        self.assertTrue(out.endswith(b"path=/hello proto=http host=127.0.0.1:%d" % self.proxy.port()), out)

    @defer.inlineCallbacks
    def test_curl_h2c_upgrade(self) -> Any:
        """
        C{curl --http2} on plain HTTP asks for C{Upgrade: h2c} (RFC 7540
        3.2); its request becomes stream 1.
        """
        out, err, code = yield curl("--http2", "-i", self.url + "/upgraded")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), out)
        self.assertIn(b"\r\n\r\nHTTP/2 200", out)
        self.assertTrue(out.endswith(b"path=/upgraded proto=http host=127.0.0.1:%d" % self.proxy.port()), out)

    @defer.inlineCallbacks
    def test_http1_on_same_port(self) -> Any:
        out, err, code = yield curl("--http1.1", "-i", self.url + "/hello")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/1.1 200"), out)

    @defer.inlineCallbacks
    def test_large_bodies(self) -> Any:
        """
        20 MB each way through h2 flow control.
        """
        size = 20 * 1024 * 1024
        out, err, code = yield curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download}",
                                    self.url + f"/size/{size}")
        self.assertEqual((code, out), (0, str(size).encode()), err)
        path = self.mktemp()
        body = os.urandom(size)
        with open(path, "wb") as f:
            f.write(body)
        out, err, code = yield curl("--http2-prior-knowledge", "--data-binary", "@" + path, self.url + "/sha")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"%s %d" % (hashlib.sha256(body).hexdigest().encode(), size))

    @defer.inlineCallbacks
    def test_many_concurrent_streams(self) -> Any:
        """
        200 requests on one connection, 100 (the proxy's limit) at a time.
        (curl 7.88's C{--parallel} with prior knowledge has a framing bug
        of its own, so this uses an h2 client.)
        """
        client = yield _H2Client.connect(self, self.proxy.port())
        results = []
        for wave in range(2):
            waves = [client.request(f"/s{wave}-{i}".encode()) for i in range(100)]
            results += (yield defer.gatherResults(waves))
        self.assertEqual(len(results), 200)
        self.assertEqual({dict(h)[b":status"] for h, _ in results}, {b"200"})
        self.assertEqual(sorted(b for _, b in results)[0][:9], b"path=/s0-")
        self.assertEqual(len(self.upstream.requests), 200)
        self.assertTrue(client.transport.connected)

    @defer.inlineCallbacks
    def test_rapid_reset_flood(self) -> Any:
        """
        A client resetting streams as fast as it opens them gets a GOAWAY
        ENHANCE_YOUR_CALM; the proxy keeps serving others.
        """
        client = _H2Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port()), client)
        self.addCleanup(client.transport.abortConnection)
        for _ in range(400):
            if client.lost.called:
                break
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                           (b":authority", b"a"), (b":path", b"/hang")])
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            client.flush()
        yield client.lost.addTimeout(10, reactor)
        terminated = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
        self.assertEqual([e.error_code for e in terminated], [ErrorCodes.ENHANCE_YOUR_CALM])
        out, err, code = yield curl("--http2-prior-knowledge", self.url + "/after")
        self.assertEqual((code, out), (0, b"path=/after proto=http host=127.0.0.1:%d" % self.proxy.port()), err)

    @defer.inlineCallbacks
    def test_client_reset_cancels_upstream(self) -> Any:
        """
        RST_STREAM from the client aborts the HTTP/1.1 upstream exchange;
        the client's connection carries on.
        """
        client = yield _H2Client.connect(self, self.proxy.port())
        d = client.request(b"/hang")
        d.addErrback(lambda f: None)
        for _ in range(200):
            if self.upstream.requests:
                break
            yield sleep(0.02)
        [hanging] = self.upstream.requests
        lost: defer.Deferred = hanging.notifyFinish()
        lost.addErrback(lambda f: "lost")
        client.conn.reset_stream(max(client._pending), ErrorCodes.CANCEL)
        client.flush()
        result = yield lost.addTimeout(10, reactor)
        self.assertEqual(result, "lost")
        _, body = yield client.request(b"/next")
        self.assertTrue(body.startswith(b"path=/next"), body)

    @defer.inlineCallbacks
    def test_h2load(self) -> Any:
        if H2LOAD is None:
            raise unittest.SkipTest("h2load is not installed")
        from twisted.internet.utils import getProcessOutputAndValue

        out, err, code = yield getProcessOutputAndValue(
            H2LOAD, ("-n", "2000", "-c", "4", "-m", "10", self.url + "/load"), env=os.environ)
        self.assertEqual(code, 0, err)
        m = re.search(rb"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
        self.assertIsNotNone(m, out)
        self.assertEqual(m.groups(), (b"2000", b"2000", b"2000", b"0"), out)
        status = re.search(rb"status codes: (\d+) 2xx", out)
        self.assertEqual(status.group(1), b"2000", out)
        m = re.search(rb"finished in [^,]+, ([\d.]+) req/s", out)
        if m:
            print(f"h2load through txmesh: {m.group(1).decode()} req/s")


class _H2Client(Protocol):
    """
    A raw h2 client on a real socket.
    """

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.events: list = []
        self.lost: defer.Deferred = defer.Deferred()
        self.ready: defer.Deferred = defer.Deferred()
        self._pending: dict[int, tuple[list, list, defer.Deferred]] = {}

    @classmethod
    @defer.inlineCallbacks
    def connect(cls, testcase: Any, port: int) -> Any:
        client = cls()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        testcase.addCleanup(client.transport.abortConnection)
        yield client.ready.addTimeout(10, reactor)
        return client

    def request(self, path: bytes, method: bytes = b"GET", body: bytes | None = None,
                timeout: float = 30) -> defer.Deferred:
        """
        @return: a Deferred firing with C{(response headers, body)}, or
            failing with the error code of a reset.
        """
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(b":method", method), (b":scheme", b"http"), (b":authority", b"test"),
                                     (b":path", path)], end_stream=body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        d: defer.Deferred = defer.Deferred()
        self._pending[sid] = ([], [], d)
        self.flush()
        return d.addTimeout(timeout, reactor)

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            return
        self.events.extend(events)
        for e in events:
            if isinstance(e, h2.events.SettingsAcknowledged) and not self.ready.called:
                self.ready.callback(None)
            pending = self._pending.get(getattr(e, "stream_id", 0))
            if pending is None:
                continue
            if isinstance(e, h2.events.ResponseReceived):
                pending[0].extend(e.headers)
            elif isinstance(e, h2.events.DataReceived):
                pending[1].append(e.data)
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.StreamEnded):
                del self._pending[e.stream_id]
                pending[2].callback((pending[0], b"".join(pending[1])))
            elif isinstance(e, h2.events.StreamReset):
                del self._pending[e.stream_id]
                pending[2].errback(RuntimeError(f"reset {e.error_code!r}"))
        self.flush()

    def connectionLost(self, reason: Any = None) -> None:
        pending, self._pending = self._pending, {}
        for _, _, d in pending.values():
            d.errback(RuntimeError("connection lost"))
        self.lost.callback(None)


class UpstreamH2Tests(unittest.TestCase):
    """
    A cluster with C{http2: true} against a real nginx speaking h2c
    (C{listen ... http2}): 2 -> 2 and 1 -> 2.  nginx answers C{/conn}
    with its connection number, and proxies C{/sha} to an HTTP/1.1
    Twisted upstream that hashes the body.
    """

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.upstream = _Upstream()
        twisted_port = yield listen_upstream(self, Site(self.upstream))
        port = free_port()
        # Readable by nginx's unprivileged worker.
        self.docroot = tempfile.mkdtemp(prefix="txmesh-h2-")
        self.addCleanup(shutil.rmtree, self.docroot, True)
        os.chmod(self.docroot, 0o755)
        self.big = os.urandom(20 * 1024 * 1024)
        with open(os.path.join(self.docroot, "big"), "wb") as f:
            f.write(self.big)
        os.chmod(os.path.join(self.docroot, "big"), 0o644)
        self.nginx = Nginx(self, f"""
            server {{
              listen 127.0.0.1:{port} http2;
              http2_max_concurrent_streams 128;
              client_max_body_size 0;
              location /conn {{ return 200 "conn=$connection proto=$server_protocol\\n"; }}
              location /big {{ root {os.path.abspath(self.docroot)}; }}
              location /sha {{ proxy_pass http://127.0.0.1:{twisted_port}; proxy_request_buffering off; }}
              location /slow {{ proxy_pass http://127.0.0.1:{twisted_port}/hang; }}
            }}
            """)
        yield self.nginx.wait_listening(port)
        # Cleanups run last-first: once the proxy has stopped, let its
        # upstream connections close before nginx (whose stop blocks the
        # reactor) waits for them.
        self.addCleanup(sleep, 0.2)
        self.proxy = ProxyHarness(self)
        yield self.proxy.start(CONFIG, up=port, extra=", http2: true")
        self.url = f"http://127.0.0.1:{self.proxy.port()}"

    @defer.inlineCallbacks
    def test_h2_to_h2(self) -> Any:
        out, err, code = yield curl("--http2-prior-knowledge", "-i", self.url + "/conn")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/2 200"), out)
        self.assertIn(b"proto=HTTP/2.0", out)
        [pool] = self.proxy.service._cluster_set.get("app").pools()
        [conn] = pool._open
        self.assertEqual((conn.active, conn.streams, conn.requests_served), (0, {}, 1))

    @defer.inlineCallbacks
    def test_h1_to_h2(self) -> Any:
        out, err, code = yield curl("--http1.1", "-i", self.url + "/conn")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/1.1 200"), out)
        self.assertIn(b"proto=HTTP/2.0", out)

    @defer.inlineCallbacks
    def test_multiplexing(self) -> Any:
        """
        Concurrent requests from several downstream connections share one
        upstream h2 connection.
        """
        results = yield defer.gatherResults([curl("--http1.1", self.url + "/conn") for _ in range(20)])
        bodies = [out for out, _, code in results if code == 0]
        self.assertEqual(len(bodies), 20)
        conns = {re.search(rb"conn=(\d+)", b).group(1) for b in bodies}
        self.assertEqual(len(conns), 1, bodies)
        client = yield _H2Client.connect(self, self.proxy.port())
        results = yield defer.gatherResults([client.request(b"/conn") for _ in range(100)])
        conns = {re.search(rb"conn=(\d+)", b).group(1) for _, b in results}
        self.assertEqual(len(conns), 1)
        [pool] = self.proxy.service._cluster_set.get("app").pools()
        self.assertEqual(pool.total_connections, 1)

    @defer.inlineCallbacks
    def test_large_bodies(self) -> Any:
        out, err, code = yield curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download}",
                                    self.url + "/big")
        self.assertEqual((code, out), (0, str(len(self.big)).encode()), err)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(self.big)
        out, err, code = yield curl("--http2-prior-knowledge", "--data-binary", "@" + path, self.url + "/sha")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"%s %d" % (hashlib.sha256(self.big).hexdigest().encode(), len(self.big)))

    @defer.inlineCallbacks
    def test_client_reset_cancels_upstream(self) -> Any:
        """
        RST_STREAM from the client resets the upstream stream (nginx then
        closes its connection to the HTTP/1.1 upstream), while the upstream
        h2 connection carries on.
        """
        client = yield _H2Client.connect(self, self.proxy.port())
        d = client.request(b"/slow")
        d.addErrback(lambda f: None)
        for _ in range(200):
            if self.upstream.requests:
                break
            yield sleep(0.02)
        [hanging] = self.upstream.requests
        lost: defer.Deferred = hanging.notifyFinish()
        lost.addErrback(lambda f: "lost")
        sid = max(client._pending)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        client.flush()
        result = yield lost.addTimeout(10, reactor)
        self.assertEqual(result, "lost")
        _, body = yield client.request(b"/conn")
        self.assertTrue(body.startswith(b"conn="))
        [pool] = self.proxy.service._cluster_set.get("app").pools()
        self.assertEqual(pool.total_connections, 1)

    @defer.inlineCallbacks
    def test_h2load(self) -> Any:
        if H2LOAD is None:
            raise unittest.SkipTest("h2load is not installed")
        from twisted.internet.utils import getProcessOutputAndValue

        out, err, code = yield getProcessOutputAndValue(
            H2LOAD, ("-n", "2000", "-c", "4", "-m", "10", self.url + "/conn"), env=os.environ)
        self.assertEqual(code, 0, err)
        self.assertIn(b"2000 succeeded, 0 failed", out)
        # nginx ends an h2 connection with a graceful GOAWAY after 1000
        # requests (http2_max_requests): the pool moved to a new one
        # without failing a request.
        [pool] = self.proxy.service._cluster_set.get("app").pools()
        self.assertGreaterEqual(pool.total_connections, 2)
        m = re.search(rb"finished in [^,]+, ([\d.]+) req/s", out)
        if m:
            print(f"h2load through txmesh to h2c nginx: {m.group(1).decode()} req/s")


# The upstream pool, in memory


class _Handler:
    """
    Records what the router would receive for one exchange.
    """

    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self.body = b""
        self.trailers: Headers | None = None
        self.ended = False
        self.reset: tuple[str, str] | None = None

    def response_informational(self, head: ResponseHead) -> None:
        pass

    def response_head(self, head: ResponseHead, end_stream: bool) -> None:
        self.head = head
        self.ended = end_stream

    def response_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data
        self.ended = self.ended or end_stream

    def response_trailers(self, trailers: Headers) -> None:
        self.trailers = trailers
        self.ended = True

    def upstream_reset(self, flag: str, reason: str) -> None:
        self.reset = (flag, reason)

    def flush(self) -> None:
        pass


class InMemoryUpstream:
    """
    An L{HTTP2EndpointPool} whose connections are L{StringTransport}s,
    each answered by a server-side h2 connection the test drives.
    """

    def __init__(self, breaker: Any = None, max_streams: int = 100):
        from twisted.internet.testing import MemoryReactorClock

        from txmesh.config.model import CircuitBreakerConfig, ClusterConfig, Endpoint
        from txmesh.proxy.cluster import Cluster

        self.reactor = MemoryReactorClock()
        endpoint = Endpoint("127.0.0.1", 8080)
        config = ClusterConfig("app", (endpoint,), http2=True, circuit_breaker=breaker or CircuitBreakerConfig())
        self.cluster = Cluster(config, self.reactor)
        [self.pool] = self.cluster.pools()
        self.max_streams = max_streams
        self.links: list[tuple[Any, StringTransport, h2.connection.H2Connection]] = []
        self.events: list = []

    def accept(self) -> None:
        """
        Complete the oldest pending connect.
        """
        factory = self.reactor.tcpClients.pop(0)[2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        server.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        server.initiate_connection()
        self.links.append((protocol, transport, server))
        protocol.makeConnection(transport)
        self.pump()

    def pump(self) -> list:
        new: list = []
        for _ in range(100):
            moved = False
            for protocol, transport, server in self.links:
                up = transport.value()
                transport.clear()
                if up:
                    moved = True
                    new.extend(server.receive_data(up))
                down = server.data_to_send()
                if down and protocol.connected:
                    moved = True
                    protocol.dataReceived(down)
            if not moved:
                break
        self.events.extend(new)
        return new

    def start(self, stream: Any, path: bytes = b"/", end_stream: bool = True) -> _Handler:
        handler = _Handler()
        stream.start(RequestHead(b"GET", path, b"svc", Headers([(b"connection", b"keep-alive")])),
                     end_stream, handler)
        return handler

    def requests(self) -> list:
        return [e for e in self.events if isinstance(e, h2.events.RequestReceived)]


class UpstreamPoolTests(unittest.TestCase):
    def test_keepalive_ping(self) -> None:
        """
        An idle upstream connection is PINGed every PING_INTERVAL; an
        answered PING keeps it, an unanswered one gets it aborted.
        """
        from txmesh.proxy.http2_client import PING_INTERVAL, PING_TIMEOUT

        u = InMemoryUpstream()
        d = u.pool.acquire()
        u.accept()
        stream = self.successResultOf(d)
        handler = u.start(stream, b"/x")
        u.pump()
        [req] = u.requests()
        server = u.links[0][2]
        server.send_headers(req.stream_id, [(b":status", b"204")], end_stream=True)
        u.pump()
        self.assertEqual(handler.head.status, 204)
        [conn] = u.pool._open
        start = conn.idle_since
        u.pool.sweep(start + PING_INTERVAL)
        self.assertIsNotNone(conn.ping_sent_at)
        u.pump()  # the in-memory upstream answers the PING
        self.assertIsNone(conn.ping_sent_at)
        self.assertEqual(u.pool._open, [conn])
        # Now the upstream goes silent: a PING gets no answer.
        later = start + PING_INTERVAL + 1
        conn.ping(later)
        u.pool.sweep(later + PING_TIMEOUT / 2)
        self.assertEqual(u.pool._open, [conn])
        u.pool.sweep(later + PING_TIMEOUT)
        self.assertEqual(u.pool._open, [])
        self.assertTrue(u.links[0][1].disconnecting or not conn.connected)

    def test_closed_while_connecting(self) -> None:
        """
        A config change closes the pool while requests wait for its first
        connection: the connection serves those it has room for, the rest
        fail at once (none is left waiting for a connection that will never
        be opened), and the connection closes after the ones it served.
        """
        from txmesh.proxy.connect import UpstreamConnectError

        u = InMemoryUpstream()
        waiters = [u.pool.acquire() for _ in range(101)]
        u.pool.close()
        u.accept()
        streams = [self.successResultOf(d) for d in waiters[:100]]
        self.failureResultOf(waiters[100], UpstreamConnectError)
        self.assertEqual(u.pool.waiting, 0)
        self.assertEqual(u.reactor.tcpClients, [])
        transport = u.links[0][1]
        for stream in streams:
            self.assertFalse(transport.disconnecting)
            u.pool.release(stream)
        self.assertTrue(transport.disconnecting)

    def test_closed_without_waiters(self) -> None:
        """
        A connection that completes after its pool closed, with nobody
        waiting for it, is closed at once.
        """
        u = InMemoryUpstream()
        d = u.pool.acquire()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        u.pool.close()
        u.accept()
        self.assertEqual(u.pool._open, [])

    def test_new_connection_idle_from_its_start(self) -> None:
        """
        A connection nobody used is idle from when it connected, not from
        the epoch: the next sweep keeps it.
        """
        u = InMemoryUpstream()
        u.reactor.advance(1000)
        d = u.pool.acquire()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        u.accept()
        [conn] = u.pool._open
        self.assertEqual(conn.idle_since, 1000)
        u.pool.sweep(1001)
        self.assertEqual(u.pool._open, [conn])

    def test_exchange(self) -> None:
        u = InMemoryUpstream()
        d = u.pool.acquire()
        self.assertIsInstance(d, defer.Deferred)
        u.accept()
        stream = self.successResultOf(d)
        handler = u.start(stream, b"/x", end_stream=False)
        stream.send_data(b"body", False)
        stream.send_trailers(Headers([(b"x-t", b"1")]))
        u.pump()
        [req] = u.requests()
        self.assertEqual(dict(req.headers)[b":path"], b"/x")
        self.assertNotIn(b"connection", dict(req.headers))
        server = u.links[0][2]
        server.send_headers(req.stream_id, [(b":status", b"200")])
        server.send_data(req.stream_id, b"hi")
        server.send_headers(req.stream_id, [(b"grpc-status", b"0")], end_stream=True)
        u.pump()
        self.assertEqual((handler.head.status, handler.body, handler.trailers.items()),
                         (200, b"hi", [(b"grpc-status", b"0")]))
        body = b"".join(e.data for e in u.events if isinstance(e, h2.events.DataReceived))
        self.assertEqual(body, b"body")
        [conn] = u.pool._open
        self.assertEqual((conn.active, conn.requests_served), (0, 1))
        # The next request reuses the connection at once.
        again = u.pool.acquire()
        self.assertNotIsInstance(again, defer.Deferred)
        self.assertTrue(again.reused)

    def test_multiplexing_and_stream_limit(self) -> None:
        """
        Streams share one connection up to the upstream's limit; beyond it
        a second connection opens.
        """
        u = InMemoryUpstream(max_streams=3)
        first = u.pool.acquire()
        u.accept()
        streams = [self.successResultOf(first)] + [u.pool.acquire() for _ in range(2)]
        self.assertFalse([s for s in streams if isinstance(s, defer.Deferred)])
        for s in streams:
            u.start(s)
        u.pump()
        self.assertEqual(len(u.requests()), 3)
        fourth = u.pool.acquire()
        self.assertIsInstance(fourth, defer.Deferred)
        self.assertEqual(u.pool.connections, 2)
        u.accept()
        self.assertEqual(self.successResultOf(fourth).connection, u.links[1][0])

    def test_breaker_max_connections_queues(self) -> None:
        """
        With C{max_connections: 1}, requests beyond the stream limit wait
        for a stream slot rather than open a connection.
        """
        from txmesh.config.model import CircuitBreakerConfig

        u = InMemoryUpstream(breaker=CircuitBreakerConfig(max_connections=1), max_streams=1)
        d = u.pool.acquire()
        u.accept()
        stream = self.successResultOf(d)
        u.start(stream)
        u.pump()
        waiting = u.pool.acquire()
        self.assertNoResult(waiting)
        self.assertEqual(u.reactor.tcpClients, [])
        [req] = u.requests()
        u.links[0][2].send_headers(req.stream_id, [(b":status", b"204")], end_stream=True)
        u.pump()
        self.assertIs(self.successResultOf(waiting).connection, u.links[0][0])

    def test_abort_resets_only_that_stream(self) -> None:
        u = InMemoryUpstream()
        d = u.pool.acquire()
        u.accept()
        a = self.successResultOf(d)
        b = u.pool.acquire()
        ha, hb = u.start(a, b"/a"), u.start(b, b"/b")
        u.pump()
        a.abort()
        u.pump()
        resets = [e for e in u.events if isinstance(e, h2.events.StreamReset)]
        self.assertEqual([(e.stream_id, e.error_code) for e in resets], [(a.stream_id, ErrorCodes.CANCEL)])
        server = u.links[0][2]
        server.send_headers(b.stream_id, [(b":status", b"200")], end_stream=True)
        u.pump()
        self.assertEqual(hb.head.status, 200)
        self.assertIsNone(ha.head)
        self.assertTrue(u.links[0][0].connected)

    def test_response_backpressure(self) -> None:
        """
        A paused stream stops acknowledging its data; resuming does.
        """
        u = InMemoryUpstream()
        d = u.pool.acquire()
        u.accept()
        stream = self.successResultOf(d)
        handler = u.start(stream)
        u.pump()
        server = u.links[0][2]
        sid = stream.stream_id
        window = server.local_flow_control_window(sid)
        server.send_headers(sid, [(b":status", b"200")])
        stream.pauseProducing()
        for _ in range(40):
            server.send_data(sid, b"z" * 16000)
        u.pump()
        self.assertEqual(len(handler.body), 640000)
        self.assertEqual(server.local_flow_control_window(sid), window - 640000)
        stream.resumeProducing()
        u.pump()
        self.assertEqual(server.local_flow_control_window(sid), window)

    def test_request_flow_control(self) -> None:
        """
        A request body larger than the upstream's window is buffered, and
        past the limit pauses the downstream until the window opens.
        """
        u = InMemoryUpstream()
        d = u.pool.acquire()
        u.accept()
        stream = self.successResultOf(d)
        producer = _Producer()
        u.start(stream, end_stream=False)
        stream.set_request_producer(producer)
        u.pump()
        stream.send_data(b"q" * (3 << 20), True)
        u.pump()
        self.assertTrue(producer.paused)
        server = u.links[0][2]
        sid = stream.stream_id
        for _ in range(200):
            got = sum(e.flow_controlled_length for e in u.events
                      if isinstance(e, h2.events.DataReceived) and not getattr(e, "_acked", False))
            for e in u.events:
                if isinstance(e, h2.events.DataReceived) and not getattr(e, "_acked", False):
                    e._acked = True
            if got:
                server.acknowledge_received_data(got, sid)
            u.pump()
            if any(isinstance(e, h2.events.StreamEnded) for e in u.events):
                break
        body = b"".join(e.data for e in u.events if isinstance(e, h2.events.DataReceived))
        self.assertEqual(len(body), 3 << 20)
        self.assertFalse(producer.paused)

    def test_goaway_refuses_unprocessed_streams(self) -> None:
        u = InMemoryUpstream()
        d = u.pool.acquire()
        u.accept()
        a = self.successResultOf(d)
        b = u.pool.acquire()
        ha, hb = u.start(a), u.start(b)
        u.pump()
        protocol, _, server = u.links[0]
        server.close_connection(last_stream_id=a.stream_id)
        u.pump()
        self.assertIsNone(ha.reset)
        self.assertEqual(hb.reset[0], "UC")
        self.assertTrue(b.reused)  # the router may retry it safely
        # No new streams on that connection.
        c = u.pool.acquire()
        self.assertIsInstance(c, defer.Deferred)
        self.assertEqual(len(u.reactor.tcpClients), 1)

    def test_graceful_goaway_lets_streams_finish(self) -> None:
        """
        After a GOAWAY with NO_ERROR (nginx's http2_max_requests), streams
        up to its last stream id still receive their responses, and the
        connection closes when they are done.
        """
        from hyperframe.frame import GoAwayFrame

        u = InMemoryUpstream()
        d = u.pool.acquire()
        u.accept()
        a = self.successResultOf(d)
        b = u.pool.acquire()
        ha, hb = u.start(a), u.start(b)
        u.pump()
        protocol, transport, server = u.links[0]
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = a.stream_id
        goaway.error_code = 0
        server.send_headers(a.stream_id, [(b":status", b"200")])
        # GOAWAY and the rest of stream a's response in one read.
        protocol.dataReceived(server.data_to_send() + goaway.serialize())
        server.send_data(a.stream_id, b"done", end_stream=True)
        u.pump()
        self.assertEqual(hb.reset[0], "UC")
        self.assertTrue(b.reused)
        self.assertEqual((ha.head.status, ha.body, ha.ended, ha.reset), (200, b"done", True, None))
        self.assertTrue(transport.disconnecting)

    def test_connection_lost_resets_every_stream(self) -> None:
        u = InMemoryUpstream()
        d = u.pool.acquire()
        u.accept()
        streams = [self.successResultOf(d), u.pool.acquire(), u.pool.acquire()]
        handlers = [u.start(s) for s in streams]
        u.pump()
        protocol = u.links[0][0]
        protocol.connectionLost(None)
        self.assertEqual([h.reset[0] for h in handlers], ["UC", "UC", "UC"])
        self.assertEqual((u.pool.connections, u.pool._open), (0, []))

    def test_connect_failure(self) -> None:
        from twisted.internet.error import ConnectionRefusedError

        from txmesh.proxy.connect import UpstreamConnectError

        u = InMemoryUpstream()
        d = u.pool.acquire()
        connector = u.reactor.connectors[0]
        factory = u.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.failureResultOf(d, UpstreamConnectError)
        self.assertEqual(u.pool.connections, 0)


class IstioTests(unittest.TestCase):
    def test_h2_upgrade_policy(self) -> None:
        from tests.test_istio import cluster, destination_rule, run, service_entry

        for policy, expected in (("UPGRADE", True), ("DEFAULT", False), ("DO_NOT_UPGRADE", False)):
            config = run(service_entry(), destination_rule(
                trafficPolicy={"connectionPool": {"http": {"h2UpgradePolicy": policy}}}))
            self.assertEqual(cluster(config).http2, expected, policy)
            self.assertEqual(config.warnings, ())

    def test_loader_flag(self) -> None:
        from txmesh.config.loader import ConfigLoader
        from txmesh.filters.registry import FilterRegistry
        from txmesh.filters.router import RouterFactory

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("clusters:\n  - {name: a, endpoints: ['127.0.0.1:1'], http2: true}\n"
                    "listeners: []\n")
        config = ConfigLoader(FilterRegistry(http=[RouterFactory()])).load_file(path)
        self.assertTrue(config.clusters[0].http2)


class TLSTests(unittest.TestCase):
    """
    h2 negotiated by ALPN on a TLS listener.
    """

    @defer.inlineCallbacks
    def test_curl_h2_over_tls(self) -> Any:
        from tests.test_tls import PROXY, Certificates, _registry

        upstream = _Upstream()
        up = yield listen_upstream(self, Site(upstream))
        proxy = ProxyHarness(self, _registry())
        certs = Certificates(self)
        proxy.path = certs.path("proxy.yaml")
        yield proxy.start(PROXY, up=up, min_version="1.2", alpn="[h2, http/1.1]")
        url = f"https://localhost:{proxy.port('https')}/tls"
        out, err, code = yield curl("--cacert", certs.path("ca.pem"), "--http2", "-w", "|%{http_version}", url)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"path=/tls proto=https"), out)
        self.assertTrue(out.endswith(b"|2"), out)
