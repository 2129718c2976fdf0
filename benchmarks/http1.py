#!/usr/bin/env python3
"""
HTTP/1.1 proxy benchmark: txmesh-proxy against nginx in the same run.

One command starts, each in its own temporary prefix on 127.0.0.1 and random
free ports:

  app     nginx returning a fixed 100-byte body           taskset -c 1
  nginx   nginx reverse proxy, upstream keepalive 64       taskset -c 0
  haproxy haproxy 1 thread, mode http, keep-alive upstream taskset -c 0
  txmesh  twistd -n txmesh-proxy with a generated config   taskset -c 0
  bare    benchmarks/bare_proxy.py (only with --bare)      taskset -c 0

then loads each target with wrk (taskset -c 1): -t1 -c50 for throughput and
-t1 -c1 --latency for the added latency, --runs rounds with targets
interleaved, and prints medians and ratios measured in this run (absolute
numbers on this machine swing 30-50% between runs; ratios hold better).

It is a measurement, not a test: it exits 0 whether or not the targets
(txmesh >= 0.5x nginx-proxy req/s, txmesh added p50 <= 150 us) are met.

    .venv/bin/python benchmarks/http1.py            # 3 runs x 5 s
    .venv/bin/python benchmarks/http1.py --quick    # 1 run x 2 s, smoke test
    .venv/bin/python benchmarks/http1.py --bare --runs 5 --duration 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiling import print_profile, profile_under_load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
NGINX_MODULES = Path("/usr/lib/nginx/modules")

# Exactly 100 bytes, printable, nothing nginx would interpret inside "...".
PAYLOAD = (b"txmesh-bench-" + b"0123456789abcdefghijklmnopqrstuvwxyz" * 3)[:100]
assert len(PAYLOAD) == 100

TARGET_RPS_RATIO = 0.5  # txmesh req/s >= 0.5 x nginx-proxy req/s
TARGET_ADDED_P50_US = 150.0  # txmesh added p50 at 1 connection vs direct

PROXY_CPU = "0"
LOAD_CPU = "1"  # wrk and the app share it; the proxy under test has CPU 0 alone


class Unavailable(Exception):
    """A target could not be started or failed its sanity check."""


# -- processes ----------------------------------------------------------------


class Proc:
    """A child process in its own session (so its whole group can be ended)."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path | None = None, env=None):
        self.name, self.argv, self.log = name, argv, log
        self._logf = open(log, "wb")  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, limit: int = 20000) -> str:
        try:
            data = self.log.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode("utf-8", "replace")

    def group_pids(self) -> list[int]:
        """Pids in this process's group (nginx master + workers)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getpgid(int(entry)) == self.pid:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.group_pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        total = 0
        for pid in self.group_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except (OSError, ValueError, IndexError):
                pass
        return total / 1024

    def repin(self, cpu: str) -> None:
        """Move every process (and thread) of the group onto `cpu`."""
        for pid in self.group_pids():
            subprocess.run(
                ["taskset", "-a", "-p", "-c", cpu, str(pid)], check=False, capture_output=True, timeout=5
            )

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM the group, then SIGKILL after `timeout`; bounded."""
        try:
            if self.alive():
                self._signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    try:
                        self.popen.wait(2.0)
                    except subprocess.TimeoutExpired:
                        pass
            # Leftover group members (e.g. nginx workers) after the leader went.
            if self.group_pids():
                self._signal(signal.SIGKILL)
        finally:
            self._logf.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise Unavailable(f"{proc.name} exited with {proc.popen.returncode}: {last_lines(proc.output())}")
        if port_open(port):
            return
        time.sleep(0.05)
    raise Unavailable(f"{proc.name} did not listen on {port} within {timeout:.0f}s")


def last_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-400:] or "no output"


def http_get(url: str, timeout: float = 2.0, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def pin(cpu: str, argv: list[str], enabled: bool) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if enabled else argv


# -- the targets --------------------------------------------------------------

NGINX_COMMON = """\
{top}worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{body}
}}
{tail}"""

NGINX_APP = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "{payload}"; }}
    }}"""

NGINX_PROXY = """\
    upstream app {{
        server 127.0.0.1:{app_port};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def start_nginx(name: str, tmp: Path, cpu: str, body: str, port: int, pinning: bool,
                stream: str = "") -> Proc:
    """
    Start one nginx (one worker) in its own prefix under C{tmp}.

    @param body: what goes inside C{http {}}.
    @param stream: a C{stream {}} block (L4); loads the dynamic stream
        module when this nginx has it as a module.
    """
    prefix = tmp / name
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    top = ""
    if stream and (NGINX_MODULES / "ngx_stream_module.so").exists():
        top = f"load_module {NGINX_MODULES / 'ngx_stream_module.so'};\n"
    conf.write_text(NGINX_COMMON.format(prefix=prefix, body=body, top=top, tail=stream))
    proc = Proc(name, pin(cpu, [NGINX, "-p", f"{prefix}/", "-c", str(conf)], pinning), prefix / "stdout.log")
    try:
        wait_port(proc, port, 10)
    except Unavailable as e:
        err = (prefix / "error.log").read_text(errors="replace") if (prefix / "error.log").exists() else ""
        raise Unavailable(f"{e} {last_lines(err)}") from None
    return proc


HAPROXY_CONFIG = """\
global
    nbthread 1
    maxconn 4096
    log stderr format short local0 err
defaults
    mode {mode}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    {options}
frontend fe
    bind 127.0.0.1:{port} backlog 4096
    default_backend app
backend app
    server app 127.0.0.1:{app_port}
"""

# Keep-alive both ways (haproxy 2.x's default), idle upstream connections
# reused by any client, like nginx's upstream keepalive pool.
HAPROXY_HTTP_OPTIONS = "option http-keep-alive\n    http-reuse always"


def start_haproxy(name: str, tmp: Path, cpu: str, app_port: int, pinning: bool, mode: str = "http") -> tuple[Proc, int]:
    """
    Start haproxy in the foreground (C{-db}), one thread, its config in C{tmp}.

    @param mode: C{http} (an HTTP reverse proxy) or C{tcp} (L4).
    @return: the process and its port.
    """
    if not os.path.exists(HAPROXY):
        raise Unavailable(f"{HAPROXY} not found (apt: haproxy)")
    port = free_port()
    conf = tmp / f"{name}.cfg"
    conf.write_text(HAPROXY_CONFIG.format(mode=mode, port=port, app_port=app_port,
                                          options=HAPROXY_HTTP_OPTIONS if mode == "http" else ""))
    proc = Proc(name, pin(cpu, [HAPROXY, "-db", "-f", str(conf)], pinning), tmp / f"{name}.log")
    wait_port(proc, port, 10)
    return proc, port


TXMESH_CONFIG = """\
node: {{id: bench, workload: bench, namespace: default, app: bench, version: v1}}
admin:
  address: "tcp:{admin_port}:interface=127.0.0.1"
listeners:
  - name: http
    address: "tcp:{port}:interface=127.0.0.1"
    protocol: http
    http_filters:
{filters}
    virtual_hosts:
      - name: bench
        domains: ["*"]
        routes:
          - {{name: health, match: {{path: /healthz}}, direct_response: {{status: 200, body: ok}}}}
          - {{name: v2, match: {{prefix: /, headers: [{{name: x-version, exact: v2}}]}}, cluster: app}}
          - {{name: default, match: {{prefix: /}}, cluster: app}}
clusters:
  - name: app
    endpoints: ["127.0.0.1:{app_port}"]
"""


# Propagation only (no collector on this box): trace headers parsed and
# written on every request, 1% of new traces sampled, as Istio's default.
TRACING_FILTER = "      - name: tracing\n        config: {kind: client}\n"


def start_txmesh(tmp: Path, app_port: int, metrics: bool, pinning: bool, timeout: float,
                 reactor: str = "txmesh") -> tuple[Proc, int]:
    """Start txmesh-proxy and wait for admin /ready (or the listener). Returns (proc, port)."""
    port, admin_port = free_port(), free_port()
    filters = ("      - name: metrics\n" if metrics else "") + TRACING_FILTER + "      - name: router"
    conf = tmp / ("txmesh.yaml" if metrics else "txmesh-nometrics.yaml")
    conf.write_text(
        TXMESH_CONFIG.format(admin_port=admin_port, port=port, app_port=app_port, filters=filters)
    )
    return launch_txmesh(conf, port, admin_port, pinning, timeout, reactor), port


def launch_txmesh(conf: Path, port: int, admin_port: int, pinning: bool, timeout: float,
                  reactor: str = "txmesh") -> Proc:
    """
    Run C{twistd -n txmesh-proxy --config conf} on the proxy CPU and wait
    until its admin C{/ready} answers 200 (or, without an admin, C{port}
    listens).

    @raise Unavailable: it exited or was not ready within C{timeout}.
    """
    twistd = VENV_BIN / "twistd"
    if not twistd.exists():
        raise Unavailable(f"{twistd} not found")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    argv = pin(PROXY_CPU, [str(twistd), "-n", "--pidfile=", "-r", reactor, "txmesh-proxy", "--config", str(conf)],
               pinning)
    proc = Proc("txmesh", argv, conf.with_suffix(".log"), cwd=ROOT, env=env)
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        if not proc.alive():
            out = proc.output()
            if "Unknown command: txmesh-proxy" in out:
                raise Unavailable("twistd has no txmesh-proxy plugin yet: 'Unknown command: txmesh-proxy'")
            raise Unavailable(f"txmesh-proxy exited with {proc.popen.returncode}: {last_lines(out, 1)}")
        try:
            status, _ = http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5)
            if status == 200:
                return proc
        except OSError:
            # No admin answering: a listening data port counts as ready too,
            # once the admin has had a couple of seconds to come up.
            if time.monotonic() > start + 2 and port_open(port):
                return proc
        time.sleep(0.1)
    proc.stop()
    raise Unavailable(f"not ready within {timeout:.0f}s: {last_lines(proc.output())}")


def start_bare(tmp: Path, app_port: int, pinning: bool) -> tuple[Proc, int]:
    port = free_port()
    argv = [
        str(VENV_BIN / "python"),
        str(ROOT / "benchmarks" / "bare_proxy.py"),
        "--listen",
        str(port),
        "--upstream",
        f"127.0.0.1:{app_port}",
    ]
    proc = Proc("bare", pin(PROXY_CPU, argv, pinning), tmp / "bare.log", cwd=ROOT)
    wait_port(proc, port, 10)
    return proc, port


def sanity_check(name: str, url: str) -> None:
    try:
        status, body = http_get(url, timeout=3.0)
    except OSError as e:
        raise Unavailable(f"sanity request to {url} failed: {e}") from None
    if status != 200 or body != PAYLOAD:
        raise Unavailable(
            f"sanity check of {name}: status {status}, body {body[:60]!r} ({len(body)} bytes), "
            f"expected 200 and the {len(PAYLOAD)}-byte payload"
        )


# -- wrk ----------------------------------------------------------------------

UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk time {text!r}")
    return float(m.group(1)) * UNITS_US[m.group(2)]


def parse_wrk(out: str) -> dict:
    res: dict = {
        "rps": None,
        "p50_us": None,
        "p90_us": None,
        "p99_us": None,
        "requests": None,
        "non2xx": 0,
        "socket_errors": 0,
    }
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+(?:us|ms|s|m|h))\s*$", out, re.MULTILINE)
        if m:
            res[f"p{pct}_us"] = to_us(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(x) for x in m.groups())
    return res


def run_wrk(url: str, connections: int, duration: int, pinning: bool) -> dict:
    argv = pin(
        LOAD_CPU,
        [WRK, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s", "--latency", url],
        pinning,
    )
    p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=duration + 30)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {last_lines(p.stderr or p.stdout)}")
    res = parse_wrk(p.stdout)
    if res["rps"] is None:
        raise RuntimeError(f"cannot parse wrk output: {last_lines(p.stdout)}")
    return res


# -- main ---------------------------------------------------------------------


def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v: float | None, spec: str = ",.0f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def wrk_parser(description: str, json_name: str) -> argparse.ArgumentParser:
    """
    The options every C{wrk} benchmark here shares (rounds, durations,
    pinning, JSON path, profiling); L{parse_wrk_args} applies C{--quick}.
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--runs", type=int, default=3, help="rounds, targets interleaved in each (default 3)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c for the throughput run (default 50)")
    ap.add_argument(
        "--warmup", type=int, default=1, help="seconds of unrecorded load per target first (default 1)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 run of 2 s each")
    ap.add_argument("--no-txmesh", action="store_true", help="skip txmesh-proxy")
    ap.add_argument("--no-haproxy", action="store_true", help="skip the haproxy peer")
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                    help="after the rounds, profile txmesh with py-spy under this many seconds of load")
    ap.add_argument("--reactor", default="txmesh",
                    help="twistd reactor for txmesh-proxy (default: txmesh, the lean epoll; 'epoll' for Twisted's)")
    ap.add_argument("--txmesh-timeout", type=float, default=20.0, help="seconds to wait for txmesh /ready")
    ap.add_argument("--no-pin", action="store_true", help="do not use taskset")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument(
        "--json",
        type=Path,
        default=ROOT / "benchmarks" / "results" / json_name,
        help=f"where to write JSON results (default benchmarks/results/{json_name})",
    )
    return ap


def parse_wrk_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.duration = 1, 2
    if args.runs < 1 or args.duration < 1:
        ap.error("--runs and --duration must be >= 1")
    return args


def parse_args(argv=None) -> argparse.Namespace:
    ap = wrk_parser("HTTP/1.1 proxy benchmark: txmesh vs nginx and haproxy, same run, ratios.", "http1-latest.json")
    ap.add_argument("--bare", action="store_true", help="also measure benchmarks/bare_proxy.py (Python peer)")
    ap.add_argument(
        "--no-metrics", action="store_true", help="leave the metrics filter out of the txmesh config"
    )
    ap.add_argument(
        "--c1-shared-cpu",
        action="store_true",
        help="for the -c1 latency runs move the proxy onto the load CPU (with wrk and the app), so the "
        "added latency excludes cross-CPU wake-ups (about 30 us per hop on this VM, 4 hops)",
    )
    return parse_wrk_args(ap, argv)


def check_tools(pinning: bool) -> bool:
    for tool in (NGINX, WRK) + (("taskset",) if pinning else ()):
        if not shutil.which(tool):
            sys.exit(f"http1.py: {tool} not found")
    if pinning:
        try:
            cpus = os.sched_getaffinity(0)
        except AttributeError:
            cpus = set(range(os.cpu_count() or 1))
        if not {int(PROXY_CPU), int(LOAD_CPU)} <= cpus:
            print(
                f"warning: CPUs {PROXY_CPU} and {LOAD_CPU} not both available ({sorted(cpus)}); not pinning"
            )
            return False
    return pinning


def harness(name: str, args, pinning: bool, run) -> int:
    """
    Run C{run(args, pinning, tmp, procs)} with what every benchmark needs
    around it: SIGTERM/SIGHUP/Ctrl-C stop it cleanly, every process it
    appended to C{procs} is stopped, and its temp dir is removed (unless
    C{--keep-tmp}).
    """

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    tmp = Path(tempfile.mkdtemp(prefix=f"txmesh-bench-{name}-"))
    procs: list[Proc] = []
    try:
        return run(args, pinning, tmp, procs)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        for p in reversed(procs):
            p.stop()
        if args.keep_tmp:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def pinning_available(pinning: bool) -> bool:
    """
    @return: C{pinning}, unless the proxy and load CPUs are not both ours.
    """
    if pinning and not {int(PROXY_CPU), int(LOAD_CPU)} <= os.sched_getaffinity(0):
        print(f"warning: CPUs {PROXY_CPU} and {LOAD_CPU} not both available; not pinning")
        return False
    return pinning


def measure_targets(args, pinning: bool, targets: dict, status: dict,
                    required: tuple = ("direct", "nginx")) -> tuple[list, dict, dict]:
    """
    Load every target: C{wrk -c<connections>} for req/s and C{-c1} for
    latency, C{args.runs} rounds with the first target rotating.

    @param targets: C{{name: (url, Proc or None)}}; a target other than
        C{required} that fails is dropped (and C{status} says why).
    @return: C{(names, raw, summary)}, medians per target in C{summary}.
    """
    names = list(targets)
    est = len(names) * (args.warmup + args.runs * 2 * args.duration)
    print(
        f"targets: {', '.join(names)}; {args.runs} run(s) x {args.duration}s x (c{args.connections} + c1); "
        f"pinning {'proxies CPU ' + PROXY_CPU + ', app+wrk CPU ' + LOAD_CPU if pinning else 'off'}; ~{est}s"
    )

    if args.warmup:
        for name in list(names):
            try:
                run_wrk(targets[name][0], args.connections, args.warmup, pinning)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                if name in required:
                    raise
                status[name] = f"failed during warm-up ({e})"
                print(f"  warm-up {name}: FAILED: {e}")
                del targets[name]
                names.remove(name)

    raw: dict[str, dict[str, list]] = {n: {"throughput": [], "latency": []} for n in names}
    for rnd in range(args.runs):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate who goes first
        for name in order:
            url, proc = targets[name]
            try:
                cpu0, t0 = (proc.cpu_seconds() if proc else 0.0), time.monotonic()
                tp = run_wrk(url, args.connections, args.duration, pinning)
                if proc is not None:
                    tp["proxy_cpu"] = (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                    tp["proxy_rss_mb"] = proc.rss_mb()
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"died under load: {last_lines(proc.output())}")
                shared = getattr(args, "c1_shared_cpu", False) and pinning and proc is not None
                if shared:
                    proc.repin(LOAD_CPU)
                try:
                    lat = run_wrk(url, 1, args.duration, pinning)
                finally:
                    if shared:
                        proc.repin(PROXY_CPU)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                if name in required:
                    raise
                status[name] = f"failed during load ({e})"
                print(f"  run {rnd + 1}/{args.runs} {name:9s} FAILED: {e}")
                del targets[name], raw[name]
                names.remove(name)
                continue
            raw[name]["throughput"].append(tp)
            raw[name]["latency"].append(lat)
            errs = tp["non2xx"] + tp["socket_errors"] + lat["non2xx"] + lat["socket_errors"]
            print(
                f"  run {rnd + 1}/{args.runs} {name:9s} {tp['rps']:>10,.0f} req/s   "
                f"c1 p50 {fmt(lat['p50_us'], '.0f')} us" + (f"   ERRORS {errs}" if errs else "")
            )

    summary: dict[str, dict] = {}
    for name in names:
        tps, lats = raw[name]["throughput"], raw[name]["latency"]
        summary[name] = {
            "rps": med([r["rps"] for r in tps]),
            "rps_runs": [r["rps"] for r in tps],
            "c50_p50_us": med([r["p50_us"] for r in tps]),
            "c50_p99_us": med([r["p99_us"] for r in tps]),
            "c1_rps": med([r["rps"] for r in lats]),
            "c1_p50_us": med([r["p50_us"] for r in lats]),
            "c1_p90_us": med([r["p90_us"] for r in lats]),
            "c1_p99_us": med([r["p99_us"] for r in lats]),
            "errors": sum(r["non2xx"] + r["socket_errors"] for r in tps + lats),
            "proxy_cpu": med([r.get("proxy_cpu") for r in tps]),
            "proxy_rss_mb": max([r["proxy_rss_mb"] for r in tps if "proxy_rss_mb" in r], default=None),
        }
    direct_p50 = summary["direct"]["c1_p50_us"]
    for name in names:
        s = summary[name]
        s["added_p50_us"] = (
            None
            if name == "direct" or s["c1_p50_us"] is None or direct_p50 is None
            else s["c1_p50_us"] - direct_p50
        )

    return names, raw, summary

def rps_ratios(summary: dict, pairs: list, key: str = "rps") -> dict:
    """
    @return: C{{"a/b": summary[a][key] / summary[b][key]}}, C{None} where
        either side was not measured.
    """
    out = {}
    for a, b in pairs:
        x, y = summary.get(a, {}).get(key), summary.get(b, {}).get(key)
        out[f"{a}/{b}"] = x / y if x and y else None
    return out


def print_table(title: str, names: list, summary: dict, status: dict) -> None:
    """Print one row per measured target, then why the others are missing."""
    print()
    print(title)
    hdr = (
        f"{'target':9s} {'req/s':>10s} {'min..max':>17s} {'c1 p50':>8s} {'c1 p90':>8s} {'c1 p99':>8s} "
        f"{'added p50':>10s} {'proxy CPU':>9s} {'RSS MB':>7s} {'errors':>6s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        s = summary[name]
        rng = f"{min(s['rps_runs']):,.0f}..{max(s['rps_runs']):,.0f}"
        print(
            f"{name:9s} {fmt(s['rps']):>10s} {rng:>17s} {fmt(s['c1_p50_us']):>6s}us {fmt(s['c1_p90_us']):>6s}us "
            f"{fmt(s['c1_p99_us']):>6s}us {fmt(s['added_p50_us'], '+.0f'):>8s}us "
            f"{fmt(s['proxy_cpu'], '.2f'):>9s} {fmt(s['proxy_rss_mb'], '.1f'):>7s} {s['errors']:>6d}"
        )
    for name, st in status.items():
        if name not in summary:
            print(f"{name}: {st}")

def main(argv=None) -> int:
    args = parse_args(argv)
    return harness("http1", args, check_tools(not args.no_pin), run)


def run(args, pinning: bool, tmp: Path, procs: list) -> int:
    started = datetime.datetime.now(datetime.timezone.utc)
    notes: list[str] = []
    status: dict[str, str] = {}

    app_port = free_port()
    procs.append(
        start_nginx(
            "app", tmp, LOAD_CPU, NGINX_APP.format(port=app_port, payload=PAYLOAD.decode()), app_port, pinning
        )
    )
    nginx_port = free_port()
    nginx_proc = start_nginx(
        "nginx", tmp, PROXY_CPU, NGINX_PROXY.format(port=nginx_port, app_port=app_port), nginx_port, pinning
    )
    procs.append(nginx_proc)

    # name -> (url, process whose CPU/RSS we report, or None)
    targets: dict[str, tuple[str, Proc | None]] = {
        "direct": (f"http://127.0.0.1:{app_port}/", None),
        "nginx": (f"http://127.0.0.1:{nginx_port}/", nginx_proc),
    }
    for name in list(targets):
        sanity_check(name, targets[name][0])  # nginx rows must work: let this fail loudly
        status[name] = "ok"
    if args.no_haproxy:
        status["haproxy"] = "skipped (--no-haproxy)"
    else:
        try:
            proc, port = start_haproxy("haproxy", tmp, PROXY_CPU, app_port, pinning)
            procs.append(proc)
            sanity_check("haproxy", f"http://127.0.0.1:{port}/")
            targets["haproxy"] = (f"http://127.0.0.1:{port}/", proc)
            status["haproxy"] = "ok"
        except Unavailable as e:
            status["haproxy"] = f"unavailable ({e})"
        print(f"haproxy: {status['haproxy']}")

    if args.no_txmesh:
        status["txmesh"] = "skipped (--no-txmesh)"
    else:
        metrics = not args.no_metrics
        try:
            try:
                proc, port = start_txmesh(tmp, app_port, metrics, pinning, args.txmesh_timeout, args.reactor)
            except Unavailable as e:
                if not (metrics and "unknown HTTP filter 'metrics'" in str(e) + _logs(tmp, "txmesh.log")):
                    raise
                notes.append("txmesh: (metrics filter unavailable) - measured without the metrics filter")
                metrics = False
                proc, port = start_txmesh(tmp, app_port, metrics, pinning, args.txmesh_timeout, args.reactor)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}/"
            sanity_check("txmesh", url)
            try:
                st, body = http_get(f"http://127.0.0.1:{port}/healthz")
                if (st, body) != (200, b"ok"):
                    notes.append(
                        f"txmesh: /healthz direct_response gave {st} {body[:40]!r}, expected 200 b'ok'"
                    )
            except OSError as e:
                notes.append(f"txmesh: /healthz direct_response failed: {e}")
            targets["txmesh"] = (url, proc)
            status["txmesh"] = "ok" + (
                ""
                if metrics
                else (" (metrics filter unavailable)" if not args.no_metrics else " (--no-metrics)")
            )
        except Unavailable as e:
            status["txmesh"] = f"unavailable ({e})"
        print(f"txmesh: {status['txmesh']}")

    if args.bare:
        try:
            proc, port = start_bare(tmp, app_port, pinning)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}/"
            sanity_check("bare", url)
            targets["bare"] = (url, proc)
            status["bare"] = "ok"
        except Unavailable as e:
            status["bare"] = f"unavailable ({e})"
        print(f"bare: {status['bare']}")

    required = ("direct", "nginx")
    names, raw, summary = measure_targets(args, pinning, targets, status, required)
    pairs = [("txmesh", "nginx"), ("txmesh", "haproxy"), ("txmesh", "direct"), ("nginx", "direct"),
             ("haproxy", "direct")]
    if "bare" in summary:
        pairs += [("bare", "nginx"), ("txmesh", "bare")]
    ratios = rps_ratios(summary, pairs)
    ratios_c1 = rps_ratios(summary, pairs, "c1_rps")
    profile = None
    if args.profile and "txmesh" in targets:
        profile = profile_under_load(targets["txmesh"][1], args.profile, tmp / "txmesh-profile.txt",
                                     lambda: run_wrk(targets["txmesh"][0], args.connections, args.profile, pinning))

    print_table(
        f"HTTP/1.1, {len(PAYLOAD)}-byte responses, wrk -t1 -c{args.connections} (req/s) and -c1 (latency), "
        f"median of {args.runs} x {args.duration}s",
        names, summary, status)
    print()
    print(f"ratios (req/s, same run; c{args.connections} and c1):")
    for key, val in ratios.items():
        print(f"  {key:16s} {fmt(val, '.3f', 'n/a')}   c1 {fmt(ratios_c1[key], '.3f', 'n/a')}")
    if profile:
        print_profile("txmesh", profile)
    print(
        "added p50 latency at 1 connection vs direct"
        + (" (proxies moved to the load CPU)" if args.c1_shared_cpu and pinning else "")
        + ":"
    )
    for name in names:
        if name != "direct":
            vs = ""
            if (
                name != "nginx"
                and "nginx" in summary
                and summary[name]["c1_p50_us"] is not None
                and summary["nginx"]["c1_p50_us"] is not None
            ):
                vs = f"   ({summary[name]['c1_p50_us'] - summary['nginx']['c1_p50_us']:+.0f} us vs nginx-proxy)"
            print(f"  {name:14s} {fmt(summary[name]['added_p50_us'], '+.0f', 'n/a')} us{vs}")

    verdicts = {}
    if "txmesh" in summary:
        r, a = ratios["txmesh/nginx"], summary["txmesh"]["added_p50_us"]
        verdicts["rps_ratio"] = "PASS" if r is not None and r >= TARGET_RPS_RATIO else "MISS"
        verdicts["added_p50"] = "PASS" if a is not None and a <= TARGET_ADDED_P50_US else "MISS"
        if summary["txmesh"]["errors"]:
            notes.append(
                f"txmesh: {summary['txmesh']['errors']} non-2xx/socket errors during load: "
                "its req/s is suspect"
            )
    else:
        verdicts = {"rps_ratio": "n/a", "added_p50": "n/a"}
    print("targets:")
    print(
        f"  txmesh >= {TARGET_RPS_RATIO}x nginx-proxy req/s: {verdicts['rps_ratio']} "
        f"({fmt(ratios['txmesh/nginx'], '.3f', 'n/a')})"
    )
    print(
        f"  txmesh added p50 <= {TARGET_ADDED_P50_US:.0f} us:   {verdicts['added_p50']} "
        f"({fmt(summary.get('txmesh', {}).get('added_p50_us'), '+.0f', 'n/a')} us)"
    )
    for n in notes:
        print(f"note: {n}")
    for name in names:
        if summary[name]["errors"] and name != "txmesh":
            print(f"note: {name}: {summary[name]['errors']} non-2xx/socket errors during load")

    result = {
        "benchmark": "http1",
        "started": started.isoformat(timespec="seconds"),
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "nginx": _version([NGINX, "-v"]),
            "wrk": _version([WRK, "-v"]),
            "haproxy": _version([HAPROXY, "-v"]),
        },
        "params": {
            "runs": args.runs,
            "duration_s": args.duration,
            "connections": args.connections,
            "warmup_s": args.warmup,
            "pinning": pinning,
            "payload_bytes": len(PAYLOAD),
            "proxy_cpu": PROXY_CPU,
            "load_cpu": LOAD_CPU,
            "c1_shared_cpu": bool(args.c1_shared_cpu and pinning),
        },
        "status": status,
        "summary": summary,
        "ratios": ratios,
        "ratios_c1": ratios_c1,
        "profile": profile,
        "targets": {"txmesh/nginx_rps_min": TARGET_RPS_RATIO, "txmesh_added_p50_us_max": TARGET_ADDED_P50_US},
        "verdicts": verdicts,
        "notes": notes,
        "raw": raw,
    }
    write_result(args.json, result)
    return 0


def write_result(path: Path, result: dict) -> None:
    """Write a benchmark's JSON result (making its directory) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"json: {path}")


def _logs(tmp: Path, name: str) -> str:
    try:
        return (tmp / name).read_text(errors="replace")
    except OSError:
        return ""


def _version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=5)
        lines = (p.stderr + p.stdout).strip().splitlines()
        return lines[0].strip() if lines else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
