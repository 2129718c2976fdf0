"""
The HTTP/1.1 codec, sans-IO, on httptools (llhttp).

L{RequestParser} (the server half) and L{ResponseParser} (the client half)
are fed bytes and call methods on a sink with protocol-neutral values from
L{txmesh.proxy.stream}.  The C{encode_*} functions turn those values back
into bytes.  No sockets, no clocks: the Twisted protocols in
L{txmesh.proxy.http1_server} and L{txmesh.proxy.http1_client} wrap these.

llhttp is strict by default and rejects most request smuggling vectors
(C{Content-Length} with C{Transfer-Encoding}, duplicate C{Content-Length},
obs-fold, whitespace before the colon, bare LF, NUL in values, invalid
chunk sizes).  The parsers here add what llhttp lets through:
C{Transfer-Encoding} that does not end in C{chunked} (llhttp only checks
that after the head), C{Transfer-Encoding} in an HTTP/1.0 message, and
chunk extensions or leading zeros beyond L{MAX_CHUNK_FRAMING};
and the limits: head size and header count, and body size.
L{ProtocolError} carries the status to answer with.
"""

from __future__ import annotations

import sys
from http import HTTPStatus
from typing import Protocol

import httptools

from txmesh.proxy.stream import Headers, RequestHead, ResponseHead

# Connection-specific headers (RFC 9110 7.6.1): meaningful for one hop only,
# so never forwarded.  "te" is handled separately: "te: trailers" survives
# because gRPC depends on it.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
    }
)

_NO_BODY_STATUSES = frozenset({204, 304})

_VERSIONS = frozenset({b"1.0", b"1.1"})
_OWS = (b" ", b"\t")

# What a Host value or a CONNECT target may hold (RFC 3986 reg-name,
# IP-literal and port); anything else (space, "/", "@", ...) lets a client
# make the router and the upstream disagree about the host.
_AUTHORITY_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%"

REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}

MAX_CHUNK_FRAMING = 4096
"""
How many bytes of chunk extensions, leading zeros and other framing beyond
the plain C{SIZE CRLF ... CRLF} one chunked message may carry.  llhttp
bounds a chunk size's value but neither its leading zeros nor extensions
(CVE-2024-22019), which would let a peer send, without end, bytes that are
neither body nor head and that no other limit counts.
"""

# The framing a chunk needs: 16 hex digits, CRLF, and the CRLF after its data.
_CHUNK_OVERHEAD = 20

_UNLIMITED = sys.maxsize


def _check_chunk_framing(parser: RequestParser | ResponseParser, framing: int, chunks: int) -> bool:
    """
    Account for the framing bytes of one feed into a chunked body.

    httptools reports neither chunk extensions nor offsets, so the framing
    of a feed is what it held beyond the body bytes it delivered.  It adds
    to the message's excess, from which each chunk header completed takes
    L{_CHUNK_OVERHEAD} (a chunk's line and CRLF may arrive in other feeds
    than its header's end), down to 0: a run of plain chunks buys at most
    that much per chunk for a later extension.  Complete trailer fields are
    taken back out, as they count against the head limit: the parser's
    C{on_header} subtracts them from C{_framing}.

    @param framing: the feed's bytes after the head, less the body bytes
        delivered.
    @param chunks: the chunk headers completed in the feed.
    @return: C{False} once the message's excess passes
        L{MAX_CHUNK_FRAMING}.
    """
    excess = parser._framing + framing - chunks * _CHUNK_OVERHEAD
    if excess <= 0:
        parser._framing = 0
        return True
    parser._framing = excess
    return excess <= MAX_CHUNK_FRAMING


def _feed_framing_ok(parser: RequestParser | ResponseParser, data: bytes, chunked: bool, begun: int, body: int,
                     chunks: int, fresh: bool) -> bool:
    """
    After a feed that left C{parser} in a chunked body, account for its
    framing (see L{_check_chunk_framing}).

    @param chunked: the feed began in that body.
    @param begun: messages begun during the feed.
    @param body: C{parser._body_received} before the feed.
    @param chunks: C{parser._chunks} before the feed.
    @param fresh: the feed began between messages.
    """
    if chunked:
        return begun > 0 or _check_chunk_framing(parser, len(data) - parser._body_received + body,
                                                 parser._chunks - chunks)
    if begun == 0 or (begun == 1 and fresh):
        # The head ended in this feed, so its body starts after the first
        # blank line (leading CRLFs before a start line are allowed).  Not
        # found (a CRLF split between feeds, bare LFs): the next feeds
        # still count.
        start = data.find(b"\r\n\r\n", len(data) - len(data.lstrip(b"\r\n")))
        return start < 0 or _check_chunk_framing(parser, len(data) - start - 4 - parser._body_received,
                                                 parser._chunks - chunks)
    return True


def split_absolute_form(target: bytes) -> tuple[bytes, bytes]:
    """
    Split an absolute-form request target (RFC 9112 3.2.2), as a client
    configured with C{HTTP_PROXY} sends it, into authority and origin form.

    @param target: e.g. C{b"http://example.com:8080/a?b"}.
    @return: the authority (C{b"example.com:8080"}) and the path and query
        (C{b"/a?b"}; C{b"/"} when the target has no path).
    @raise ProtocolError: (400) if the scheme is not C{http} (C{https}
        goes through C{CONNECT}), or the authority is empty, carries
        user info or holds characters an authority cannot.
    """
    sep = target.find(b"://")
    if sep < 0 or target[:sep].lower() != b"http":
        raise ProtocolError(400, "a forward proxy takes http:// targets (https goes through CONNECT)")
    rest = target[sep + 3:]
    end = len(rest)
    for delimiter in (b"/", b"?"):
        i = rest.find(delimiter)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if not authority or authority.translate(None, _AUTHORITY_CHARS):
        raise ProtocolError(400, "invalid authority in the request target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


class ProtocolError(Exception):
    """
    The peer sent something that is not acceptable HTTP/1.1.

    @ivar status: the status a server should answer with (400, 413, 431, ...).
    @ivar reason: a short human-readable explanation.
    """

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}")


class RequestSink(Protocol):
    """
    Receives the events of L{RequestParser}.
    """

    def request_head(self, head: RequestHead, end_stream: bool, keep_alive: bool) -> None: ...

    def request_data(self, data: bytes) -> None: ...

    def request_end(self, trailers: Headers | None) -> None: ...


class ResponseSink(Protocol):
    """
    Receives the events of L{ResponseParser}.
    """

    def response_informational(self, head: ResponseHead) -> None: ...

    def response_head(self, head: ResponseHead, end_stream: bool) -> None: ...

    def response_data(self, data: bytes) -> None: ...

    def response_end(self, trailers: Headers | None, last_data: bytes = b"") -> None: ...


_VERSION_BYTES = {"1.1": b"1.1", "1.0": b"1.0"}


def _version_bytes(version: str) -> bytes:
    v = _VERSION_BYTES.get(version)
    return v if v is not None else version.encode("ascii")


_COMMON_TOKENS = {
    v: (v.lower(),) for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade",
                             b"chunked", b"trailers")
}


# Connection options that name no header (every other token names a header
# to drop, RFC 9110 7.6.1): checked first, as most heads carry only these.
_CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade"))


def _connection_tokens(value: bytes) -> list[bytes] | tuple[bytes, ...]:
    common = _COMMON_TOKENS.get(value)
    if common is not None:
        return common
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class RequestParser:
    """
    Parses a stream of HTTP/1.x requests (keep-alive and pipelined) from a
    client.

    Events go to the sink as they are parsed: C{request_head} (with
    C{end_stream} true when no body follows), then C{request_data}s and
    C{request_end} for requests with a body.  C{host} and hop-by-hop headers
    are taken out of the header list: C{host} becomes C{head.authority}, and
    C{head.upgrade} tells an upgrade request (its C{upgrade} header is kept
    so the upstream hop can be asked to upgrade too).

    @ivar upgraded: true once an C{Upgrade}/C{CONNECT} request has been
        parsed; every byte after it belongs to the tunnel, and
        L{receive_data} returns those bytes instead of parsing them.
    """

    __slots__ = (
        "_sink", "_parser", "_max_head", "_head_bytes", "_headers", "_url",
        "_in_head", "_trailers", "_has_body", "upgraded", "_scheme", "in_message",
        "_default_authority", "_quiet", "_progress", "_forward_proxy", "_max_headers", "_max_body",
        "_body_received", "_chunked_body", "_chunks", "_framing", "_messages",
    )

    def __init__(self, sink: RequestSink, max_head_bytes: int = 64 * 1024, scheme: bytes = b"http",
                 default_authority: bytes | None = None, forward_proxy: bool = False,
                 max_headers: int = 100, max_body_bytes: int = 0, allow_bare_lf: bool = False):
        """
        @param sink: receives parsed events.
        @param max_head_bytes: request line plus headers beyond this is a 431.
        @param scheme: the scheme the client used to reach us.
        @param default_authority: used for HTTP/1.0 requests without C{Host}.
        @param forward_proxy: accept absolute-form targets (they become
            origin form, their authority replacing C{Host}, and the head is
            marked C{absolute_form}) and drop C{Proxy-Authorization}, which
            is meant for this hop.
        @param max_headers: more header fields than this in a head is a 431.
        @param max_body_bytes: a body longer than this (declared or as it
            flows) is a 413; 0 for no limit.
        @param allow_bare_lf: accept a bare LF ending a header line or the
            head (llhttp's C{lenient_optional_cr_before_lf}).  The request
            line and chunk lines still need CRLF: llhttp's leniency that
            would allow a bare LF there also takes a bare CR as a line end.
        """
        self._forward_proxy = forward_proxy
        self._max_headers = max_headers
        self._max_body = max_body_bytes or _UNLIMITED
        self._body_received = 0
        self._chunked_body = False
        self._chunks = 0
        self._framing = 0
        self._messages = 0
        self._sink = sink
        self._parser = httptools.HttpRequestParser(self)
        if allow_bare_lf:
            self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
        self._max_head = max_head_bytes
        self._scheme = scheme
        self._default_authority = default_authority
        self._head_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._url = b""
        self._in_head = False
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._has_body = False
        self.upgraded = False
        self.in_message = False
        self._quiet = 0
        self._progress = False

    def receive_data(self, data: bytes) -> bytes | None:
        """
        Parse C{data}.

        @return: C{None}, or, once the request switched to a tunnel
            (Upgrade or CONNECT), the bytes that followed its head.
        @raise ProtocolError: on malformed or over-limit input; the
            connection must then be answered and closed.
        """
        if self.upgraded:
            return data
        self._progress = False
        chunked = self._chunked_body
        in_message = self.in_message
        messages, body, chunks = self._messages, self._body_received, self._chunks
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            return data[e.args[0]:]
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, ProtocolError):
                raise cause from None
            raise
        except httptools.HttpParserError as e:
            raise ProtocolError(400, str(e) or "malformed request") from None
        if self._chunked_body and not _feed_framing_ok(self, data, chunked, self._messages - messages, body, chunks,
                                                       not in_message):
            raise ProtocolError(400, "too many chunk extension or framing bytes")
        if self._progress:
            self._quiet = 0
        else:
            # httptools holds a header line back until it is complete, so
            # one endless header would never reach on_header's limit.
            self._quiet += len(data)
            if self._quiet > self._max_head:
                raise ProtocolError(431, "request headers too large")
        return None

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._progress = True
        self.in_message = True
        self._in_head = True
        self._head_bytes = 0
        self._headers = []
        self._url = b""
        self._trailers = None
        self._messages += 1

    def on_url(self, url: bytes) -> None:
        self._progress = True
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head:
            raise ProtocolError(414, "request line too long")
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progress = True
        if value[-1:] in _OWS:
            value = value.rstrip(b" \t")  # llhttp keeps trailing OWS in values
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            raise ProtocolError(431, "request headers too large")
        if self._in_head:
            self._headers.append((name.lower(), value))
        else:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name.lower(), value))
            self._framing -= len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = _version_bytes(parser.get_http_version())
        if version not in _VERSIONS:
            raise ProtocolError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        if len(self._headers) > self._max_headers:
            raise ProtocolError(431, "too many request headers")
        method = parser.get_method()
        url = self._url
        authority = None
        connection: list[bytes] = []
        codings: list[bytes] = []
        headers = []
        content_length = None
        chunked = False
        upgrade = False
        te_trailers = False
        forward_proxy = self._forward_proxy
        absolute_form = False
        for name, value in self._headers:
            if forward_proxy and name == b"proxy-authorization":
                continue
            if name == b"host":
                if authority is not None:
                    raise ProtocolError(400, "duplicate Host header")
                authority = value
            elif name in HOP_BY_HOP:
                if name == b"connection":
                    connection.extend(_connection_tokens(value))
                elif name == b"transfer-encoding":
                    codings.extend(_connection_tokens(value))
                elif name == b"te":
                    te_trailers = b"trailers" in _connection_tokens(value)
                elif name == b"upgrade":
                    upgrade = True
                    headers.append((name, value))
            else:
                if name == b"content-length":
                    content_length = value
                headers.append((name, value))
        if codings:
            # An HTTP/1.0 recipient may not know chunked: a front end that
            # framed this by Content-Length would disagree (RFC 9112 6.1).
            if version == b"1.0":
                raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
            # llhttp checks for a final "chunked" only after this callback,
            # and codings are not forwarded: take "chunked" alone.
            if codings[-1] != b"chunked":
                raise ProtocolError(400, "Transfer-Encoding must end with chunked")
            if len(codings) > 1:
                raise ProtocolError(501, "transfer codings other than chunked are not supported")
            chunked = True
        if connection and not _CONNECTION_OPTIONS.issuperset(connection):
            drop = frozenset(connection) - _CONNECTION_OPTIONS
            headers = [(n, v) for n, v in headers if n not in drop or n == b"upgrade"]
        if te_trailers:
            headers.append((b"te", b"trailers"))
        if upgrade and b"upgrade" not in connection:
            # An Upgrade header not named in Connection is not a request to
            # upgrade (RFC 9110 7.8); llhttp agrees and will not switch.
            headers = [(n, v) for n, v in headers if n != b"upgrade"]
            upgrade = False
        if method == b"CONNECT":
            # The tunnel goes where the target says, whatever Host claims.
            if url[:1] == b"/" or url == b"*":
                raise ProtocolError(400, "CONNECT needs an authority-form target (host:port)")
            authority = url
        elif url[:1] != b"/" and not (method == b"OPTIONS" and url == b"*"):
            # Absolute-form belongs to forward proxies; a reverse proxy that
            # accepted it would route by a host the client chose.
            if not forward_proxy:
                raise ProtocolError(400, "absolute-form request target not accepted here")
            # RFC 9112 3.2.2: the target's authority wins over Host.
            authority, url = split_absolute_form(url)
            absolute_form = True
        if authority is None:
            if version == b"1.1":
                raise ProtocolError(400, "missing Host header")
            authority = self._default_authority or b""
        elif authority.translate(None, _AUTHORITY_CHARS):
            raise ProtocolError(400, "invalid Host header")
        tunnel = upgrade or method == b"CONNECT"
        if tunnel and chunked:
            raise ProtocolError(400, "an Upgrade or CONNECT request cannot have a chunked body")
        # llhttp switches to the tunnel right after the head: a body declared
        # with Content-Length is the tunnel's first bytes, not a request body.
        self._has_body = not tunnel and (chunked or (content_length is not None and content_length != b"0"))
        if self._has_body:
            self._body_received = 0
            if chunked:
                self._chunked_body = True
                self._framing = 0
            elif self._max_body < _UNLIMITED and int(content_length) > self._max_body:
                raise ProtocolError(413, "request body too large")
        end_stream = not self._has_body and not tunnel
        head = RequestHead(method, url, authority, Headers(headers), self._scheme, version, absolute_form)
        self._sink.request_head(head, end_stream, parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self._progress = True
        received = self._body_received + len(body)
        self._body_received = received
        if received > self._max_body:
            raise ProtocolError(413, "request body too large")
        self._sink.request_data(body)

    def on_chunk_header(self) -> None:
        self._progress = True
        self._chunks += 1

    def on_message_complete(self) -> None:
        self._progress = True
        self.in_message = False
        if self._has_body:
            self._has_body = False
            self._chunked_body = False
            trailers = self._trailers
            self._sink.request_end(Headers(trailers) if trailers else None)


class ResponseParser:
    """
    Parses the responses on one upstream connection, one per request sent.

    Call L{expect_response} before each request's response: it says whether
    the request was a C{HEAD} (whose response carries no body whatever its
    headers say) and resets the parser if the previous message needs it.
    """

    __slots__ = (
        "_sink", "_parser", "_headers", "_in_head", "_trailers", "_head_request",
        "_close_delimited", "_head_done", "_done", "upgraded", "_has_body", "_max_head", "_head_bytes",
        "_stale", "_keep_alive", "_held", "_hop", "_content_length",
        "_body_received", "_chunked_body", "_chunks", "_framing", "_messages", "_pending_head", "_early",
    )

    def __init__(self, sink: ResponseSink, max_head_bytes: int = 64 * 1024):
        self._sink = sink
        self._max_head = max_head_bytes
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = False
        self._done = False
        self._stale = False
        self._chunks = 0
        self._framing = 0
        self._messages = 0
        # Cleared when released; after an error the parser is not used again.
        self._pending_head: ResponseHead | None = None
        self._early: list[bytes] | None = None
        self._reset_message()
        self.upgraded = False

    def _reset_message(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._hop: list[tuple[bytes, bytes]] | None = None
        self._content_length: bytes | None = None
        self._in_head = True
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._close_delimited = False
        self._head_done = False
        self._has_body = False
        self._head_bytes = 0
        self._keep_alive = False
        self._held = b""
        self._body_received = 0
        self._chunked_body = False

    def expect_response(self, head_request: bool) -> None:
        """
        Prepare for the response to the next request.

        @param head_request: the request was C{HEAD}.
        """
        if self._stale:
            # llhttp cannot be told a response belongs to HEAD, so after one
            # it still expects a body: start afresh.
            self._parser = httptools.HttpResponseParser(self)
            self._stale = False
        self._done = False
        self._head_request = head_request
        self._reset_message()

    @property
    def keep_alive(self) -> bool:
        """
        Whether the connection may carry another request after this response.
        """
        # Latched at the head: llhttp forgets the message's flags once it
        # is complete.
        return not self._close_delimited and self._keep_alive

    @property
    def close_delimited(self) -> bool:
        """
        Whether the current response's body ends when the connection closes.
        """
        return self._close_delimited

    @property
    def head_received(self) -> bool:
        """
        Whether the final (non-1xx) head of the current response has arrived.
        """
        return self._head_done

    def receive_data(self, data: bytes) -> bytes | None:
        """
        Parse C{data} from the upstream.

        @return: C{None}, or after a C{101 Switching Protocols} the bytes
            that followed its head (the start of the tunnel).
        @raise ProtocolError: if the upstream's response is malformed.
        """
        if self.upgraded:
            return data
        if self._done:
            if data:
                raise ProtocolError(502, "upstream sent data after a complete response")
            return None
        chunked = self._chunked_body
        messages, body, chunks = self._messages, self._body_received, self._chunks
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            return data[e.args[0]:]
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, ProtocolError):
                raise cause from None
            raise
        except httptools.HttpParserError as e:
            raise ProtocolError(502, f"malformed upstream response: {e}") from None
        if self._chunked_body and not _feed_framing_ok(self, data, chunked, self._messages - messages, body, chunks,
                                                       data.startswith(b"HTTP/")):
            raise ProtocolError(502, "upstream sent too many chunk extension or framing bytes")
        if self._pending_head is not None:
            self._release_head()
        held = self._held
        if held:
            self._held = b""
            self._sink.response_data(held)
        return None

    def connection_lost(self) -> bool:
        """
        The upstream closed the connection.

        @return: C{True} if that cleanly ended a close-delimited response
            (and C{response_end} was delivered); C{False} if a response was
            cut short.
        """
        if self._close_delimited and self._head_done and not self._done:
            self._done = True
            held, self._held = self._held, b""
            self._sink.response_end(None, held)
            return True
        return False

    def on_message_begin(self) -> None:
        if self._done:
            # A second response to one request would be taken, on a pooled
            # connection, as the answer to the next request.
            raise ProtocolError(502, "upstream sent data after a complete response")
        self._reset_message()
        self._messages += 1

    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        if value[-1:] in _OWS:
            value = value.rstrip(b" \t")  # llhttp keeps trailing OWS in values
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            raise ProtocolError(502, "upstream response headers too large")
        name = name.lower()
        if self._in_head:
            # Sorted as they arrive: the end of the head then only looks at
            # the (usually one) hop-by-hop header.
            if name in HOP_BY_HOP:
                if self._hop is None:
                    self._hop = []
                self._hop.append((name, value))
            else:
                if name == b"content-length":
                    self._content_length = value
                self._headers.append((name, value))
        else:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
            self._framing -= len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        status = parser.get_status_code()
        version = _version_bytes(parser.get_http_version())
        if version not in _VERSIONS or status < 100:
            raise ProtocolError(502, f"malformed upstream response: HTTP/{version.decode()} {status}")
        headers = self._headers
        connection: list[bytes] = []
        codings: list[bytes] = []
        content_length = self._content_length
        chunked = False
        if self._hop:
            for name, value in self._hop:
                if name == b"connection":
                    connection.extend(_connection_tokens(value))
                elif name == b"transfer-encoding":
                    codings.extend(_connection_tokens(value))
                elif name == b"upgrade" and status == 101:
                    headers.append((name, value))
        if connection and not _CONNECTION_OPTIONS.issuperset(connection):
            drop = frozenset(connection) - _CONNECTION_OPTIONS
            headers = [(n, v) for n, v in headers if n not in drop]
        head = ResponseHead(status, Headers(headers), b"", version)
        if status < 200:
            if status == 101:
                # llhttp switches protocols only on Connection: upgrade with
                # a non-empty Upgrade; any other 101 would reach the client
                # and then fail the parse, so it is refused whole.
                if b"upgrade" not in connection or not any(n == b"upgrade" and v.strip() for n, v in headers):
                    raise ProtocolError(502, "malformed upstream response: 101 without Connection: upgrade "
                                             "and an Upgrade protocol")
                self._head_done = True
                self._done = True
                self._sink.response_head(head, False)
            else:
                self._sink.response_informational(head)
            return
        self._head_done = True
        self._keep_alive = parser.should_keep_alive()
        if self._head_request or status in _NO_BODY_STATUSES:
            self._done = True
            self._stale = self._head_request
            self._sink.response_head(head, True)
            return
        if codings:
            # Codings are not forwarded, and without a final "chunked" llhttp
            # would wait for a chunked body the upstream never frames.
            if codings != [b"chunked"]:
                raise ProtocolError(502, "upstream used a transfer coding other than chunked")
            if version == b"1.0":
                raise ProtocolError(502, "upstream sent Transfer-Encoding in an HTTP/1.0 response")
            chunked = True
        if chunked:
            self._has_body = True
            self._chunked_body = True
            self._framing = 0
        elif content_length is not None:
            self._has_body = content_length != b"0"
        else:
            self._has_body = True
            self._close_delimited = True
        if not self._has_body:
            self._done = True
            self._sink.response_head(head, True)
        else:
            # Held to the end of this input (or of the message), with the
            # body pieces that come with it: a malformed body in the same
            # read is then a 502, not a relayed head and a cut connection.
            self._pending_head = head

    def _release_head(self) -> None:
        head = self._pending_head
        self._pending_head = None
        self._sink.response_head(head, False)
        early = self._early
        if early is not None:
            self._early = None
            for piece in early:
                self._sink.response_data(piece)

    def on_body(self, body: bytes) -> None:
        if self._done:
            # Only after a HEAD response, which llhttp expects a body for.
            raise ProtocolError(502, "upstream sent data after a complete response")
        # The latest piece is held until the next one, the end of the
        # message, or the end of this input: a small body then leaves as one
        # "data + end" event instead of two.
        if self._chunked_body:
            self._body_received += len(body)
        held = self._held
        self._held = body
        if held:
            if self._pending_head is not None:
                if self._early is None:
                    self._early = [held]
                else:
                    self._early.append(held)
            else:
                self._sink.response_data(held)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_message_complete(self) -> None:
        self._chunked_body = False
        if not self._head_done:
            return  # an informational (1xx) response
        if self._done and not self._has_body:
            return  # already ended at the head
        self._done = True
        head = self._pending_head
        if head is not None:
            if self._early is not None:
                self._release_head()
            else:
                self._pending_head = None
                self._sink.response_head(head, False)
        trailers = self._trailers
        held, self._held = self._held, b""
        self._sink.response_end(Headers(trailers) if trailers else None, held)


def _encode_headers(parts: list[bytes], headers: Headers) -> None:
    for name, value in headers.items():
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")


def encode_request_head(head: RequestHead, chunked: bool, upgrade: bool = False) -> bytes:
    """
    Serialise a request head for an HTTP/1.1 upstream.

    @param chunked: add C{Transfer-Encoding: chunked} (a body of unknown
        length follows).
    @param upgrade: add C{Connection: upgrade} (the head carries an
        C{upgrade} header and the client asked to switch protocols).
    """
    parts = [head.method, b" ", head.path, b" HTTP/1.1\r\nhost: ", head.authority, b"\r\n"]
    _encode_headers(parts, head.headers)
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        parts.append(b"connection: upgrade\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_response_head(
    head: ResponseHead,
    chunked: bool = False,
    connection: bytes | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """
    Serialise a response head for an HTTP/1.x client.

    @param chunked: add C{Transfer-Encoding: chunked}.
    @param connection: a C{Connection} header value to add (C{b"close"},
        C{b"keep-alive"} or C{b"upgrade"}), if any.
    @param extra: more headers to append.
    """
    status = head.status
    reason = head.reason or REASONS.get(status, b"Unknown")
    parts = [b"HTTP/1.1 ", str(status).encode("ascii"), b" ", reason, b"\r\n"]
    _encode_headers(parts, head.headers)
    if extra:
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if connection is not None:
        parts += (b"connection: ", connection, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_chunk(data: bytes) -> bytes:
    """
    Frame C{data} as one chunk of a chunked body; empty data gives C{b""}
    (an empty chunk would end the body).
    """
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_last_chunk(trailers: Headers | None = None) -> bytes:
    """
    The end of a chunked body, with optional trailers.
    """
    if not trailers:
        return b"0\r\n\r\n"
    parts = [b"0\r\n"]
    _encode_headers(parts, trailers)
    parts.append(b"\r\n")
    return b"".join(parts)
