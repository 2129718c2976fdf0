"""
What a captured connection's first bytes say it carries: HTTP/1.x, the
HTTP/2 preface, a TLS ClientHello (and its SNI), or opaque bytes.

Envoy does this with its C{http_inspector} and C{tls_inspector} listener
filters; here it is a pure function of the bytes read so far, which
answers C{None} while it needs more of them.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re

from txmesh.proxy.http2 import PREFACE

HTTP = "http"
"""
An HTTP/1.x request line or the HTTP/2 connection preface.
"""

TLS = "tls"
"""
A TLS handshake record (a ClientHello).
"""

OPAQUE = "opaque"
"""
Anything else: relayed at L4.
"""

# A request line longer than this is not taken for HTTP.
REQUEST_LINE_LIMIT = 8 * 1024

_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
_REQUEST_LINE = re.compile(rb"[A-Z]+ [\x21-\x7e]+ HTTP/1\.[01]\r?\n")


def classify(data: bytes) -> str | None:
    """
    @param data: the first bytes a client sent on a connection.
    @return: L{HTTP}, L{TLS} or L{OPAQUE}, or C{None} while C{data} is too
        short to tell (a prefix of a request line or of the HTTP/2
        preface).
    """
    if not data:
        return None
    n = min(len(data), len(PREFACE))
    if data[:n] == PREFACE[:n]:
        return HTTP if len(data) >= len(PREFACE) else None
    if data[0] == 0x16:
        # A handshake record: content type 22, version 3.x.
        if len(data) < 2:
            return None
        return TLS if data[1] == 0x03 else OPAQUE
    space = data.find(b" ")
    method = data if space < 0 else data[:space]
    if not any(m.startswith(method) if space < 0 else m == method for m in _METHODS):
        return OPAQUE
    end = data.find(b"\n")
    if end < 0:
        if len(data) > REQUEST_LINE_LIMIT or any(b < 0x20 and b != 0x0D for b in data):
            return OPAQUE
        return None
    return HTTP if end < REQUEST_LINE_LIMIT and _REQUEST_LINE.fullmatch(data[:end + 1]) else OPAQUE


def _u8(data: bytes, at: int) -> int:
    if at >= len(data):
        raise IndexError(at)
    return data[at]


def _u16(data: bytes, at: int) -> int:
    if at + 2 > len(data):
        raise IndexError(at)
    return int.from_bytes(data[at:at + 2], "big")


def server_name(data: bytes) -> str | None:
    """
    The SNI of a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3).

    Only the first handshake record is read: a ClientHello split over
    several records (rare, e.g. with huge post-quantum key shares) gives
    C{None}.

    @param data: the first bytes a client sent (a TLS record).
    @return: the C{host_name} the client asked for, lower case, or C{None}
        if there is none or C{data} is not (all of) a ClientHello.
    """
    try:
        if _u8(data, 0) != 0x16 or _u8(data, 1) != 0x03:
            return None
        record_end = 5 + _u16(data, 3)
        hello = data[5:record_end]
        if _u8(hello, 0) != 0x01:  # ClientHello
            return None
        hello = hello[4:4 + int.from_bytes(hello[1:4], "big")]
        at = 2 + 32  # legacy_version, random
        at += 1 + _u8(hello, at)  # legacy_session_id
        at += 2 + _u16(hello, at)  # cipher_suites
        at += 1 + _u8(hello, at)  # legacy_compression_methods
        extensions_end = at + 2 + _u16(hello, at)
        at += 2
        if extensions_end > len(hello):
            return None
        while at + 4 <= extensions_end:
            kind, size = _u16(hello, at), _u16(hello, at + 2)
            at += 4
            if kind == 0:  # server_name
                names_end = at + 2 + _u16(hello, at)
                at += 2
                while at + 3 <= names_end:
                    name_type, length = _u8(hello, at), _u16(hello, at + 1)
                    at += 3
                    if at + length > len(hello):
                        return None
                    if name_type == 0:
                        return hello[at:at + length].decode("ascii").lower()
                    at += length
                return None
            at += size
    except (IndexError, UnicodeDecodeError):
        return None
    return None
