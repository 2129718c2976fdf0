#!/usr/bin/env python3
"""
L4 (TCP) proxy benchmark: a txmesh C{protocol: tcp} listener against nginx
C{stream} and haproxy C{mode tcp}, in the same run.

  direct   the nginx app (100-byte HTTP responses)           taskset -c 1
  nginx    nginx stream { proxy_pass app; }                  taskset -c 0
  haproxy  haproxy mode tcp, one thread                       taskset -c 0
  txmesh   twistd txmesh-proxy, a protocol: tcp listener     taskset -c 0

Load: wrk over the L4 path (HTTP/1.1 keep-alive through a byte relay):
-t1 -c50 for req/s and -c1 for latency, rounds interleaved, medians and
ratios from this run. Helpers come from http1.py. A measurement: it exits 0
when it measured.

    .venv/bin/python benchmarks/l4.py            # 3 runs x 5 s
    .venv/bin/python benchmarks/l4.py --quick    # 1 run x 2 s
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http1 import (  # noqa: E402
    LOAD_CPU,
    NGINX,
    NGINX_APP,
    PAYLOAD,
    PROXY_CPU,
    Unavailable,
    check_tools,
    free_port,
    harness,
    launch_txmesh,
    measure_targets,
    parse_wrk_args,
    print_table,
    rps_ratios,
    run_wrk,
    sanity_check,
    start_haproxy,
    start_nginx,
    write_result,
    wrk_parser,
)
from http1 import _version as version  # noqa: E402
from profiling import print_profile, profile_under_load  # noqa: E402

TARGET_L4_RATIO = 0.6  # txmesh L4 req/s >= 0.6 x nginx stream

NGINX_STREAM = """\
stream {{
    upstream app {{ server 127.0.0.1:{app_port}; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_pass app;
    }}
}}
"""

TXMESH_TCP = """\
node: {{id: bench-l4, workload: bench, namespace: default, app: bench, version: v1}}
admin:
  address: "tcp:{admin_port}:interface=127.0.0.1"
listeners:
  - name: tcp
    address: "tcp:{port}:interface=127.0.0.1"
    protocol: tcp
    cluster: app
clusters:
  - name: app
    endpoints: ["127.0.0.1:{app_port}"]
"""


def parse_args(argv=None):
    return parse_wrk_args(wrk_parser("L4 proxy benchmark: txmesh tcp vs nginx stream vs haproxy tcp.",
                                     "l4-latest.json"), argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return harness("l4", args, check_tools(not args.no_pin), run)


def run(args, pinning: bool, tmp: Path, procs: list) -> int:
    started = datetime.datetime.now(datetime.timezone.utc)
    status: dict[str, str] = {}
    app_port = free_port()
    procs.append(start_nginx("app", tmp, LOAD_CPU, NGINX_APP.format(port=app_port, payload=PAYLOAD.decode()),
                             app_port, pinning))
    targets: dict = {"direct": (f"http://127.0.0.1:{app_port}/", None)}
    status["direct"] = "ok"

    def add(name: str, start) -> None:
        try:
            proc, port = start()
            procs.append(proc)
            url = f"http://127.0.0.1:{port}/"
            sanity_check(name, url)
            targets[name] = (url, proc)
            status[name] = "ok"
        except Unavailable as e:
            status[name] = f"unavailable ({e})"
        print(f"{name}: {status[name]}")

    def nginx_stream():
        port = free_port()
        return start_nginx("nginx", tmp, PROXY_CPU, "", port, pinning,
                           stream=NGINX_STREAM.format(port=port, app_port=app_port)), port

    def txmesh_tcp():
        port, admin_port = free_port(), free_port()
        conf = tmp / "txmesh-tcp.yaml"
        conf.write_text(TXMESH_TCP.format(port=port, admin_port=admin_port, app_port=app_port))
        return launch_txmesh(conf, port, admin_port, pinning, args.txmesh_timeout, args.reactor), port

    add("nginx", nginx_stream)
    if not args.no_haproxy:
        add("haproxy", lambda: start_haproxy("haproxy", tmp, PROXY_CPU, app_port, pinning, mode="tcp"))
    if not args.no_txmesh:
        add("txmesh", txmesh_tcp)

    names, raw, summary = measure_targets(args, pinning, targets, status, required=("direct",))
    pairs = [("txmesh", "nginx"), ("txmesh", "haproxy"), ("txmesh", "direct"), ("nginx", "direct"),
             ("haproxy", "direct")]
    ratios, ratios_c1 = rps_ratios(summary, pairs), rps_ratios(summary, pairs, "c1_rps")
    profile = None
    if args.profile and "txmesh" in targets:
        profile = profile_under_load(targets["txmesh"][1], args.profile, tmp / "txmesh-profile.txt",
                                     lambda: run_wrk(targets["txmesh"][0], args.connections, args.profile, pinning))

    print_table(f"L4 (TCP relay), wrk -t1 -c{args.connections} (req/s) and -c1 (latency) over it, "
                f"median of {args.runs} x {args.duration}s", names, summary, status)
    print()
    print(f"ratios (req/s, same run; c{args.connections} and c1):")
    for key, value in ratios.items():
        print(f"  {key:16s} {'n/a' if value is None else format(value, '.3f')}   "
              f"c1 {'n/a' if ratios_c1[key] is None else format(ratios_c1[key], '.3f')}")
    r = ratios["txmesh/nginx"]
    verdict = "n/a" if r is None else ("PASS" if r >= TARGET_L4_RATIO else "MISS")
    print(f"target: txmesh L4 >= {TARGET_L4_RATIO}x nginx stream req/s: {verdict} "
          f"({'n/a' if r is None else format(r, '.3f')})")
    if profile:
        print_profile("txmesh", profile)

    result = {
        "benchmark": "l4",
        "started": started.isoformat(timespec="seconds"),
        "host": {"nginx": version([NGINX, "-v"])},
        "params": {"runs": args.runs, "duration_s": args.duration, "connections": args.connections,
                   "warmup_s": args.warmup, "pinning": pinning, "proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU},
        "status": status,
        "summary": summary,
        "ratios": ratios,
        "ratios_c1": ratios_c1,
        "verdicts": {"l4_ratio": verdict},
        "profile": profile,
        "raw": raw,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
