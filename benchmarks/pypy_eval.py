#!/usr/bin/env python3
"""
PyPy vs CPython on the Python proxy paths txmesh could run on, in one run.

One command (run it with the CPython venv):

    .venv/bin/python benchmarks/pypy_eval.py              # 3 rounds x 5 s, 10 s JIT warm-up
    .venv/bin/python benchmarks/pypy_eval.py --quick      # smoke test
    .venv/bin/python benchmarks/pypy_eval.py --no-gc-variants --runs 5

It installs Debian's C{pypy3} (C{apt-get install pypy3 pypy3-dev pypy3-venv})
if missing, builds C{.venv-pypy/} with Twisted and httptools (httptools is
compiled from source there), then starts on 127.0.0.1:

  app         nginx returning a fixed 100-byte body                       taskset -c 1
  *-bare      benchmarks/bare_proxy.py (Twisted + httptools)              taskset -c 0
  *-l4        twisted.protocols.portforward.ProxyFactory                  taskset -c 0
  pypy-bare-* the PyPy bare proxy with GC knobs (PYPY_GC_*, manual GC)    taskset -c 0

and, after a warm-up of every proxy (the JIT's, and the same for CPython),
loads each with wrk on CPU 1: C{-t1 -c50} (req/s and latency under load) and
C{-t1 -c1} (latency), C{--runs} rounds with the first target rotating. Each
proxy records its own collector pauses (PyPy C{gc.hooks}, CPython
C{gc.callbacks}). It prints medians, the PyPy/CPython ratios measured in this
run, and writes C{benchmarks/results/pypy-latest.json}.

txmesh itself needs Python >= 3.10 and Debian 12's PyPy is 3.9, so txmesh-proxy
is not a target here; see docs/pypy.md.  A measurement, not a test: exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYPY_VENV = ROOT / ".venv-pypy"
PYPY_PACKAGES = ["twisted", "httptools"]

# Percentiles straight from wrk's full latency histogram (microseconds).
WRK_LUA = """\
done = function(summary, latency, requests)
  for _, p in pairs({50, 90, 99, 99.9}) do
    io.write(string.format("pct %g %d\\n", p, latency:percentile(p)))
  end
  io.write(string.format("pct max %d\\n", latency.max))
end
"""
PCTS = ("50", "90", "99", "99.9", "max")

# PyPy GC variants: (name, proxy, environment, manual-gc-every-N-responses).  PyPy sizes its
# nursery as half the last-level cache: this VM reports a 480 MB L3, so the default nursery
# here is 240 MB, far from the 4-32 MB of a typical server; hence the nursery sizes.
GC_VARIANTS = [
    ("pypy-bare-nursery1M", "bare", {"PYPY_GC_NURSERY": "1MB"}, 0),
    ("pypy-bare-nursery4M", "bare", {"PYPY_GC_NURSERY": "4MB"}, 0),
    ("pypy-bare-nursery32M", "bare", {"PYPY_GC_NURSERY": "32MB"}, 0),
    ("pypy-bare-n4M-major1.3", "bare", {"PYPY_GC_NURSERY": "4MB", "PYPY_GC_MAJOR_COLLECT": "1.3"}, 0),
    ("pypy-bare-n4M-step256K", "bare", {"PYPY_GC_NURSERY": "4MB", "PYPY_GC_INCREMENT_STEP": "256KB"}, 0),
    ("pypy-bare-n4M-manual", "bare", {"PYPY_GC_NURSERY": "4MB"}, 32),
    ("pypy-l4-nursery4M", "l4", {"PYPY_GC_NURSERY": "4MB"}, 0),
]


# -- the proxy side (runs under CPython 3.11 and PyPy 3.9: keep it 3.9) --------


class PauseRecorder:
    """Collector pauses of this process, from the interpreter's own hooks."""

    def __init__(self) -> None:
        self.minor = {"count": 0, "total_s": 0.0, "max_s": 0.0}
        self.major_step = {"count": 0, "total_s": 0.0, "max_s": 0.0}
        self.majors_done = 0
        self.t0 = time.perf_counter()
        self._start = 0.0
        self.pypy = platform.python_implementation() == "PyPy"
        if self.pypy:
            gc_hooks = __import__("gc").hooks
            gc_hooks.on_gc_minor = self._on_minor
            gc_hooks.on_gc_collect_step = self._on_step
            gc_hooks.on_gc_collect = self._on_collect
        else:
            import gc

            gc.callbacks.append(self._on_cpython)

    # PyPy 7.3.11 reports durations in seconds (their sum matches gc.get_stats()'s "time spent in GC").
    def _on_minor(self, stats) -> None:
        self.minor["count"] += stats.count
        self.minor["total_s"] += stats.duration
        self.minor["max_s"] = max(self.minor["max_s"], stats.duration_max)

    def _on_step(self, stats) -> None:
        self.major_step["count"] += stats.count
        self.major_step["total_s"] += stats.duration
        self.major_step["max_s"] = max(self.major_step["max_s"], stats.duration_max)

    def _on_collect(self, stats) -> None:
        self.majors_done += stats.count

    # CPython: generation 0/1 collections count as "minor", generation 2 as "major".
    def _on_cpython(self, phase, info) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        bucket = self.major_step if info["generation"] == 2 else self.minor
        bucket["count"] += 1
        bucket["total_s"] += took
        bucket["max_s"] = max(bucket["max_s"], took)
        if info["generation"] == 2:
            self.majors_done += 1

    def report(self) -> dict:
        out = {"interpreter": platform.python_implementation(), "majors_done": self.majors_done,
               "uptime_s": time.perf_counter() - self.t0}
        for name, b in (("minor", self.minor), ("major_step", self.major_step)):
            out[name] = {"count": b["count"], "total_ms": b["total_s"] * 1e3, "max_ms": b["max_s"] * 1e3}
        if self.pypy:
            stats = __import__("gc").get_stats()
            out["pypy"] = {k: str(getattr(stats, k)) for k in (
                "nursery_size", "total_gc_memory", "peak_memory", "jit_backend_used", "total_gc_time")}
        return out


def serve(argv: list[str]) -> int:
    """C{pypy_eval.py serve --kind bare|l4 --listen P --upstream H:P}: one proxy process."""
    ap = argparse.ArgumentParser(prog="pypy_eval.py serve")
    ap.add_argument("--kind", choices=("bare", "l4"), required=True)
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--manual-gc", type=int, default=0, metavar="N",
                    help="gc.disable() and one gc.collect_step() every N responses (PyPy)")
    ap.add_argument("--report", type=Path, required=True, help="JSON file for the GC pause report")
    args = ap.parse_args(argv)
    import gc

    from twisted.internet import reactor

    host, _, port = args.upstream.rpartition(":")
    recorder = PauseRecorder()
    if args.kind == "bare":
        sys.path.insert(0, str(BENCH))
        import bare_proxy

        factory = bare_proxy.Front(bare_proxy.Pool(host, int(port)))
        respond_cls, respond_name = bare_proxy.Downstream, "finish"
    else:
        from twisted.protocols import portforward

        factory = portforward.ProxyFactory(host, int(port))
        respond_cls, respond_name = portforward.ProxyClient, "dataReceived"
    if args.manual_gc:
        if not hasattr(gc, "collect_step"):
            sys.exit("--manual-gc needs PyPy's gc.collect_step")
        gc.disable()  # on PyPy: no major collection unless we step it; minor ones still run
        original, every, counter = getattr(respond_cls, respond_name), args.manual_gc, [0]

        def responded(self, *a):
            original(self, *a)
            counter[0] += 1
            if counter[0] % every == 0:
                gc.collect_step()

        setattr(respond_cls, respond_name, responded)

    def dump() -> None:
        args.report.write_text(json.dumps(recorder.report()))

    reactor.addSystemEventTrigger("before", "shutdown", dump)
    reactor.listenTCP(args.listen, factory, backlog=1024, interface="127.0.0.1")
    reactor.run()
    return 0


def parse_cost() -> int:
    """
    C{pypy_eval.py parse}: CPU microseconds for httptools to parse one wrk-like
    request, in memory (on PyPy the C extension runs through cpyext).
    """
    import httptools

    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"

    class Callbacks:
        def __init__(self) -> None:
            self.headers: list = []

        def on_url(self, url) -> None:
            pass

        def on_header(self, name, value) -> None:
            self.headers.append((name, value))

        def on_message_complete(self) -> None:
            self.headers = []

    def parse(n: int) -> None:
        parser = httptools.HttpRequestParser(Callbacks())
        for _ in range(n):
            parser.feed_data(req)

    n = 200_000
    parse(n)  # JIT warm-up
    best = min(_timed(parse, n) for _ in range(5))
    print(json.dumps({"httptools_parse_us": best / n * 1e6}))
    return 0


def _timed(fn, n: int) -> float:
    t = time.process_time()
    fn(n)
    return time.process_time() - t


# -- the orchestrator (CPython venv) -------------------------------------------


def run_cmd(argv: list[str], **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(argv), flush=True)
    return subprocess.run(argv, check=False, **kw)


def ensure_pypy() -> Path:
    """
    Install Debian's PyPy and build C{.venv-pypy} with Twisted and httptools.

    @return: the venv's python.
    @raise SystemExit: with what failed, when it cannot be done here.
    """
    if not shutil.which("pypy3"):
        if os.geteuid() != 0:
            sys.exit("pypy3 is missing: apt-get install pypy3 pypy3-dev pypy3-venv (as root)")
        pkgs = ["pypy3", "pypy3-dev", "pypy3-venv"] + ([] if shutil.which("gcc") else ["gcc"])
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if run_cmd(["apt-get", "install", "-y", *pkgs], env=env).returncode != 0:
            run_cmd(["apt-get", "update"], env=env)
            if run_cmd(["apt-get", "install", "-y", *pkgs], env=env).returncode != 0:
                sys.exit("apt-get install pypy3 failed")
    python = PYPY_VENV / "bin" / "python"
    if not python.exists():
        if run_cmd(["pypy3", "-m", "venv", str(PYPY_VENV)]).returncode != 0:
            sys.exit("pypy3 -m venv failed (apt: pypy3-venv)")
    probe = [str(python), "-c", "import twisted, httptools"]
    if subprocess.run(probe, check=False, capture_output=True).returncode != 0:
        # httptools has no PyPy wheel for this platform: pip compiles it (pypy3-dev + gcc).
        if run_cmd([str(python), "-m", "pip", "install", "-q", *PYPY_PACKAGES]).returncode != 0:
            sys.exit("pip install twisted httptools into .venv-pypy failed (needs pypy3-dev and gcc)")
    return python


def versions(python: str) -> dict:
    code = ("import json, platform, sys, twisted, httptools; print(json.dumps({'version': sys.version, "
            "'implementation': platform.python_implementation(), 'twisted': twisted.__version__, "
            "'httptools': httptools.__version__}))")
    p = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    return json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-300:]}


def run_wrk(h, url: str, connections: int, duration: int, pinning: bool, lua: Path) -> dict:
    argv = h.pin(h.LOAD_CPU, [h.WRK, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
                              "--latency", "-s", str(lua), url], pinning)
    p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=duration + 30)
    res = h.parse_wrk(p.stdout)
    if p.returncode != 0 or res["rps"] is None:
        raise RuntimeError(f"wrk failed ({p.returncode}): {h.last_lines(p.stderr or p.stdout)}")
    for pct, val in re.findall(r"^pct (\S+) (\d+)$", p.stdout, re.MULTILINE):
        res[f"p{pct}_us"] = float(val)
    return res


def vm_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds, targets interleaved (default 3)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--warmup", type=int, default=10,
                    help="seconds of unrecorded c50 load per proxy before round 1, for PyPy's JIT (default 10)")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c for the loaded runs (default 50)")
    ap.add_argument("--no-gc-variants", action="store_true", help="skip the PyPy GC knob variants")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round x 2 s, 3 s warm-up")
    ap.add_argument("--no-pin", action="store_true", help="do not use taskset")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, GC reports)")
    ap.add_argument("--json", type=Path, default=BENCH / "results" / "pypy-latest.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 2, 3
    if args.runs < 1 or args.duration < 1:
        ap.error("--runs and --duration must be >= 1")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    if argv[:1] == ["parse"]:
        return parse_cost()
    args = parse_args(argv)
    sys.path.insert(0, str(BENCH))
    import http1 as h  # the shared process, port, nginx and wrk helpers

    pypy = ensure_pypy()
    return h.harness("pypy", args, h.check_tools(not args.no_pin), lambda *a: run(h, str(pypy), *a))


def run(h, pypy: str, args, pinning: bool, tmp: Path, procs: list) -> int:
    started = datetime.datetime.now(datetime.timezone.utc)
    cpython = str(ROOT / ".venv" / "bin" / "python")
    interpreters = {"cpython": cpython, "pypy": pypy}
    parse_us = {}
    for interp, python in interpreters.items():
        p = subprocess.run(h.pin(h.PROXY_CPU, [python, str(Path(__file__).resolve()), "parse"], pinning),
                           check=False, capture_output=True, text=True, timeout=300)
        parse_us[interp] = json.loads(p.stdout)["httptools_parse_us"] if p.returncode == 0 else None
    print("httptools parse, CPU us per request in memory: "
          + ", ".join(f"{k} {h.fmt(v, '.2f')}" for k, v in parse_us.items()), flush=True)
    lua = tmp / "pct.lua"
    lua.write_text(WRK_LUA)
    app_port = h.free_port()
    procs.append(h.start_nginx("app", tmp, h.LOAD_CPU,
                               h.NGINX_APP.format(port=app_port, payload=h.PAYLOAD.decode()), app_port, pinning))
    upstream = f"127.0.0.1:{app_port}"

    # name -> (interpreter, kind, extra env, manual-gc N)
    specs = {f"{i}-{k}": (i, k, {}, 0) for k in ("bare", "l4") for i in ("cpython", "pypy")}
    if not args.no_gc_variants:
        specs.update({name: ("pypy", kind, env, n) for name, kind, env, n in GC_VARIANTS})
    targets: dict = {"direct": (f"http://127.0.0.1:{app_port}/", None, None)}
    status = {}
    for name, (interp, kind, extra, manual) in specs.items():
        port, report = h.free_port(), tmp / f"{name}.gc.json"
        argv = [interpreters[interp], str(Path(__file__).resolve()), "serve", "--kind", kind,
                "--listen", str(port), "--upstream", upstream, "--report", str(report)]
        if manual:
            argv += ["--manual-gc", str(manual)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYPY_GC_", "PYTHON"))}
        env.update(extra)
        proc = h.Proc(name, h.pin(h.PROXY_CPU, argv, pinning), tmp / f"{name}.log", cwd=ROOT, env=env)
        procs.append(proc)
        try:
            h.wait_port(proc, port, 20)
            h.sanity_check(name, f"http://127.0.0.1:{port}/")
            targets[name] = (f"http://127.0.0.1:{port}/", proc, report)
            status[name] = "ok"
        except h.Unavailable as e:
            status[name] = f"unavailable ({e})"
            print(f"{name}: {status[name]}")

    names = list(targets)
    est = (len(names) - 1) * args.warmup + len(names) * args.runs * 2 * args.duration
    print(f"targets: {', '.join(names)}\n{args.runs} round(s) x {args.duration}s x (c{args.connections} + c1), "
          f"warm-up {args.warmup}s each; pinning "
          f"{'proxies CPU ' + h.PROXY_CPU + ', app+wrk CPU ' + h.LOAD_CPU if pinning else 'off'}; ~{est}s",
          flush=True)
    for name in names[1:]:  # the same warm-up for CPython and PyPy
        run_wrk(h, targets[name][0], args.connections, args.warmup, pinning, lua)

    raw: dict = {n: {"c50": [], "c1": []} for n in names}
    for rnd in range(args.runs):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            url, proc, _ = targets[name]
            if name not in raw:
                continue
            try:
                cpu0, t0 = (proc.cpu_seconds() if proc else 0.0), time.monotonic()
                tp = run_wrk(h, url, args.connections, args.duration, pinning, lua)
                if proc is not None:
                    tp["proxy_cpu"] = (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                    # CPU per request: less sensitive than req/s to other load on the machine.
                    tp["cpu_us_per_req"] = tp["proxy_cpu"] / tp["rps"] * 1e6
                lat = run_wrk(h, url, 1, args.duration, pinning, lua)
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"died: {h.last_lines(proc.output())}")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                status[name] = f"failed during load ({e})"
                print(f"  {name}: FAILED {e}")
                del raw[name]
                continue
            raw[name]["c50"].append(tp)
            raw[name]["c1"].append(lat)
            print(f"  round {rnd + 1}/{args.runs} {name:21s} {tp['rps']:>9,.0f} req/s  c50 p99 "
                  f"{tp.get('p99_us', 0) / 1e3:6.2f} ms max {tp.get('pmax_us', 0) / 1e3:6.1f} ms   c1 p50 "
                  f"{lat.get('p50_us', 0):4.0f} us p99 {lat.get('p99_us', 0) / 1e3:5.2f} ms "
                  f"max {lat.get('pmax_us', 0) / 1e3:5.1f} ms", flush=True)

    summary = {}
    for name in raw:
        url, proc, report = targets[name]
        c50, c1 = raw[name]["c50"], raw[name]["c1"]
        s = {"rps": h.med([r["rps"] for r in c50]), "rps_runs": [r["rps"] for r in c50],
             "c1_rps": h.med([r["rps"] for r in c1]),
             "errors": sum(r["non2xx"] + r["socket_errors"] for r in c50 + c1)}
        for label, runs in (("c50", c50), ("c1", c1)):
            for p in PCTS:
                s[f"{label}_p{p}_us"] = h.med([r.get(f"p{p}_us") for r in runs])
            s[f"{label}_worst_max_us"] = max((r.get("pmax_us") or 0 for r in runs), default=None)
        if proc is not None:
            s["proxy_cpu"] = h.med([r.get("proxy_cpu") for r in c50])
            s["cpu_us_per_req"] = h.med([r.get("cpu_us_per_req") for r in c50])
            s["rss_mb"] = (vm_kb(proc.pid, "VmRSS") or 0) / 1024
            s["peak_rss_mb"] = (vm_kb(proc.pid, "VmHWM") or 0) / 1024
            proc.stop()  # SIGTERM: the proxy writes its GC pause report
            try:
                s["gc"] = json.loads(report.read_text())
            except (OSError, ValueError):
                s["gc"] = None
        summary[name] = s

    print_report(h, args, names, summary, status)
    ratios = {}
    for kind in ("bare", "l4"):
        a, b = summary.get(f"pypy-{kind}"), summary.get(f"cpython-{kind}")
        if a and b:
            ratios[kind] = {k: (a[k] / b[k] if a.get(k) and b.get(k) else None)
                            for k in ("rps", "cpu_us_per_req", "c50_p50_us", "c50_p99_us", "c50_p99.9_us",
                                      "c50_pmax_us", "c1_p50_us", "c1_p99_us", "c1_p99.9_us", "c1_pmax_us", "rss_mb")}
    print("\nPyPy / CPython, same run (req/s >1 is better; CPU per request, latency and RSS <1 are better):")
    for kind, r in ratios.items():
        print(f"  {kind:5s} " + "  ".join(f"{k.replace('_us', '')} {h.fmt(v, '.2f')}" for k, v in r.items()))

    result = {
        "benchmark": "pypy_eval",
        "started": started.isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "kernel": platform.release(),
                 "l3_cache": h._version(["getconf", "LEVEL3_CACHE_SIZE"]),
                 "nginx": h._version([h.NGINX, "-v"]), "wrk": h._version([h.WRK, "-v"])},
        "interpreters": {k: versions(v) for k, v in interpreters.items()},
        "params": {"runs": args.runs, "duration_s": args.duration, "warmup_s": args.warmup,
                   "connections": args.connections, "pinning": pinning, "payload_bytes": len(h.PAYLOAD),
                   "proxy_cpu": h.PROXY_CPU, "load_cpu": h.LOAD_CPU,
                   "gc_variants": {n: {"proxy": k, "env": e, "manual_gc_every": m} for n, k, e, m in GC_VARIANTS}},
        "status": status,
        "httptools_parse_us": parse_us,
        "summary": summary,
        "ratios_pypy_over_cpython": ratios,
        "raw": raw,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"json: {args.json}")
    return 0


def print_report(h, args, names: list, summary: dict, status: dict) -> None:
    ms = lambda v: h.fmt(None if v is None else v / 1e3, ".2f")  # noqa: E731
    print(f"\n{len(h.PAYLOAD)}-byte responses; median of {args.runs} x {args.duration}s; latency in ms "
          f"(wrk full histogram); max = median of the runs' maxima")
    hdr = (f"{'target':21s} {'req/s':>8s} {'c50 p50':>7s} {'p99':>6s} {'p99.9':>6s} {'max':>6s} | "
           f"{'c1 p50':>6s} {'p90':>6s} {'p99':>6s} {'p99.9':>6s} {'max':>6s} | {'CPU':>4s} {'us/req':>6s} "
           f"{'RSS MB':>6s} {'GC max ms':>9s} {'err':>3s}")
    print(hdr + "\n" + "-" * len(hdr))
    for name in names:
        s = summary.get(name)
        if s is None:
            continue  # its status is printed below
        gc = s.get("gc") or {}
        gcmax = max((gc.get(k, {}).get("max_ms", 0) for k in ("minor", "major_step")), default=0) if gc else None
        print(f"{name:21s} {h.fmt(s['rps']):>8s} {ms(s['c50_p50_us']):>7s} {ms(s['c50_p99_us']):>6s} "
              f"{ms(s['c50_p99.9_us']):>6s} {ms(s['c50_pmax_us']):>6s} | {ms(s['c1_p50_us']):>6s} "
              f"{ms(s['c1_p90_us']):>6s} {ms(s['c1_p99_us']):>6s} {ms(s['c1_p99.9_us']):>6s} "
              f"{ms(s['c1_pmax_us']):>6s} | {h.fmt(s.get('proxy_cpu'), '.2f'):>4s} "
              f"{h.fmt(s.get('cpu_us_per_req'), '.1f'):>6s} {h.fmt(s.get('rss_mb'), '.0f'):>6s} "
              f"{h.fmt(gcmax, '.2f'):>9s} {s['errors']:>3d}")
    for name, st in status.items():
        if st != "ok":
            print(f"{name}: {st}")


if __name__ == "__main__":
    sys.exit(main())
