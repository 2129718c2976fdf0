"""
CPU cost of txmesh's HTTP/1.1 request path, without sockets.

Drives the real downstream protocol, filter chain (metrics + router), pool
and upstream protocol over in-memory transports, and the bare httptools
proxy's parsing and framing the same way, and prints microseconds and
Python function calls per request for each, and their ratio.  Unlike wrk
runs it is not disturbed by other load on the machine: use it to see what a
change to the hot path costs.

    python benchmarks/http1_cpu.py [--requests N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httptools  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.epollreactor import EPollReactor  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from txmesh.config.loader import ConfigLoader  # noqa: E402
from txmesh.config.model import NodeConfig  # noqa: E402
from txmesh.filters.registry import FilterRegistry  # noqa: E402
from txmesh.filters.router import RouterFactory  # noqa: E402
from txmesh.filters.tracing import TracingFactory  # noqa: E402
from txmesh.observability.metrics import MetricsFactory, ProxyMetrics  # noqa: E402
from txmesh.proxy.cluster import ClusterManager  # noqa: E402
from txmesh.proxy.connection_manager import HTTPConnectionManager, ProxyContext  # noqa: E402
from txmesh.proxy.deadlines import DeadlineWheel  # noqa: E402
from txmesh.proxy.http1_client import HTTP1ClientConnection  # noqa: E402
from txmesh.proxy.http1_server import HTTP1ServerFactory  # noqa: E402

CONFIG = b"""
listeners:
  - name: http
    address: "tcp:0"
    http_filters: [{name: metrics}%(tracing)s]
    virtual_hosts:
      - name: bench
        domains: ["*"]
        routes:
          - {name: health, match: {path: /healthz}, direct_response: {status: 200, body: ok}}
          - {name: v2, match: {prefix: /, headers: [{name: x-version, exact: v2}]}, cluster: app}
          - {name: default, match: {prefix: /}, cluster: app}
clusters:
  - name: app
    endpoints: ["127.0.0.1:1"]
"""

REQUEST = b"GET /foo HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
BODY = b"x" * 100
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 14:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + BODY)


def config_with(tracing: bool) -> bytes:
    """
    @return: L{CONFIG}, with the C{tracing} filter (propagation, 1% sampled,
        no collector: the benchmarks' production chain) when C{tracing}.
    """
    return CONFIG % {b"tracing": b", {name: tracing, config: {kind: client}}" if tracing else b""}


def txmesh_path(config: bytes | None = None, node: NodeConfig | None = None, request: bytes = REQUEST,
                response: bytes = RESPONSE) -> callable:
    """
    @param config: the proxy config (one HTTP listener, cluster C{app});
        by default L{config_with}C{(False)}.
    @param node: the proxy's node.
    @return: a function that runs one request through txmesh in memory;
        its C{first} attribute holds what went upstream and to the client
        in a first exchange made before returning.
    """
    config = config_with(False) if config is None else config
    node = node or NodeConfig()
    # An uninstalled, unstarted reactor: real callLater and seconds().
    clock = EPollReactor()
    registry = FilterRegistry(http=[RouterFactory(), MetricsFactory(), TracingFactory()])
    loaded = ConfigLoader(registry).load_bytes(config)
    clusters = ClusterManager(clock).update(loaded.clusters)
    proxy = ProxyContext(node, clock, ProxyMetrics(node), deadlines=DeadlineWheel(clock))
    factory = HTTP1ServerFactory(HTTPConnectionManager(loaded.listeners[0], clusters, proxy))
    server = factory.buildProtocol(None)
    down = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    server.makeConnection(down)
    pool = clusters.get("app").pools()[0]
    upstream = HTTP1ClientConnection(pool, pool.endpoint)
    up = StringTransport()
    upstream.makeConnection(up)
    pool.connections += 1
    pool.release(upstream)

    def one() -> None:
        server.dataReceived(request)
        upstream.dataReceived(response)
        down.clear()
        up.clear()

    # The first request, kept: it shows what the exchange did.
    server.dataReceived(request)
    upstream.dataReceived(response)
    one.first = (up.value(), down.value())
    down.clear()
    up.clear()
    return one


class _Bare:
    """
    The bare proxy's per-request work (benchmarks/bare_proxy.py): parse the
    request, frame it upstream, parse the response, frame it downstream.
    """

    def __init__(self) -> None:
        self.req = httptools.HttpRequestParser(self)
        self.resp = httptools.HttpResponseParser(self)
        self.out: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_begin(self) -> None:
        self.headers: list = []
        self.body: list = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_headers_complete(self) -> None:
        pass

    def on_status(self, status: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        hop = {b"connection", b"keep-alive", b"content-length", b"transfer-encoding"}
        body = b"".join(self.body)
        lines = [b"%s: %s\r\n" % (n, v) for n, v in self.headers if n.lower() not in hop]
        self.out.append(b"".join([b"X 200 OK\r\n"] + lines + [b"content-length: %d\r\n\r\n" % len(body), body]))


def bare_path() -> callable:
    bare = _Bare()

    def one() -> None:
        bare.req.feed_data(REQUEST)
        bare.resp.feed_data(RESPONSE)
        bare.out.clear()

    return one


def measure(one: callable, n: int) -> tuple[float, float]:
    """
    @return: CPU microseconds and Python function calls per request.
    """
    for _ in range(min(n, 2000)):
        one()
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(n):
            one()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(1000):
        one()
    prof.disable()
    calls = sum(v[1] for v in pstats.Stats(prof).stats.values()) / 1000
    return best, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true", help="print the top functions of the txmesh path")
    parser.add_argument("--tracing", action="store_true",
                        help="add the tracing filter (propagation, 1%% sampled), as benchmarks/http1.py runs it")
    args = parser.parse_args()
    config = config_with(args.tracing)
    tx_us, tx_calls = measure(txmesh_path(config), args.requests)
    bare_us, bare_calls = measure(bare_path(), args.requests)
    print(f"per request, in memory, best of 5 x {args.requests}:")
    chain = "metrics + tracing + router" if args.tracing else "metrics + router"
    print(f"  txmesh  {tx_us:7.2f} us  {tx_calls:6.1f} calls  ({chain}, 3 routes)")
    print(f"  bare    {bare_us:7.2f} us  {bare_calls:6.1f} calls  (parse + frame only)")
    print(f"  ratio   {tx_us / bare_us:7.2f}x cpu   {tx_calls / bare_calls:5.1f}x calls")
    if args.profile:
        one = txmesh_path(config)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5000):
            one()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
