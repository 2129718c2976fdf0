"""
Tests for L{txmesh.proxy.http1}, the sans-IO HTTP/1.1 codec.

Every parse runs in several feeding modes -- the whole buffer at once, one
byte at a time, and random-sized chunks from seeded generators -- and the
modes must agree on the event sequence (consecutive data events coalesced),
the tunnel bytes and the error.  A parser that only works when a message
arrives in one piece is the commonest HTTP/1 bug there is.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from txmesh.proxy.http1 import (
    HOP_BY_HOP,
    MAX_CHUNK_FRAMING,
    ProtocolError,
    RequestParser,
    ResponseParser,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
    encode_response_head,
)
from txmesh.proxy.stream import Headers, RequestHead, ResponseHead

SEEDS = (0, 1, 2, 1234)


def chunkers() -> list[tuple[str, Callable[[bytes], list[bytes]]]]:
    """
    @return: C{(name, split)} for every feeding mode; C{split} cuts bytes
        into the pieces fed to a parser.  A random mode's generator is
        shared by all the steps of one script.
    """
    def random_split(seed: int) -> Callable[[bytes], list[bytes]]:
        rng = random.Random(seed)

        def split(data: bytes) -> list[bytes]:
            chunks = []
            i = 0
            while i < len(data):
                n = rng.randint(1, 16)
                chunks.append(data[i:i + n])
                i += n
            return chunks
        return split

    modes: list[tuple[str, Callable[[bytes], list[bytes]]]] = [
        ("whole", lambda data: [data]),
        ("bytewise", lambda data: [data[i:i + 1] for i in range(len(data))]),
    ]
    modes += [(f"random(seed={seed})", random_split(seed)) for seed in SEEDS]
    return modes


def feeding_modes(data: bytes) -> list[tuple[str, list[bytes]]]:
    """
    @return: C{(name, chunks)} for every way C{data} is fed in these tests.
    """
    return [(name, split(data)) for name, split in chunkers()]


def coalesce(events: list[tuple]) -> list[tuple]:
    """
    Merge consecutive C{("data", bytes)} events, which differ in number with
    the feeding mode but not in content.
    """
    out: list[tuple] = []
    for event in events:
        if event[0] == "data" and out and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + event[1])
        else:
            out.append(event)
    return out


class RequestRecorder:
    """
    A L{txmesh.proxy.http1.RequestSink} that records events.
    """

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def request_head(self, head: RequestHead, end_stream: bool, keep_alive: bool) -> None:
        self.events.append(("head", head, end_stream, keep_alive))

    def request_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def request_end(self, trailers: Headers | None) -> None:
        self.events.append(("end", trailers))


class ResponseRecorder:
    """
    A L{txmesh.proxy.http1.ResponseSink} that records events.
    """

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def response_informational(self, head: ResponseHead) -> None:
        self.events.append(("info", head))

    def response_head(self, head: ResponseHead, end_stream: bool) -> None:
        self.events.append(("head", head, end_stream))

    def response_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def response_end(self, trailers: Headers | None, last_data: bytes = b"") -> None:
        # The parser may hand the last piece of body over with the end.
        if last_data:
            self.events.append(("data", last_data))
        self.events.append(("end", trailers))


@attrs.frozen
class Outcome:
    """
    What one parse produced.

    @ivar events: the sink's events, data coalesced.
    @ivar tail: bytes returned after a switch to a tunnel, or C{None}.
    @ivar status: the L{ProtocolError}'s status, or C{None}.
    @ivar state: parser attributes read after the last step.
    @ivar reason: the L{ProtocolError}'s reason (not compared across modes).
    """

    events: list[tuple]
    tail: bytes | None
    status: int | None
    state: dict[str, Any]
    reason: str | None = attrs.field(default=None, eq=False)

    def heads(self) -> list[tuple]:
        return [e for e in self.events if e[0] == "head"]

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


class EXPECT:
    """
    A response-script step: call C{expect_response(head_request)}.
    """

    def __init__(self, head_request: bool = False):
        self.head_request = head_request


LOST = object()
"""
A response-script step: call C{connection_lost()}, recording its result as
a C{("lost", bool)} event.
"""

Step = object  # bytes to feed, an EXPECT, or LOST


def _run(parser: Any, recorder: Any, steps: list[Step], chunking: Callable[[bytes], list[bytes]],
         state: Callable[[Any], dict[str, Any]]) -> Outcome:
    tail: bytes | None = None
    error: ProtocolError | None = None
    try:
        for step in steps:
            if isinstance(step, bytes):
                for chunk in chunking(step):
                    result = parser.receive_data(chunk)
                    if result is not None:
                        tail = (tail or b"") + result
            elif isinstance(step, EXPECT):
                parser.expect_response(step.head_request)
            elif step is LOST:
                recorder.events.append(("lost", parser.connection_lost()))
            else:
                raise AssertionError(f"unknown step {step!r}")
    except ProtocolError as e:
        error = e
    return Outcome(
        coalesce(recorder.events), tail,
        None if error is None else error.status, state(parser),
        None if error is None else error.reason,
    )


def _request_state(parser: RequestParser) -> dict[str, Any]:
    return {"upgraded": parser.upgraded, "in_message": parser.in_message}


def _response_state(parser: ResponseParser) -> dict[str, Any]:
    return {
        "upgraded": parser.upgraded,
        "keep_alive": parser.keep_alive,
        "close_delimited": parser.close_delimited,
        "head_received": parser.head_received,
    }


class CodecTestCase(SynchronousTestCase):
    """
    Parsing helpers that check every feeding mode agrees.
    """

    def _all_modes(self, one: Callable[[Callable[[bytes], list[bytes]]], Outcome]) -> Outcome:
        outcomes = [(name, one(split)) for name, split in chunkers()]
        whole = outcomes[0][1]
        for name, outcome in outcomes[1:]:
            self.assertEqual(outcome, whole, f"feeding mode {name} disagrees with whole-buffer parsing")
        return whole

    def parse_request(self, data: bytes, **kwargs: Any) -> Outcome:
        """
        Parse C{data} with a fresh L{RequestParser} in every feeding mode.
        """
        def one(chunking: Callable[[bytes], list[bytes]]) -> Outcome:
            recorder = RequestRecorder()
            return _run(RequestParser(recorder, **kwargs), recorder, [data], chunking, _request_state)
        return self._all_modes(one)

    def parse_response(self, *steps: Step, **kwargs: Any) -> Outcome:
        """
        Run a script of bytes and L{EXPECT}/L{LOST} steps on a fresh
        L{ResponseParser} in every feeding mode.  A script that does not
        start with L{EXPECT} gets C{EXPECT(False)} first.
        """
        script = list(steps)
        if not script or not isinstance(script[0], EXPECT):
            script.insert(0, EXPECT(False))

        def one(chunking: Callable[[bytes], list[bytes]]) -> Outcome:
            recorder = ResponseRecorder()
            return _run(ResponseParser(recorder, **kwargs), recorder, script, chunking, _response_state)
        return self._all_modes(one)

    def assertRejected(self, data: bytes, status: int = 400, **kwargs: Any) -> Outcome:
        """
        C{data} is refused with C{status} before any head reaches the sink.
        """
        outcome = self.parse_request(data, **kwargs)
        self.assertEqual(outcome.status, status, outcome)
        self.assertEqual(outcome.heads(), [], "a rejected request's head reached the sink")
        return outcome


def req(method: bytes, path: bytes, authority: bytes, headers: list[tuple[bytes, bytes]] = (),
        scheme: bytes = b"http", version: bytes = b"1.1") -> RequestHead:
    return RequestHead(method, path, authority, Headers(list(headers)), scheme, version)


def resp(status: int, headers: list[tuple[bytes, bytes]] = (), version: bytes = b"1.1") -> ResponseHead:
    return ResponseHead(status, Headers(list(headers)), b"", version)


class FeedingModeTests(SynchronousTestCase):
    """
    The test helpers themselves.
    """

    def test_modes_reassemble(self):
        data = bytes(range(256)) * 3
        for name, chunks in feeding_modes(data):
            self.assertEqual(b"".join(chunks), data, name)
        names = [name for name, _ in feeding_modes(data)]
        self.assertEqual(names[:2], ["whole", "bytewise"])
        self.assertEqual(len(names), 2 + len(SEEDS))

    def test_random_modes_are_seeded(self):
        self.assertEqual(feeding_modes(b"x" * 100), feeding_modes(b"x" * 100))
        random_chunks = [chunks for name, chunks in feeding_modes(b"x" * 100) if name.startswith("random")]
        self.assertTrue(any(len(c) > 1 for chunks in random_chunks for c in chunks))

    def test_coalesce(self):
        self.assertEqual(
            coalesce([("head", 1), ("data", b"a"), ("data", b"b"), ("end", None), ("data", b"c")]),
            [("head", 1), ("data", b"ab"), ("end", None), ("data", b"c")],
        )


class RequestParserTests(CodecTestCase):
    """
    L{RequestParser}: well-formed requests.
    """

    def test_get_with_headers(self):
        outcome = self.parse_request(
            b"GET /path?q=1 HTTP/1.1\r\n"
            b"Host: Example.COM:8080\r\n"
            b"User-Agent: curl/8\r\n"
            b"Accept: */*\r\n"
            b"X-Multi: a\r\n"
            b"x-multi: b\r\n"
            b"\r\n",
            scheme=b"https",
        )
        expected = req(b"GET", b"/path?q=1", b"Example.COM:8080", [
            (b"user-agent", b"curl/8"), (b"accept", b"*/*"), (b"x-multi", b"a"), (b"x-multi", b"b"),
        ], scheme=b"https")
        self.assertEqual(outcome.events, [("head", expected, True, True)])
        self.assertIsNone(outcome.status)
        self.assertIsNone(outcome.tail)
        self.assertEqual(outcome.state, {"upgraded": False, "in_message": False})

    def test_pipelined_keep_alive(self):
        outcome = self.parse_request(
            b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(outcome.events, [
            ("head", req(b"GET", b"/a", b"h"), True, True),
            ("head", req(b"POST", b"/b", b"h", [(b"content-length", b"3")]), False, True),
            ("data", b"abc"),
            ("end", None),
            ("head", req(b"GET", b"/c", b"h"), True, False),
        ])

    def test_in_message(self):
        recorder = RequestRecorder()
        parser = RequestParser(recorder)
        self.assertFalse(parser.in_message)
        parser.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab")
        self.assertTrue(parser.in_message)
        parser.receive_data(b"cd")
        self.assertFalse(parser.in_message)

    def test_content_length_body(self):
        outcome = self.parse_request(
            b"PUT /obj HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world"
        )
        self.assertEqual(outcome.events, [
            ("head", req(b"PUT", b"/obj", b"h", [(b"content-length", b"11"), (b"content-type", b"text/plain")]),
             False, True),
            ("data", b"hello world"),
            ("end", None),
        ])

    def test_zero_content_length(self):
        outcome = self.parse_request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(outcome.events, [("head", req(b"POST", b"/", b"h", [(b"content-length", b"0")]), True, True)])

    def test_chunked_body_with_trailers(self):
        outcome = self.parse_request(
            b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n"
            b"TE: trailers\r\n\r\n"
            b"5\r\nhello\r\n"
            b"6;ext=1\r\n world\r\n"
            b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
        )
        self.assertEqual(outcome.events, [
            ("head", req(b"POST", b"/upload", b"h", [(b"te", b"trailers")]), False, True),
            ("data", b"hello world"),
            ("end", Headers([(b"x-checksum", b"abc"), (b"x-other", b"1")])),
        ])

    def test_chunked_body_without_trailers(self):
        outcome = self.parse_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        self.assertEqual(outcome.events, [
            ("head", req(b"POST", b"/", b"h"), False, True),
            ("data", b"abc"),
            ("end", None),
            ("head", req(b"GET", b"/next", b"h"), True, True),
        ])

    def test_http10_without_keep_alive(self):
        outcome = self.parse_request(b"GET / HTTP/1.0\r\nHost: h\r\n\r\n")
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/", b"h", version=b"1.0"), True, False)])

    def test_http10_with_keep_alive(self):
        outcome = self.parse_request(
            b"GET / HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
            b"GET /2 HTTP/1.0\r\nHost: h\r\n\r\n"
        )
        self.assertEqual(outcome.events, [
            ("head", req(b"GET", b"/", b"h", version=b"1.0"), True, True),
            ("head", req(b"GET", b"/2", b"h", version=b"1.0"), True, False),
        ])

    def test_http10_without_host_uses_default_authority(self):
        outcome = self.parse_request(b"GET /x HTTP/1.0\r\n\r\n", default_authority=b"backend.local")
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/x", b"backend.local", version=b"1.0"), True, False)])

    def test_http10_without_host_or_default(self):
        outcome = self.parse_request(b"GET /x HTTP/1.0\r\n\r\n")
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/x", b"", version=b"1.0"), True, False)])

    def test_http11_empty_host_allowed(self):
        """
        RFC 9112 3.2: a target without an authority is sent with an empty
        C{Host}; that is not a missing one.
        """
        outcome = self.parse_request(b"GET / HTTP/1.1\r\nHost: \r\n\r\n", default_authority=b"d")
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/", b""), True, True)])

    def test_host_forms(self):
        for host in (b"example.com", b"EXAMPLE.com:443", b"[::1]:8080", b"10.0.0.1", b"a-b_c~d.example"):
            outcome = self.parse_request(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            self.assertEqual(outcome.events, [("head", req(b"GET", b"/", host), True, True)])

    def test_http11_without_host(self):
        outcome = self.assertRejected(b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n", default_authority=b"d")
        self.assertIn("Host", outcome.reason)

    def test_duplicate_host(self):
        outcome = self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        self.assertIn("Host", outcome.reason)

    def test_duplicate_host_same_value(self):
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n")

    def test_hop_by_hop_removed(self):
        outcome = self.parse_request(
            b"GET / HTTP/1.1\r\n"
            b"Host: h\r\n"
            b"Connection: keep-alive, X-Secret, x-other\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers, deflate;q=0.5\r\n"
            b"Trailer: x-checksum\r\n"
            b"X-Secret: s\r\n"
            b"X-Other: o\r\n"
            b"X-Keep: k\r\n"
            b"\r\n"
        )
        self.assertEqual(outcome.events, [
            ("head", req(b"GET", b"/", b"h", [(b"x-keep", b"k"), (b"te", b"trailers")]), True, True),
        ])

    def test_te_other_than_trailers_removed(self):
        outcome = self.parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nTE: gzip\r\nX-A: 1\r\n\r\n")
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/", b"h", [(b"x-a", b"1")]), True, True)])

    def test_hop_by_hop_constant(self):
        self.assertTrue({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
                         b"trailer", b"upgrade"} <= HOP_BY_HOP)
        self.assertNotIn(b"content-length", HOP_BY_HOP)
        self.assertNotIn(b"host", HOP_BY_HOP)

    def test_upgrade_websocket(self):
        frame = b"\x81\x05hello"
        outcome = self.parse_request(
            b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" + frame
        )
        self.assertEqual(outcome.events, [
            ("head", req(b"GET", b"/chat", b"h", [
                (b"upgrade", b"websocket"),
                (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                (b"sec-websocket-version", b"13"),
            ]), False, True),
        ])
        self.assertEqual(outcome.tail, frame)
        self.assertTrue(outcome.state["upgraded"])

    def test_upgrade_tail_empty(self):
        recorder = RequestRecorder()
        parser = RequestParser(recorder)
        tail = parser.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
        self.assertEqual(tail, b"")
        self.assertTrue(parser.upgraded)
        # Once upgraded, bytes pass through untouched, even ones that look
        # like HTTP.
        data = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
        self.assertEqual(parser.receive_data(data), data)
        self.assertEqual(len(recorder.events), 1)

    def test_upgrade_without_connection_upgrade(self):
        outcome = self.parse_request(
            b"GET /chat HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        self.assertEqual(outcome.events, [
            ("head", req(b"GET", b"/chat", b"h"), True, True),
            ("head", req(b"GET", b"/next", b"h"), True, True),
        ])
        self.assertIsNone(outcome.tail)
        self.assertFalse(outcome.state["upgraded"])

    def test_connection_upgrade_without_upgrade_header(self):
        outcome = self.parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n\r\n")
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/", b"h"), True, True)])
        self.assertFalse(outcome.state["upgraded"])

    def test_upgrade_with_content_length_body(self):
        """
        llhttp switches to the tunnel straight after the head, so a declared
        body is the tunnel's first bytes: no C{request_end} may come between
        the head and the tunnel (the server would close the request side).
        """
        outcome = self.parse_request(
            b"POST /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 3\r\n\r\nabcTUNNEL"
        )
        self.assertEqual(outcome.events, [
            ("head", req(b"POST", b"/ws", b"h", [(b"upgrade", b"websocket"), (b"content-length", b"3")]),
             False, True),
        ])
        self.assertEqual(outcome.tail, b"abcTUNNEL")

    def test_upgrade_with_chunked_body(self):
        self.assertRejected(
            b"POST /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )

    def test_connect(self):
        outcome = self.parse_request(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n\x00\x01")
        self.assertEqual(outcome.events, [
            ("head", req(b"CONNECT", b"db.internal:5432", b"db.internal:5432"), False, True),
        ])
        self.assertEqual(outcome.tail, b"\x00\x01")
        self.assertTrue(outcome.state["upgraded"])

    def test_connect_without_host(self):
        outcome = self.parse_request(b"CONNECT db.internal:5432 HTTP/1.1\r\n\r\n")
        self.assertEqual(outcome.events, [
            ("head", req(b"CONNECT", b"db.internal:5432", b"db.internal:5432"), False, True),
        ])

    def test_connect_target_wins_over_host(self):
        """
        The tunnel goes to the request target; a different C{Host} must not
        steer routing elsewhere.
        """
        outcome = self.parse_request(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: admin.internal\r\n\r\n")
        self.assertEqual(outcome.heads()[0][1].authority, b"db.internal:5432")

    def test_connect_origin_form(self):
        self.assertRejected(b"CONNECT /x HTTP/1.1\r\nHost: h\r\n\r\n")

    def test_absolute_form(self):
        outcome = self.assertRejected(b"GET http://evil.example/ HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertIn("absolute-form", outcome.reason)

    def test_options_asterisk(self):
        outcome = self.parse_request(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(outcome.events, [("head", req(b"OPTIONS", b"*", b"h"), True, True)])

    def test_asterisk_only_for_options(self):
        self.assertRejected(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n")

    def test_leading_empty_line_ignored(self):
        """
        RFC 9112 2.2: a server should ignore at least one empty line before
        the request line.
        """
        outcome = self.parse_request(b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/", b"h"), True, True)])

    def test_obs_text_and_tab_in_values(self):
        outcome = self.parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\tb\r\nX-B: caf\xe9\r\n\r\n")
        self.assertEqual(outcome.events, [
            ("head", req(b"GET", b"/", b"h", [(b"x-a", b"a\tb"), (b"x-b", b"caf\xe9")]), True, True),
        ])

    def test_header_value_whitespace_trimmed(self):
        outcome = self.parse_request(b"GET / HTTP/1.1\r\nHost:   h  \r\nX-A:\t v \t\r\n\r\n")
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/", b"h", [(b"x-a", b"v")]), True, True)])

    def test_unsupported_transfer_coding(self):
        """
        C{gzip, chunked} is well framed, but the coding would be dropped with
        the hop-by-hop header: 501, before a head is delivered.
        """
        self.assertRejected(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 501)


# Request smuggling and desync vectors: each must be refused with a 400
# before its head reaches the sink.
SMUGGLING_VECTORS = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: h\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                 b"0\r\n\r\n",
    "duplicate_cl_same": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "duplicate_cl_conflicting": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
                                b"hello!",
    "cl_list": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\nhello!",
    "cl_plus_sign": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello",
    "cl_negative": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
    "cl_not_a_number": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5x\r\n\r\nhello",
    "cl_overflow": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "cl_empty": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n",
    "te_gzip_alone": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "te_chunked_gzip": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te_chunked_then_gzip_headers": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                                    b"Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
    "te_chunked_twice": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_xchunked": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_identity": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\nhello",
    "te_empty": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \r\n\r\n",
    "te_chunked_identity": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                           b"0\r\n\r\n",
    "te_chunked_trailing_comma": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
    "te_on_http10": b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_on_http10_with_cl": b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                            b"hello",
    "cl_hex": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\nhello",
    "cl_space_inside": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1 0\r\n\r\nhello",
    "cl_vertical_tab": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \x0b5\r\n\r\nhello",
    "nul_in_name": b"GET / HTTP/1.1\r\nHost: h\r\nX\x00A: b\r\n\r\n",
    "ctl_in_value": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x01b\r\n\r\n",
    "del_in_value": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x7fb\r\n\r\n",
    "absolute_form_reverse_proxy": b"GET http://other/ HTTP/1.1\r\nHost: h\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
    "obs_fold_te": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n chunked\r\n\r\n0\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost: h\r\nX-A : b\r\n\r\n",
    "space_before_colon_te": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n"
                             b"Content-Length: 3\r\n\r\nabc",
    "tab_before_colon": b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length\t: 0\r\n\r\n",
    "space_in_header_name": b"GET / HTTP/1.1\r\nHost: h\r\nX A: b\r\n\r\n",
    "empty_header_name": b"GET / HTTP/1.1\r\nHost: h\r\n: b\r\n\r\n",
    "leading_space_first_header": b"GET / HTTP/1.1\r\n Host: h\r\n\r\n",
    "bare_lf_request_line": b"GET / HTTP/1.1\nHost: h\r\n\r\n",
    "bare_lf_header": b"GET / HTTP/1.1\r\nHost: h\nX-A: b\r\n\r\n",
    "bare_lf_everywhere": b"GET / HTTP/1.1\nHost: h\n\n",
    "bare_cr_header": b"GET / HTTP/1.1\r\nHost: h\rX-A: b\r\n\r\n",
    "nul_in_value": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
    "cr_in_value": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
    "lf_in_value": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\nb\r\n\r\n",
    "ctl_in_path": b"GET /a\x01b HTTP/1.1\r\nHost: h\r\n\r\n",
    "space_in_path": b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
    "invalid_method_char": b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
    "unknown_method": b"FROB / HTTP/1.1\r\nHost: h\r\n\r\n",
    "lowercase_method": b"get / HTTP/1.1\r\nHost: h\r\n\r\n",
    "version_1_2": b"GET / HTTP/1.2\r\nHost: h\r\n\r\n",
    "version_garbage": b"GET / HTTX/1.1\r\nHost: h\r\n\r\n",
    "version_missing_minor": b"GET / HTTP/1\r\nHost: h\r\n\r\n",
    "host_with_space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "host_list": b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n",
    "host_with_path": b"GET / HTTP/1.1\r\nHost: good.example/evil\r\n\r\n",
    "host_with_userinfo": b"GET / HTTP/1.1\r\nHost: evil@good.example\r\n\r\n",
}


def _make_smuggling_test(data: bytes) -> Callable[[CodecTestCase], None]:
    def test(self: CodecTestCase) -> None:
        self.assertRejected(data, 400)
    return test


class RequestSmugglingTests(CodecTestCase):
    """
    L{RequestParser}: ambiguous or malformed requests are refused before
    anything of them is forwarded.
    """

    def test_http2_version(self):
        self.assertRejected(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505)

    def test_http09_request(self):
        self.assertRejected(b"GET /\r\n\r\n", 505, default_authority=b"d")

    def assertBodyRejected(self, body: bytes) -> None:
        """
        A chunked body with a bad chunk: the head was complete (and so
        delivered) before the chunk arrived, but no byte of the bad chunk
        and no end of the request may follow it.
        """
        outcome = self.parse_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        self.assertEqual(outcome.status, 400, outcome)
        self.assertEqual(outcome.kinds(), ["head"])

    def test_chunk_size_not_hex(self):
        self.assertBodyRejected(b"zz\r\nhello\r\n0\r\n\r\n")

    def test_chunk_size_negative(self):
        self.assertBodyRejected(b"-5\r\nhello\r\n0\r\n\r\n")

    def test_chunk_size_overflow(self):
        self.assertBodyRejected(b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n")

    def test_chunk_size_just_over_64_bits(self):
        self.assertBodyRejected(b"10000000000000000\r\nhello\r\n")

    def test_chunk_size_trailing_space(self):
        self.assertBodyRejected(b"5 \r\nhello\r\n0\r\n\r\n")

    def test_chunk_size_0x_prefix(self):
        self.assertBodyRejected(b"0x5\r\nhello\r\n0\r\n\r\n")

    def test_chunk_size_bare_lf(self):
        self.assertBodyRejected(b"5\nhello\r\n0\r\n\r\n")

    def test_chunk_data_longer_than_size(self):
        outcome = self.parse_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhelloX\r\n0\r\n\r\n")
        self.assertEqual(outcome.status, 400)
        self.assertEqual(outcome.kinds(), ["head", "data"])
        self.assertEqual(outcome.events[1], ("data", b"hel"))

    def test_content_length_in_trailers(self):
        outcome = self.parse_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(outcome.status, 400)
        self.assertNotIn("end", outcome.kinds())

    def test_error_is_final(self):
        """
        The error carries the status and reason to answer with.
        """
        e = ProtocolError(431, "request headers too large")
        self.assertEqual((e.status, e.reason, str(e)), (431, "request headers too large",
                                                         "431 request headers too large"))


for _name, _data in SMUGGLING_VECTORS.items():
    setattr(RequestSmugglingTests, f"test_{_name}", _make_smuggling_test(_data))
del _name, _data


class RequestLimitTests(CodecTestCase):
    """
    L{RequestParser}: C{max_head_bytes}.
    """

    def test_header_block_too_large(self):
        headers = b"".join(b"X-Header-%d: %s\r\n" % (i, b"v" * 40) for i in range(40))
        outcome = self.assertRejected(b"GET / HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n", 431,
                                      max_head_bytes=1024)
        self.assertIn("headers", outcome.reason)

    def test_request_line_too_long(self):
        outcome = self.assertRejected(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414,
                                      max_head_bytes=1024)
        self.assertIn("request line", outcome.reason)

    def test_head_within_limit(self):
        value = b"v" * 900
        outcome = self.parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + value + b"\r\n\r\n",
                                     max_head_bytes=1024)
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/", b"h", [(b"x-big", value)]), True, True)])

    def test_limit_is_per_request(self):
        one = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"v" * 600 + b"\r\n\r\n"
        outcome = self.parse_request(one * 3, max_head_bytes=1024)
        self.assertIsNone(outcome.status)
        self.assertEqual(len(outcome.heads()), 3)

    def test_body_does_not_count(self):
        outcome = self.parse_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n" + b"b" * 5000, max_head_bytes=1024)
        self.assertEqual(outcome.kinds(), ["head", "data", "end"])

    def test_endless_header_value(self):
        """
        httptools holds a header back until it is complete, so one header
        that never ends must still be cut off near the limit instead of
        being buffered without bound.
        """
        parser = RequestParser(RequestRecorder(), max_head_bytes=1024)
        parser.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nX-Endless: ")
        fed = 0
        with self.assertRaises(ProtocolError) as cm:
            while fed < 1024 * 1024:
                parser.receive_data(b"a" * 100)
                fed += 100
        self.assertEqual(cm.exception.status, 431)
        self.assertLessEqual(fed, 1024 + 100)

    def test_endless_header_name(self):
        parser = RequestParser(RequestRecorder(), max_head_bytes=1024)
        parser.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\n")
        with self.assertRaises(ProtocolError) as cm:
            for _ in range(10000):
                parser.receive_data(b"x" * 10)
        self.assertEqual(cm.exception.status, 431)

    def test_endless_trailer(self):
        parser = RequestParser(RequestRecorder(), max_head_bytes=1024)
        parser.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: ")
        with self.assertRaises(ProtocolError) as cm:
            for _ in range(10000):
                parser.receive_data(b"t" * 10)
        self.assertEqual(cm.exception.status, 431)


class ResponseParserTests(CodecTestCase):
    """
    L{ResponseParser}.
    """

    def test_content_length(self):
        outcome = self.parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello")
        self.assertEqual(outcome.events, [
            ("head", resp(200, [(b"content-length", b"5"), (b"content-type", b"text/plain")]), False),
            ("data", b"hello"),
            ("end", None),
        ])
        self.assertIsNone(outcome.status)
        self.assertEqual(outcome.state, {
            "upgraded": False, "keep_alive": True, "close_delimited": False, "head_received": True})

    def test_zero_content_length(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(outcome.events, [("head", resp(200, [(b"content-length", b"0")]), True)])
        self.assertTrue(outcome.state["keep_alive"])

    def test_chunked_with_trailers(self):
        outcome = self.parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n"
            b"Content-Type: application/grpc\r\n\r\n"
            b"5\r\nhello\r\n1;x=y\r\n!\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n")
        self.assertEqual(outcome.events, [
            ("head", resp(200, [(b"content-type", b"application/grpc")]), False),
            ("data", b"hello!"),
            ("end", Headers([(b"grpc-status", b"0"), (b"grpc-message", b"ok")])),
        ])
        self.assertTrue(outcome.state["keep_alive"])

    def test_chunked_without_trailers(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        self.assertEqual(outcome.events, [("head", resp(200), False), ("data", b"ok"), ("end", None)])

    def test_close_delimited(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ", b"world",
                                      LOST)
        self.assertEqual(outcome.events, [
            ("head", resp(200, [(b"content-type", b"text/plain")]), False),
            ("data", b"hello world"),
            ("end", None),
            ("lost", True),
        ])
        self.assertTrue(outcome.state["close_delimited"])
        self.assertFalse(outcome.state["keep_alive"])

    def test_close_delimited_empty(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\n\r\n", LOST)
        self.assertEqual(outcome.events, [("head", resp(200), False), ("end", None), ("lost", True)])

    def test_truncated_content_length(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", LOST)
        self.assertEqual(outcome.events, [
            ("head", resp(200, [(b"content-length", b"10")]), False),
            ("data", b"hello"),
            ("lost", False),
        ])

    def test_truncated_chunked(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", LOST)
        self.assertEqual(outcome.kinds(), ["head", "data", "lost"])
        self.assertEqual(outcome.events[-1], ("lost", False))

    def test_lost_before_head(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\nContent-", LOST)
        self.assertEqual(outcome.events, [("lost", False)])
        self.assertFalse(outcome.state["head_received"])

    def test_lost_after_complete_response(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", LOST)
        self.assertEqual(outcome.events[-1], ("lost", False))
        self.assertEqual(outcome.kinds().count("end"), 1)

    def test_head_response(self):
        outcome = self.parse_response(
            EXPECT(head_request=True),
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/html\r\n\r\n",
            EXPECT(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        self.assertEqual(outcome.events, [
            ("head", resp(200, [(b"content-length", b"1234"), (b"content-type", b"text/html")]), True),
            ("head", resp(200, [(b"content-length", b"2")]), False),
            ("data", b"ok"),
            ("end", None),
        ])
        self.assertIsNone(outcome.status)
        self.assertTrue(outcome.state["keep_alive"])

    def test_head_response_keep_alive(self):
        parser = ResponseParser(ResponseRecorder())
        parser.expect_response(True)
        parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        self.assertTrue(parser.keep_alive)

    def test_head_response_chunked_then_next(self):
        outcome = self.parse_response(
            EXPECT(head_request=True),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            EXPECT(head_request=True),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n",
            EXPECT(),
            b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx",
        )
        self.assertEqual(outcome.events, [
            ("head", resp(200), True),
            ("head", resp(404, [(b"content-length", b"9")]), True),
            ("head", resp(201, [(b"content-length", b"1")]), False),
            ("data", b"x"),
            ("end", None),
        ])

    def test_head_response_followed_by_body(self):
        """
        Bytes after a HEAD response are not a body, whatever llhttp thinks:
        the upstream is out of step with us.
        """
        outcome = self.parse_response(
            EXPECT(head_request=True), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(outcome.status, 502)
        self.assertEqual(outcome.kinds(), ["head"])

    def test_204_and_304_have_no_body(self):
        for status, reason in ((204, b"No Content"), (304, b"Not Modified")):
            outcome = self.parse_response(
                b"HTTP/1.1 %d %s\r\nContent-Length: 7\r\nETag: \"x\"\r\n\r\n" % (status, reason),
                EXPECT(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            )
            self.assertEqual(outcome.events, [
                ("head", resp(status, [(b"content-length", b"7"), (b"etag", b'"x"')]), True),
                ("head", resp(200, [(b"content-length", b"2")]), False),
                ("data", b"ok"),
                ("end", None),
            ], status)

    def test_204_keep_alive(self):
        outcome = self.parse_response(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(outcome.state["keep_alive"])
        outcome = self.parse_response(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        self.assertFalse(outcome.state["keep_alive"])

    def test_100_continue_then_200(self):
        outcome = self.parse_response(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(outcome.events, [
            ("info", resp(100)),
            ("head", resp(200, [(b"content-length", b"2")]), False),
            ("data", b"ok"),
            ("end", None),
        ])
        self.assertTrue(outcome.state["keep_alive"])

    def test_informational_is_not_the_head(self):
        parser = ResponseParser(ResponseRecorder())
        parser.expect_response(False)
        parser.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertFalse(parser.head_received)
        parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        self.assertTrue(parser.head_received)

    def test_103_early_hints(self):
        outcome = self.parse_response(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(outcome.events, [
            ("info", resp(103, [(b"link", b"</style.css>; rel=preload")])),
            ("info", resp(103, [(b"link", b"</app.js>; rel=preload")])),
            ("head", resp(200, [(b"content-length", b"0")]), True),
        ])

    def test_101_switching_protocols(self):
        outcome = self.parse_response(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi")
        self.assertEqual(outcome.events, [
            # The codec sorts hop-by-hop headers out as they arrive, so the
            # Upgrade header a 101 keeps comes after the end-to-end ones.
            ("head", resp(101, [(b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                                (b"upgrade", b"websocket")]), False),
        ])
        self.assertEqual(outcome.tail, b"\x81\x02hi")
        self.assertTrue(outcome.state["upgraded"])

    def test_after_101_bytes_pass_through(self):
        parser = ResponseParser(ResponseRecorder())
        parser.expect_response(False)
        self.assertEqual(
            parser.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"),
            b"")
        self.assertEqual(parser.receive_data(b"HTTP/1.1 200 OK\r\n\r\n"), b"HTTP/1.1 200 OK\r\n\r\n")

    def test_keep_alive_connection_close(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(outcome.events[0], ("head", resp(200, [(b"content-length", b"2")]), False))
        self.assertFalse(outcome.state["keep_alive"])

    def test_keep_alive_http10(self):
        outcome = self.parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(outcome.events[0], ("head", resp(200, [(b"content-length", b"2")], b"1.0"), False))
        self.assertFalse(outcome.state["keep_alive"])

    def test_keep_alive_http10_with_keep_alive(self):
        outcome = self.parse_response(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(outcome.state["keep_alive"])

    def test_keep_alive_during_response(self):
        """
        The sink may ask while the response is being delivered (the client
        connection does, on C{response_end}).
        """
        seen = []

        class Asking(ResponseRecorder):
            def response_end(self, trailers: Headers | None, last_data: bytes = b"") -> None:
                seen.append(parser.keep_alive)

        parser = ResponseParser(Asking())
        parser.expect_response(False)
        parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        parser.expect_response(False)
        parser.receive_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(seen, [True, False])

    def test_hop_by_hop_removed(self):
        outcome = self.parse_response(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\n"
            b"Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\nTrailer: x\r\nX-End: 2\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(outcome.events, [
            ("head", resp(200, [(b"x-end", b"2"), (b"content-length", b"0")]), True),
        ])

    def test_keep_alive_sequence(self):
        outcome = self.parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", EXPECT(),
            b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n",
            EXPECT(),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nc",
        )
        self.assertEqual([e[1].status for e in outcome.heads()], [200, 500, 404])
        self.assertEqual([e for e in outcome.events if e[0] == "data"], [("data", b"a"), ("data", b"b"),
                                                                          ("data", b"c")])


MALFORMED_RESPONSES = {
    "garbage_status_line": b"garbage\r\n\r\n",
    "bare_lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "status_too_long": b"HTTP/1.1 2000 OK\r\n\r\n",
    "status_letters": b"HTTP/1.1 abc OK\r\n\r\n",
    "status_below_100": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "version_2": b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "version_0_9": b"HTTP/0.9 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "te_gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "te_chunked_gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello",
    "te_gzip_chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "obs_fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "nul_in_value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "second_response_in_same_read": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
    "second_response_after_204": b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
}


def _make_malformed_response_test(data: bytes) -> Callable[[CodecTestCase], None]:
    def test(self: CodecTestCase) -> None:
        outcome = self.parse_response(data)
        self.assertEqual(outcome.status, 502, outcome)
        # Whatever was delivered, no second head and no body after an error.
        self.assertLessEqual(len(outcome.heads()), 1)
    return test


class MalformedResponseTests(CodecTestCase):
    """
    L{ResponseParser}: a malformed upstream response is a 502.
    """

    def test_head_before_error_is_not_delivered(self):
        for name in ("cl_and_te", "duplicate_cl", "te_gzip", "te_chunked_gzip", "version_2", "status_below_100"):
            outcome = self.parse_response(MALFORMED_RESPONSES[name])
            self.assertEqual(outcome.events, [], name)

    def test_101_without_upgrade_is_refused_whole(self):
        """
        A 101 without C{Connection: upgrade} and an C{Upgrade} protocol
        (which llhttp would not switch on) is a 502, and its head never
        reaches the client (found by fuzzing).
        """
        for data in (b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                     b"HTTP/1.1 101 Switching Protocols\r\nupgrade: \r\nconnection: upgrade\r\n\r\n",
                     b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"):
            outcome = self.parse_response(data)
            self.assertEqual((outcome.status, outcome.events), (502, []), data)

    def test_invalid_chunk_size(self):
        """
        A head whose body turns out malformed in the same input is not
        delivered (the client can still get a 502); one that arrived
        earlier was.
        """
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\nabc\r\n"
        for name, split in chunkers():
            recorder = ResponseRecorder()
            outcome = _run(ResponseParser(recorder), recorder, [EXPECT(False), data], split, _response_state)
            self.assertEqual(outcome.status, 502, name)
            if name == "whole":
                self.assertEqual(outcome.kinds(), [], name)
            else:
                self.assertIn(outcome.kinds(), ([], ["head"]), name)

    def test_head_held_with_body_pieces(self):
        """
        The pieces of body that came with the head follow it once the input
        parsed cleanly.
        """
        recorder = ResponseRecorder()
        parser = ResponseParser(recorder)
        parser.expect_response(False)
        parser.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n1\r\nf\r\n")
        self.assertEqual([e[0] for e in recorder.events], ["head", "data", "data", "data"])
        self.assertEqual(b"".join(e[1] for e in recorder.events[1:]), b"abcdef")
        parser.receive_data(b"0\r\n\r\n")
        self.assertEqual(recorder.events[-1], ("end", None))

    def test_data_after_complete_response(self):
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"extra")
        self.assertEqual(outcome.status, 502)
        self.assertEqual(outcome.kinds(), ["head", "data", "end"])

    def test_headers_too_large(self):
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(30))
        outcome = self.parse_response(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n", max_head_bytes=1024)
        self.assertEqual(outcome.status, 502)
        self.assertEqual(outcome.events, [])

    def test_reason_names_upstream(self):
        outcome = self.parse_response(b"garbage\r\n\r\n")
        self.assertIn("upstream", outcome.reason)


for _name, _data in MALFORMED_RESPONSES.items():
    setattr(MalformedResponseTests, f"test_{_name}", _make_malformed_response_test(_data))
del _name, _data


class EncoderTests(SynchronousTestCase):
    """
    The C{encode_*} functions.
    """

    def test_request_head(self):
        head = req(b"POST", b"/x?y=1", b"svc:8080", [(b"content-type", b"text/plain"), (b"x-a", b"1")])
        self.assertEqual(
            encode_request_head(head, chunked=False),
            b"POST /x?y=1 HTTP/1.1\r\nhost: svc:8080\r\ncontent-type: text/plain\r\nx-a: 1\r\n\r\n",
        )

    def test_request_head_always_http11(self):
        head = req(b"GET", b"/", b"h", version=b"1.0")
        self.assertEqual(encode_request_head(head, chunked=False), b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")

    def test_request_head_chunked(self):
        head = req(b"POST", b"/", b"h", [(b"x-a", b"1")])
        self.assertEqual(
            encode_request_head(head, chunked=True),
            b"POST / HTTP/1.1\r\nhost: h\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n",
        )

    def test_request_head_upgrade(self):
        head = req(b"GET", b"/ws", b"h", [(b"upgrade", b"websocket")])
        self.assertEqual(
            encode_request_head(head, chunked=False, upgrade=True),
            b"GET /ws HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        )

    def test_response_head_default_reason(self):
        self.assertEqual(encode_response_head(resp(404)), b"HTTP/1.1 404 Not Found\r\n\r\n")
        self.assertEqual(encode_response_head(resp(200)), b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(encode_response_head(resp(503)), b"HTTP/1.1 503 Service Unavailable\r\n\r\n")

    def test_response_head_unknown_status(self):
        self.assertEqual(encode_response_head(resp(599)), b"HTTP/1.1 599 Unknown\r\n\r\n")

    def test_response_head_given_reason(self):
        head = ResponseHead(200, Headers(), b"Fine")
        self.assertEqual(encode_response_head(head), b"HTTP/1.1 200 Fine\r\n\r\n")

    def test_response_head_everything(self):
        head = resp(200, [(b"content-type", b"text/plain")])
        self.assertEqual(
            encode_response_head(head, chunked=True, connection=b"close",
                                 extra=[(b"x-txmesh-flags", b"UF"), (b"server", b"txmesh")]),
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-txmesh-flags: UF\r\nserver: txmesh\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        )

    def test_response_head_connection_upgrade(self):
        head = resp(101, [(b"upgrade", b"websocket")])
        self.assertEqual(
            encode_response_head(head, connection=b"upgrade"),
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        )

    def test_chunk(self):
        self.assertEqual(encode_chunk(b""), b"")
        self.assertEqual(encode_chunk(b"hello"), b"5\r\nhello\r\n")
        self.assertEqual(encode_chunk(b"x" * 300), b"12c\r\n" + b"x" * 300 + b"\r\n")

    def test_last_chunk(self):
        self.assertEqual(encode_last_chunk(), b"0\r\n\r\n")
        self.assertEqual(encode_last_chunk(None), b"0\r\n\r\n")
        self.assertEqual(encode_last_chunk(Headers()), b"0\r\n\r\n")

    def test_last_chunk_with_trailers(self):
        self.assertEqual(
            encode_last_chunk(Headers([(b"grpc-status", b"0"), (b"grpc-message", b"ok")])),
            b"0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n",
        )


class RoundTripTests(CodecTestCase):
    """
    What the encoders write, the parsers read back as the same values.
    """

    def test_request_content_length(self):
        head = req(b"PUT", b"/a/b?c=d&e", b"api.example:8443",
                   [(b"content-length", b"5"), (b"x-multi", b"1"), (b"x-multi", b"2")])
        outcome = self.parse_request(encode_request_head(head, chunked=False) + b"hello")
        self.assertEqual(outcome.events, [("head", head, False, True), ("data", b"hello"), ("end", None)])

    def test_request_chunked_with_trailers(self):
        head = req(b"POST", b"/grpc.Service/Call", b"svc", [(b"content-type", b"application/grpc"),
                                                            (b"te", b"trailers")])
        trailers = Headers([(b"x-checksum", b"abc")])
        data = (encode_request_head(head, chunked=True) + encode_chunk(b"hello ") + encode_chunk(b"")
                + encode_chunk(b"world") + encode_last_chunk(trailers))
        outcome = self.parse_request(data)
        self.assertEqual(outcome.events, [("head", head, False, True), ("data", b"hello world"), ("end", trailers)])

    def test_request_no_body(self):
        head = req(b"GET", b"/", b"h", [(b"accept", b"*/*")])
        outcome = self.parse_request(encode_request_head(head, chunked=False))
        self.assertEqual(outcome.events, [("head", head, True, True)])

    def test_request_upgrade(self):
        head = req(b"GET", b"/ws", b"h", [(b"upgrade", b"websocket"), (b"sec-websocket-version", b"13")])
        outcome = self.parse_request(encode_request_head(head, chunked=False, upgrade=True) + b"frames")
        self.assertEqual(outcome.events, [("head", head, False, True)])
        self.assertEqual(outcome.tail, b"frames")

    def test_response_chunked_with_trailers(self):
        head = resp(200, [(b"content-type", b"application/grpc")])
        trailers = Headers([(b"grpc-status", b"0")])
        data = (encode_response_head(head, chunked=True) + encode_chunk(b"abc") + encode_chunk(b"def")
                + encode_last_chunk(trailers))
        outcome = self.parse_response(data)
        self.assertEqual(outcome.events, [("head", head, False), ("data", b"abcdef"), ("end", trailers)])
        self.assertTrue(outcome.state["keep_alive"])

    def test_response_connection_close(self):
        head = resp(404, [(b"content-length", b"3")])
        outcome = self.parse_response(encode_response_head(head, connection=b"close") + b"nope")
        self.assertEqual(outcome.events, [("head", head, False), ("data", b"nop"), ("end", None)])
        # The extra byte is upstream garbage after a complete response.
        self.assertEqual(outcome.status, 502)
        self.assertFalse(outcome.state["keep_alive"])

    def test_response_extra_headers(self):
        head = resp(503, [(b"content-length", b"0")])
        outcome = self.parse_response(encode_response_head(head, extra=[(b"x-txmesh-flags", b"UH")]))
        self.assertEqual(outcome.events, [
            ("head", resp(503, [(b"content-length", b"0"), (b"x-txmesh-flags", b"UH")]), True),
        ])

    def test_response_101(self):
        head = resp(101, [(b"upgrade", b"websocket")])
        outcome = self.parse_response(encode_response_head(head, connection=b"upgrade") + b"tunnel")
        self.assertEqual(outcome.events, [("head", head, False)])
        self.assertEqual(outcome.tail, b"tunnel")


CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


class ChunkFramingLimitTests(CodecTestCase):
    """
    Chunk extensions and leading zeros beyond L{MAX_CHUNK_FRAMING}: llhttp
    bounds the size's value, not the line, so the parser counts what a feed
    held beyond its body bytes.
    """

    def assertLineRefused(self, body: bytes) -> None:
        """
        Refused in every feeding mode (which may differ in how much body
        went through before).
        """
        for name, split in chunkers():
            recorder = RequestRecorder()
            outcome = _run(RequestParser(recorder), recorder, [CHUNKED_HEAD + body], split, _request_state)
            self.assertEqual(outcome.status, 400, name)
            self.assertIn("chunk extension", outcome.reason, name)
            self.assertNotIn("end", outcome.kinds(), name)

    def test_long_extension(self):
        self.assertLineRefused(b"5;" + b"e" * 2 * MAX_CHUNK_FRAMING)

    def test_many_extensions(self):
        self.assertLineRefused(b"5" + b";a=b" * MAX_CHUNK_FRAMING)

    def test_leading_zeros(self):
        self.assertLineRefused(b"0" * 2 * MAX_CHUNK_FRAMING)

    def test_long_line_after_good_chunks(self):
        self.assertLineRefused(b"5\r\nhello\r\n" * 50 + b"5;" + b"e" * 2 * MAX_CHUNK_FRAMING)

    def test_small_extensions_add_up(self):
        """
        Extensions on every chunk add up (each chunk header pays for a
        plain chunk's framing, so a few bytes of extension each go free).
        """
        self.assertLineRefused((b"1;" + b"e" * 62 + b"\r\nx\r\n") * (MAX_CHUNK_FRAMING // 20))

    def test_trickled_extension(self):
        """
        Fed a little at a time, the line is still refused near the limit.
        """
        parser = RequestParser(RequestRecorder())
        parser.receive_data(CHUNKED_HEAD + b"5;")
        fed = 0
        with self.assertRaises(ProtocolError) as cm:
            while fed < 1 << 20:
                parser.receive_data(b"e" * 7)
                fed += 7
        self.assertEqual(cm.exception.status, 400)
        self.assertLessEqual(fed, MAX_CHUNK_FRAMING + 7 + 20)

    def test_small_chunks_in_pieces(self):
        """
        A chunk's line, data and CRLF in separate feeds, as a client writing
        each on its own sends them: plain framing never adds up.
        """
        parser = RequestParser(RequestRecorder())
        parser.receive_data(CHUNKED_HEAD)
        for _ in range(5000):
            for piece in (b"5", b"\r\n", b"hello", b"\r", b"\n"):
                parser.receive_data(piece)
        parser.receive_data(b"0\r\n\r\n")
        self.assertFalse(parser.in_message)

    def test_extensions_within_limit(self):
        body = (b"5;" + b"e" * (MAX_CHUNK_FRAMING // 4) + b"\r\nhello\r\n" + b"1;a=b\r\nx\r\n" * 200
                + b"0000000000000001\r\ny\r\n" * 100 + b"0\r\n" + b"x-trailer: " + b"t" * 2000 + b"\r\n" * 5
                + b"\r\n")
        outcome = self.parse_request(CHUNKED_HEAD + body)
        self.assertIsNone(outcome.status, outcome)
        self.assertEqual(outcome.kinds(), ["head", "data", "end"])
        self.assertEqual(outcome.events[1], ("data", b"hello" + b"x" * 200 + b"y" * 100))

    def test_response_long_extension(self):
        outcome = self.parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"5;" + b"e" * (2 * MAX_CHUNK_FRAMING))
        self.assertEqual(outcome.status, 502, outcome)
        self.assertNotIn("end", outcome.kinds())


class HeaderCountTests(CodecTestCase):
    """
    L{RequestParser}: C{max_headers}.
    """

    def head(self, n: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(n)) + b"\r\n"

    def test_default_is_100(self):
        self.assertIsNone(self.parse_request(self.head(99)).status)
        self.assertRejected(self.head(100), 431)

    def test_configured(self):
        self.assertIsNone(self.parse_request(self.head(9), max_headers=10).status)
        outcome = self.assertRejected(self.head(10), 431, max_headers=10)
        self.assertIn("too many", outcome.reason)


class BodyLimitTests(CodecTestCase):
    """
    L{RequestParser}: C{max_body_bytes}, counted as the body flows.
    """

    def test_declared_length_over(self):
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n" + b"b" * 11, 413,
                            max_body_bytes=10)

    def test_declared_length_at_limit(self):
        outcome = self.parse_request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n" + b"b" * 10,
                                     max_body_bytes=10)
        self.assertEqual(outcome.kinds(), ["head", "data", "end"])

    def test_chunked_over(self):
        """
        Counted as it flows: at most the limit is delivered, whatever the
        feeding (so the modes differ in how much).
        """
        for name, split in chunkers():
            recorder = RequestRecorder()
            outcome = _run(RequestParser(recorder, max_body_bytes=10), recorder,
                           [CHUNKED_HEAD + b"8\r\n" + b"b" * 8 + b"\r\n8\r\n" + b"c" * 8 + b"\r\n0\r\n\r\n"],
                           split, _request_state)
            self.assertEqual(outcome.status, 413, name)
            self.assertNotIn("end", outcome.kinds(), name)
            self.assertLessEqual(sum(len(e[1]) for e in outcome.events if e[0] == "data"), 10, name)

    def test_limit_is_per_request(self):
        one = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\n\r\n" + b"b" * 8
        outcome = self.parse_request(one * 3 + CHUNKED_HEAD + b"8\r\n12345678\r\n0\r\n\r\n", max_body_bytes=10)
        self.assertIsNone(outcome.status)
        self.assertEqual(len(outcome.heads()), 4)


class BareLFTests(CodecTestCase):
    """
    L{RequestParser}: C{allow_bare_lf}.
    """

    def test_strict_by_default(self):
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: h\nX-A: b\n\n")

    def test_lenient_header_lines(self):
        outcome = self.parse_request(b"GET / HTTP/1.1\r\nHost: h\nX-A: b\n\n", allow_bare_lf=True)
        self.assertEqual(outcome.events, [("head", req(b"GET", b"/", b"h", [(b"x-a", b"b")]), True, True)])

    def test_lenient_still_refuses_bare_lf_request_line(self):
        self.assertRejected(b"GET / HTTP/1.1\nHost: h\r\n\r\n", allow_bare_lf=True)

    def test_lenient_still_refuses_bare_cr(self):
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: h\rX-A: b\r\n\r\n", allow_bare_lf=True)
        self.assertRejected(b"GET / HTTP/1.1\rHost: h\r\n\r\n", allow_bare_lf=True)

    def test_lenient_still_refuses_smuggling(self):
        for data in SMUGGLING_VECTORS.values():
            if b"\n" in data.replace(b"\r\n", b""):
                continue  # bare LF vectors
            self.assertRejected(data, allow_bare_lf=True)


class ResponseSplittingTests(CodecTestCase):
    """
    L{ResponseParser}: ambiguous upstream responses are a 502.
    """

    VECTORS = {
        "cl_and_te": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "duplicate_cl": b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "cl_list": b"Content-Length: 5, 5\r\n\r\nhello",
        "te_identity": b"Transfer-Encoding: identity\r\n\r\nhello",
        "te_chunked_identity": b"Transfer-Encoding: chunked, identity\r\n\r\nhello",
        "te_chunked_twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "te_empty": b"Transfer-Encoding: \r\n\r\nhello",
        "obs_fold": b"Content-Length: 0\r\nX-A: a\r\n b\r\n\r\n",
        "space_before_colon": b"Content-Length : 0\r\n\r\n",
        "nul_in_value": b"Content-Length: 0\r\nX-A: a\x00b\r\n\r\n",
        "cr_in_value": b"Content-Length: 0\r\nX-A: a\rb\r\n\r\n",
        "lf_in_value": b"Content-Length: 0\r\nX-A: a\nb\r\n\r\n",
    }

    def test_vectors(self):
        for name, rest in self.VECTORS.items():
            outcome = self.parse_response(b"HTTP/1.1 200 OK\r\n" + rest)
            self.assertEqual(outcome.status, 502, name)
            self.assertEqual(outcome.heads(), [], name)

    def test_te_on_http10(self):
        outcome = self.parse_response(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertEqual(outcome.status, 502)
        self.assertEqual(outcome.heads(), [])

    def test_bad_chunks(self):
        for body in (b"z\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffffff\r\n", b"5\r\nhelloXX0\r\n\r\n",
                     b"5\nhello\r\n0\r\n\r\n"):
            recorder = ResponseRecorder()
            parser = ResponseParser(recorder)
            parser.expect_response(False)
            with self.assertRaises(ProtocolError) as cm:
                parser.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
            self.assertEqual(cm.exception.status, 502, body)
            self.assertNotIn("end", [e[0] for e in recorder.events], body)
