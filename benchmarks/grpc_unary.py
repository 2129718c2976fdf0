#!/usr/bin/env python3
"""
gRPC unary benchmark: a grpcio client against the grpcio server directly and
through txmesh-proxy (h2c both sides, cluster http2: true), same run, ratio.

  server  tests/grpc_fixtures/runner.py's grpcio Echo server    taskset -c 1
  txmesh  twistd -n txmesh-proxy, cluster http2: true           taskset -c 0
  client  grpc.aio, --concurrency callers on one channel        taskset -c 1

Each run makes Echo/Unary calls (16-byte payload) for --duration seconds (or
--calls in total) and counts completed calls per second. Rounds alternate
which target goes first; medians and the txmesh/direct ratio are printed.
A measurement, not a test: it always exits 0. Helpers come from http1.py,
the proto and server from tests/grpc_fixtures.

    .venv/bin/python benchmarks/grpc_unary.py            # 3 runs x 5 s
    .venv/bin/python benchmarks/grpc_unary.py --quick    # 1 run x 2 s
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "grpc_fixtures"))

from http1 import (  # noqa: E402
    LOAD_CPU,
    PROXY_CPU,
    ROOT,
    VENV_BIN,
    Proc,
    Unavailable,
    fmt,
    free_port,
    harness,
    http_get,
    last_lines,
    med,
    pin,
    pinning_available,
    port_open,
    write_result,
)

PY = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable

TXMESH_GRPC_CONFIG = """\
node: {{id: bench, workload: bench, namespace: default, app: bench, version: v1}}
admin:
  address: "tcp:{admin_port}:interface=127.0.0.1"
listeners:
  - name: grpc
    address: "tcp:{port}:interface=127.0.0.1"
    protocol: http
    http_filters:
{filters}
    routes: [{{match: {{prefix: /}}, cluster: grpc}}]
clusters:
  - {{name: grpc, http2: true, endpoints: ["127.0.0.1:{up}"]}}
"""


# -- child modes --------------------------------------------------------------


def child_server(gen: str, portfile: str) -> None:
    """runner.py's server, kept alive until signalled (runner stops on stdin EOF)."""
    import runner

    r, _w = os.pipe()  # _w stays open: the runner's stdin never reaches EOF
    sys.stdin = os.fdopen(r)
    runner.serve(gen, portfile)


def child_client(gen: str, target: str, concurrency: int, duration: float, calls: int) -> None:
    """Print {"calls", "errors", "seconds"} for `concurrency` callers on one aio channel."""
    import asyncio

    import grpc
    import runner

    pb, pb_grpc = runner._load(gen)

    async def main() -> dict:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.EchoStub(channel)
            msg = pb.Msg(payload=b"txmesh-bench-016")
            await stub.Unary(msg, timeout=10)  # connect before the clock starts
            done = errors = 0
            budget = [calls] if calls else None
            stop_at = time.monotonic() + duration

            async def caller() -> None:
                nonlocal done, errors
                while True:
                    if budget is not None:
                        if budget[0] <= 0:
                            return
                        budget[0] -= 1
                    elif time.monotonic() >= stop_at:
                        return
                    try:
                        reply = await stub.Unary(msg, timeout=10)
                        if reply.payload == msg.payload:
                            done += 1
                        else:
                            errors += 1
                    except grpc.RpcError:
                        errors += 1

            t0 = time.monotonic()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return {"calls": done, "errors": errors, "seconds": time.monotonic() - t0}

    print(json.dumps(asyncio.run(main())))


# -- orchestration ------------------------------------------------------------


def start_server(tmp: Path, gen: Path, pinning: bool) -> tuple[Proc, int]:
    portfile = tmp / "server.port"
    proc = Proc("grpc-server", pin(LOAD_CPU, [PY, str(Path(__file__).resolve()), "_server", str(gen), str(portfile)],
                                   pinning), tmp / "server.log", cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not proc.alive():
            raise Unavailable(f"grpc server exited: {last_lines(proc.output())}")
        if portfile.exists():
            return proc, int(portfile.read_text())
        time.sleep(0.05)
    raise Unavailable("grpc server did not write its port within 20s")


def start_txmesh(tmp: Path, up: int, metrics: bool, pinning: bool, timeout: float, reactor: str) -> tuple[Proc, int]:
    twistd = VENV_BIN / "twistd"
    if not twistd.exists():
        raise Unavailable(f"{twistd} not found")
    port, admin_port = free_port(), free_port()
    filters = ("      - name: metrics\n" if metrics else "") + "      - name: router"
    conf = tmp / "txmesh-grpc.yaml"
    conf.write_text(TXMESH_GRPC_CONFIG.format(admin_port=admin_port, port=port, up=up, filters=filters))
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
            if status == 200 and port_open(port):
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise Unavailable(f"not ready within {timeout:.0f}s: {last_lines(proc.output())}")


def run_client(gen: Path, port: int, concurrency: int, duration: float, calls: int, pinning: bool) -> dict:
    argv = pin(LOAD_CPU, [PY, str(Path(__file__).resolve()), "_client", str(gen), f"127.0.0.1:{port}",
                          str(concurrency), str(duration), str(calls)], pinning)
    p = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=ROOT,
                       timeout=(duration if not calls else 120) + 60)
    if p.returncode != 0:
        raise RuntimeError(f"client failed ({p.returncode}): {last_lines(p.stderr or p.stdout)}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["cps"] = r["calls"] / r["seconds"] if r["seconds"] > 0 else None
    if not r["calls"]:
        raise RuntimeError(f"no call succeeded ({r['errors']} errors)")
    return r


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="gRPC unary calls/s: grpcio client -> (txmesh ->) grpcio server.")
    ap.add_argument("--runs", type=int, default=3, help="rounds, targets alternating (default 3)")
    ap.add_argument("--duration", type=float, default=5, help="seconds per client run (default 5)")
    ap.add_argument("--calls", type=int, default=0, help="a fixed number of calls per run instead of --duration")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent callers in the client (default 32)")
    ap.add_argument("--warmup", type=float, default=1, help="seconds of unrecorded calls per target first")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 run of 2 s each")
    ap.add_argument("--no-metrics", action="store_true", help="leave the metrics filter out of the txmesh config")
    ap.add_argument("--reactor", default="txmesh", help="twistd reactor for txmesh-proxy (default txmesh)")
    ap.add_argument("--txmesh-timeout", type=float, default=20.0)
    ap.add_argument("--no-pin", action="store_true", help="do not use taskset")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (generated code, configs, logs)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "grpc-latest.json",
                    help="where to write JSON results (default benchmarks/results/grpc-latest.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.duration = 1, 2
    if args.runs < 1 or args.duration <= 0 or args.concurrency < 1:
        ap.error("--runs, --duration and --concurrency must be positive")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_server"]:
        child_server(argv[1], argv[2])
        return 0
    if argv[:1] == ["_client"]:
        child_client(argv[1], argv[2], int(argv[3]), float(argv[4]), int(argv[5]))
        return 0
    args = parse_args(argv)
    pinning = pinning_available(not args.no_pin and bool(shutil.which("taskset")))
    return harness("grpc", args, pinning, run)


def run(args, pinning: bool, tmp: Path, procs: list) -> int:
    import runner

    started = datetime.datetime.now(datetime.timezone.utc)
    gen = tmp / "gen"
    runner.generate(str(gen))
    server, up = start_server(tmp, gen, pinning)
    procs.append(server)
    targets: dict[str, tuple[int, Proc | None]] = {"direct": (up, None)}
    status = {"direct": "ok"}
    try:
        proc, port = start_txmesh(tmp, up, not args.no_metrics, pinning, args.txmesh_timeout, args.reactor)
        procs.append(proc)
        targets["txmesh"] = (port, proc)
        status["txmesh"] = "ok"
    except Unavailable as e:
        status["txmesh"] = f"unavailable ({e})"
    print(f"txmesh: {status['txmesh']}")
    names = list(targets)
    bound = f"{args.calls} calls" if args.calls else f"{args.duration:g}s"
    print(f"targets: {', '.join(names)}; {args.runs} run(s) x {bound}, {args.concurrency} concurrent callers; "
          f"pinning {'proxy CPU ' + PROXY_CPU + ', client+server CPU ' + LOAD_CPU if pinning else 'off'}")

    def drop(name: str, why: str) -> None:
        if name == "direct":
            raise RuntimeError(f"direct: {why}")
        status[name] = why
        print(f"  {name}: FAILED: {why}")
        del targets[name]
        names.remove(name)

    for name in list(names):
        try:  # sanity (one call happens inside) + warm-up
            run_client(gen, targets[name][0], args.concurrency, max(args.warmup, 0.2), 0, pinning)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            drop(name, f"failed during warm-up ({e})")

    raw: dict[str, list] = {n: [] for n in names}
    for rnd in range(args.runs):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in order:
            port, proc = targets[name]
            try:
                cpu0, t0 = (proc.cpu_seconds() if proc else 0.0), time.monotonic()
                r = run_client(gen, port, args.concurrency, args.duration, args.calls, pinning)
                if proc is not None:
                    r["proxy_cpu"] = (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                    r["proxy_rss_mb"] = proc.rss_mb()
                    if not proc.alive():
                        raise RuntimeError(f"died under load: {last_lines(proc.output())}")
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                drop(name, f"failed during load ({e})")
                del raw[name]
                continue
            raw[name].append(r)
            print(f"  run {rnd + 1}/{args.runs} {name:7s} {r['cps']:>9,.0f} calls/s"
                  + (f"   ERRORS {r['errors']}" if r["errors"] else ""))

    summary = {
        name: {
            "calls_per_s": med([r["cps"] for r in raw[name]]),
            "runs": [r["cps"] for r in raw[name]],
            "errors": sum(r["errors"] for r in raw[name]),
            "proxy_cpu": med([r.get("proxy_cpu") for r in raw[name]]),
            "proxy_rss_mb": max([r["proxy_rss_mb"] for r in raw[name] if "proxy_rss_mb" in r], default=None),
        }
        for name in names
    }
    ratio = None
    if "txmesh" in summary and summary["direct"]["calls_per_s"]:
        ratio = summary["txmesh"]["calls_per_s"] / summary["direct"]["calls_per_s"]

    print()
    print(f"gRPC unary (Echo/Unary, 16-byte payload), grpc.aio client, {args.concurrency} concurrent callers, "
          f"median of {args.runs} x {bound}")
    hdr = f"{'target':8s} {'calls/s':>9s} {'min..max':>15s} {'proxy CPU':>9s} {'RSS MB':>7s} {'errors':>6s}"
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        s = summary[name]
        rng = f"{min(s['runs']):,.0f}..{max(s['runs']):,.0f}"
        print(f"{name:8s} {fmt(s['calls_per_s']):>9s} {rng:>15s} {fmt(s['proxy_cpu'], '.2f'):>9s} "
              f"{fmt(s['proxy_rss_mb'], '.1f'):>7s} {s['errors']:>6d}")
    for name, st in status.items():
        if name not in summary:
            print(f"{name}: {st}")
    print()
    print(f"ratio txmesh/direct (calls/s, same run): {fmt(ratio, '.3f', 'n/a')}")

    import grpc

    result = {
        "benchmark": "grpc_unary",
        "started": started.isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "grpcio": grpc.__version__},
        "params": {"runs": args.runs, "duration_s": None if args.calls else args.duration, "calls": args.calls,
                   "concurrency": args.concurrency, "warmup_s": args.warmup, "pinning": pinning,
                   "proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU, "metrics": not args.no_metrics,
                   "reactor": args.reactor},
        "status": status,
        "summary": summary,
        "ratios": {"txmesh/direct": ratio},
        "raw": raw,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
