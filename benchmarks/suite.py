"""
Every txmesh benchmark in one run: the ratios to the peers measured in this
run, each goal of the performance issue met or not, JSON in
C{benchmarks/results/} and PNG plots in C{docs/}.

    scripts/bench                          # installs the peers, then this
    .venv/bin/python -m benchmarks.suite   # the same, peers already installed
    .venv/bin/python -m benchmarks.suite --quick --only http1,l4

Each benchmark is its own script run as a child process (each runs its own
reactor and processes), bounded by a timeout; a benchmark that fails or
times out is reported as such and the others still run. The ratios printed
at the end all come from this run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from http1 import HAPROXY, NGINX, WRK, _version  # noqa: E402
from pilot_scale import machine as base_machine  # noqa: E402
from sidecar import H2LOAD, TARGET_ADDED_P90_US, TARGET_RSS_MB, TARGET_VCPU_PER_1K  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

TARGET_HTTP1_RATIO = 0.5  # txmesh >= 0.5x nginx reverse proxy, per core
TARGET_L4_RATIO = 0.6  # txmesh tcp >= 0.6x nginx stream
ISTIO_VCPU_PER_1K = 0.35
ISTIO_ADDED_P90_US = 2650.0


def wrk_args(o) -> list[str]:
    return load_args(o) + (["--profile", str(o.profile)] if o.profile else [])


def load_args(o) -> list[str]:
    return ["--runs", str(o.runs), "--duration", str(o.duration), "--warmup", str(o.warmup)]


def sidecar_args(o) -> list[str]:
    return ["--runs", str(o.runs), "--duration", str(o.sidecar_duration), "--warmup", str(o.warmup),
            "--rate", str(o.rate), "--timeout", str(sidecar_bound(o) - 30)] + (
        ["--profile", str(o.profile)] if o.profile else [])


def sidecar_bound(o) -> float:
    return 90 + o.runs * 3 * (o.sidecar_duration + 3) + 2 * o.profile


def pilot_args(o) -> list[str]:
    return ["--proxies", o.pilot_proxies, "--changes", str(o.pilot_changes), "--timeout", str(o.pilot_timeout)]


def wrk_bound(o) -> float:
    return 60 + o.runs * 4 * (2 * o.duration + 1) + o.profile


# name -> (script, its JSON file, tools it needs, argv builder, timeout in seconds given the options)
BENCHMARKS = {
    "http1": ("http1.py", "http1-latest.json", (NGINX, WRK), wrk_args, wrk_bound),
    "l4": ("l4.py", "l4-latest.json", (NGINX, WRK), wrk_args, wrk_bound),
    "sidecar": ("sidecar.py", "sidecar-latest.json", (NGINX, WRK, H2LOAD), sidecar_args, sidecar_bound),
    "http2": ("http2.py", "http2-latest.json", (NGINX, H2LOAD), load_args,
              lambda o: 60 + o.runs * 4 * (o.duration + 2)),
    "grpc": ("grpc_unary.py", "grpc-latest.json", (), load_args, lambda o: 90 + o.runs * 2 * (o.duration + 4)),
    "pilot": ("pilot_scale.py", "pilot_scale.json", (), pilot_args, lambda o: o.pilot_timeout + 30),
    "rss": ("rss.py", "rss-latest.json", (), lambda o: ["--runs", str(o.runs)], lambda o: 60 + o.runs * 40),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Run every txmesh benchmark; print same-run ratios and goals.")
    ap.add_argument("--runs", type=int, default=3, help="rounds per benchmark, peers interleaved (default 3)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per load run (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded load per target (default 1)")
    ap.add_argument("--rate", type=int, default=1000, help="the sidecar benchmark's fixed req/s (default 1000)")
    ap.add_argument("--profile", type=int, default=5, metavar="SECONDS",
                    help="py-spy txmesh under load this long after the rounds (0: no profile; default 5)")
    ap.add_argument("--pilot-proxies", default="100,1000", help="N simulated proxies for the pilot (default 100,1000)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 run, 2 s loads, no warm-up, no profile, pilot with 10 proxies")
    ap.add_argument("--results", type=Path, default=BENCH / "results",
                    help="JSON directory (default benchmarks/results)")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs", help="PNG directory (default docs)")
    ap.add_argument("--no-plots", action="store_true", help="do not draw the PNGs")
    args = ap.parse_args(argv)
    args.sidecar_duration, args.pilot_changes, args.pilot_timeout = 2 * args.duration, 3, 300
    if args.quick:
        args.runs, args.warmup, args.profile = 1, 0, 0
        if "--duration" not in " ".join(argv if argv is not None else sys.argv):
            args.duration = 2
        args.sidecar_duration, args.pilot_proxies, args.pilot_changes, args.pilot_timeout = \
            args.duration, "10", 1, 60
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = (set(names) | skip) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(BENCHMARKS)}")
    args.names = [n for n in names if n not in skip]
    if args.runs < 1 or args.duration < 1:
        ap.error("--runs and --duration must be >= 1")
    return args


def machine() -> dict:
    """The machine and the versions of everything measured, for the record."""
    info = base_machine()
    info["kernel"] = platform.release()
    import OpenSSL.SSL

    info["openssl"] = OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode()
    for name, argv in (("nginx", [NGINX, "-v"]), ("haproxy", [HAPROXY, "-v"]), ("wrk", [WRK, "-v"]),
                       ("h2load", [H2LOAD, "--version"])):
        info[name] = _version(argv) if os.path.exists(argv[0]) else "not installed"
    return info


def run_one(name: str, args, log_dir: Path) -> dict:
    """
    Run one benchmark script, its output streamed here and kept in
    C{log_dir}, bounded by its timeout.

    @return: C{{"status": "ok" | "failed (...)" | "skipped (...)",
        "elapsed_s", "json": path or None, "result": its JSON or None}}.
    """
    script, json_name, tools, build, bound = BENCHMARKS[name]
    missing = [t for t in tools if not os.path.exists(t)]
    if missing:
        return {"status": f"skipped ({', '.join(missing)} not installed; scripts/bench installs them)",
                "elapsed_s": 0, "json": None, "result": None}
    out = args.results / json_name
    if out.exists():
        out.unlink()
    argv = [PYTHON, "-u", str(BENCH / script), *build(args), "--json", str(out)]
    timeout = bound(args)
    print(f"\n=== {name}: {' '.join(argv[2:])} (bound {timeout:.0f}s)", flush=True)
    t0 = time.monotonic()
    log = log_dir / f"{name}.log"
    with open(log, "wb") as logf:
        child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = t0 + timeout
        status = None
        try:
            os.set_blocking(child.stdout.fileno(), False)
            while child.poll() is None or _drain(child, logf):
                _drain(child, logf)
                if time.monotonic() > deadline:
                    status = f"failed (timed out after {timeout:.0f}s)"
                    _end(child)
                    break
                time.sleep(0.05)
        except KeyboardInterrupt:
            _end(child)
            raise
    elapsed = time.monotonic() - t0
    if status is None:
        status = "ok" if child.returncode == 0 else f"failed (exit {child.returncode}; log {log})"
    result = None
    if out.exists():
        try:
            result = json.loads(out.read_text())
        except ValueError as e:
            status = f"failed (unreadable JSON: {e})"
    elif status == "ok":
        status = "failed (no JSON written)"
    print(f"=== {name}: {status} in {elapsed:.0f}s", flush=True)
    return {"status": status, "elapsed_s": round(elapsed, 1), "json": str(out) if result else None,
            "result": result}


def _drain(child, logf) -> bool:
    """Copy what the child wrote so far to stdout and the log; @return: whether there was any."""
    try:
        data = child.stdout.read()
    except (BlockingIOError, ValueError):
        return False
    if not data:
        return False
    logf.write(data)
    sys.stdout.write(data.decode("utf-8", "replace"))
    sys.stdout.flush()
    return True


def _end(child) -> None:
    """SIGTERM the child's session (its benchmark stops its own processes), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


# -- the report ------------------------------------------------------------------------


def goal(value, target, better: str, unit: str = "x") -> dict:
    """@return: C{{"value", "target", "unit", "met"}}; C{met} is C{None} when not measured."""
    met = None if value is None else (value >= target if better == "higher" else value <= target)
    return {"value": value, "target": target, "unit": unit, "met": met}


def per_core(summary: dict, a: str, b: str) -> float | None:
    """req/s per proxy CPU-second of C{a} over that of C{b} (each pinned to one core)."""
    x, y = summary.get(a, {}), summary.get(b, {})
    if x.get("rps") and y.get("rps") and x.get("proxy_cpu") and y.get("proxy_cpu"):
        return (x["rps"] / x["proxy_cpu"]) / (y["rps"] / y["proxy_cpu"])
    return None


def report(results: dict) -> tuple[dict, dict, list[str]]:
    """
    @param results: C{{benchmark: its JSON}} (those that produced one).
    @return: C{(ratios, goals, lines)}: the same-run ratios, the issue's
        goals met or not, and the lines to print.
    """
    ratios: dict = {}
    goals: dict = {}
    lines: list[str] = []

    def line(key: str, value, extra: str = "") -> None:
        ratios[key] = value
        lines.append(f"  {key:42s} {'n/a' if value is None else format(value, '.3f')}{extra}")

    for bench, label in (("http1", "HTTP/1.1"), ("l4", "L4")):
        doc = results.get(bench)
        if not doc:
            continue
        lines.append(f"{label} (c{doc['params']['connections']} and c1, req/s, median of {doc['params']['runs']}):")
        for key, value in doc["ratios"].items():
            line(f"{bench} {key} c{doc['params']['connections']}", value)
            line(f"{bench} {key} c1", doc["ratios_c1"].get(key))
        for peer in ("nginx", "haproxy"):
            line(f"{bench} txmesh/{peer} per proxy CPU-second", per_core(doc["summary"], "txmesh", peer))
    # Per core: req/s per CPU-second each proxy used, so that a proxy held
    # back by the load CPU or by other processes on its own CPU is not
    # counted as slower (the raw c50 ratio is printed above it).
    for bench, key, target in (("http1", "http1 >= 0.5x nginx proxy (per core)", TARGET_HTTP1_RATIO),
                               ("l4", "L4 >= 0.6x nginx stream (per core)", TARGET_L4_RATIO)):
        if bench in results:
            r = ratios.get(f"{bench} txmesh/nginx per proxy CPU-second")
            if r is None:
                r = ratios.get(f"{bench} txmesh/nginx c{results[bench]['params']['connections']}")
            goals[key] = goal(r, target, "higher")
    doc = results.get("sidecar")
    if doc:
        g = doc["goals"]
        lines.append(f"two sidecars, mTLS + metrics + tracing, at a fixed {doc['params']['rate']:,} req/s:")
        line("sidecar vCPU per 1,000 req/s / Istio 0.35", g["vcpu_per_1k"] / ISTIO_VCPU_PER_1K,
             f"   ({g['vcpu_per_1k']:.3f} vCPU)")
        if g["added_p90_us"] is not None:
            line("two-hop mTLS added p90 / Istio 2.65 ms", g["added_p90_us"] / ISTIO_ADDED_P90_US,
                 f"   ({g['added_p90_us'] / 1000:+.2f} ms)")
        m, p = doc["summary"]["mtls"], doc["summary"]["plain"]
        line("p90 mtls/plain", m["p90_us"] / p["p90_us"] if m["p90_us"] and p["p90_us"] else None)
        goals["sidecar <= 0.10 vCPU per 1,000 req/s"] = goal(g["vcpu_per_1k"], TARGET_VCPU_PER_1K, "lower", "vCPU")
        goals["sidecar <= 40 MB RSS"] = goal(g["rss_mb"], TARGET_RSS_MB, "lower", "MB")
        goals["two-hop mTLS added p90 <= 1 ms"] = goal(g["added_p90_us"], TARGET_ADDED_P90_US, "lower", "us")
    doc = results.get("http2")
    if doc:
        lines.append("HTTP/2 (h2load):")
        for key, value in doc["ratios"].items():
            line(f"h2 {key}", value)
    doc = results.get("grpc")
    if doc:
        lines.append("gRPC unary (grpcio):")
        for key, value in doc["ratios"].items():
            line(f"grpc {key}", value)
    doc = results.get("rss")
    if doc:
        lines.append("idle RSS (MB, median): what the sidecar holds above its floors:")
        for key, value in doc["ratios"].items():
            line(f"rss {key}", value)
        summary = doc["summary"]
        lines.append(f"  txmesh {summary['txmesh']['rss_mb']:.1f}, twistd web {summary['twistd']['rss_mb']:.1f}, "
                     f"Python + reactor + pyOpenSSL {summary['reactor']['rss_mb']:.1f}")
    doc = results.get("pilot")
    if doc:
        lines.append("pilot push convergence (s, median; and pilot RSS per proxy):")
        for r in doc.get("results") or []:
            ratios[f"pilot N={r['n']} convergence_s"] = r["convergence_s"]["median"]
            lines.append(f"  N={r['n']:<6d} convergence {r['convergence_s']['median']:.3f} s   "
                         f"RSS {r['rss_per_proxy_mb']:.3f} MB per proxy")
    return ratios, goals, lines


def main(argv=None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    args.results.mkdir(parents=True, exist_ok=True)
    log_dir = ROOT / "build" / "bench-logs"  # git-ignored, like scripts/test's log
    log_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["loadavg_before"] = os.getloadavg()
    print(f"suite: {', '.join(args.names)}; {args.runs} run(s); machine {info['cpu_model']}, {info['cpus']} CPUs, "
          f"kernel {info['kernel']}, Python {info['python']}, Twisted {info['twisted']}")
    runs: dict = {}
    try:
        for name in args.names:
            runs[name] = run_one(name, args, log_dir)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    info["loadavg_after"] = os.getloadavg()
    results = {n: r["result"] for n, r in runs.items() if r["result"]}
    ratios, goals, lines = report(results)

    print("\n" + "=" * 78)
    print(f"ratios measured in this run ({started:%Y-%m-%d %H:%M} UTC; load average before "
          f"{info['loadavg_before'][0]:.1f}, after {info['loadavg_after'][0]:.1f}, on {info['cpus']} CPUs):")
    for text in lines:
        print(text)
    print("goals of the performance issue:")
    for key, g in goals.items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        value = "n/a" if g["value"] is None else format(g["value"], ",.0f" if g["unit"] == "us" else ".3f")
        print(f"  {key:40s} {value:>9s} {g['unit']:4s} {verdict}")
    for name, r in runs.items():
        if r["status"] != "ok":
            print(f"  {name}: {r['status']}")

    plots = []
    if not args.no_plots and results:
        try:
            from plots import draw_all
        except ImportError as e:
            print(f"plots: skipped ({e}; scripts/bench installs matplotlib)")
        else:
            plots = [str(p) for p in draw_all(results, args.plots)]
            for p in plots:
                print(f"plot: {p}")

    doc = {
        "benchmark": "suite",
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "params": {k: getattr(args, k) for k in ("runs", "duration", "warmup", "rate", "profile", "pilot_proxies",
                                                  "quick", "names")},
        "benchmarks": {n: {k: v for k, v in r.items() if k != "result"} for n, r in runs.items()},
        "ratios": ratios,
        "goals": goals,
        "plots": plots,
    }
    out = args.results / "suite-latest.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"json: {out}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in runs.values()) else 1


if __name__ == "__main__":
    shutil.which("taskset") or print("warning: taskset not found: nothing will be pinned", file=sys.stderr)
    sys.exit(main())
