"""
HTTP/2 on h2, the sans-IO half: header lists to and from the
protocol-neutral L{RequestHead}/L{ResponseHead}, and the connection
configurations the server and client protocols use.

Pure functions over plain values; the Twisted protocols in
L{txmesh.proxy.http2_server} and L{txmesh.proxy.http2_client} feed them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

import h2.config
import h2.settings
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated

from txmesh.proxy.stream import Headers, RequestHead, ResponseHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST_SIZE = 64 * 1024
# Stream and connection receive windows: larger than the RFC default
# (65535) so one round trip carries more than a few frames of a body.
INITIAL_WINDOW_SIZE = 1 << 20
CONNECTION_WINDOW_SIZE = 1 << 24

# Connection-specific headers (RFC 9113 8.2.2): never valid in HTTP/2.
CONNECTION_SPECIFIC = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
})
# Not forwarded from HTTP/1 to HTTP/2 (the hop-by-hop set plus host, which
# becomes :authority).
_DROP_ON_SEND = CONNECTION_SPECIFIC | {b"te", b"host", b"trailer", b"proxy-authenticate"}

_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})


class StreamProtocolError(Exception):
    """
    A stream's headers break HTTP/2's rules: the stream is reset with
    C{PROTOCOL_ERROR}.
    """


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def request_from_h2(header_list: Iterable[tuple[bytes | str, bytes | str]],
                    default_scheme: bytes = b"http") -> RequestHead:
    """
    @param header_list: a request's header block as h2 reports it.
    @return: the request head; C{host} is kept in the headers when sent, and
        becomes the authority when C{:authority} is absent.
    @raise StreamProtocolError: for missing or unknown pseudo-headers,
        connection-specific headers, or C{te} other than C{trailers}.
    """
    method = scheme = authority = path = None
    protocol = None
    items: list[tuple[bytes, bytes]] = []
    regular = False
    for name, value in header_list:
        name = _b(name)
        value = _b(value)
        if name[:1] == b":":
            if regular:
                raise StreamProtocolError("pseudo-header after a regular header")
            if name == b":method":
                method = value
            elif name == b":scheme":
                scheme = value
            elif name == b":authority":
                authority = value
            elif name == b":path":
                path = value
            elif name == b":protocol":
                protocol = value
            else:
                raise StreamProtocolError(f"unknown pseudo-header {name.decode('latin-1')}")
            continue
        regular = True
        if name != name.lower():
            raise StreamProtocolError("upper-case header name")
        if name in CONNECTION_SPECIFIC:
            raise StreamProtocolError(f"connection-specific header {name.decode('latin-1')}")
        if name == b"te" and value.strip().lower() != b"trailers":
            raise StreamProtocolError("te other than trailers")
        items.append((name, value))
    if method is None:
        raise StreamProtocolError("missing :method")
    if method == b"CONNECT" and protocol is None:
        if authority is None or path is not None or scheme is not None:
            raise StreamProtocolError("malformed CONNECT")
        path = b""
    else:
        if path is None or scheme is None:
            raise StreamProtocolError("missing :scheme or :path")
        if not path:
            raise StreamProtocolError("empty :path")
    headers = Headers(items)
    if authority is None:
        authority = headers.get(b"host") or b""
    return RequestHead(method, path, authority, headers, scheme or default_scheme, b"2")


def response_from_h2(header_list: Iterable[tuple[bytes | str, bytes | str]]) -> ResponseHead:
    """
    @return: the response head of a header block with C{:status}.
    @raise StreamProtocolError: if C{:status} is missing or malformed.
    """
    status = None
    items: list[tuple[bytes, bytes]] = []
    for name, value in header_list:
        name = _b(name)
        value = _b(value)
        if name == b":status":
            status = value
        elif name[:1] == b":":
            raise StreamProtocolError(f"unexpected pseudo-header {name.decode('latin-1')}")
        elif name in CONNECTION_SPECIFIC:
            raise StreamProtocolError(f"connection-specific header {name.decode('latin-1')}")
        else:
            items.append((name, value))
    if status is None or len(status) != 3 or not status.isdigit():
        raise StreamProtocolError("missing or malformed :status")
    return ResponseHead(int(status), Headers(items), b"", b"2")


def trailers_from_h2(header_list: Iterable[tuple[bytes | str, bytes | str]]) -> Headers:
    """
    @return: a trailer block as L{Headers}.
    @raise StreamProtocolError: if it holds pseudo-headers.
    """
    items = []
    for name, value in header_list:
        name = _b(name)
        if name[:1] == b":":
            raise StreamProtocolError("pseudo-header in trailers")
        items.append((name, _b(value)))
    return Headers(items)


def _regular(headers: Headers) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        name = name.lower()
        if name in _DROP_ON_SEND:
            if name == b"te" and value.strip().lower() == b"trailers":
                out.append((name, b"trailers"))
            continue
        out.append((name, value))
    return out


def request_to_h2(head: RequestHead) -> list[tuple[bytes, bytes]]:
    """
    @return: the header block for sending C{head} over HTTP/2.
    """
    authority = head.authority or head.headers.get(b"host") or b""
    if head.method == b"CONNECT":
        pseudo = [(b":method", b"CONNECT"), (b":authority", authority)]
    else:
        pseudo = [(b":method", head.method), (b":scheme", head.scheme or b"http"),
                  (b":authority", authority), (b":path", head.path or b"/")]
    return pseudo + _regular(head.headers)


def response_to_h2(head: ResponseHead) -> list[tuple[bytes, bytes]]:
    """
    @return: the header block for sending C{head} over HTTP/2.
    """
    return [(b":status", b"%d" % head.status)] + _regular(head.headers)


def trailers_to_h2(trailers: Headers) -> list[tuple[bytes, bytes]]:
    """
    @return: a trailer block for sending over HTTP/2.
    """
    return _regular(trailers)


def server_config() -> h2.config.H2Configuration:
    """
    @return: the configuration of a server-side connection.  Header
        validation of inbound blocks is ours (L{request_from_h2}), so that
        a bad request resets its stream instead of the connection.
    """
    return h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False,
        normalize_inbound_headers=False, validate_outbound_headers=False)


def client_config() -> h2.config.H2Configuration:
    """
    @return: the configuration of an upstream (client-side) connection.
    """
    return h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_inbound_headers=False,
        normalize_inbound_headers=False, validate_outbound_headers=False)


def local_settings(max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
                   max_header_list_size: int = MAX_HEADER_LIST_SIZE,
                   initial_window_size: int = INITIAL_WINDOW_SIZE) -> dict[int, int]:
    """
    @return: the SETTINGS a txmesh endpoint announces.
    """
    codes = h2.settings.SettingCodes
    return {
        codes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
        codes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        codes.INITIAL_WINDOW_SIZE: initial_window_size,
        codes.ENABLE_PUSH: 0,
    }


_UPGRADE_DROP = CONNECTION_SPECIFIC | {b"http2-settings", b"te"}


def parse_h2c_upgrade(data: bytes, scheme: bytes = b"http") -> tuple[RequestHead, bytes, bytes] | None:
    """
    Recognise an HTTP/1.1 request asking to upgrade to h2c (RFC 7540 3.2):
    C{Upgrade: h2c}, C{Connection: Upgrade, HTTP2-Settings} and one
    C{HTTP2-Settings} header, with no request body.

    @param data: the start of a connection, holding a complete request head.
    @return: the request (to become stream 1), the C{HTTP2-Settings} value
        and the bytes after the head; or C{None} if this is not such a
        request (it is then served as HTTP/1.1, the upgrade ignored).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[1].startswith(b"/"):
        return None
    items: list[tuple[bytes, bytes]] = []
    upgrade = connection = settings = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None
        name = name.lower()
        value = value.strip()
        if name == b"upgrade":
            upgrade = value.lower()
        elif name == b"connection":
            connection = value.lower()
        elif name == b"http2-settings":
            if settings is not None:
                return None
            settings = value
        elif name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return None  # a body: not worth the buffering; stay on HTTP/1.1
        if name not in _UPGRADE_DROP:
            items.append((name, value))
    if upgrade is None or connection is None or settings is None:
        return None
    try:
        payload = base64.urlsafe_b64decode(settings + b"=" * (-len(settings) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(payload) % 6:
        return None  # not a SETTINGS payload: six bytes per setting
    if b"h2c" not in [t.strip() for t in upgrade.split(b",")]:
        return None
    tokens = [t.strip() for t in connection.split(b",")]
    if b"upgrade" not in tokens or b"http2-settings" not in tokens:
        return None
    headers = Headers(items)
    head = RequestHead(parts[0], parts[1], headers.get(b"host") or b"", headers, scheme, b"2")
    return head, settings, data[end + 4:]


class GracefulH2Connection(H2Connection):
    """
    h2's connection, except that a GOAWAY with C{NO_ERROR} does not close
    it: the peer promises no new streams but the streams up to
    C{last_stream_id} still finish (RFC 9113 6.8), and h2 would refuse
    their frames as a protocol error.  nginx sends one after
    C{http2_max_requests}; clients send one when they are done.  The
    C{ConnectionTerminated} event is still delivered, so callers stop
    starting streams.

    This overrides h2's C{_receive_goaway_frame}: recheck it when h2 is
    upgraded.
    """

    def _receive_goaway_frame(self, frame: Any) -> tuple[list, list]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]
