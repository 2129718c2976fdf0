"""
The C{tracing} filter: distributed tracing as Envoy's Zipkin tracer does it
in an Istio mesh.

For each request the filter:

  1. reads the incoming trace context (W3C C{traceparent}, else the single
     C{b3} header, else the C{x-b3-*} headers; invalid ones are ignored,
     see L{txmesh.observability.trace_context});
  2. decides sampling, parent-based: a parent's decision (or B3 debug) is
     kept; without one, C{sampling} percent of requests are sampled;
  3. starts a span: the incoming trace id (or a new one), a new span id, the
     incoming span id as parent;
  4. rewrites the propagation headers so the next hop is a child of this
     span (every stale propagation header is removed first) and makes sure
     C{x-request-id} goes along;
  5. when the stream completes, if sampled, hands a Zipkin v2 span to the
     collector's L{ZipkinReporter}, which sends it in the background.

A C{SERVER} span is recorded on the inbound listener (the request arriving
at this workload), a C{CLIENT} span elsewhere (the workload calling out).

Config (every field optional)::

    http_filters:
      - name: tracing
        config:
          kind: server            # or client; default: server on the listener named "inbound"
          sampling: 1.0           # percent of new traces sampled (Istio's default is 1%)
          collector: http://zipkin:9411/api/v2/spans   # none: propagate only, report nothing
          service_name: reviews   # default: the node's workload
          propagate: [w3c, b3]    # w3c, b3 (x-b3-* headers), b3-single
          max_queue: 1000         # spans held for the collector at most
          batch_size: 100         # spans per POST at most
          flush_interval: 1s      # how long a span waits at most for its batch
          timeout: 5s             # bound on one POST
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from zope.interface import implementer

from txmesh.config.durations import parse_duration
from txmesh.config.errors import FilterConfigError
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory
from txmesh.observability.trace_context import (
    B3_MULTI,
    FORMATS,
    W3C,
    TraceContext,
    extract,
    inject,
    new_span_id,
    new_trace_id,
)
from txmesh.observability.zipkin import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_QUEUE,
    DEFAULT_TIMEOUT,
    ReporterSettings,
    ZipkinReporter,
)
from txmesh.proxy.stream import RequestHead, ResponseHead

SERVER = "server"
CLIENT = "client"

INBOUND_LISTENER = "inbound"
"""
The listener whose spans default to C{SERVER}.
"""

DEFAULT_SAMPLING = 1.0
"""
Percent of new traces sampled by default: Istio's default.
"""

METADATA_KEY = "tracing.context"
"""
The key of C{stream.metadata} the filter leaves this stream's span context
under (a L{TraceContext}), for access logs and later filters.
"""

MAX_TAG_LENGTH = 256
"""
Tag values (C{http.url}, C{user_agent}) are cut to this many characters.
"""

_REQUEST_ID = b"x-request-id"
_FIELDS = (
    "kind", "sampling", "collector", "service_name", "propagate",
    "max_queue", "batch_size", "flush_interval", "timeout",
)


@attrs.frozen
class TracingConfig:
    """
    The parsed config of the C{tracing} filter.

    @ivar kind: L{SERVER}, L{CLIENT}, or C{None} for "by listener".
    @ivar sampling: percent (0..100) of traces without a parent decision
        that are sampled.
    @ivar collector: the Zipkin v2 URL spans are POSTed to, or C{None} to
        propagate context without reporting.
    @ivar service_name: the local endpoint's service name, or C{None} for
        the node's workload.
    @ivar propagate: the formats written for the next hop.
    @ivar reporter: the collector queue's bounds.
    """

    kind: str | None = None
    sampling: float = DEFAULT_SAMPLING
    collector: str | None = None
    service_name: str | None = None
    propagate: tuple[str, ...] = (W3C, B3_MULTI)
    reporter: ReporterSettings = ReporterSettings()


class TracingFilter(HTTPFilter):
    """
    One stream's span.
    """

    _span: TraceContext | None = None
    _head: RequestHead | None = None
    _status = 0

    def __init__(self, config: TracingConfig | None, stream: Any, factory: TracingFactory):
        self._config = config
        self._stream = stream
        self._factory = factory

    @property
    def span(self) -> TraceContext | None:
        """
        @return: this stream's span context, once the request head was seen.
        """
        return self._span

    def request_headers(self, head: RequestHead, end_stream: bool) -> Any:
        config = self._config
        if config is None:
            return None
        stream = self._stream
        factory = self._factory
        incoming = extract(head.headers)
        if incoming is not None and incoming.debug:
            sampled = True
        elif incoming is not None and incoming.sampled is not None:
            sampled = incoming.sampled
        else:
            sampled = _chance(factory.sampling_rng(stream), config.sampling)
        rng = factory.rng
        if incoming is not None and incoming.has_ids:
            span = TraceContext(
                incoming.trace_id, new_span_id(rng), incoming.span_id,
                sampled=sampled, debug=incoming.debug, tracestate=incoming.tracestate,
            )
        else:
            span = TraceContext(
                new_trace_id(rng), new_span_id(rng),
                sampled=sampled, debug=incoming is not None and incoming.debug,
            )
        inject(head.headers, span, config.propagate)
        if _REQUEST_ID not in head.headers and stream.request_id:
            # The proxy always sets one; keep the trace and the access logs
            # joined even behind a filter that removed it.
            head.headers.set(_REQUEST_ID, stream.request_id)
        self._span = span
        self._head = head
        stream.metadata[METADATA_KEY] = span
        return None

    def response_headers(self, head: ResponseHead, end_stream: bool) -> Any:
        self._status = head.status
        return None

    def stream_complete(self) -> None:
        span, config = self._span, self._config
        if span is None or config is None or config.collector is None:
            return
        if not (span.sampled or span.debug):
            return
        stream = self._stream
        reporter = self._factory.reporter(config.collector, config.reporter, stream.clock)
        reporter.report(self.zipkin_span())

    def zipkin_span(self) -> dict[str, Any]:
        """
        @return: this stream's span in the Zipkin v2 JSON model.
        """
        span = self._span
        assert span is not None
        config = self._config
        assert config is not None
        stream = self._stream
        head = self._head
        assert head is not None
        node = stream.proxy.node if stream.proxy is not None else None
        kind = config.kind or (SERVER if stream.listener_name == INBOUND_LISTENER else CLIENT)
        status = self._status
        if not status:
            response = getattr(stream, "response_head", None)
            status = response.status if response is not None else 0
        start = stream.start_time
        # Microseconds, as Zipkin wants; a duration under 1us is rounded up.
        timestamp = int(round(start * 1_000_000))
        duration = max(1, int(round((stream.clock.seconds() - start) * 1_000_000)))
        authority = _text(head.authority)
        flags = list(stream.response_flags)
        tags = {
            "component": "proxy",
            "http.method": _text(head.method),
            "http.url": _cut(f"{_text(head.scheme)}://{authority}{_text(head.path_only)}"),
            "http.protocol": "HTTP/2" if head.version == b"2" else f"HTTP/{_text(head.version)}",
            "http.status_code": str(status),
            "response_flags": ",".join(flags) if flags else "-",
            "upstream_cluster": stream.upstream_cluster or "-",
            "guid:x-request-id": _text(head.headers.get(_REQUEST_ID) or stream.request_id or b""),
        }
        if node is not None:
            tags["node_id"] = node.id
        user_agent = head.headers.get(b"user-agent")
        if user_agent:
            tags["user_agent"] = _cut(_text(user_agent))
        upstream = stream.upstream_host
        if upstream is not None:
            tags["upstream_host"] = str(upstream)
        peer = stream.downstream_address
        peer_host = getattr(peer, "host", None)
        if peer_host:
            tags["peer.address"] = str(peer_host)
        if status >= 500 or status == 0:
            # Envoy's rule: a 5xx, or no response at all (reset, failure).
            tags["error"] = "true"
        service = config.service_name or (node.workload if node is not None else "unknown")
        local: dict[str, Any] = {"serviceName": service}
        if kind == SERVER:
            port = getattr(stream, "downstream_port", None)
            if port:
                local["port"] = port
            remote = _endpoint(peer_host, getattr(peer, "port", None))
        else:
            remote = _endpoint(getattr(upstream, "host", None), getattr(upstream, "port", None))
            if stream.upstream_cluster:
                remote["serviceName"] = stream.upstream_cluster
        result: dict[str, Any] = {
            "traceId": span.trace_id,
            "id": span.span_id,
            "kind": kind.upper(),
            "name": _cut(f"{authority}/*").lower(),
            "timestamp": timestamp,
            "duration": duration,
            "localEndpoint": local,
            "tags": tags,
        }
        if span.parent_id is not None:
            result["parentId"] = span.parent_id
        if remote:
            result["remoteEndpoint"] = remote
        if span.debug:
            result["debug"] = True
        return result


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _cut(value: str) -> str:
    return value[:MAX_TAG_LENGTH]


def _endpoint(host: Any, port: Any) -> dict[str, Any]:
    """
    @return: a Zipkin endpoint for an address: C{ipv4} or C{ipv6} for an IP
        literal (a host name has no field of its own), and C{port}.
    """
    endpoint: dict[str, Any] = {}
    if host:
        try:
            address = ipaddress.ip_address(str(host))
        except ValueError:
            pass
        else:
            endpoint["ipv4" if address.version == 4 else "ipv6"] = str(address)
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        endpoint["port"] = port
    return endpoint


def _chance(rng: Any, percent: float) -> bool:
    """
    @return: true with probability C{percent}/100 (never for 0, always for 100).
    """
    return percent >= 100 or (percent > 0 and rng.random() * 100.0 < percent)


@implementer(IHTTPFilterFactory)
class TracingFactory:
    """
    The C{tracing} filter: propagate trace context and report spans to
    Zipkin.

    The factory owns the reporters (one L{ZipkinReporter} per collector
    URL), so queued spans and counters survive config reloads.

    @ivar rng: where new trace and span ids come from (and sampling coins
        when the stream's proxy has no C{rng}).
    @ivar reporters: the collector URL's reporter, for each URL used so far
        (for metrics: each has C{dropped}, C{sent}, C{failures}...).
    """

    name = "tracing"

    def __init__(self, rng: random.Random | None = None, client: Any = None, reactor: Any = None, clock: Any = None):
        """
        @param rng: ids and default sampling coins; by default a generator
            seeded from C{os.urandom}.
        @param client: a treq-like client for the reporters (tests pass
            L{treq.testing.StubTreq}).
        @param reactor: what the default client connects with (by default
            the stream's clock when it is a reactor, else the global one).
        @param clock: what reporter timers run on (by default the first
            sampled stream's clock).
        """
        self.rng = rng if rng is not None else random.Random(os.urandom(32))
        self._client = client
        self._reactor = reactor
        self._clock = clock
        self.reporters: dict[str, ZipkinReporter] = {}

    def parse_config(self, raw: Mapping[str, Any]) -> TracingConfig:
        """
        @param raw: see the module docstring; every field is optional.
        @raise FilterConfigError: naming the offending field.
        """
        if not isinstance(raw, Mapping):
            raise FilterConfigError("", "expected a mapping")
        for key in raw:
            if key not in _FIELDS:
                raise FilterConfigError(str(key), f"unknown field (expected one of: {', '.join(_FIELDS)})")
        kind = raw.get("kind")
        if kind is not None and kind not in (SERVER, CLIENT):
            raise FilterConfigError("kind", f"expected server or client, got {kind!r}")
        sampling = raw.get("sampling", DEFAULT_SAMPLING)
        if isinstance(sampling, bool) or not isinstance(sampling, (int, float)) or not math.isfinite(sampling):
            raise FilterConfigError("sampling", f"must be a number of percent, got {sampling!r}")
        if not 0 <= sampling <= 100:
            raise FilterConfigError("sampling", f"must be between 0 and 100, got {sampling}")
        collector = raw.get("collector")
        if collector is not None and (
            not isinstance(collector, str) or not collector.startswith(("http://", "https://"))
        ):
            raise FilterConfigError("collector", f"expected an http:// or https:// URL, got {collector!r}")
        service_name = raw.get("service_name")
        if service_name is not None and (not isinstance(service_name, str) or not service_name):
            raise FilterConfigError("service_name", f"expected a non-empty string, got {service_name!r}")
        propagate = raw.get("propagate", [W3C, B3_MULTI])
        if not isinstance(propagate, list) or not propagate:
            raise FilterConfigError("propagate", f"expected a non-empty list of: {', '.join(FORMATS)}")
        for name in propagate:
            if name not in FORMATS:
                raise FilterConfigError("propagate", f"unknown format {name!r} (expected: {', '.join(FORMATS)})")
        max_queue = _integer(raw, "max_queue", DEFAULT_MAX_QUEUE)
        batch_size = _integer(raw, "batch_size", min(DEFAULT_BATCH_SIZE, max_queue))
        if batch_size > max_queue:
            raise FilterConfigError("batch_size", f"must not exceed max_queue ({max_queue}), got {batch_size}")
        settings = ReporterSettings(
            max_queue=max_queue,
            batch_size=batch_size,
            flush_interval=_duration(raw, "flush_interval", DEFAULT_FLUSH_INTERVAL),
            timeout=_duration(raw, "timeout", DEFAULT_TIMEOUT),
        )
        return TracingConfig(
            kind=kind, sampling=float(sampling), collector=collector, service_name=service_name,
            propagate=tuple(dict.fromkeys(propagate)), reporter=settings,
        )

    def create_filter(self, config: TracingConfig | None, stream: Any) -> TracingFilter:
        return TracingFilter(config, stream, self)

    def sampling_rng(self, stream: Any) -> Any:
        """
        @return: the stream's proxy's C{rng}, or the factory's.
        """
        proxy = stream.proxy
        rng = proxy.rng if proxy is not None else None
        return rng if rng is not None else self.rng

    def reporter(self, url: str, settings: ReporterSettings, clock: Any) -> ZipkinReporter:
        """
        @return: the reporter for C{url}, made on first use; a reload that
            changed the bounds updates them in place.
        """
        reporter = self.reporters.get(url)
        if reporter is None:
            timer = self._clock if self._clock is not None else clock
            reporter = ZipkinReporter(
                url, timer, settings, client=self._client, reactor=self._connect_reactor(timer),
            )
            self.reporters[url] = reporter
        elif reporter.settings is not settings and reporter.settings != settings:
            reporter.settings = settings
        return reporter

    def _connect_reactor(self, clock: Any) -> Any:
        if self._reactor is not None or self._client is not None:
            return self._reactor
        from twisted.internet.interfaces import IReactorTCP

        # None: the reporter falls back to the global reactor.
        return clock if IReactorTCP.providedBy(clock) else None

    def metric_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        """
        @return: each reporter's counters, for the proxy's metrics:
            C{txmesh_tracing_spans_dropped_total} (the queue was full, or
            the spans were in a failed POST),
            C{txmesh_tracing_spans_sent_total} and
            C{txmesh_tracing_report_failures_total}, by collector.
        """
        out = []
        for url, reporter in sorted(self.reporters.items()):
            labels = {"collector": url}
            out += [
                ("txmesh_tracing_spans_dropped",
                 "Spans the collector will never get: the report queue was full, or their report failed.",
                 labels, reporter.spans_dropped),
                ("txmesh_tracing_spans_sent", "Spans the collector accepted.", labels, reporter.sent),
                ("txmesh_tracing_report_failures", "Reports that failed (error, timeout or non-2xx).", labels,
                 reporter.failures),
            ]
        return out

    def stop(self) -> Deferred:
        """
        Stop every reporter (queued spans are dropped).

        @return: a L{Deferred} that fires once the reporters' idle
            connections are closed.
        """
        closing = [reporter.stop() for reporter in self.reporters.values()]
        return gatherResults([d for d in closing if d is not None]).addCallback(lambda _: None)


def _integer(raw: Mapping[str, Any], field: str, default: int) -> int:
    value = raw.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FilterConfigError(field, f"must be a positive integer, got {value!r}")
    return value


def _duration(raw: Mapping[str, Any], field: str, default: float) -> float:
    if raw.get(field) is None:
        return default
    try:
        value = parse_duration(raw[field])
    except ValueError as e:
        raise FilterConfigError(field, str(e)) from None
    if value <= 0:
        raise FilterConfigError(field, "must be greater than zero")
    return value
