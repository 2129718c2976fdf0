#!/usr/bin/env python3
"""
HTTP/2 (h2c) proxy benchmark: txmesh-proxy against nginx in the same run.

Targets, each on 127.0.0.1 and random free ports, in temporary prefixes:

  direct      nginx "app", h2c prior knowledge, 100-byte body   taskset -c 1
  nginx       nginx h2c reverse proxy -> the app's HTTP/1.1      taskset -c 0
              listener (nginx cannot proxy upstream over HTTP/2)
  txmesh-2to2 txmesh-proxy, h2c downstream, cluster http2: true  taskset -c 0
              -> the app's h2c listener
  txmesh-2to1 the same txmesh-proxy, second listener, HTTP/1.1    taskset -c 0
              cluster -> the app's HTTP/1.1 listener

Load: h2load -t1 -c10 -m10 (taskset -c 1, with the app), --runs rounds with
the first target rotating, medians and ratios measured in this run. A
measurement, not a test: it always exits 0. Helpers come from http1.py.

    .venv/bin/python benchmarks/http2.py            # 3 runs x 5 s
    .venv/bin/python benchmarks/http2.py --quick    # 1 run x 2 s, smoke test
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http1 import (  # noqa: E402
    LOAD_CPU,
    NGINX,
    PAYLOAD,
    PROXY_CPU,
    ROOT,
    VENV_BIN,
    Proc,
    Unavailable,
    _version,
    fmt,
    free_port,
    harness,
    http_get,
    last_lines,
    med,
    pin,
    pinning_available,
    port_open,
    start_nginx,
    write_result,
)

H2LOAD = shutil.which("h2load") or "/usr/bin/h2load"
CURL = shutil.which("curl") or "/usr/bin/curl"

NGINX_APP_H2 = """\
    server {{
        listen 127.0.0.1:{h2_port} http2 backlog=4096;
        http2_max_concurrent_streams 128;
        location / {{ return 200 "{payload}"; }}
    }}
    server {{
        listen 127.0.0.1:{h1_port} backlog=4096;
        location / {{ return 200 "{payload}"; }}
    }}"""

# nginx speaks HTTP/2 downstream only: its proxy module talks HTTP/1.x upstream.
NGINX_PROXY_H2 = """\
    upstream app {{
        server 127.0.0.1:{app_port};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        http2_max_concurrent_streams 128;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""

TXMESH_H2_CONFIG = """\
node: {{id: bench, workload: bench, namespace: default, app: bench, version: v1}}
admin:
  address: "tcp:{admin_port}:interface=127.0.0.1"
listeners:
  - name: to-h2
    address: "tcp:{port_h2}:interface=127.0.0.1"
    protocol: http
    http_filters:
{filters}
    routes: [{{match: {{prefix: /}}, cluster: app-h2}}]
  - name: to-h1
    address: "tcp:{port_h1}:interface=127.0.0.1"
    protocol: http
    http_filters:
{filters}
    routes: [{{match: {{prefix: /}}, cluster: app-h1}}]
clusters:
  - {{name: app-h2, http2: true, endpoints: ["127.0.0.1:{app_h2}"]}}
  - {{name: app-h1, endpoints: ["127.0.0.1:{app_h1}"]}}
"""


def start_txmesh_h2(tmp: Path, app_h2: int, app_h1: int, metrics: bool, pinning: bool, timeout: float,
                    reactor: str) -> tuple[Proc, int, int]:
    """One txmesh-proxy, two listeners (-> h2c cluster, -> HTTP/1.1 cluster). Returns (proc, port_h2, port_h1)."""
    twistd = VENV_BIN / "twistd"
    if not twistd.exists():
        raise Unavailable(f"{twistd} not found")
    port_h2, port_h1, admin_port = free_port(), free_port(), free_port()
    filters = ("      - name: metrics\n" if metrics else "") + "      - name: router"
    conf = tmp / "txmesh-h2.yaml"
    conf.write_text(TXMESH_H2_CONFIG.format(admin_port=admin_port, port_h2=port_h2, port_h1=port_h1,
                                            app_h2=app_h2, app_h1=app_h1, filters=filters))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    argv = pin(PROXY_CPU, [str(twistd), "-n", "--pidfile=", "-r", reactor, "txmesh-proxy", "--config", str(conf)],
               pinning)
    proc = Proc("txmesh", argv, conf.with_suffix(".log"), cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise Unavailable(f"txmesh-proxy exited with {proc.popen.returncode}: {last_lines(proc.output(), 2)}")
        try:
            status, _ = http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5)
            if status == 200 and port_open(port_h2) and port_open(port_h1):
                return proc, port_h2, port_h1
        except OSError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise Unavailable(f"not ready within {timeout:.0f}s: {last_lines(proc.output())}")


def sanity_check_h2(name: str, url: str) -> None:
    """One h2c prior-knowledge request with curl: HTTP/2, 200, the exact payload."""
    p = subprocess.run([CURL, "-s", "--http2-prior-knowledge", "-m", "5", "-w", "\n%{http_version} %{http_code}",
                        url], check=False, capture_output=True, timeout=15)
    body, _, tail = p.stdout.rpartition(b"\n")
    if p.returncode != 0 or tail != b"2 200" or body != PAYLOAD:
        raise Unavailable(f"sanity check of {name}: curl rc {p.returncode}, got {tail.decode(errors='replace')!r} "
                          f"body {body[:60]!r} ({len(body)} bytes); expected HTTP/2 200 and the 100-byte payload")


# -- h2load -------------------------------------------------------------------

UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * UNITS_US[m.group(2)]


def parse_h2load(out: str) -> dict:
    res: dict = {"rps": None, "requests": None, "succeeded": None, "failed": None, "errored": None,
                 "timeout": None, "status_2xx": None, "non2xx": None, "mean_us": None, "sd_us": None}
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if m:
        res["requests"], res["succeeded"], res["failed"], res["errored"], res["timeout"] = map(int, m.groups())
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        res["status_2xx"] = int(m.group(1))
        res["non2xx"] = sum(int(x) for x in m.groups()[1:])
    m = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)\s+(\S+)", out)
    if m:
        try:
            res["mean_us"], res["sd_us"] = _us(m.group(1)), _us(m.group(2))
        except ValueError:
            pass
    return res


def run_h2load(url: str, clients: int, streams: int, duration: int, requests: int | None, pinning: bool) -> dict:
    load = ["-n", str(requests)] if requests else ["-D", str(duration)]
    argv = pin(LOAD_CPU, [H2LOAD, "-t1", f"-c{clients}", f"-m{streams}", *load, url], pinning)
    p = subprocess.run(argv, check=False, capture_output=True, text=True,
                       timeout=(duration if not requests else 60) + 60)
    res = parse_h2load(p.stdout)
    if p.returncode != 0 or res["rps"] is None:
        raise RuntimeError(f"h2load failed ({p.returncode}): {last_lines(p.stderr or p.stdout)}")
    if not res["succeeded"]:
        raise RuntimeError(f"h2load: no request succeeded: {last_lines(p.stdout, 6)}")
    if "h2c" not in p.stdout:
        raise RuntimeError(f"h2load did not negotiate h2c: {last_lines(p.stdout, 6)}")
    return res


# -- main ---------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="HTTP/2 (h2c) proxy benchmark: txmesh vs nginx, same run, ratios.")
    ap.add_argument("--runs", type=int, default=3, help="rounds, targets interleaved in each (default 3)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per h2load run, -D (default 5)")
    ap.add_argument("-n", "--requests", type=int, default=None,
                    help="h2load -n N per run instead of -D duration")
    ap.add_argument("--clients", type=int, default=10, help="h2load -c (default 10)")
    ap.add_argument("--streams", type=int, default=10, help="h2load -m, concurrent streams per connection (default 10)")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded load per target first (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 run of 2 s each")
    ap.add_argument("--no-txmesh", action="store_true", help="skip txmesh-proxy")
    ap.add_argument("--no-metrics", action="store_true", help="leave the metrics filter out of the txmesh config")
    ap.add_argument("--reactor", default="txmesh", help="twistd reactor for txmesh-proxy (default txmesh)")
    ap.add_argument("--txmesh-timeout", type=float, default=20.0, help="seconds to wait for txmesh /ready")
    ap.add_argument("--no-pin", action="store_true", help="do not use taskset")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "http2-latest.json",
                    help="where to write JSON results (default benchmarks/results/http2-latest.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.duration = 1, 2
    if args.runs < 1 or args.duration < 1:
        ap.error("--runs and --duration must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for tool in (NGINX, H2LOAD, CURL) + (() if args.no_pin else ("taskset",)):
        if not shutil.which(tool):
            sys.exit(f"http2.py: {tool} not found")
    pinning = pinning_available(not args.no_pin)
    return harness("http2", args, pinning, run)


def run(args, pinning: bool, tmp: Path, procs: list) -> int:
    started = datetime.datetime.now(datetime.timezone.utc)
    notes = ["nginx proxies upstream over HTTP/1.1 only (proxy_pass http://app, keepalive 64): "
             "its row is h2c downstream -> HTTP/1.1 upstream, i.e. 2->1"]
    status: dict[str, str] = {}

    app_h2, app_h1 = free_port(), free_port()
    procs.append(start_nginx("app", tmp, LOAD_CPU,
                             NGINX_APP_H2.format(h2_port=app_h2, h1_port=app_h1, payload=PAYLOAD.decode()),
                             app_h2, pinning))
    nginx_port = free_port()
    nginx_proc = start_nginx("nginx", tmp, PROXY_CPU, NGINX_PROXY_H2.format(port=nginx_port, app_port=app_h1),
                             nginx_port, pinning)
    procs.append(nginx_proc)

    targets: dict[str, tuple[str, Proc | None]] = {
        "direct": (f"http://127.0.0.1:{app_h2}/", None),
        "nginx": (f"http://127.0.0.1:{nginx_port}/", nginx_proc),
    }
    for name in list(targets):
        sanity_check_h2(name, targets[name][0])
        status[name] = "ok"

    if args.no_txmesh:
        status["txmesh"] = "skipped (--no-txmesh)"
    else:
        try:
            proc, p2, p1 = start_txmesh_h2(tmp, app_h2, app_h1, not args.no_metrics, pinning,
                                           args.txmesh_timeout, args.reactor)
            procs.append(proc)
            for name, port in (("txmesh-2to2", p2), ("txmesh-2to1", p1)):
                url = f"http://127.0.0.1:{port}/"
                try:
                    sanity_check_h2(name, url)
                    targets[name] = (url, proc)
                    status[name] = "ok"
                except Unavailable as e:
                    status[name] = f"unavailable ({e})"
                print(f"{name}: {status[name]}")
        except Unavailable as e:
            status["txmesh"] = f"unavailable ({e})"
            print(f"txmesh: {status['txmesh']}")

    names = list(targets)
    load = f"-n {args.requests}" if args.requests else f"-D {args.duration}"
    print(f"targets: {', '.join(names)}; {args.runs} run(s) of h2load -t1 -c{args.clients} -m{args.streams} {load}; "
          f"pinning {'proxies CPU ' + PROXY_CPU + ', app+h2load CPU ' + LOAD_CPU if pinning else 'off'}")

    def drop(name: str, why: str) -> None:
        if name in ("direct", "nginx"):
            raise RuntimeError(f"{name}: {why}")
        status[name] = why
        print(f"  {name}: FAILED: {why}")
        del targets[name]
        names.remove(name)

    if args.warmup:
        for name in list(names):
            try:
                run_h2load(targets[name][0], args.clients, args.streams, args.warmup, None, pinning)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                drop(name, f"failed during warm-up ({e})")

    raw: dict[str, list] = {n: [] for n in names}
    for rnd in range(args.runs):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in order:
            url, proc = targets[name]
            try:
                cpu0, t0 = (proc.cpu_seconds() if proc else 0.0), time.monotonic()
                r = run_h2load(url, args.clients, args.streams, args.duration, args.requests, pinning)
                if proc is not None:
                    r["proxy_cpu"] = (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                    r["proxy_rss_mb"] = proc.rss_mb()
                    if not proc.alive():
                        raise RuntimeError(f"died under load: {last_lines(proc.output())}")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                drop(name, f"failed during load ({e})")
                del raw[name]
                continue
            raw[name].append(r)
            errs = (r["failed"] or 0) + (r["errored"] or 0) + (r["timeout"] or 0) + (r["non2xx"] or 0)
            print(f"  run {rnd + 1}/{args.runs} {name:12s} {r['rps']:>10,.0f} req/s"
                  + (f"   ERRORS {errs}" if errs else ""))

    summary: dict[str, dict] = {}
    for name in names:
        rs = raw[name]
        summary[name] = {
            "rps": med([r["rps"] for r in rs]),
            "rps_runs": [r["rps"] for r in rs],
            "mean_us": med([r["mean_us"] for r in rs]),
            "errors": sum((r["failed"] or 0) + (r["errored"] or 0) + (r["timeout"] or 0) + (r["non2xx"] or 0)
                          for r in rs),
            "proxy_cpu": med([r.get("proxy_cpu") for r in rs]),
            "proxy_rss_mb": max([r["proxy_rss_mb"] for r in rs if "proxy_rss_mb" in r], default=None),
        }

    def ratio(a: str, b: str) -> float | None:
        if a in summary and b in summary and summary[a]["rps"] and summary[b]["rps"]:
            return summary[a]["rps"] / summary[b]["rps"]
        return None

    ratios = {
        "txmesh-2to2/nginx": ratio("txmesh-2to2", "nginx"),
        "txmesh-2to1/nginx": ratio("txmesh-2to1", "nginx"),
        "txmesh-2to2/direct": ratio("txmesh-2to2", "direct"),
        "txmesh-2to1/direct": ratio("txmesh-2to1", "direct"),
        "nginx/direct": ratio("nginx", "direct"),
    }

    print()
    print(f"HTTP/2 h2c, {len(PAYLOAD)}-byte responses, h2load -t1 -c{args.clients} -m{args.streams} {load}, "
          f"median of {args.runs}")
    hdr = (f"{'target':12s} {'req/s':>10s} {'min..max':>17s} {'mean req':>9s} {'proxy CPU':>9s} "
           f"{'RSS MB':>7s} {'errors':>6s}")
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        s = summary[name]
        rng = f"{min(s['rps_runs']):,.0f}..{max(s['rps_runs']):,.0f}"
        print(f"{name:12s} {fmt(s['rps']):>10s} {rng:>17s} {fmt(s['mean_us']):>7s}us "
              f"{fmt(s['proxy_cpu'], '.2f'):>9s} {fmt(s['proxy_rss_mb'], '.1f'):>7s} {s['errors']:>6d}")
    for name, st in status.items():
        if name not in summary:
            print(f"{name}: {st}")
    print()
    print("ratios (req/s, same run):")
    for key, val in ratios.items():
        print(f"  {key:20s} {fmt(val, '.3f', 'n/a')}")
    for n in notes:
        print(f"note: {n}")
    for name in names:
        if summary[name]["errors"]:
            print(f"note: {name}: {summary[name]['errors']} failed/errored/non-2xx requests: its req/s is suspect")

    result = {
        "benchmark": "http2",
        "started": started.isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "nginx": _version([NGINX, "-v"]), "h2load": _version([H2LOAD, "--version"])},
        "params": {"runs": args.runs, "duration_s": None if args.requests else args.duration,
                   "requests": args.requests, "clients": args.clients, "streams": args.streams,
                   "warmup_s": args.warmup, "pinning": pinning, "payload_bytes": len(PAYLOAD),
                   "proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU, "metrics": not args.no_metrics,
                   "reactor": args.reactor},
        "status": status,
        "summary": summary,
        "ratios": ratios,
        "notes": notes,
        "raw": raw,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
