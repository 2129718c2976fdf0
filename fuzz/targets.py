"""
The fuzz targets: one function per target, taking the fuzzer's bytes and
raising (an C{AssertionError}, or whatever escaped the code under test)
when a property does not hold.  The atheris scripts beside this module
run them under libFuzzer; C{tests/test_fuzz.py} runs them from hypothesis.

Properties:
  - L{http1_request}, L{http1_response}: the HTTP/1.1 codec raises nothing
    but its L{ProtocolError}; feeding one byte at a time gives the same
    events as one chunk; a message it accepts, encoded again with the
    codec's own C{encode_*}, parses to the same message.
  - L{http2_server}: frames (well-formed or not) sent to an
    L{HTTP2ServerProtocol} never make it raise or log a failure; a
    connection the server closes, unless the client said goodbye first,
    carries a GOAWAY; the streams it tracks are open h2 streams.
  - L{config_loader}: any YAML either loads or raises L{ConfigError}, in
    the proxy config loader and the Istio translators and parsers.
  - L{pilot_channel}: any bytes on the pilot channel either decode or
    raise L{ChannelProtocolError}; what decodes encodes back to itself.
"""

from __future__ import annotations

import tempfile
from typing import Any

import hpack
import yaml
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from fuzz.harness import ByteSource
from txmesh.config.errors import ConfigError
from txmesh.config.gateway import parse_gateways
from txmesh.config.istio import translate
from txmesh.config.loader import ConfigLoader
from txmesh.config.model import FilterConfig, ListenerConfig, NodeConfig
from txmesh.filters.api import HTTPFilter, LocalReply
from txmesh.filters.registry import FilterRegistry
from txmesh.pilot.messages import ChannelDecoder, ChannelProtocolError, encode
from txmesh.policy import istio_security
from txmesh.proxy.connection_manager import HTTPConnectionManager, ProxyContext
from txmesh.proxy.http1 import (
    ProtocolError,
    RequestParser,
    ResponseParser,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
    encode_response_head,
)
from txmesh.proxy.http2 import PREFACE
from txmesh.proxy.http2_server import HTTP2ServerProtocol
from txmesh.proxy.listener import HTTPListenerFactory
from txmesh.proxy.stream import Headers, RequestHead, ResponseHead

# -- HTTP/1.1 ------------------------------------------------------------------


class _RequestRecorder:
    """
    A L{RequestSink} that records events, with body pieces joined (how a
    body is cut into C{request_data} calls depends on the reads).
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def request_head(self, head: RequestHead, end_stream: bool, keep_alive: bool) -> None:
        self.events.append(("head", head, end_stream))

    def request_data(self, data: bytes) -> None:
        assert data, "request_data with no data"
        if self.events and self.events[-1][0] == "data":
            self.events[-1] = ("data", self.events[-1][1] + data)
        else:
            self.events.append(("data", data))

    def request_end(self, trailers: Headers | None) -> None:
        self.events.append(("end", trailers))


def _parse_requests(data: bytes, pieces: list[bytes], forward_proxy: bool) -> tuple[list, int | None, bytes]:
    """
    @return: the events of parsing C{pieces}, the status of the
        L{ProtocolError} that ended it (or C{None}) and the tunnel bytes.
    """
    sink = _RequestRecorder()
    parser = RequestParser(sink, forward_proxy=forward_proxy)
    tunnel = b""
    error = None
    for piece in pieces:
        try:
            rest = parser.receive_data(piece)
        except ProtocolError as e:
            assert 400 <= e.status <= 599, f"ProtocolError with status {e.status}"
            error = e.status
            break
        if rest is not None:
            tunnel += rest
    return sink.events, error, tunnel


def _body(events: list) -> bytes:
    return b"".join(e[1] for e in events if e[0] == "data")


def _complete(events: list) -> bool:
    """
    @return: whether C{events} end with a complete response.
    """
    return bool(events) and (events[-1][0] == "end" or events[-1][0] == "head" and events[-1][2])


def _assert_same_parse(chunk: tuple, byte: tuple) -> None:
    """
    Feeding a message byte by byte gives what feeding it in one chunk gives.

    @param chunk: C{(events, error status, ...)} of the one-chunk parse.
    @param byte: the same, of the byte-at-a-time parse.
    """
    if chunk[1] is None and byte[1] is None:
        ok = byte == chunk
    elif (chunk[1] is None or byte[1] is None) and _complete(chunk[0]) and byte[0] == chunk[0]:
        # Bytes after a complete response: llhttp skips stray CRLFs and,
        # after a HEAD response, a chunked body's framing within the read
        # that ended the response, while a later read is refused outright
        # (see docs/fuzzing.md); the response itself must be the same.
        ok = True
    else:
        # An error ends both the same way; but a parser may hold events of a
        # read back until the read is over (a head, the last body piece),
        # and a read that ends in an error drops them: what one chunk
        # delivered must be a beginning of what bytes delivered.
        chunk_events = [e for e in chunk[0] if e[0] != "data"]
        byte_events = [e for e in byte[0] if e[0] != "data"]
        ok = (byte[1:] == chunk[1:] and byte_events[:len(chunk_events)] == chunk_events
              and _body(byte[0]).startswith(_body(chunk[0])))
    assert ok, f"byte-at-a-time parse differs from one chunk:\n  one chunk:    {chunk!r}\n  byte a time: {byte!r}"


def _requests(events: list) -> list[tuple[RequestHead, bool, bytes, Headers | None, bool]]:
    """
    @return: the complete requests among C{events}: head, whether it ended
        with the head, body, trailers, and whether it ended at all.
    """
    out = []
    for event in events:
        if event[0] == "head":
            out.append([event[1], event[2], b"", None, event[2]])
        elif event[0] == "data":
            out[-1][2] += event[1]
        else:
            out[-1][3] = event[1]
            out[-1][4] = True
    return [tuple(r) for r in out]  # type: ignore[misc]


def _same_request(a: RequestHead, b: RequestHead) -> bool:
    return (a.method, a.path, a.authority, a.headers) == (b.method, b.path, b.authority, b.headers)


def http1_request(data: bytes) -> None:
    """
    The server half of the HTTP/1.1 codec (L{RequestParser}).  The first
    byte chooses options (forward-proxy mode); the rest is the client's bytes.
    """
    forward_proxy = bool(data[:1] and data[0] & 1)
    data = data[1:]
    events, error, tunnel = _parse_requests(data, [data], forward_proxy)
    byte_result = _parse_requests(data, [data[i:i + 1] for i in range(len(data))], forward_proxy)
    _assert_same_parse((events, error, tunnel), byte_result)
    for head, end_stream, body, trailers, ended in _requests(events):
        tunnel_request = head.method == b"CONNECT" or b"upgrade" in head.headers
        if not ended and not tunnel_request:
            continue
        if tunnel_request:
            wire = encode_request_head(head, False, upgrade=head.method != b"CONNECT")
        elif end_stream:
            wire = encode_request_head(head, False)
        elif b"content-length" in head.headers:
            wire = encode_request_head(head, False) + body
        else:
            wire = encode_request_head(head, True) + encode_chunk(body) + encode_last_chunk(trailers)
        again, again_error, _ = _parse_requests(wire, [wire], False)
        assert again_error is None, f"re-encoded request refused ({again_error}): {wire!r} from {head!r}"
        assert again, f"re-encoded request gave no request: {wire!r}"
        [(head2, end2, body2, trailers2, _ended2)] = _requests(again)
        assert _same_request(head, head2), f"re-encoded request parses differently:\n  {head!r}\n  {head2!r}"
        if not tunnel_request:
            assert (end2, body2, trailers2) == (end_stream, body, trailers), (
                f"re-encoded request body differs: {(end_stream, body, trailers)!r} != {(end2, body2, trailers2)!r}")


class _ResponseRecorder:
    """
    A L{ResponseSink} that records events, with body pieces joined.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def _data(self, data: bytes) -> None:
        if not data:
            return
        if self.events and self.events[-1][0] == "data":
            self.events[-1] = ("data", self.events[-1][1] + data)
        else:
            self.events.append(("data", data))

    def response_informational(self, head: ResponseHead) -> None:
        self.events.append(("informational", head))

    def response_head(self, head: ResponseHead, end_stream: bool) -> None:
        self.events.append(("head", head, end_stream))

    def response_data(self, data: bytes) -> None:
        assert data, "response_data with no data"
        self._data(data)

    def response_end(self, trailers: Headers | None, last_data: bytes = b"") -> None:
        self._data(last_data)
        self.events.append(("end", trailers))


def _parse_response(pieces: list[bytes], head_request: bool, close: bool) -> tuple[list, int | None, bytes, bool]:
    sink = _ResponseRecorder()
    parser = ResponseParser(sink)
    parser.expect_response(head_request)
    tunnel = b""
    error = None
    for piece in pieces:
        try:
            rest = parser.receive_data(piece)
        except ProtocolError as e:
            assert e.status == 502, f"upstream ProtocolError with status {e.status}"
            error = e.status
            break
        if rest is not None:
            tunnel += rest
    clean_close = False
    if error is None and close:
        clean_close = parser.connection_lost()
    return sink.events, error, tunnel, clean_close


def http1_response(data: bytes) -> None:
    """
    The client half of the HTTP/1.1 codec (L{ResponseParser}), for one
    request on an upstream connection.  The first byte chooses whether the
    request was a C{HEAD} and whether the upstream closes after its bytes.
    """
    flags = data[0] if data else 0
    head_request, close = bool(flags & 1), bool(flags & 2)
    data = data[1:]
    result = _parse_response([data], head_request, close)
    byte_result = _parse_response([data[i:i + 1] for i in range(len(data))], head_request, close)
    _assert_same_parse(result, byte_result)
    events, error, _tunnel, _clean = result
    final = [e for e in events if e[0] == "head"]
    if not final or events[-1][0] != "end" and final[0][1].status != 101:
        return
    _, head, end_stream = final[0]
    if head.status == 101 and error is not None:
        # A 101 llhttp does not switch on (it wants Connection: upgrade and
        # an Upgrade value) is a 502 once its head went to the sink: there
        # is no accepted response to re-encode (docs/fuzzing.md, finding 3).
        return
    body = _body(events)
    trailers = events[-1][1] if events[-1][0] == "end" else None
    if head.status == 101:
        wire = encode_response_head(head, connection=b"upgrade")
    elif end_stream:
        wire = encode_response_head(head)
    elif b"content-length" in head.headers:
        wire = encode_response_head(head) + body
    else:
        wire = encode_response_head(head, chunked=True) + encode_chunk(body) + encode_last_chunk(trailers)
    again, again_error, _, _ = _parse_response([wire], head_request, False)
    assert again_error is None, f"re-encoded response refused: {wire!r} from {head!r}"
    again_final = [e for e in again if e[0] == "head"]
    assert again_final, f"re-encoded response gave no response: {wire!r}"
    head2 = again_final[0][1]
    assert (head2.status, head2.headers) == (head.status, head.headers), (
        f"re-encoded response parses differently:\n  {head!r}\n  {head2!r}")
    if head.status != 101:
        body2 = _body(again)
        trailers2 = again[-1][1] if again[-1][0] == "end" else None
        assert (body2, trailers2) == (body, trailers), (
            f"re-encoded response body differs: {(body, trailers)!r} != {(body2, trailers2)!r}")


# -- HTTP/2 --------------------------------------------------------------------

_FRAME_TYPES = 10  # DATA .. CONTINUATION
_GOAWAY = 0x7
_REQUEST_NAMES = (b":method", b":scheme", b":authority", b":path", b":protocol", b"content-length", b"te",
                  b"host", b"connection", b"x-a", b"X-Up", b"cookie", b"grpc-timeout", b"")
_REQUEST_VALUES = (b"GET", b"POST", b"CONNECT", b"http", b"https", b"example.com", b"/", b"/a?b", b"0", b"5",
                   b"trailers", b"gzip", b"", b"websocket", b"\x00", b"a\r\nb")


class _H2Terminal(HTTPFilter):
    """
    The last filter of the fuzzed listener: keeps every stream so the input
    can answer, stream or reset it later.
    """

    def __init__(self, factory: _H2TerminalFactory, stream: Any):
        self.factory = factory
        self.stream = stream

    def request_headers(self, head: RequestHead, end_stream: bool) -> Any:
        self.factory.streams.append(self)
        return None



class _H2TerminalFactory:
    name = "fuzz-terminal"

    def __init__(self) -> None:
        self.streams: list[_H2Terminal] = []

    def parse_config(self, raw: Any) -> None:
        return None

    def create_filter(self, config: Any, stream: Any) -> _H2Terminal:
        return _H2Terminal(self, stream)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload


def _goaway_in(data: bytes) -> bool:
    """
    @return: whether the server's output C{data} holds a GOAWAY frame.
    """
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        if data[pos + 3] == _GOAWAY:
            return True
        pos += 9 + length
    return False


def http2_server(data: bytes) -> None:
    """
    A client speaking (possibly broken) HTTP/2 to an L{HTTP2ServerProtocol}
    behind a real L{HTTPListenerFactory}, over a L{StringTransport}.  The
    input is a program: frames with fuzzed header blocks, raw bytes,
    responses and resets from the terminal filter, clock steps and
    back-pressure.
    """
    src = ByteSource(data)
    failures: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    clock = Clock()
    terminal = _H2TerminalFactory()
    listener = ListenerConfig("fuzz", "tcp:0", http_filters=(FilterConfig(terminal.name, terminal),),
                              idle_timeout=30.0)
    factory = HTTPListenerFactory(HTTPConnectionManager(listener, None, ProxyContext(NodeConfig(), clock)))
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    encoder = hpack.Encoder()
    client_goaway = False
    globalLogPublisher.addObserver(observe)
    try:
        protocol.makeConnection(transport)
        protocol.dataReceived(PREFACE + _frame(0x4, 0, 0, b""))
        stream_ids = [1, 3, 5, 7]
        steps = 0
        while src.remaining and steps < 64 and not transport.disconnecting:
            steps += 1
            op = src.below(10)
            if op <= 3:
                # A frame: mostly HEADERS/DATA/RST_STREAM/SETTINGS/WINDOW_UPDATE.
                kind = src.below(_FRAME_TYPES + 2) if op else 1
                kind = kind if kind < _FRAME_TYPES else src.byte()
                flags = src.byte()
                sid = stream_ids[src.below(4)] if src.below(8) else src.uint(4) & 0x7FFFFFFF
                if kind in (1, 9) and src.boolean():
                    headers = []
                    for _ in range(src.below(8)):
                        name = _REQUEST_NAMES[src.below(len(_REQUEST_NAMES))] if src.below(4) else src.chunk(8)
                        value = _REQUEST_VALUES[src.below(len(_REQUEST_VALUES))] if src.below(4) else src.chunk(8)
                        headers.append((name, value))
                    payload = encoder.encode(headers)
                    if kind == 1 and flags & 0x8:
                        payload = b"\0" + payload  # the pad length the PADDED flag announces
                else:
                    payload = src.chunk(32)
                if kind == _GOAWAY:
                    client_goaway = True
                protocol.dataReceived(_frame(kind, flags, sid, payload))
            elif op == 4:
                chunk = src.chunk(64)
                if b"\x07" in chunk:
                    client_goaway = True  # it might make up a GOAWAY
                protocol.dataReceived(chunk)
            elif op in (5, 6):
                # The terminal filter answers one of the streams.
                if not terminal.streams:
                    continue
                t = terminal.streams[src.below(len(terminal.streams))]
                action = src.below(5)
                # A terminal filter sends a head first, then data or trailers.
                if action in (1, 2) and not t.stream.response_started:
                    action = 0
                elif action == 0 and t.stream.response_started:
                    action = 1
                if action == 0:
                    t.stream.encode_headers(ResponseHead(200 + src.below(400), Headers([(b"x", b"y")])),
                                            src.boolean())
                elif action == 1:
                    t.stream.encode_data(src.chunk(70000 if src.boolean() else 16), src.boolean())
                elif action == 2:
                    t.stream.encode_trailers(Headers([(b"grpc-status", b"0")]))
                elif action == 3:
                    t.stream.reset()
                else:
                    t.stream.send_local_reply(_local_reply(src.below(600)))
            elif op == 7:
                clock.advance(src.below(40))
            elif op == 8:
                inner = protocol._inner
                if not isinstance(inner, HTTP2ServerProtocol):
                    continue
                if src.boolean():
                    inner.pauseProducing()
                else:
                    inner.resumeProducing()
            else:
                inner = protocol._inner
                if src.boolean() and isinstance(inner, HTTP2ServerProtocol):
                    inner.start_drain()
            inner = protocol._inner
            if isinstance(inner, HTTP2ServerProtocol) and not inner._closing:
                for sid, stream in inner.streams.items():
                    assert not stream.closed, f"closed stream {sid} still tracked"
                    assert sid in inner._conn.streams, f"stream {sid} tracked but unknown to h2"
            if transport.disconnecting and not client_goaway:
                assert _goaway_in(transport.value()), "the server closed the connection without a GOAWAY"
        protocol.connectionLost(None)
        inner = protocol._inner
        if isinstance(inner, HTTP2ServerProtocol):
            assert not inner.streams, "streams left after the connection was lost"
        for t in terminal.streams:
            assert t.stream.complete, "a stream outlived its connection"
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, "a failure was logged: " + "\n".join(
        str(f["log_failure"].getTraceback()) for f in failures)


def _local_reply(status: int) -> Any:
    return LocalReply(max(status, 200), b"local\n")


# -- configuration ---------------------------------------------------------------

# Paths the loader might be told to read (certificates, Istio files): a
# fuzzed path into a device or a FIFO would block the run, not find a bug.
_UNSAFE_PATH_WORDS = (b"dev", b"proc", b"sys", b"run", b"fifo")


_config_loader: Any = None
_config_tmp: Any = None


def _config_dir() -> str:
    """
    @return: an empty directory the fuzzed config pretends to be in, so
        the relative paths it names (certificates, Istio files) find nothing.
    """
    global _config_tmp
    if _config_tmp is None:
        _config_tmp = tempfile.TemporaryDirectory(prefix="txmesh-fuzz-")
    return _config_tmp.name


def _proxy_config_loader() -> ConfigLoader:
    global _config_loader
    if _config_loader is None:
        _config_loader = ConfigLoader(FilterRegistry.from_plugins())
    return _config_loader


CONFIG_READERS = 6
"""
How many readers L{config_documents} chooses from: 0 the proxy config
loader, 1 the Istio translation, 2 Gateways, 3 AuthorizationPolicy,
4 PeerAuthentication, 5 RequestAuthentication.
"""


def config_documents(which: int, docs: list[Any], flags: int = 0) -> None:
    """
    Give parsed YAML documents to one of the configuration readers; it
    either succeeds or raises L{ConfigError}.

    @param which: the reader, below L{CONFIG_READERS}.
    @param docs: the documents (the proxy config loader takes the first).
    @param flags: options of the Istio translation (bit 0 C{partial},
        bit 1 C{mtls}).
    """
    documents = [("fuzz.yaml", i + 1, d) for i, d in enumerate(docs)]
    try:
        if which == 0:
            _proxy_config_loader().load_document(docs[0] if docs else None, f"{_config_dir()}/fuzz.yaml")
        elif which == 1:
            translate(documents, partial=bool(flags & 1), mtls=bool(flags & 2))
        elif which == 2:
            parse_gateways(documents)
        elif which == 3:
            istio_security.parse_authorization_policies(documents)
        elif which == 4:
            istio_security.parse_peer_authentications(documents)
        else:
            istio_security.parse_request_authentications(documents)
    except ConfigError:
        pass


# libyaml when there is one: YAML is not what this target explores, and the
# pure-Python parser is most of its time.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def config_loader(data: bytes) -> None:
    """
    The configuration readers: the first byte chooses the reader (see
    L{CONFIG_READERS}), the rest is YAML.  The proxy config loader is given
    the bytes (C{load_bytes}, whose YAML errors are L{ConfigError}s too);
    the Istio readers are given the documents of the YAML, if it is YAML.
    """
    if not data:
        return
    which, text = data[0] % CONFIG_READERS, data[1:]
    if any(w in text.lower() for w in _UNSAFE_PATH_WORDS):
        return
    if which == 0:
        try:
            _proxy_config_loader().load_bytes(text, f"{_config_dir()}/fuzz.yaml")
        except ConfigError:
            pass
        return
    try:
        docs = list(yaml.load_all(text, Loader=_YAML_LOADER))
    except (yaml.YAMLError, RecursionError, ValueError):
        return  # not YAML: kubectl would refuse it before these readers
    config_documents(which, docs, len(text))


# -- pilot channel -------------------------------------------------------------------


def pilot_channel(data: bytes) -> None:
    """
    The pilot channel's decoder (L{ChannelDecoder}, as both the pilot and
    the proxy run it): the first byte chooses where the input is cut into
    reads; every read either decodes or raises L{ChannelProtocolError},
    after which the channel stays broken; a decoded message encodes back
    to the same message.
    """
    src = ByteSource(data)
    step = src.byte() % 17
    rest = src.rest()
    decoder = ChannelDecoder(max_message_bytes=1 << 16)
    cuts = range(0, len(rest), step) if step else [0]
    broken = False
    for start in cuts:
        piece = rest[start:start + step] if step else rest
        try:
            messages = decoder.receive_data(piece)
        except ChannelProtocolError:
            broken = True
            continue
        assert not broken, "the decoder accepted data after a protocol error"
        for message in messages:
            try:
                wire = encode(message)
            except ChannelProtocolError:
                continue
            [again] = ChannelDecoder().receive_data(wire)
            assert again == message, f"message does not survive encode/decode:\n  {message!r}\n  {again!r}"
