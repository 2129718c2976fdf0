"""
What the metrics filter costs on the request path.

CPU (default): the in-memory request path of benchmarks/http1_cpu.py (the
real downstream protocol, filter chain, router, pool and upstream protocol
over memory transports), once without the metrics filter and once with it
as each reporter:

  off          router only
  source       metrics as the client's sidecar: adds x-txmesh-peer to the
               request, takes the server's off the response
  no-exchange  metrics as the client's sidecar with peer_metadata: false
               and a peer that sends none: recording only
  destination  metrics as the server's sidecar: takes x-txmesh-peer off the
               request, adds its own to the response

and prints CPU microseconds and Python calls per request, best of 5, and
the ratios to "off".

Throughput (--wrk): benchmarks/http1.py's harness (nginx app on CPU 1,
txmesh-proxy on CPU 0, wrk -t1 -c50 on CPU 1), txmesh with and without the
metrics filter interleaved over --runs rounds; prints median req/s and
their ratio.

    .venv/bin/python benchmarks/metrics_cost.py [--requests N]
    .venv/bin/python benchmarks/metrics_cost.py --wrk [--runs 3 --duration 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import http1_cpu  # noqa: E402

from txmesh.config.model import NodeConfig  # noqa: E402

NODE = NodeConfig(workload="bench-v1", namespace="default", app="bench", version="v1")
PEER = b"x-txmesh-peer: w=peer-v1;n=default;a=peer;v=v1\r\n"

# Each variant: (listener name, http_filters, request, response).
VARIANTS = {
    "off": ("http", "[]", http1_cpu.REQUEST, http1_cpu.RESPONSE),
    "source": ("http", "[{name: metrics}]", http1_cpu.REQUEST,
               http1_cpu.RESPONSE.replace(b"Connection: keep-alive\r\n", b"Connection: keep-alive\r\n" + PEER)),
    "no-exchange": ("http", "[{name: metrics, config: {peer_metadata: false}}]", http1_cpu.REQUEST,
                    http1_cpu.RESPONSE),
    "destination": ("inbound", "[{name: metrics}]",
                    http1_cpu.REQUEST.replace(b"User-Agent: wrk\r\n", b"User-Agent: wrk\r\n" + PEER),
                    http1_cpu.RESPONSE),
}


def path(listener: str, filters: str, request: bytes, response: bytes) -> callable:
    """
    @return: a function running one request through txmesh in memory
        (benchmarks/http1_cpu.py's C{txmesh_path}, with this listener name
        and these filters).
    """
    config_text = http1_cpu.config_with(False).replace(b"name: http\n", b"name: " + listener.encode() + b"\n").replace(
        b"http_filters: [{name: metrics}]", b"http_filters: " + filters.encode())
    return http1_cpu.txmesh_path(config_text, NODE, request, response)


def cpu(args: argparse.Namespace) -> None:
    results = {}
    for name, variant in VARIANTS.items():
        one = path(*variant)
        upstream_got, client_got = one.first
        assert b" 200 OK" in client_got, client_got
        # Source: the header goes upstream; destination: it does not reach
        # the app, and goes back to the client.
        assert (b"x-txmesh-peer" in upstream_got.lower()) == (name == "source"), (name, upstream_got)
        assert (b"x-txmesh-peer" in client_got.lower()) == (name == "destination"), (name, client_got)

        results[name] = http1_cpu.measure(one, args.requests)
    base_us, base_calls = results["off"]
    print(f"per request, in memory, best of 5 x {args.requests}:")
    for name, (us, calls) in results.items():
        print(f"  {name:12s} {us:7.2f} us  {calls:6.1f} calls   x{us / base_us:5.3f} cpu  +{us - base_us:5.2f} us"
              f"  +{calls - base_calls:4.1f} calls")


def wrk(args: argparse.Namespace) -> int:
    import http1

    pinning = http1.pinning_available(True)
    tmp = Path(tempfile.mkdtemp(prefix="txmesh-metrics-cost-"))
    procs: list = []
    try:
        app_port = http1.free_port()
        procs.append(http1.start_nginx("app", tmp, http1.LOAD_CPU,
                                       http1.NGINX_APP.format(port=app_port, payload=http1.PAYLOAD.decode()),
                                       app_port, pinning))
        urls = {}
        for metrics in (False, True):
            sub = tmp / ("on" if metrics else "off")
            sub.mkdir()
            proc, port = http1.start_txmesh(sub, app_port, metrics, pinning, 30.0)
            procs.append(proc)
            urls["on" if metrics else "off"] = f"http://127.0.0.1:{port}/"
        rps: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.runs):
            for name in ("off", "on"):
                # Only one txmesh is loaded at a time; both are pinned to CPU 0.
                rps[name].append(http1.run_wrk(urls[name], 50, args.duration, pinning)["rps"])
        off, on = statistics.median(rps["off"]), statistics.median(rps["on"])
        print(f"wrk -t1 -c50, {args.runs} x {args.duration} s, interleaved, pinning={pinning}:")
        print(f"  metrics off  {off:9,.0f} req/s   runs {[round(r) for r in rps['off']]}")
        print(f"  metrics on   {on:9,.0f} req/s   runs {[round(r) for r in rps['on']]}")
        print(f"  ratio on/off {on / off:9.3f}")
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--wrk", action="store_true", help="measure req/s with wrk instead of CPU in memory")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    if args.wrk:
        return wrk(args)
    cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
