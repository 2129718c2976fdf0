#!/usr/bin/env python3
"""
Idle memory of a txmesh sidecar against the floors it is built on, measured
in the same run: how much of the sidecar's RSS is txmesh, and how much is
the Python, Twisted and OpenSSL every such process carries.

Each target is started, left idle for C{--settle} seconds (imports done,
listeners open), and read from C{/proc/PID/smaps_rollup}: C{Rss}, and
C{Private_Dirty} (memory no other process can share: the heap, the
modules' code objects). The targets:

  python     C{python -c 'import sys'}: the interpreter alone
  reactor    Python with Twisted's reactor and pyOpenSSL, running: the
             least any Twisted process with TLS holds
  twistd     C{twistd -n web}: Twisted's own web server under twistd
             (twistd loads every IServiceMaker plugin at start)
  txmesh     C{twistd -n -r txmesh txmesh-proxy} with the sidecar's
             filter chain (metrics, tracing, router, access log) and an
             admin endpoint
  nginx      an nginx reverse proxy, one worker (master + worker summed),
             for scale

and prints each one's figures and the ratios txmesh/twistd and
txmesh/reactor. The modules' bytecode should be compiled first (as an
installed proxy has it; C{scripts/bench} does it): with
C{PYTHONDONTWRITEBYTECODE} and an editable install, every start compiles
txmesh from source and holds 2-5 MB more.

    .venv/bin/python benchmarks/rss.py [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http1 import NGINX, Proc, Unavailable, free_port, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
TARGET_RSS_MB = 40.0

SIDECAR = """\
node: {{id: rss, namespace: default, workload: rss, app: rss}}
admin: {{address: "tcp:{admin}:interface=127.0.0.1"}}
listeners:
  - name: inbound
    address: "tcp:{port}:interface=127.0.0.1"
    http_filters:
      - {{name: tracing, config: {{sampling: 100, collector: "http://127.0.0.1:9/api/v2/spans"}}}}
      - {{name: metrics}}
      - {{name: access_log, config: {{path: "{log}"}}}}
      - {{name: router}}
    routes: [{{match: {{prefix: "/"}}, cluster: app}}]
clusters:
  - {{name: app, endpoints: [{{address: 127.0.0.1, port: 9}}]}}
"""

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream app {{ server 127.0.0.1:9; keepalive 16; }}
    server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://app; }} }}
}}
"""


def memory_kb(proc: Proc) -> dict[str, int]:
    """
    @return: C{Rss} and C{Private_Dirty} in kB, summed over the process
        group (nginx's master and worker).
    """
    out = {"Rss": 0, "Private_Dirty": 0}
    for pid in proc.group_pids():
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] += int(value.split()[0])
    return out


def start(name: str, tmp: Path) -> tuple[Proc, int | None]:
    """
    @return: the started target and the port to wait for (C{None}: wait a
        moment instead).
    """
    if name == "python":
        return Proc(name, [PYTHON, "-c", "import sys, time; time.sleep(3600)"], tmp / "python.log"), None
    if name == "reactor":
        code = "import OpenSSL.SSL; from twisted.internet import reactor, ssl; reactor.run()"
        return Proc(name, [PYTHON, "-c", code], tmp / "reactor.log"), None
    port = free_port()
    if name == "twistd":
        argv = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "web", "--listen",
                f"tcp:{port}:interface=127.0.0.1", "--path", str(tmp)]
        return Proc(name, argv, tmp / "twistd.log", cwd=tmp), port
    if name == "txmesh":
        conf = tmp / "sidecar.yaml"
        conf.write_text(SIDECAR.format(admin=free_port(), port=port, log=tmp / "access.log"))
        argv = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "-r", "txmesh", "txmesh-proxy", "--config", str(conf)]
        return Proc(name, argv, tmp / "txmesh.log", cwd=ROOT), port
    if name == "nginx":
        prefix = tmp / "nginx"
        prefix.mkdir(exist_ok=True)
        (prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=prefix, port=port))
        return Proc(name, [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], tmp / "nginx.log"), port
    raise ValueError(name)


def measure(name: str, settle: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"txmesh-rss-{name}-") as d:
        proc, port = start(name, Path(d))
        try:
            if port is not None:
                wait_port(proc, port, 20.0)
            time.sleep(settle)
            if not proc.alive():
                raise Unavailable(f"{name} exited: {proc.output()[-400:]}")
            kb = memory_kb(proc)
        finally:
            proc.stop()
    return {"rss_mb": kb["Rss"] / 1024, "private_dirty_mb": kb["Private_Dirty"] / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Idle RSS of a txmesh sidecar against its floors, same run.")
    ap.add_argument("--runs", type=int, default=3, help="rounds, targets interleaved (default 3)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds idle before reading (default 2)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    targets = ["python", "reactor", "twistd", "txmesh"] + (["nginx"] if Path(NGINX).exists() else [])
    rounds: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    for _ in range(args.runs):
        for target in targets:
            rounds[target].append(measure(target, args.settle))
    summary = {t: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for t, runs in rounds.items()}
    print(f"{'target':10s} {'RSS MB':>8s} {'private dirty MB':>17s}   (median of {args.runs})")
    for target, s in summary.items():
        print(f"{target:10s} {s['rss_mb']:8.1f} {s['private_dirty_mb']:17.1f}")
    tx = summary["txmesh"]
    ratios = {f"txmesh/{peer}": tx["rss_mb"] / summary[peer]["rss_mb"] for peer in ("twistd", "reactor")}
    above_twistd = tx["rss_mb"] - summary["twistd"]["rss_mb"]
    for key, value in ratios.items():
        print(f"RSS {key:16s} {value:.3f}")
    print(f"txmesh above twistd web: {above_twistd:+.1f} MB; "
          f"Python + Twisted reactor + pyOpenSSL alone: {summary['reactor']['rss_mb']:.1f} MB "
          f"(goal for a whole sidecar: <= {TARGET_RSS_MB:.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps({
            "params": {"runs": args.runs, "settle_s": args.settle},
            "summary": summary, "ratios": ratios, "txmesh_above_twistd_mb": above_twistd,
            "target_rss_mb": TARGET_RSS_MB,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
