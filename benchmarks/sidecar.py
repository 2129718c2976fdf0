#!/usr/bin/env python3
"""
Sidecar cost at a fixed request rate: two txmesh sidecars with mutual TLS,
metrics and tracing (client proxy -> server proxy -> app), against the app
directly, at C{--rate} requests per second (default 1,000).

The two sidecars, the pilot that gives them their certificates and the app
are the ones of C{mtls.py} (L{mtls.start_sidecars}): both proxies on CPU 0,
the app and the load generator on CPU 1. Three paths, interleaved per round:

  direct  h2load -> app
  plain   h2load -> client proxy -> server proxy (plaintext hop) -> app
  mtls    h2load -> client proxy =ISTIO_MUTUAL=> server proxy (STRICT) -> app

Load is open-loop at a fixed rate: C{h2load --h1 --rps R/C -c C -m1}, each
of C clients issuing its share of the rate on a timer, the clients started
1/R apart so that the requests arrive evenly (see L{run_fixed_rate}), with C{--log-file}
giving every request's latency (h2load itself prints no percentiles). Its own
overhead is the C{direct} row: the latency it measures with no proxy at all.

Reported per path: p50/p90/p99, added vs direct, achieved rate, and for each
proxy the CPU seconds (utime + stime from /proc/PID/stat) per 1,000 requests
-- which is the vCPU it needs at 1,000 req/s -- and its RSS.

    .venv/bin/python benchmarks/sidecar.py                # 3 rounds x 10 s at 1,000 req/s
    .venv/bin/python benchmarks/sidecar.py --quick        # 1 round x 2 s
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http1 import LOAD_CPU, PROXY_CPU, ROOT, WRK, fmt, harness, last_lines, med, pin, pinning_available, write_result  # noqa: E402
from http1 import NGINX as NGINX_BIN  # noqa: E402
from mtls import start_sidecars  # noqa: E402
from profiling import print_profile, profile_under_load  # noqa: E402

H2LOAD = shutil.which("h2load") or "/usr/bin/h2load"

TARGET_VCPU_PER_1K = 0.10  # per sidecar, at 1,000 req/s (Istio's Envoy: 0.35)
TARGET_RSS_MB = 40.0  # per sidecar (Istio's Envoy: 40 MB)
TARGET_ADDED_P90_US = 1000.0  # two hops with mTLS, at 1,000 req/s (Istio: 2.65 ms)


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of C{values} (C{None} when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def run_fixed_rate(url: str, rate: int, clients: int, duration: int, log: Path, pinning: bool) -> dict:
    """
    Run h2load (HTTP/1.1) at C{rate} req/s for C{duration} s.

    @return: C{{"requests", "rate", "p50_us", "p90_us", "p99_us", "errors"}}.
    """
    # The clients start 1/rate seconds apart (-r 1 --rate-period), so their
    # request timers interleave and the rate arrives evenly. Started together
    # (-D alone), every client fires on the same tick: bursts of C requests
    # that a one-process proxy serves one after another, which measured C/2
    # service times of queueing (+2.6 ms p50 over two hops at 1,000 req/s)
    # rather than the proxies. -r excludes -D, so the length is a count.
    argv = pin(LOAD_CPU, [H2LOAD, "--h1", "-c", str(clients), "-m", "1", "--rps", f"{rate / clients:g}",
                          "-r", "1", "--rate-period", f"{1000.0 / rate:g}ms", "-n", str(rate * duration),
                          "--log-file", str(log), url], pinning)
    p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=duration + 30)
    if p.returncode != 0 or not log.exists():
        raise RuntimeError(f"h2load failed ({p.returncode}): {last_lines(p.stderr or p.stdout)}")
    latencies, errors, starts = [], 0, []
    for line in log.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        start_us, status, elapsed_us = float(fields[0]), int(fields[1]), float(fields[2])
        starts.append(start_us)
        if status == 200:
            latencies.append(elapsed_us)
        else:
            errors += 1
    log.unlink()
    span = (max(starts) - min(starts)) / 1e6 if len(starts) > 1 else 0
    return {
        "requests": len(starts),
        "rate": len(starts) / span if span else None,
        "p50_us": percentile(latencies, 50),
        "p90_us": percentile(latencies, 90),
        "p99_us": percentile(latencies, 99),
        "errors": errors,
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Two mTLS sidecars at a fixed rate: added latency, CPU, RSS.")
    ap.add_argument("--rate", type=int, default=1000, help="requests per second (default 1000)")
    ap.add_argument("--clients", type=int, default=10, help="h2load connections sharing the rate (default 10)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per path and round (default 10)")
    ap.add_argument("--runs", type=int, default=3, help="rounds, paths interleaved (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded load per path first (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s")
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                    help="after the rounds, profile both proxies with py-spy on the mTLS path at the same rate")
    ap.add_argument("--timeout", type=float, default=240, help="give up after this many seconds (default 240)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "sidecar-latest.json",
                    help="where to write JSON results (default benchmarks/results/sidecar-latest.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.duration = 1, 2
    for name in ("rate", "clients", "duration", "runs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.deadline = time.monotonic() + args.timeout
    for tool in (H2LOAD, NGINX_BIN, WRK):
        if not os.path.exists(tool):
            sys.exit(f"sidecar.py: {tool} not found")
    pinning = pinning_available(not args.no_pin and shutil.which("taskset") is not None)
    return harness("sidecar", args, pinning, run)


def run(args, pinning: bool, tmp: Path, procs: list) -> int:
    started = datetime.datetime.now(datetime.timezone.utc)
    sidecars = start_sidecars(args, pinning, tmp, procs)
    proxies = {"client": sidecars["client"], "server": sidecars["server"]}
    urls = {"direct": f"http://127.0.0.1:{sidecars['app_port']}/", **sidecars["urls"]}
    log = tmp / "h2load.log"
    if args.warmup:
        for url in urls.values():
            run_fixed_rate(url, args.rate, args.clients, args.warmup, log, pinning)

    paths = list(urls)
    raw: dict = {name: [] for name in paths}
    for rnd in range(args.runs):
        for name in paths[rnd % len(paths):] + paths[:rnd % len(paths)]:
            if time.monotonic() + args.duration + 5 > args.deadline:
                raise RuntimeError(f"--timeout {args.timeout:.0f}s would pass")
            cpu0 = {k: p.cpu_seconds() for k, p in proxies.items()}
            res = run_fixed_rate(urls[name], args.rate, args.clients, args.duration, log, pinning)
            for k, p in proxies.items():
                used = p.cpu_seconds() - cpu0[k]
                res[f"{k}_cpu_s_per_1k"] = used / res["requests"] * 1000 if res["requests"] else None
                res[f"{k}_rss_mb"] = p.rss_mb()
            raw[name].append(res)
            print(f"  run {rnd + 1}/{args.runs} {name:6s} {fmt(res['rate'])} req/s  p50 {fmt(res['p50_us'])} us  "
                  f"p90 {fmt(res['p90_us'])} us  p99 {fmt(res['p99_us'])} us  "
                  f"CPU s/1k client {fmt(res['client_cpu_s_per_1k'], '.3f')} "
                  f"server {fmt(res['server_cpu_s_per_1k'], '.3f')}"
                  + (f"  ERRORS {res['errors']}" if res["errors"] else ""))

    summary: dict = {}
    for name, runs in raw.items():
        s = {key: med([r[key] for r in runs]) for key in runs[0] if key not in ("errors",) and "rss" not in key}
        s["errors"] = sum(r["errors"] for r in runs)
        for k in proxies:
            s[f"{k}_rss_mb"] = max(r[f"{k}_rss_mb"] for r in runs)
        summary[name] = s
    for name in ("plain", "mtls"):
        for pct in ("p50", "p90", "p99"):
            a, b = summary[name][f"{pct}_us"], summary["direct"][f"{pct}_us"]
            summary[name][f"added_{pct}_us"] = a - b if a is not None and b is not None else None

    m = summary["mtls"]
    vcpu = max(m["client_cpu_s_per_1k"] or 0, m["server_cpu_s_per_1k"] or 0)
    rss = max(m["client_rss_mb"], m["server_rss_mb"])
    added_p90 = m["added_p90_us"]
    verdicts = {
        "vcpu_per_1k": "PASS" if vcpu <= TARGET_VCPU_PER_1K else "MISS",
        "rss_mb": "PASS" if rss <= TARGET_RSS_MB else "MISS",
        "added_p90": "PASS" if added_p90 is not None and added_p90 <= TARGET_ADDED_P90_US else "MISS",
    }
    profiles = None
    if args.profile and "MISS" in verdicts.values():
        def load():
            run_fixed_rate(urls["mtls"], args.rate, args.clients, args.profile, log, pinning)

        profiles = {}
        profiles["server"] = profile_under_load(
            proxies["server"], args.profile, tmp / "server-profile.txt",
            lambda: profiles.__setitem__("client", profile_under_load(
                proxies["client"], args.profile, tmp / "client-profile.txt", load)))

    print()
    print(f"two sidecars at a fixed {args.rate:,} req/s (h2load --h1 -c{args.clients} --rps), "
          f"median of {args.runs} x {args.duration}s; proxies on CPU {PROXY_CPU}, app and h2load on CPU {LOAD_CPU}")
    hdr = (f"{'path':7s} {'req/s':>7s} {'p50':>8s} {'p90':>8s} {'p99':>8s} {'+p50':>7s} {'+p90':>7s} {'+p99':>7s} "
           f"{'client CPU s/1k':>15s} {'server CPU s/1k':>15s} {'RSS MB c/s':>11s} {'errors':>6s}")
    print(hdr)
    print("-" * len(hdr))
    for name in paths:
        s = summary[name]
        print(f"{name:7s} {fmt(s['rate']):>7s} {fmt(s['p50_us']):>6s}us {fmt(s['p90_us']):>6s}us "
              f"{fmt(s['p99_us']):>6s}us {fmt(s.get('added_p50_us'), '+.0f'):>7s} "
              f"{fmt(s.get('added_p90_us'), '+.0f'):>7s} {fmt(s.get('added_p99_us'), '+.0f'):>7s} "
              f"{fmt(s['client_cpu_s_per_1k'], '.3f'):>15s} {fmt(s['server_cpu_s_per_1k'], '.3f'):>15s} "
              f"{s['client_rss_mb']:>5.1f}/{s['server_rss_mb']:<5.1f} {s['errors']:>6d}")
    print("(direct: the load generator's own latency with no proxy; the proxies idle, their CPU is the idle cost)")
    print("ratios and goals (same run):")
    print(f"  mTLS sidecar vCPU at {args.rate:,} req/s (max of the two) {vcpu:.3f}   "
          f"(goal <= {TARGET_VCPU_PER_1K}; Istio 0.35): {verdicts['vcpu_per_1k']}; "
          f"ratio to Istio {vcpu / 0.35:.2f}")
    print(f"  mTLS sidecar RSS MB (max of the two)              {rss:.1f}   (goal <= {TARGET_RSS_MB:.0f}): "
          f"{verdicts['rss_mb']}")
    print(f"  two-hop mTLS added p50/p90/p99 us  {fmt(m['added_p50_us'], '+.0f')} / {fmt(added_p90, '+.0f')} / "
          f"{fmt(m['added_p99_us'], '+.0f')}   (goal p90 <= {TARGET_ADDED_P90_US:.0f}; Istio 2650): "
          f"{verdicts['added_p90']}")
    mp, pp = m["p90_us"], summary["plain"]["p90_us"]
    print(f"  p90 mtls/plain                     {fmt(mp / pp if mp and pp else None, '.3f', 'n/a')}")
    for name, prof in (profiles or {}).items():
        if prof:
            print_profile(f"{name} proxy (mTLS path, {args.rate:,} req/s)", prof)

    result = {
        "benchmark": "sidecar",
        "started": started.isoformat(timespec="seconds"),
        "params": {k: getattr(args, k) for k in ("rate", "clients", "duration", "runs", "warmup")}
        | {"pinning": pinning, "proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU, "generator": "h2load --h1 --rps"},
        "summary": summary,
        "goals": {"vcpu_per_1k": vcpu, "rss_mb": rss, "added_p90_us": added_p90},
        "targets": {"vcpu_per_1k_max": TARGET_VCPU_PER_1K, "rss_mb_max": TARGET_RSS_MB,
                    "added_p90_us_max": TARGET_ADDED_P90_US},
        "verdicts": verdicts,
        "profiles": profiles,
        "raw": raw,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
