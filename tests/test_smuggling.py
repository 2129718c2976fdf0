"""
Request smuggling and response splitting, end to end: a raw client, an
in-process proxy and a real loopback upstream that records every byte it
receives.

Each request vector is one named test: the proxy must answer it with an
error status and C{x-txmesh-flags: DPE}, close the connection, and forward
nothing -- the upstream must receive no byte of it.  Each response vector is
sent by a fake upstream: the client must get C{502} with flag C{UPE}, and
the upstream connection must not be reused.

The listener limits (header count, body size, body idle timeout, open
connections) are tested here too, against the same kind of upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support import (
    ProxyHarness,
    RecordingFactory,
    RecordingProtocol,
    fixed_response,
    listen_upstream,
    raw_connect,
    raw_exchange,
)
from txmesh.proxy.http1 import MAX_CHUNK_FRAMING

CONFIG = """
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        {options}
        routes:
          - {match: {prefix: /limited}, cluster: app, max_request_bytes: 10}
          - {match: {prefix: /}, cluster: app}
      - name: egress
        address: "tcp:0:interface=127.0.0.1"
        forward_proxy: {}
        virtual_hosts:
          - {name: app, domains: ["app"], routes: [{match: {prefix: /}, cluster: app}]}
    clusters:
      - {name: app, endpoints: ["127.0.0.1:{up}"]}
    """

CONTROL = b"GET /control HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"

H = b"POST / HTTP/1.1\r\nHost: h\r\n"
CHUNKED = H + b"Transfer-Encoding: chunked\r\n\r\n"

# name: (request bytes, status the proxy answers with).  Every one must be
# refused without a byte reaching the upstream.
REQUEST_VECTORS: dict[str, tuple[bytes, int]] = {
    # Content-Length and Transfer-Encoding together
    "cl_then_te": (H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", 400),
    "te_then_cl": (H + b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nX", 400),
    "cl_te_smuggled_get": (H + b"Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                           b"GET /admin HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    # duplicate or conflicting Content-Length
    "cl_duplicate_same": (H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    "cl_duplicate_conflicting": (H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    "cl_list_same": (H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    "cl_list_conflicting": (H + b"Content-Length: 5, 6\r\n\r\nhello!", 400),
    "cl_plus_sign": (H + b"Content-Length: +5\r\n\r\nhello", 400),
    "cl_minus_sign": (H + b"Content-Length: -5\r\n\r\nhello", 400),
    "cl_non_digit": (H + b"Content-Length: 5a\r\n\r\nhello", 400),
    "cl_hex": (H + b"Content-Length: 0x5\r\n\r\nhello", 400),
    "cl_space_inside": (H + b"Content-Length: 1 0\r\n\r\nhelloworld", 400),
    "cl_vertical_tab": (H + b"Content-Length: \x0b5\r\n\r\nhello", 400),
    "cl_form_feed": (H + b"Content-Length: 5\x0c\r\n\r\nhello", 400),
    "cl_empty": (H + b"Content-Length: \r\n\r\n", 400),
    "cl_overflow": (H + b"Content-Length: 99999999999999999999999\r\n\r\nhello", 400),
    # Transfer-Encoding other than a final chunked
    "te_chunked_identity": (H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    "te_identity": (H + b"Transfer-Encoding: identity\r\n\r\nhello", 400),
    "te_xchunked": (H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    "te_chunked_twice_list": (H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    "te_chunked_twice_headers": (H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"0\r\n\r\n", 400),
    "te_chunked_then_identity_headers": (H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
                                         b"0\r\n\r\n", 400),
    "te_empty": (H + b"Transfer-Encoding: \r\n\r\n0\r\n\r\n", 400),
    "te_trailing_comma": (H + b"Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n", 400),
    "te_on_http10": (b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te_gzip_chunked": (H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    # obs-fold
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n", 400),
    "obs_fold_tab": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n\tb\r\n\r\n", 400),
    "obs_fold_te": (H + b"Transfer-Encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    # whitespace before the colon
    "space_before_colon": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A : b\r\n\r\n", 400),
    "space_before_colon_te": (H + b"Transfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc", 400),
    "tab_before_colon_cl": (H + b"Content-Length\t: 5\r\n\r\nhello", 400),
    # bare LF (strict listener) and bare CR
    "bare_lf_request_line": (b"GET / HTTP/1.1\nHost: h\r\n\r\n", 400),
    "bare_lf_header": (b"GET / HTTP/1.1\r\nHost: h\nX-A: b\r\n\r\n", 400),
    "bare_lf_everywhere": (b"GET / HTTP/1.1\nHost: h\n\n", 400),
    "bare_lf_chunk_size": (CHUNKED + b"5\nhello\r\n0\r\n\r\n", 400),
    "bare_cr_header": (b"GET / HTTP/1.1\r\nHost: h\rX-A: b\r\n\r\n", 400),
    # chunks
    "chunk_size_not_hex": (CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_overflow": (CHUNKED + b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_just_over_64_bits": (CHUNKED + b"10000000000000000\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_negative": (CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_0x": (CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_trailing_space": (CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_empty": (CHUNKED + b"\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_leading_zeros": (CHUNKED + b"0" * (2 * MAX_CHUNK_FRAMING) + b"5\r\nhello\r\n", 400),
    "chunk_extension_too_long": (CHUNKED + b"5;" + b"e" * (2 * MAX_CHUNK_FRAMING), 400),
    "chunk_extensions_many": (CHUNKED + b"5" + b";a=b" * MAX_CHUNK_FRAMING, 400),
    "chunk_extension_bare_lf": (CHUNKED + b"5;a\nb\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_bad_terminator": (CHUNKED + b"5\r\nhelloXX0\r\n\r\n", 400),
    "chunk_data_longer_than_size": (CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_cl_in_trailers": (CHUNKED + b"0\r\nContent-Length: 5\r\n\r\nhello", 400),
    # NUL, CR, LF in header values (and names)
    "nul_in_value": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", 400),
    "cr_in_value": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", 400),
    "lf_in_value": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\nb\r\n\r\n", 400),
    "ctl_in_value": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x01b\r\n\r\n", 400),
    "nul_in_name": (b"GET / HTTP/1.1\r\nHost: h\r\nX\x00A: b\r\n\r\n", 400),
    # request target and line
    "absolute_form_on_reverse_proxy": (b"GET http://app/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "request_line_too_long": (b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    "headers_too_large": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431),
    "too_many_headers": (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", 431),
    # Host games
    "duplicate_host": (b"GET / HTTP/1.1\r\nHost: h\r\nHost: evil\r\n\r\n", 400),
    "host_with_path": (b"GET / HTTP/1.1\r\nHost: h/evil\r\n\r\n", 400),
}


def _silent(proto: RecordingProtocol, data: bytes) -> None:
    """
    An upstream that never answers (so only the proxy does).
    """


def _after_body(body_end: bytes) -> Callable[[RecordingProtocol, bytes], None]:
    """
    @return: an upstream that answers once it has received C{body_end}.
    """
    def respond(proto: RecordingProtocol, data: bytes) -> None:
        if proto.received.endswith(body_end):
            proto.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    return respond


class _Case(unittest.TestCase):
    """
    A proxy in front of a recording upstream.
    """

    @defer.inlineCallbacks
    def start(self, *options: str, respond: Callable | None = None) -> Any:
        """
        Start the upstream and the proxy (C{options} are extra YAML lines
        for the C{http} listener).

        @return: the C{http} listener's port.
        """
        self.upstream = RecordingFactory(respond or fixed_response())
        up = yield listen_upstream(self, self.upstream)
        self.harness = ProxyHarness(self)
        yield self.harness.start(CONFIG.replace("{options}", "\n        ".join(options)), up=up)
        return self.harness.port()

    @defer.inlineCallbacks
    def assertRefused(self, port: int, data: bytes, status: int) -> Any:
        """
        C{data} gets C{status} with flag C{DPE} and the connection closes;
        then a control request on a new connection goes through, and it is
        all the upstream ever received.
        """
        reply = yield raw_exchange(self, port, data)
        self.assertTrue(reply.startswith(b"HTTP/1.1 %d " % status), reply[:200])
        head = reply.split(b"\r\n\r\n", 1)[0].lower()
        self.assertIn(b"x-txmesh-flags: dpe", head)
        self.assertIn(b"connection: close", head)
        self.assertEqual(reply.count(b"HTTP/1.1 "), 1, reply[:500])
        yield self.assertNothingForwarded(port)
        return reply

    @defer.inlineCallbacks
    def assertNothingForwarded(self, port: int) -> Any:
        # A connection the bad request made the proxy open would have been
        # accepted before the control request's.
        control = yield raw_exchange(self, port, CONTROL)
        self.assertTrue(control.startswith(b"HTTP/1.1 200 "), control[:200])
        self.assertEqual(len(self.upstream.connections), 1, self.upstream.all_received()[:500])
        received = self.upstream.all_received()
        self.assertTrue(received.startswith(b"GET /control HTTP/1.1\r\n"), received[:500])
        self.assertEqual(received.count(b"HTTP/1.1"), 1, received[:500])


def _refused(data: bytes, status: int) -> Callable[[_Case], Any]:
    @defer.inlineCallbacks
    def test(self: _Case) -> Any:
        port = yield self.start()
        yield self.assertRefused(port, data, status)
    return test


class RequestSmugglingTests(_Case):
    """
    Every request vector is refused, and nothing of it reaches the upstream.
    """

    @defer.inlineCallbacks
    def test_control_request_alone(self):
        """
        The control request on its own is the only thing the upstream sees.
        """
        port = yield self.start()
        yield self.assertNothingForwarded(port)

    @defer.inlineCallbacks
    def test_good_request_before_bad_one(self):
        """
        A complete request pipelined before a bad one is answered and
        forwarded; the bad one is not.
        """
        port = yield self.start()
        reply = yield raw_exchange(
            self, port, b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n" + REQUEST_VECTORS["cl_te_smuggled_get"][0])
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertIn(b"HTTP/1.1 400 ", reply)
        received = self.upstream.all_received()
        self.assertEqual(received.count(b"HTTP/1.1"), 1, received)
        self.assertTrue(received.startswith(b"GET /first "))
        self.assertNotIn(b"/admin", received)

    @defer.inlineCallbacks
    def test_chunk_extension_trickled(self):
        """
        A chunk extension sent a little at a time is cut off near the limit;
        the head had gone upstream, the extension never does, and the
        upstream connection is closed.
        """
        port = yield self.start(respond=_silent)
        client = yield raw_connect(self, port)
        client.transport.write(CHUNKED + b"5;")
        sent = 0
        while not client.closed.called and sent < 4 * MAX_CHUNK_FRAMING:
            client.transport.write(b"e" * 512)
            sent += 512
            yield task.deferLater(reactor, 0.01, lambda: None)
        reply = yield client.closed
        self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply)
        head, _, body = self.upstream.all_received().partition(b"\r\n\r\n")
        self.assertIn(b"transfer-encoding: chunked", head)
        self.assertEqual(body, b"")


for _name, (_data, _status) in REQUEST_VECTORS.items():
    setattr(RequestSmugglingTests, f"test_{_name}", _refused(_data, _status))
del _name, _data, _status


class BareLFTests(_Case):
    """
    C{allow_bare_lf}: strict by default, lenient on header lines only.
    """

    @defer.inlineCallbacks
    def test_lenient_accepts_bare_lf_header_lines(self):
        port = yield self.start("allow_bare_lf: true")
        reply = yield raw_exchange(self, port, b"GET /lf HTTP/1.1\r\nHost: h\nX-A: b\nConnection: close\n\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        received = self.upstream.all_received()
        self.assertTrue(received.startswith(b"GET /lf HTTP/1.1\r\n"))
        self.assertIn(b"\r\nx-a: b\r\n", received)
        self.assertNotIn(b"\n\n", received.replace(b"\r\n", b""))

    @defer.inlineCallbacks
    def test_lenient_refuses_bare_lf_request_line(self):
        port = yield self.start("allow_bare_lf: true")
        yield self.assertRefused(port, REQUEST_VECTORS["bare_lf_request_line"][0], 400)

    @defer.inlineCallbacks
    def test_lenient_refuses_bare_cr(self):
        port = yield self.start("allow_bare_lf: true")
        yield self.assertRefused(port, REQUEST_VECTORS["bare_cr_header"][0], 400)

    @defer.inlineCallbacks
    def test_lenient_refuses_cl_and_te(self):
        port = yield self.start("allow_bare_lf: true")
        yield self.assertRefused(port, b"POST / HTTP/1.1\r\nHost: h\nContent-Length: 5\nTransfer-Encoding: chunked\n\n"
                                       b"0\r\n\r\n", 400)


class ForwardProxyTests(_Case):
    """
    Absolute-form targets are a forward-proxy listener's business.
    """

    @defer.inlineCallbacks
    def test_forward_proxy_accepts_absolute_form(self):
        yield self.start()
        port = self.harness.port("egress")
        reply = yield raw_exchange(self, port, b"GET http://app/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertTrue(self.upstream.all_received().startswith(b"GET /x HTTP/1.1\r\nhost: app\r\n"))

    @defer.inlineCallbacks
    def test_forward_proxy_still_refuses_smuggling(self):
        yield self.start()
        port = self.harness.port("egress")
        reply = yield raw_exchange(
            self, port, b"POST http://app/ HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply)
        self.assertEqual(self.upstream.received, [])


# name: the malformed response (status line included).
RESPONSE_VECTORS: dict[str, bytes] = {
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "cl_duplicate_conflicting": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl_duplicate_same": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "cl_list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
    "cl_plus_sign": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "te_identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nhello",
    "te_chunked_identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\nhello",
    "te_gzip_chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_chunked_twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"0\r\n\r\n",
    "te_empty": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\nhello",
    "te_on_http10": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "obs_fold": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: a\r\n b\r\n\r\n",
    "space_before_colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "nul_in_value": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: a\x00b\r\n\r\n",
    "cr_in_value": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: a\rb\r\n\r\n",
    "lf_in_value": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: a\nb\r\n\r\n",
    "split_header_injection": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nSet-Cookie: a\rContent-Length: 7\r\n\r\n",
    "bare_lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "chunk_size_not_hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk_size_overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n",
    "chunk_bad_terminator": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    "chunk_extension_too_long": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;"
                                + b"e" * (2 * MAX_CHUNK_FRAMING),
    "second_response_in_same_read": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nevil!!",
}


def _malformed_first(bad: bytes) -> Callable[[RecordingProtocol, bytes], None]:
    """
    @return: an upstream that answers the first request of its first
        connection with C{bad} and every other request correctly.
    """
    good = fixed_response(b"good")

    def respond(proto: RecordingProtocol, data: bytes) -> None:
        if proto is proto.factory.connections[0] and not getattr(proto, "answered", False):
            if b"\r\n\r\n" in proto.received:
                proto.answered = True
                proto.transport.write(bad)
            return
        good(proto, data)

    return respond


def _split(bad: bytes) -> Callable[[_Case], Any]:
    @defer.inlineCallbacks
    def test(self: _Case) -> Any:
        port = yield self.start(respond=_malformed_first(bad))
        reply = yield raw_exchange(self, port, b"GET /one HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        if reply.startswith(b"HTTP/1.1 200 "):
            # A second response in the same read: the first was complete
            # and relayed; the rest must not reach the client.
            self.assertNotIn(b"evil", reply)
        else:
            self.assertTrue(reply.startswith(b"HTTP/1.1 502 "), reply)
            head = reply.split(b"\r\n\r\n", 1)[0].lower()
            self.assertIn(b"x-txmesh-flags: upe", head)
            self.assertNotIn(b"hello", reply)
        self.assertEqual(reply.count(b"HTTP/1.1 "), 1, reply)
        # The next request opens a new upstream connection: the first is
        # never reused.
        again = yield raw_exchange(self, port, b"GET /two HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertTrue(again.startswith(b"HTTP/1.1 200 "), again)
        self.assertTrue(again.endswith(b"good"), again)
        self.assertEqual(len(self.upstream.connections), 2)
        first, second = self.upstream.connections
        self.assertNotIn(b"/two", first.received)
        self.assertTrue(second.received.startswith(b"GET /two "))
        self.assertIn(first, self.upstream.closed)
    return test


class ResponseSplittingTests(_Case):
    """
    Every malformed upstream response is a 502 UPE, and its connection is
    not reused.
    """

    @defer.inlineCallbacks
    def test_bad_chunk_after_head_was_relayed(self):
        """
        A body that turns malformed after the head reached the client cannot
        become a 502: the client connection is closed mid-body.
        """
        def respond(proto: RecordingProtocol, data: bytes) -> None:
            if b"\r\n\r\n" in proto.received and not getattr(proto, "answered", False):
                proto.answered = True
                proto.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                reactor.callLater(0.05, proto.transport.write, b"zz\r\nevil\r\n0\r\n\r\n")

        port = yield self.start(respond=respond)
        reply = yield raw_exchange(self, port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertIn(b"hello", reply)
        self.assertNotIn(b"evil", reply)
        self.assertFalse(reply.endswith(b"0\r\n\r\n"), reply)


for _name, _bad in RESPONSE_VECTORS.items():
    setattr(ResponseSplittingTests, f"test_{_name}", _split(_bad))
del _name, _bad


class LimitTests(_Case):
    """
    Listener and route limits, against a recording upstream.
    """

    @defer.inlineCallbacks
    def test_header_count_configurable(self):
        port = yield self.start("max_request_headers: 5")
        head = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 5 + b"\r\n"
        yield self.assertRefused(port, head, 431)

    @defer.inlineCallbacks
    def test_header_count_within_limit(self):
        port = yield self.start("max_request_headers: 5")
        reply = yield raw_exchange(self, port, b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 3
                                   + b"Connection: close\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)

    @defer.inlineCallbacks
    def test_listener_body_limit_declared(self):
        port = yield self.start("max_request_bytes: 100")
        yield self.assertRefused(port, H + b"Content-Length: 101\r\n\r\n" + b"b" * 101, 413)

    @defer.inlineCallbacks
    def test_listener_body_limit_chunked(self):
        """
        A chunked body is counted as it flows: what passed the limit never
        reaches the upstream.
        """
        port = yield self.start("max_request_bytes: 100")
        reply = yield raw_exchange(self, port, CHUNKED + b"40\r\n" + b"a" * 64 + b"\r\n40\r\n" + b"b" * 64
                                   + b"\r\n0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply)
        self.assertNotIn(b"bbbb", self.upstream.all_received())

    @defer.inlineCallbacks
    def test_listener_body_limit_allows_at_limit(self):
        port = yield self.start("max_request_bytes: 100")
        reply = yield raw_exchange(self, port, H + b"Connection: close\r\nContent-Length: 100\r\n\r\n" + b"b" * 100)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertTrue(self.upstream.all_received().endswith(b"b" * 100))

    @defer.inlineCallbacks
    def test_route_body_limit_declared(self):
        port = yield self.start()
        reply = yield raw_exchange(self, port, b"POST /limited HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n"
                                   + b"b" * 11)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply)
        self.assertNotIn(b"bbbbbbbbbbb", self.upstream.all_received())

    @defer.inlineCallbacks
    def test_route_body_limit_streamed(self):
        port = yield self.start(respond=_silent)
        client = yield raw_connect(self, port)
        client.transport.write(b"POST /limited HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"6\r\nabcdef\r\n")
        yield task.deferLater(reactor, 0.1, lambda: None)
        client.transport.write(b"6\r\nghijkl\r\n")
        reply = yield client.closed
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply)
        self.assertNotIn(b"ghijkl", self.upstream.all_received())

    @defer.inlineCallbacks
    def test_route_body_limit_other_routes_unaffected(self):
        port = yield self.start()
        reply = yield raw_exchange(self, port, H + b"Connection: close\r\nContent-Length: 50\r\n\r\n" + b"b" * 50)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)

    @defer.inlineCallbacks
    def test_body_idle_timeout(self):
        port = yield self.start("request_body_timeout: 0.3s", respond=_silent)
        client = yield raw_connect(self, port)
        client.transport.write(H + b"Content-Length: 10\r\n\r\nabc")
        reply = yield client.closed.addTimeout(5, reactor)
        self.assertTrue(reply.startswith(b"HTTP/1.1 408 "), reply)
        self.assertIn(b"body", reply)

    @defer.inlineCallbacks
    def test_body_idle_timeout_reset_by_bytes(self):
        """
        The timeout is for silence, not for the whole body.
        """
        port = yield self.start("request_body_timeout: 0.3s", respond=_after_body(b"hello"))
        client = yield raw_connect(self, port)
        client.transport.write(H + b"Connection: close\r\nContent-Length: 5\r\n\r\n")
        for byte in b"hello":
            yield task.deferLater(reactor, 0.15, lambda: None)
            client.transport.write(bytes([byte]))
        reply = yield client.closed.addTimeout(5, reactor)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertTrue(self.upstream.all_received().endswith(b"hello"))

    @defer.inlineCallbacks
    def test_max_connections(self):
        port = yield self.start("max_connections: 2")
        first = yield raw_connect(self, port)
        second = yield raw_connect(self, port)
        yield task.deferLater(reactor, 0.05, lambda: None)
        third = yield raw_connect(self, port)
        yield third.closed.addTimeout(5, reactor)
        self.assertEqual(third.data, b"")
        self.assertFalse(first.closed.called)
        self.assertFalse(second.closed.called)
        # The refusal is counted.
        samples = {
            s.labels["listener"]: s.value
            for metric in self.harness.service.metrics.registry.collect()
            if metric.name == "txmesh_downstream_connections_overflow"
            for s in metric.samples if s.name.endswith("_total")
        }
        self.assertEqual(samples, {"http": 1.0})
        # Once one closes, a new connection is served.
        first.transport.loseConnection()
        yield first.closed
        yield task.deferLater(reactor, 0.05, lambda: None)
        reply = yield raw_exchange(self, port, CONTROL)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
