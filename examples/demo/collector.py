"""
The demo mesh's trace collector: a tiny stand-in for Zipkin, on
C{twisted.web}, that keeps the spans the sidecars report in memory.

It speaks the part of Zipkin's v2 HTTP API the demo needs, so the same
commands work against a real Zipkin, Jaeger or OpenTelemetry Collector:

  - C{POST /api/v2/spans}: a JSON array of spans (what the sidecars'
    C{tracing} filter sends); answered C{202};
  - C{GET /api/v2/trace/TRACEID}: the spans of one trace, oldest first
    (C{404} if it has none);
  - C{GET /api/v2/traces?limit=N}: the latest N traces (default 10), each a
    list of spans, newest trace first;
  - C{GET /api/v2/services}: the service names seen.

Answers are indented JSON with sorted keys, one field per line, so C{grep}
picks out what a person wants to see.  At most L{MAX_SPANS} spans are kept
(the oldest are forgotten first).  It knows nothing about txmesh.

Run::

    python examples/demo/collector.py --port 15809
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import OrderedDict
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import Site

MAX_SPANS = 10_000
MAX_BODY = 4 * 1024 * 1024
TRACE_ID = re.compile(r"^[0-9a-f]{16}([0-9a-f]{16})?$")


class SpanStore:
    """
    Spans by trace id, in arrival order, with a bound on how many are kept.
    """

    def __init__(self, max_spans: int = MAX_SPANS):
        self.max_spans = max_spans
        self.traces: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.count = 0

    def add(self, span: dict[str, Any]) -> None:
        trace_id = span["traceId"].rjust(32, "0")
        spans = self.traces.pop(trace_id, [])
        spans.append(span)
        self.traces[trace_id] = spans  # most recently reported last
        self.count += 1
        while self.count > self.max_spans:
            _, oldest = self.traces.popitem(last=False)
            self.count -= len(oldest)

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        spans = self.traces.get(trace_id.rjust(32, "0"), [])
        return sorted(spans, key=lambda s: s.get("timestamp", 0))

    def latest(self, limit: int) -> list[list[dict[str, Any]]]:
        return [self.trace(t) for t in list(reversed(self.traces))[:limit]]

    def services(self) -> list[str]:
        return sorted({s.get("localEndpoint", {}).get("serviceName", "")
                       for spans in self.traces.values() for s in spans} - {""})


def _json(request: Any, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def _valid_span(span: Any) -> bool:
    return (isinstance(span, dict) and isinstance(span.get("traceId"), str) and TRACE_ID.match(span["traceId"])
            is not None and isinstance(span.get("id"), str))


class ZipkinAPI(Resource):
    isLeaf = True

    def __init__(self, store: SpanStore):
        super().__init__()
        self.store = store

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 (twisted.web's naming)
        if request.path != b"/api/v2/spans":
            return _json(request, {"error": "POST spans to /api/v2/spans"}, 404)
        body = request.content.read(MAX_BODY + 1)
        try:
            spans = json.loads(body)
        except ValueError:
            spans = None
        if len(body) > MAX_BODY or not isinstance(spans, list) or not all(_valid_span(s) for s in spans):
            return _json(request, {"error": "expected a JSON array of Zipkin v2 spans"}, 400)
        for span in spans:
            self.store.add(span)
        request.setResponseCode(202)
        return b""

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (twisted.web's naming)
        path = request.path.decode("latin-1")
        if path.startswith("/api/v2/trace/"):
            trace_id = path[len("/api/v2/trace/"):].lower()
            spans = self.store.trace(trace_id) if TRACE_ID.match(trace_id) else []
            return _json(request, spans) if spans else _json(request, {"error": f"no trace {trace_id}"}, 404)
        if path == "/api/v2/traces":
            try:
                limit = int(request.args.get(b"limit", [b"10"])[0])
            except ValueError:
                limit = 10
            return _json(request, self.store.latest(max(0, limit)))
        if path == "/api/v2/services":
            return _json(request, self.store.services())
        return _json(request, {"error": "see /api/v2/traces, /api/v2/trace/TRACEID, /api/v2/services"}, 404)


class QuietSite(Site):
    noisy = False

    def log(self, request: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    args = parser.parse_args(argv)
    status = []

    def listening(port: Any) -> None:
        print(f"collector (Zipkin v2 API) listening on 127.0.0.1:{port.getHost().port}", flush=True)

    def failed(failure: Any) -> None:
        print(f"collector: cannot listen on 127.0.0.1:{args.port}: {failure.value}", file=sys.stderr, flush=True)
        status.append(1)
        reactor.stop()

    endpoint = TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1")
    site = QuietSite(ZipkinAPI(SpanStore()))
    reactor.callWhenRunning(lambda: endpoint.listen(site).addCallbacks(listening, failed))
    reactor.run()
    sys.exit(status[0] if status else 0)


if __name__ == "__main__":
    main()
