#!/usr/bin/env python3
"""
Scaling of C{twistd txmesh-proxy --concurrency N}: the same proxy config run
with 1 and with N worker processes (default 2), loaded by wrk in the same
run, rounds interleaved; prints the medians and the ratio N workers / 1.

  app      nginx returning a fixed 100-byte body     taskset -c 1 (with wrk)
  txmesh-1 twistd txmesh-proxy --concurrency 1       not pinned
  txmesh-N twistd txmesh-proxy --concurrency N       not pinned

Neither proxy is pinned, so both can use every CPU; wrk and the app share
CPU 1.  On a 2-core machine the second worker shares a core with the load
generator and the app, so the ratio is below what more cores would give.
The metrics and tracing filters are on, as in benchmarks/http1.py.

    .venv/bin/python benchmarks/concurrency.py            # 3 runs x 5 s
    .venv/bin/python benchmarks/concurrency.py --quick    # 1 run x 2 s
    .venv/bin/python benchmarks/concurrency.py --workers 2 --runs 5 --connections 100

It is a measurement, not a test: it exits 0 whatever the ratio.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http1 import (  # noqa: E402
    LOAD_CPU,
    NGINX_APP,
    PAYLOAD,
    ROOT,
    TRACING_FILTER,
    TXMESH_CONFIG,
    VENV_BIN,
    Proc,
    Unavailable,
    free_port,
    harness,
    http_get,
    last_lines,
    med,
    parse_wrk_args,
    pinning_available,
    run_wrk,
    sanity_check,
    start_nginx,
    wrk_parser,
)


def parse_args(argv: list[str] | None = None):
    ap = wrk_parser("txmesh-proxy --concurrency scaling: 1 worker vs N, same run, ratio.", "concurrency-latest.json")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the second proxy (default 2)")
    args = parse_wrk_args(ap, argv)
    if args.workers < 2:
        ap.error("--workers must be >= 2")
    return args


def start_proxy(tmp: Path, name: str, app_port: int, concurrency: int, reactor: str,
                timeout: float) -> tuple[Proc, int]:
    """
    Run C{twistd -n txmesh-proxy --concurrency N} and wait until its admin
    C{/ready} answers 200 (every worker serving).
    """
    port, admin_port = free_port(), free_port()
    filters = "      - name: metrics\n" + TRACING_FILTER + "      - name: router"
    conf = tmp / f"{name}.yaml"
    conf.write_text(TXMESH_CONFIG.format(admin_port=admin_port, port=port, app_port=app_port, filters=filters))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    argv = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "-r", reactor, "txmesh-proxy", "--config", str(conf),
            "--concurrency", str(concurrency)]
    proc = Proc(name, argv, tmp / f"{name}.log", cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise Unavailable(f"{name} exited with {proc.popen.returncode}: {last_lines(proc.output())}")
        try:
            if http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5)[0] == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.stop()
    raise Unavailable(f"{name} not ready within {timeout:.0f}s: {last_lines(proc.output())}")


def run(args, pinning: bool, tmp: Path, procs: list) -> int:
    app_port = free_port()
    procs.append(start_nginx("app", tmp, LOAD_CPU, NGINX_APP.format(port=app_port, payload=PAYLOAD.decode()),
                             app_port, pinning))
    # Worker processes take several seconds each to import on a busy box.
    timeout = max(args.txmesh_timeout, 60.0)
    one, one_port = start_proxy(tmp, "txmesh-1", app_port, 1, args.reactor, timeout)
    procs.append(one)
    many_name = f"txmesh-{args.workers}"
    many, many_port = start_proxy(tmp, many_name, app_port, args.workers, args.reactor, timeout)
    procs.append(many)
    targets = {"txmesh-1": (f"http://127.0.0.1:{one_port}/", one),
               many_name: (f"http://127.0.0.1:{many_port}/", many)}
    for name, (url, _) in targets.items():
        sanity_check(name, url)
    print(f"wrk -t1 -c{args.connections}, {args.runs} run(s) x {args.duration}s, rounds interleaved; "
          f"app+wrk {'on CPU ' + LOAD_CPU if pinning else 'not pinned'}, proxies not pinned")
    for url, _ in targets.values():
        if args.warmup:
            run_wrk(url, args.connections, args.warmup, pinning)
    results: dict[str, list[dict]] = {name: [] for name in targets}
    names = list(targets)
    for rnd in range(args.runs):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            url, proc = targets[name]
            cpu0, t0 = proc.cpu_seconds(), time.monotonic()
            result = run_wrk(url, args.connections, args.duration, pinning)
            result["proxy_cpu"] = (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            if not proc.alive():
                raise Unavailable(f"{name} died under load: {last_lines(proc.output())}")
            results[name].append(result)
            errors = result["non2xx"] + result["socket_errors"]
            print(f"  run {rnd + 1}/{args.runs} {name:9s} {result['rps']:>10,.0f} req/s   "
                  f"p50 {result['p50_us'] or 0:.0f} us   proxy CPU {result['proxy_cpu']:.2f}"
                  + (f"   ERRORS {errors}" if errors else ""))
    summary = {name: {"rps": med([r["rps"] for r in rs]), "rps_runs": [r["rps"] for r in rs],
                      "p50_us": med([r["p50_us"] for r in rs]), "p99_us": med([r["p99_us"] for r in rs]),
                      "proxy_cpu": med([r["proxy_cpu"] for r in rs]),
                      "errors": sum(r["non2xx"] + r["socket_errors"] for r in rs)}
               for name, rs in results.items()}
    per_round = [m["rps"] / o["rps"] for o, m in zip(results["txmesh-1"], results[many_name], strict=True)]
    ratio = summary[many_name]["rps"] / summary["txmesh-1"]["rps"]
    print()
    for name, s in summary.items():
        print(f"{name:9s} median {s['rps']:>10,.0f} req/s   p50 {s['p50_us'] or 0:.0f} us   "
              f"p99 {s['p99_us'] or 0:.0f} us   proxy CPU {s['proxy_cpu']:.2f}   errors {s['errors']}")
    print(f"ratio {many_name} / txmesh-1: {ratio:.2f} (median of medians; per round: "
          f"{', '.join(f'{r:.2f}' for r in per_round)})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "workers": args.workers, "connections": args.connections, "runs": args.runs,
            "duration": args.duration, "pinning": pinning,
            "summary": summary, "ratio": ratio, "ratio_per_round": per_round,
        }, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = pinning_available(not args.no_pin)
    try:
        return harness("concurrency", args, pinning, run)
    except Unavailable as e:
        print(f"concurrency.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
