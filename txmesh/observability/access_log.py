"""
Access log records and their two formats: Envoy's default text line and
Istio's JSON object.  Pure code: no clock, no IO.  The C{access_log} filter
(L{txmesh.filters.access_log}) builds the records and a
L{txmesh.observability.log_writer.LogWriter} writes the lines.

An HTTP request, in the text format (Envoy's default format string)::

    [2026-11-25T17:06:08.123Z] "GET /api/items?page=2 HTTP/1.1" 200 - 0 1234 12 - "10.0.0.7" "curl/8.5.0"
    "5f0c1d2e-..." "web.example.com" "10.0.1.4:8080"

(one line), and in the JSON format (Istio's field names; missing values are
C{null}, numbers are numbers, C{response_flags} is C{"-"} when there is none)::

    {"authority":"web.example.com","bytes_received":0,"bytes_sent":1234,...,"upstream_host":"10.0.1.4:8080"}

An L4 connection (L{TCPAccessRecord}) has the same line with C{"- - -"} in
place of the request line and C{0} as the response code, as Envoy logs a
C{tcp_proxy} connection with the default format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from txmesh.observability.audit import iso8601

__all__ = [
    "FORMATS",
    "KNOWN_FLAGS",
    "MAX_PATH_LENGTH",
    "AccessRecord",
    "LogFilter",
    "LogFilterError",
    "TCPAccessRecord",
    "fields",
    "format_json",
    "format_line",
    "format_text",
]

MAX_PATH_LENGTH = 2048
"""
Longest path (with its query) a line carries; a longer one is cut here and
ends in C{...}, so a hostile client cannot make one line arbitrarily long.
"""

KNOWN_FLAGS = frozenset({
    "UH", "UF", "UO", "NR", "URX", "UT", "DC", "UC", "UPE", "DPE", "LR", "RBACD", "SI", "DI", "FI",
})
"""
The response flags txmesh sets (see docs/proxy.md), which a L{LogFilter} may name.
"""

# Control characters (and DEL) would let a header value forge a second line
# or fool a terminal; Envoy's defaults never meet them because its codecs
# refuse them, but filters can set anything.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(value: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def _cap_path(path: str | None, limit: int = MAX_PATH_LENGTH) -> str | None:
    if path is None or len(path) <= limit:
        return path
    return path[: limit - 3] + "..."


@attrs.frozen
class AccessRecord:
    """
    What the access log says about one HTTP request.

    Everything is plain data; C{None} means "not known" and is written as
    C{-} (text) or C{null} (JSON), as Envoy does for unset values.

    @ivar start_time: when the request head arrived, in seconds since the
        epoch (from the stream's clock).
    @ivar method: e.g. C{GET}.
    @ivar path: the request target as the client sent it (path and
        query), before any rewrite.
    @ivar protocol: C{HTTP/1.0}, C{HTTP/1.1} or C{HTTP/2}.
    @ivar response_code: the status sent downstream, C{0} if no response
        head was sent (the client left first, or the stream was reset).
    @ivar response_flags: Envoy-style flags, in the order they were set.
    @ivar bytes_received: request body bytes read from the client.
    @ivar bytes_sent: response body bytes sent to the client.
    @ivar duration_ms: milliseconds from the request head to the end of the
        stream.
    @ivar upstream_service_time: the upstream's C{x-envoy-upstream-service-time}
        response header (milliseconds, as text), when it sent one.
    @ivar x_forwarded_for: the request's C{x-forwarded-for}, this proxy's
        hop included.
    @ivar user_agent: the request's C{user-agent}.
    @ivar request_id: the stream's C{x-request-id}.
    @ivar authority: the request's C{:authority} (C{Host}).
    @ivar upstream_host: the endpoint the request went to, C{host:port}.
    @ivar upstream_cluster: the cluster the router chose.
    @ivar downstream_remote_address: the client's C{host:port}.
    @ivar downstream_peer_principal: the client's verified SPIFFE ID (mutual
        TLS).
    @ivar route_name: the name of the matched route.
    @ivar trace_id: the trace the request belongs to, when a tracing filter
        left one in the stream's metadata.
    @ivar connection_termination_details: why the connection ended, when
        something said so.
    """

    start_time: float
    method: str | None = None
    path: str | None = None
    protocol: str | None = None
    response_code: int = 0
    response_flags: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    bytes_received: int = 0
    bytes_sent: int = 0
    duration_ms: int = 0
    upstream_service_time: str | None = None
    x_forwarded_for: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    authority: str | None = None
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    downstream_remote_address: str | None = None
    downstream_peer_principal: str | None = None
    route_name: str | None = None
    trace_id: str | None = None
    connection_termination_details: str | None = None


@attrs.frozen
class TCPAccessRecord:
    """
    What the access log says about one L4 (C{protocol: tcp}) connection.

    @ivar start_time: when the downstream connection was accepted, in
        seconds since the epoch.
    @ivar duration_ms: milliseconds until both sides were closed.
    @ivar bytes_received: bytes read from the client.
    @ivar bytes_sent: bytes written to the client.
    @ivar response_flags: C{UH}, C{UF}, C{DC}, C{SI}, or none for an
        ordinary close.
    @ivar upstream_host: the chosen endpoint, C{host:port}.
    @ivar upstream_cluster: the listener's cluster.
    @ivar downstream_remote_address: the client's C{host:port}.
    @ivar route_name: the listener's name (a TCP listener has no routes).
    @ivar connection_termination_details: why the connection ended, when
        something said so.
    """

    start_time: float
    duration_ms: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    response_flags: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    downstream_remote_address: str | None = None
    route_name: str | None = None
    connection_termination_details: str | None = None


def _flags(flags: Iterable[str]) -> str:
    return ",".join(flags) or "-"


def fields(record: AccessRecord | TCPAccessRecord) -> dict[str, Any]:
    """
    @return: the record's values under Istio's JSON field names, in
        alphabetical order (as Envoy's JSON formatter writes them); C{None}
        for unknown values.
    """
    if isinstance(record, TCPAccessRecord):
        values: dict[str, Any] = {
            "authority": None,
            "bytes_received": record.bytes_received,
            "bytes_sent": record.bytes_sent,
            "connection_termination_details": record.connection_termination_details,
            "downstream_peer_principal": None,
            "downstream_remote_address": record.downstream_remote_address,
            "duration": record.duration_ms,
            "method": None,
            "path": None,
            "protocol": None,
            "request_id": None,
            "response_code": 0,
            "response_flags": _flags(record.response_flags),
            "route_name": record.route_name,
            "start_time": iso8601(record.start_time),
            "trace_id": None,
            "upstream_cluster": record.upstream_cluster,
            "upstream_host": record.upstream_host,
            "upstream_service_time": None,
            "user_agent": None,
            "x_forwarded_for": None,
        }
        return values
    return {
        "authority": record.authority,
        "bytes_received": record.bytes_received,
        "bytes_sent": record.bytes_sent,
        "connection_termination_details": record.connection_termination_details,
        "downstream_peer_principal": record.downstream_peer_principal,
        "downstream_remote_address": record.downstream_remote_address,
        "duration": record.duration_ms,
        "method": record.method,
        "path": _cap_path(record.path),
        "protocol": record.protocol,
        "request_id": record.request_id,
        "response_code": record.response_code,
        "response_flags": _flags(record.response_flags),
        "route_name": record.route_name,
        "start_time": iso8601(record.start_time),
        "trace_id": record.trace_id,
        "upstream_cluster": record.upstream_cluster,
        "upstream_host": record.upstream_host,
        "upstream_service_time": record.upstream_service_time,
        "user_agent": record.user_agent,
        "x_forwarded_for": record.x_forwarded_for,
    }


def _text(value: Any) -> str:
    # Envoy writes "-" for every unset or empty value.
    if value is None or value == "":
        return "-"
    return _escape(str(value))


def format_text(record: AccessRecord | TCPAccessRecord) -> str:
    """
    Format a record as Envoy's default access log format::

        [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
        %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
        %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
        "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"

    @return: one line, with its C{\\n}.
    """
    f = fields(record)
    return (
        f"[{f['start_time']}] \"{_text(f['method'])} {_text(f['path'])} {_text(f['protocol'])}\" "
        f"{f['response_code']} {_text(f['response_flags'])} {f['bytes_received']} {f['bytes_sent']} "
        f"{f['duration']} {_text(f['upstream_service_time'])} \"{_text(f['x_forwarded_for'])}\" "
        f"\"{_text(f['user_agent'])}\" \"{_text(f['request_id'])}\" \"{_text(f['authority'])}\" "
        f"\"{_text(f['upstream_host'])}\"\n"
    )


def format_json(record: AccessRecord | TCPAccessRecord) -> str:
    """
    Format a record as a JSON object with Istio's field names (see
    L{fields}), on one line.

    @return: one line, with its C{\\n}.
    """
    return json.dumps(fields(record), separators=(",", ":"), ensure_ascii=True) + "\n"


FORMATS = {"text": format_text, "json": format_json}
"""
The formats by the name config uses.
"""


def format_line(record: AccessRecord | TCPAccessRecord, fmt: str = "text") -> str:
    """
    @param fmt: C{text} or C{json}.
    @return: the record in that format.
    @raise ValueError: for an unknown format.
    """
    try:
        return FORMATS[fmt](record)
    except KeyError:
        raise ValueError(f"unknown access log format {fmt!r} (expected text or json)") from None


class LogFilterError(ValueError):
    """
    A filter section is invalid.

    @ivar field: the offending field, relative to the filter section
        (e.g. C{status.min}).
    @ivar reason: what is wrong with it.
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


_FILTER_FIELDS = ("status", "flags", "errors_only")


def _status(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 999:
        raise LogFilterError(field, f"expected a status code 100..999, got {value!r}")
    return value


@attrs.frozen
class LogFilter:
    """
    Which records get written.  Every condition given must hold; an empty
    filter passes everything.

    @ivar status_min: the response code must be at least this.
    @ivar status_max: the response code must be at most this.
    @ivar flags: the record must carry at least one of these flags.
    @ivar errors_only: the record must be an error: a response code of 400
        or more, or any flag (for a TCP connection: any flag).
    """

    status_min: int | None = None
    status_max: int | None = None
    flags: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    errors_only: bool = False

    def matches(self, record: AccessRecord | TCPAccessRecord) -> bool:
        """
        @return: whether C{record} should be written.
        """
        code = record.response_code if isinstance(record, AccessRecord) else 0
        if self.status_min is not None and code < self.status_min:
            return False
        if self.status_max is not None and code > self.status_max:
            return False
        if self.flags and not self.flags.intersection(record.response_flags):
            return False
        if self.errors_only and not (code >= 400 or record.response_flags):
            return False
        return True

    @classmethod
    def from_config(cls, raw: Any) -> LogFilter | None:
        """
        Read a C{filter} section::

            {status: {min: 400, max: 599}, flags: [UO, UT], errors_only: true}

        @return: the filter, or C{None} for no section (write everything).
        @raise LogFilterError: naming the offending field.
        """
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise LogFilterError("", "expected a mapping like {status: {min: 400}}, {flags: [UO]} "
                                     "or {errors_only: true}")
        for key in raw:
            if key not in _FILTER_FIELDS:
                raise LogFilterError(str(key), f"unknown field (expected one of: {', '.join(_FILTER_FIELDS)})")
        status_min = status_max = None
        status = raw.get("status")
        if status is not None:
            if not isinstance(status, Mapping):
                raise LogFilterError("status", "expected a mapping like {min: 400, max: 599}")
            for key in status:
                if key not in ("min", "max"):
                    raise LogFilterError(f"status.{key}", "unknown field (expected: min, max)")
            status_min = _status(status.get("min"), "status.min")
            status_max = _status(status.get("max"), "status.max")
            if status_min is not None and status_max is not None and status_min > status_max:
                raise LogFilterError("status", f"min ({status_min}) is greater than max ({status_max})")
        flags = raw.get("flags")
        if flags is None:
            flags = []
        if isinstance(flags, str) or not isinstance(flags, list):
            raise LogFilterError("flags", "expected a list of response flags, like [UO, UT]")
        for i, flag in enumerate(flags):
            if flag not in KNOWN_FLAGS:
                raise LogFilterError(f"flags[{i}]", f"unknown response flag {flag!r} "
                                                    f"(expected one of: {', '.join(sorted(KNOWN_FLAGS))})")
        errors_only = raw.get("errors_only", False)
        if not isinstance(errors_only, bool):
            raise LogFilterError("errors_only", f"expected true or false, got {errors_only!r}")
        return cls(status_min, status_max, frozenset(flags), errors_only)
