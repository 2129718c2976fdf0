"""
gRPC over the mesh, pure: recognising gRPC requests, reading their
deadlines, and turning the proxy's own answers into replies a gRPC client
can read.

A gRPC client reads the outcome of a call from C{grpc-status} and
C{grpc-message} (in trailers, or in the headers of a "trailers-only"
response); an HTTP 503 with a text body is, to it, a protocol error.  So
when the proxy answers a gRPC request itself it sends HTTP 200,
C{content-type: application/grpc}, the gRPC status and message, and no
body -- as Envoy does.

Status choice follows gRPC's U{HTTP to gRPC status mapping
<https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md>}
for every local reply (so "no healthy upstream", connect failures and
circuit-breaker overflow, all 503, are C{UNAVAILABLE}; no route, 404, is
C{UNIMPLEMENTED}), except timeouts: a reply flagged C{UT} (route timeout,
per-try timeout or the client's C{grpc-timeout}) is C{DEADLINE_EXCEEDED},
not the C{UNAVAILABLE} that 504 maps to.  Envoy long used the plain mapping
(envoyproxy/envoy#10184) and now sends C{DEADLINE_EXCEEDED} for router
timeouts on gRPC requests (envoyproxy/envoy#44479): C{UNAVAILABLE} tells
clients to retry a call whose deadline has already passed.

Also here: the gRPC length-prefixed message framing and the two messages
of C{grpc.health.v1.Health/Check}, encoded by hand (no protobuf runtime),
for active health checks.
"""

from __future__ import annotations

from collections.abc import Iterable

from txmesh.proxy.stream import Headers, RequestHead, ResponseFlag

GRPC_CONTENT_TYPE = b"application/grpc"

# gRPC status codes (grpc/include/grpc/impl/codegen/status.h).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
UNAUTHENTICATED = 16

_HTTP_TO_GRPC = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}

# grpc-timeout units, in seconds.
_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def is_grpc(head: RequestHead) -> bool:
    """
    @return: whether C{head} is a gRPC request: its content type is
        C{application/grpc} or C{application/grpc+<codec>} (C{+proto},
        C{+json}, ...), possibly with parameters.
    """
    ctype = head.headers.get(b"content-type")
    if ctype is None or len(ctype) < 16:
        return False
    ctype = ctype.lower()
    if not ctype.startswith(GRPC_CONTENT_TYPE):
        return False
    rest = ctype[16:]
    return not rest or rest[:1] in (b"+", b";")


def parse_grpc_timeout(value: bytes | None) -> float | None:
    """
    Read a C{grpc-timeout} header: at most 8 ASCII digits and a unit
    (C{H}ours, C{M}inutes, C{S}econds, C{m}illi-, C{u}micro-, C{n}anoseconds).

    @return: the timeout in seconds, or C{None} when C{value} is absent or
        malformed (a malformed deadline is ignored, as gRPC servers do).
    """
    if not value or len(value) < 2 or len(value) > 9:
        return None
    digits = value[:-1]
    unit = _TIMEOUT_UNITS.get(value[-1])
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def format_grpc_timeout(seconds: float) -> bytes:
    """
    @return: a C{grpc-timeout} value for C{seconds}, in the coarsest unit
        that keeps millisecond precision within 8 digits.
    """
    ms = max(0, int(round(seconds * 1000)))
    if ms < 10 ** 8:
        return str(ms).encode("ascii") + b"m"
    s = min(ms // 1000, 10 ** 8 - 1)
    return str(s).encode("ascii") + b"S"


def http_to_grpc_status(status: int) -> int:
    """
    @return: the gRPC status for an HTTP status, per gRPC's mapping
        (C{UNKNOWN} for anything it does not name).
    """
    return _HTTP_TO_GRPC.get(status, UNKNOWN)


def local_reply_grpc_status(status: int, flag: str) -> int:
    """
    @return: the gRPC status of a proxy-generated reply with HTTP status
        C{status} and response flag C{flag}: C{DEADLINE_EXCEEDED} for
        timeouts (C{UT}), else L{http_to_grpc_status}.
    """
    if flag == ResponseFlag.UPSTREAM_TIMEOUT:
        return DEADLINE_EXCEEDED
    return http_to_grpc_status(status)


_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def encode_grpc_message(message: str | bytes) -> bytes:
    """
    Percent-encode a C{grpc-message} value: UTF-8, then every byte outside
    printable ASCII (0x20-0x7E), and C{%} itself, as C{%XX}.
    """
    data = message.encode("utf-8") if isinstance(message, str) else message
    if all(b in _UNRESERVED for b in data):
        return data
    return b"".join(bytes((b,)) if b in _UNRESERVED else b"%%%02X" % b for b in data)


def decode_grpc_message(value: bytes) -> str:
    """
    Undo L{encode_grpc_message}; malformed escapes are kept as they are.
    """
    out = bytearray()
    i = 0
    n = len(value)
    while i < n:
        b = value[i]
        if b == 0x25 and i + 2 < n and _is_hex(value[i + 1:i + 3]):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def trailers_only_headers(grpc_status: int, message: bytes | str = b"") -> list[tuple[bytes, bytes]]:
    """
    @return: the headers of a gRPC "trailers-only" response (to send with
        HTTP status 200 and no body): content type, C{grpc-status} and,
        when C{message} is not empty, the percent-encoded C{grpc-message}.
    """
    items = [(b"content-type", GRPC_CONTENT_TYPE), (b"grpc-status", str(grpc_status).encode("ascii"))]
    # Local reply bodies end with a newline for curl's sake; a status
    # message does not need it.
    message = message.rstrip()
    if message:
        items.append((b"grpc-message", encode_grpc_message(message)))
    return items


def has_grpc_status(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """
    @return: whether C{headers} (lower-case names) already carry a
        C{grpc-status}.
    """
    return any(n == b"grpc-status" for n, _ in headers)


def grpc_status_of(headers: Headers | None) -> int | None:
    """
    @return: the numeric C{grpc-status} in C{headers}, or C{None}.
    """
    if headers is None:
        return None
    value = headers.get(b"grpc-status")
    if value is None or not value.isdigit():
        return None
    return int(value)


# Length-prefixed messages: 1 byte compressed flag, 4 bytes big-endian length.

def frame_message(payload: bytes, compressed: bool = False) -> bytes:
    """
    @return: C{payload} framed as one gRPC message.
    """
    return bytes((1 if compressed else 0,)) + len(payload).to_bytes(4, "big") + payload


def unframe_messages(data: bytes) -> tuple[list[bytes], bytes]:
    """
    Split framed gRPC messages off the front of C{data}.

    @return: the complete (uncompressed) payloads and the unconsumed tail.
    @raise ValueError: for a compressed message (the proxy does not
        decompress).
    """
    messages = []
    while len(data) >= 5:
        size = int.from_bytes(data[1:5], "big")
        if len(data) < 5 + size:
            break
        if data[0]:
            raise ValueError("compressed gRPC message")
        messages.append(data[5:5 + size])
        data = data[5 + size:]
    return messages, data


# grpc.health.v1

HEALTH_CHECK_PATH = b"/grpc.health.v1.Health/Check"

HEALTH_UNKNOWN = 0
HEALTH_SERVING = 1
HEALTH_NOT_SERVING = 2
HEALTH_SERVICE_UNKNOWN = 3


def health_check_request(service: str = "") -> bytes:
    """
    @return: a serialized C{grpc.health.v1.HealthCheckRequest} (field 1,
        C{service}; empty asks about the server as a whole), unframed.
    """
    name = service.encode("utf-8")
    if not name:
        return b""
    return b"\x0a" + _varint(len(name)) + name


def parse_health_check_response(payload: bytes) -> int:
    """
    @return: the C{status} (field 1, an enum) of a serialized
        C{grpc.health.v1.HealthCheckResponse}; C{HEALTH_UNKNOWN} when absent.
    @raise ValueError: when C{payload} is not a valid protobuf message.
    """
    status = HEALTH_UNKNOWN
    i = 0
    n = len(payload)
    while i < n:
        key, i = _read_varint(payload, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(payload, i)
            if field == 1:
                status = value
        elif wire == 1:
            i += 8
        elif wire == 2:
            size, i = _read_varint(payload, i)
            i += size
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
    return status


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated protobuf varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i
