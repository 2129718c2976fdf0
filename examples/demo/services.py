"""
The demo mesh's sample applications, on C{twisted.web}.

They know nothing about txmesh ("mesh-agnostic"):

  - C{backend} answers every request with JSON naming its version and the
    request headers it received (so you can see what the sidecars added:
    C{x-request-id}, C{x-forwarded-for}, C{x-forwarded-client-cert},
    C{traceparent}, ...);
  - C{frontend} answers every request by calling the backend by its
    service name (C{http://backend/}) and wraps the backend's answer in its
    own JSON.  The call goes to its own sidecar's outbound listener on
    localhost (C{--connect-to}), which routes it by that name; in
    Kubernetes, Istio's iptables capture does this instead.  Like Istio's sample
    apps, it propagates C{x-request-id} (so one id follows the request
    through every hop), C{x-version} (so a routing header set by the
    caller reaches the sidecar that routes on it) and the trace headers
    (C{traceparent}, C{x-b3-traceid}, C{x-b3-spanid}: so the sidecars'
    spans join one trace).

Run::

    python examples/demo/services.py --role backend --version v1 --port 15801
    python examples/demo/services.py --role frontend --port 15800 \\
        --backend-url http://backend/ --connect-to 127.0.0.1:15811
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

# Twisted's HTTP client hands the body protocol a transport without
# abortConnection; readBody warns about it on every call.
warnings.filterwarnings("ignore", message="Using readBody with a transport", category=DeprecationWarning)

# Headers the frontend copies from its request onto its call to the backend.
PROPAGATED = (b"x-request-id", b"x-version", b"x-b3-traceid", b"x-b3-spanid", b"traceparent")


def _json(request: Any, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def _seen_headers(request: Any) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


class Backend(Resource):
    isLeaf = True

    def __init__(self, version: str):
        super().__init__()
        self.version = version

    def render(self, request: Any) -> bytes:
        return _json(request, {
            "service": "backend",
            "version": self.version,
            "method": request.method.decode("latin-1"),
            "path": request.uri.decode("latin-1"),
            "headers": _seen_headers(request),
        })


@implementer(IAgentEndpointFactory)
class ConnectTo:
    """
    Connect every request to one address, whatever its URL's host: the
    URL's host is still the C{Host} header, which the sidecar routes by.
    """

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:  # noqa: N802 (Twisted's interface)
        return TCP4ClientEndpoint(reactor, self.host, self.port, timeout=5)


class Frontend(Resource):
    isLeaf = True

    def __init__(self, backend_url: str, connect_to: str | None = None):
        super().__init__()
        self.backend_url = backend_url.encode("ascii")
        pool = HTTPConnectionPool(reactor, persistent=True)
        if connect_to is None:
            self.agent = Agent(reactor, pool=pool)
        else:
            host, _, port = connect_to.rpartition(":")
            self.agent = Agent.usingEndpointFactory(reactor, ConnectTo(host, int(port)), pool=pool)

    def render_GET(self, request: Any) -> Any:
        self._call_backend(request)
        return NOT_DONE_YET

    @defer.inlineCallbacks
    def _call_backend(self, request: Any) -> Any:
        headers = Headers({b"user-agent": [b"demo-frontend"]})
        for name in PROPAGATED:
            value = request.getHeader(name)
            if value is not None:
                headers.setRawHeaders(name, [value])
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)
        try:
            response = yield self.agent.request(b"GET", self.backend_url, headers)
            body = yield readBody(response)
            try:
                backend: Any = json.loads(body)
            except ValueError:
                backend = body.decode("utf-8", "replace")
            result = {
                "service": "frontend",
                "request_id": (request.getHeader(b"x-request-id") or b"").decode("latin-1"),
                "backend_status": response.code,
                "backend": backend,
            }
            status = 200 if response.code < 500 else 502
        except Exception as e:  # noqa: BLE001 (any failure is the answer's content)
            result = {"service": "frontend", "error": f"calling {self.backend_url.decode()}: {e}"}
            status = 502
        if not request.finished and not request._disconnected:
            request.write(_json(request, result, status))
            request.finish()


class QuietSite(Site):
    """
    A site that logs one short line per request to stdout.
    """

    noisy = False

    def log(self, request: Any) -> None:
        line = "{} {} {} {} x-request-id={}\n".format(
            self.role, request.method.decode("latin-1"), request.uri.decode("latin-1"), request.code,
            (request.getHeader(b"x-request-id") or b"-").decode("latin-1"))
        sys.stdout.write(line)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("frontend", "backend"), required=True)
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--version", default="v1", help="backend: the version it reports")
    parser.add_argument("--backend-url", default="http://backend/",
                        help="frontend: the backend's URL (by its service name, which the mesh routes by)")
    parser.add_argument("--connect-to", metavar="HOST:PORT", default=None,
                        help="frontend: send the backend calls to this address (its sidecar's outbound "
                             "listener) instead of resolving the URL's host")
    args = parser.parse_args(argv)

    if args.role == "backend":
        resource: Resource = Backend(args.version)
        role = f"backend-{args.version}"
    else:
        resource = Frontend(args.backend_url, args.connect_to)
        role = "frontend"
    site = QuietSite(resource)
    site.role = role

    def listening(port: Any) -> None:
        print(f"{role} listening on 127.0.0.1:{port.getHost().port}", flush=True)

    def failed(failure: Any) -> None:
        print(f"{role}: cannot listen on 127.0.0.1:{args.port}: {failure.value}", file=sys.stderr, flush=True)
        reactor.stop()
        global exit_status
        exit_status = 1

    endpoint = TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: endpoint.listen(site).addCallbacks(listening, failed))
    reactor.run()
    sys.exit(exit_status)


exit_status = 0

if __name__ == "__main__":
    main()
