"""
The C{access_log} filter: one line per request, in Envoy's default text
format or Istio's JSON, to standard output or a file.

Listener config (every field optional)::

    http_filters:
      - name: access_log
        config:
          format: text          # or json
          path: "-"             # standard output, or a file to append to
          filter: {errors_only: true}   # or {status: {min: 400}}, {flags: [UO, UT]}

The line is written when the stream is over (C{stream_complete}), whatever
ended it: a response, a local reply, a reset, the client going away.  The
filter reads what the stream knows then (status, flags, byte counts,
upstream) and what the request looked like when it arrived (method, path,
authority, headers), before any filter or route rewrite changed it.  Put it
first in C{http_filters} so that it also sees the requests earlier filters
answer; it is built for every request whatever its position, and it writes
the line from C{stream_complete}, which runs for every filter that was built.

For L4 (C{protocol: tcp}) listeners, L{TCPAccessLog} formats the
L{txmesh.proxy.tcp.TCPConnectionStats} the TCP proxy reports when a
connection closes (C{TCPProxyFactory(on_connection_closed=...)}).  It is not
a network filter: a network filter's C{connection_closed} hook gets no stats
(flags, byte counts, timing), so a filter could not tell a C{UH} from a C{UF}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from txmesh.config.errors import FilterConfigError
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory
from txmesh.observability.access_log import (
    FORMATS,
    AccessRecord,
    LogFilter,
    LogFilterError,
    TCPAccessRecord,
)
from txmesh.observability.log_writer import STDOUT, LogWriter, LogWriters

__all__ = [
    "AccessLogConfig",
    "AccessLogFactory",
    "AccessLogFilter",
    "TRACE_KEYS",
    "TCPAccessLog",
    "address_text",
    "tcp_record",
    "trace_id_of",
]

_FIELDS = ("format", "path", "filter")

log = Logger()


@attrs.frozen
class AccessLogConfig:
    """
    The parsed config of the C{access_log} filter.

    @ivar writer: where lines go.
    @ivar format: C{text} or C{json}.
    @ivar filter: which records are written; C{None} for all.
    """

    writer: LogWriter
    format: str = "text"
    filter: LogFilter | None = None

    def emit(self, record: AccessRecord | TCPAccessRecord) -> None:
        """
        Write C{record} if the filter lets it through.  Never raises.
        """
        if self.filter is not None and not self.filter.matches(record):
            return
        self.writer.write_line(FORMATS[self.format](record))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def address_text(address: Any) -> str | None:
    """
    @param address: an L{twisted.internet.interfaces.IAddress}, or C{None}.
    @return: C{host:port} (C{[host]:port} for IPv6), a UNIX socket's path,
        or C{None}.
    """
    if address is None:
        return None
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return _text(name)
    return str(address)


TRACE_KEYS = ("trace", "tracing.context")
"""
The C{stream.metadata} keys a tracing filter may leave its context under,
in the order they are tried.
"""


def trace_id_of(metadata: Any) -> str | None:
    """
    Find the trace id a tracing filter left in C{metadata["trace"]} (or
    C{metadata["tracing.context"]}): an object with a C{trace_id}
    attribute, or a mapping with a C{trace_id} key.  An integer id is
    written as 32 hex digits (W3C trace context).

    @return: the id as text, or C{None} when there is none.
    """
    if not isinstance(metadata, Mapping):
        return None
    trace = next((metadata[k] for k in TRACE_KEYS if metadata.get(k) is not None), None)
    if trace is None:
        return None
    if isinstance(trace, Mapping):
        value = trace.get("trace_id")
    else:
        value = getattr(trace, "trace_id", None)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return f"{value:032x}"
    return _text(value) or None


def _protocol(version: bytes | None) -> str | None:
    if not version:
        return None
    return "HTTP/2" if version == b"2" else "HTTP/" + version.decode("latin-1")


def _header(headers: Any, name: bytes) -> str | None:
    values = headers.get_all(name) if headers is not None else []
    if not values:
        return None
    return ",".join(v.decode("latin-1") for v in values)


@attrs.frozen
class _RequestSnapshot:
    """
    The request as it arrived, before filters or the router change it.
    """

    method: str | None = None
    path: str | None = None
    protocol: str | None = None
    authority: str | None = None
    x_forwarded_for: str | None = None
    user_agent: str | None = None


def _snapshot(head: Any) -> _RequestSnapshot:
    if head is None:
        return _RequestSnapshot()
    headers = head.headers
    return _RequestSnapshot(
        method=_text(head.method),
        path=_text(head.path),
        protocol=_protocol(head.version),
        authority=_text(head.authority or headers.get(b"host")) or None,
        x_forwarded_for=_header(headers, b"x-forwarded-for"),
        user_agent=_header(headers, b"user-agent"),
    )


def _duration_ms(seconds: float) -> int:
    # Truncated, as Envoy's %DURATION%; the epsilon absorbs float error
    # (0.3 s computed as 0.29999... would otherwise log 299).
    return max(0, int(seconds * 1000 + 1e-6))


class AccessLogFilter(HTTPFilter):
    """
    One stream's access log line, written when the stream is over.
    """

    def __init__(self, config: AccessLogConfig, stream: Any):
        self._config = config
        self._stream = stream
        # The chain builds every filter before the first hook runs, so the
        # head here is the request as the client sent it.
        self._request = _snapshot(getattr(stream, "request_head", None))

    def record(self) -> AccessRecord:
        """
        @return: the stream's record, as it stands now.
        """
        stream = self._stream
        request = self._request
        response_head = getattr(stream, "response_head", None)
        # The chain sets response_head when the head goes downstream: no
        # head means the client got no response (Envoy's code 0).
        code = response_head.status if response_head is not None else 0
        route = stream.route
        upstream = stream.upstream_host
        metadata = stream.metadata
        details = metadata.get("connection_termination_details") if metadata else None
        return AccessRecord(
            start_time=stream.start_time,
            method=request.method,
            path=request.path,
            protocol=request.protocol,
            response_code=code,
            response_flags=tuple(stream.response_flags),
            bytes_received=getattr(stream, "bytes_received", 0),
            bytes_sent=getattr(stream, "bytes_sent", 0),
            duration_ms=_duration_ms(stream.clock.seconds() - stream.start_time),
            upstream_service_time=_header(response_head.headers, b"x-envoy-upstream-service-time")
            if response_head is not None else None,
            x_forwarded_for=request.x_forwarded_for,
            user_agent=request.user_agent,
            request_id=_text(stream.request_id),
            authority=request.authority,
            upstream_host=str(upstream) if upstream is not None else None,
            upstream_cluster=stream.upstream_cluster,
            downstream_remote_address=address_text(stream.downstream_address),
            downstream_peer_principal=stream.downstream_principal,
            route_name=getattr(route, "name", None) or None,
            trace_id=trace_id_of(metadata),
            connection_termination_details=details if isinstance(details, str) else None,
        )

    def stream_complete(self) -> None:
        try:
            record = self.record()
        except Exception:  # noqa: BLE001 (a log line must never fail a stream)
            log.failure("access log: could not build the record of {request_id}",
                        request_id=_text(getattr(self._stream, "request_id", None)))
            return
        self._config.emit(record)


def tcp_record(stats: Any, upstream_cluster: str | None = None) -> TCPAccessRecord:
    """
    @param stats: a L{txmesh.proxy.tcp.TCPConnectionStats}.
    @param upstream_cluster: the listener's cluster.
    @return: the connection's access log record.
    """
    endpoint = stats.upstream_endpoint
    return TCPAccessRecord(
        start_time=stats.start_time,
        duration_ms=_duration_ms(stats.duration),
        bytes_received=stats.bytes_received,
        bytes_sent=stats.bytes_sent,
        response_flags=tuple(stats.response_flags),
        upstream_host=str(endpoint) if endpoint is not None else None,
        upstream_cluster=upstream_cluster,
        downstream_remote_address=address_text(stats.downstream_address),
        route_name=stats.listener_name,
    )


class TCPAccessLog:
    """
    An access log for a TCP listener: pass it as
    C{TCPProxyFactory(on_connection_closed=...)} and it writes one line per
    closed connection.
    """

    def __init__(self, config: AccessLogConfig, upstream_cluster: str | None = None):
        """
        @param config: parsed by L{AccessLogFactory.parse_config}.
        @param upstream_cluster: the listener's cluster, for the record.
        """
        self._config = config
        self._cluster = upstream_cluster

    def __call__(self, stats: Any) -> None:
        """
        Write the line for one closed connection.  Never raises.
        """
        try:
            record = tcp_record(stats, self._cluster)
        except Exception:  # noqa: BLE001 (a log line must never fail a connection)
            log.failure("access log: could not build a TCP connection record")
            return
        self._config.emit(record)


@implementer(IHTTPFilterFactory)
class AccessLogFactory:
    """
    The C{access_log} filter: one Envoy- or Istio-style line per request.
    """

    name = "access_log"

    def __init__(self, writers: LogWriters | None = None) -> None:
        """
        @param writers: the writers, one per path, shared by every config
            this factory parses (a reload must not reopen the file).
        """
        self.writers = writers if writers is not None else LogWriters()

    def parse_config(self, raw: Mapping[str, Any]) -> AccessLogConfig:
        """
        @param raw: optional C{format} (C{text}, the default, or C{json}),
            C{path} (a file, or C{"-"}, the default, for standard output) and
            C{filter} (see L{LogFilter.from_config}).
        @raise FilterConfigError: naming the offending field.
        """
        for key in raw:
            if key not in _FIELDS:
                raise FilterConfigError(str(key), f"unknown field (expected one of: {', '.join(_FIELDS)})")
        fmt = raw.get("format", "text")
        if fmt not in FORMATS:
            raise FilterConfigError("format", f"expected text or json, got {fmt!r}")
        path = raw.get("path", STDOUT)
        if not isinstance(path, str) or not path:
            raise FilterConfigError("path", "expected a file name, or '-' for standard output")
        try:
            log_filter = LogFilter.from_config(raw.get("filter"))
        except LogFilterError as e:
            field = f"filter.{e.field}" if e.field else "filter"
            raise FilterConfigError(field, e.reason) from None
        try:
            writer = self.writers.get(path)
        except OSError as e:
            raise FilterConfigError("path", f"cannot open {path}: {e.strerror}") from None
        return AccessLogConfig(writer, fmt, log_filter)

    def create_filter(self, config: AccessLogConfig | None, stream: Any) -> AccessLogFilter | HTTPFilter:
        if config is None:
            return HTTPFilter()
        return AccessLogFilter(config, stream)
