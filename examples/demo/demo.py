"""
Run the txmesh demo mesh: sample apps with txmesh-proxy sidecars on
127.0.0.1 (static YAML configs, no control plane), then a short tour.

Started by C{scripts/demo} (which makes the virtualenv first)::

    scripts/demo            # start, run the tour, stay up until Ctrl-C / SIGTERM
    scripts/demo --check    # start, run the tour, assert its results, stop; exit 0/1
    scripts/demo --stop     # stop a demo left running

State (logs, pids) lives in C{.demo/} at the repository root, or in
C{$TXMESH_DEMO_DIR}.  This file uses only the standard library, so
C{--stop} works without the virtualenv.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STATE_DIR = os.environ.get("TXMESH_DEMO_DIR") or os.path.join(ROOT, ".demo")
PIDS = "pids.json"
START_TIMEOUT = float(os.environ.get("TXMESH_DEMO_START_TIMEOUT", "20"))
MARKER = os.path.join(ROOT, "examples", "demo")  # in every demo process's command line

HOST = "127.0.0.1"
FRONTEND_INBOUND = 15810
FRONTEND_OUTBOUND = 15811
FRONTEND_TCP = 15812
FRONTEND_ADMIN = 15819


class Component:
    """
    One process of the demo: a sample app (ready when its port accepts) or
    a sidecar (ready when its admin C{/ready} answers 200).
    """

    def __init__(self, name: str, argv: list[str], ports: list[int], ready_port: int, admin: bool):
        self.name = name
        self.argv = argv
        self.ports = ports
        self.ready_port = ready_port
        self.admin = admin
        self.process: subprocess.Popen | None = None
        self.log = os.path.join(STATE_DIR, name + ".log")

    def is_ready(self) -> bool:
        if not self.admin:
            try:
                with socket.create_connection((HOST, self.ready_port), timeout=0.5):
                    return True
            except OSError:
                return False
        status, _, _ = http_get(self.ready_port, "/ready", timeout=1.0)
        return status == 200


def yaml_ports(path: str) -> list[int]:
    """
    @return: the ports of a sidecar config's listeners and admin endpoint
        (its C{tcp:PORT:interface=...} endpoint strings).
    """
    with open(path) as f:
        return [int(p) for p in re.findall(r"\btcp:(\d+):", f.read())]


def admin_port(path: str) -> int:
    with open(path) as f:
        text = f.read()
    m = re.search(r"^admin:\s*\n\s+address:\s*tcp:(\d+):", text, re.M)
    if m is None:
        raise SystemExit(f"demo: no admin address in {path}")
    return int(m.group(1))


def components() -> list[Component]:
    python = sys.executable
    twistd = os.path.join(os.path.dirname(python), "twistd")
    twistd_argv = [twistd] if os.path.exists(twistd) else [
        python, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
    services = os.path.join(HERE, "services.py")
    out = [
        Component("backend-v1", [python, services, "--role", "backend", "--version", "v1", "--port", "15801"],
                  [15801], 15801, False),
        Component("backend-v2", [python, services, "--role", "backend", "--version", "v2", "--port", "15802"],
                  [15802], 15802, False),
        Component("frontend", [python, services, "--role", "frontend", "--port", "15800",
                               "--backend-url", f"http://{HOST}:{FRONTEND_OUTBOUND}/"],
                  [15800], 15800, False),
    ]
    for name in ("backend-v1-sidecar", "backend-v2-sidecar", "frontend-sidecar"):
        config = os.path.join(HERE, name + ".yaml")
        out.append(Component(
            name,
            twistd_argv + ["-n", "--pidfile=", "txmesh-proxy", "--config", config, "--drain-timeout", "1"],
            yaml_ports(config), admin_port(config), True))
    return out


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The repository (txmesh and its twisted/plugins) and the example
    # filters' package and twisted/plugins dir, on sys.path before
    # twisted.plugins is first imported.
    paths = [ROOT, os.path.join(ROOT, "examples", "filters")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent(parent: int) -> Callable[[], None]:
    """
    @return: a C{preexec_fn} that makes the child get SIGTERM when this
        process dies, even by SIGKILL (Linux only; elsewhere a no-op).
    """

    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:
            os._exit(1)

    return preexec


# --- HTTP without dependencies (readiness and the curl-less tour) ---------

def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
    """
    @return: C{(status, headers, body)}; status 0 if the request failed.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "curl/demo", "Accept": "*/*", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    except (OSError, http.client.HTTPException):
        return 0, [], b""
    finally:
        conn.close()


# --- process state ------------------------------------------------------

def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _ours(pid: int) -> bool:
    """
    @return: whether C{pid} is alive and one of this demo's processes (pid
        files can outlive their processes and pids get reused).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    if not os.path.isdir("/proc"):
        return True  # cannot tell; trust the pid file
    return MARKER in _cmdline(pid)


def _read_pids() -> dict[str, Any]:
    try:
        with open(os.path.join(STATE_DIR, PIDS)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_pids(main_pid: int, children: dict[str, int]) -> None:
    tmp = os.path.join(STATE_DIR, PIDS + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"demo": main_pid, "children": children}, f)
    os.replace(tmp, os.path.join(STATE_DIR, PIDS))


def _remove_pids() -> None:
    try:
        os.unlink(os.path.join(STATE_DIR, PIDS))
    except OSError:
        pass


def _terminate(pids: list[int], grace: float = 6.0) -> None:
    """
    SIGTERM each process's group (each child leads its own), wait up to
    C{grace} seconds, then SIGKILL what is left.
    """
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our child, so a zombie does not count as alive.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_command() -> int:
    state = _read_pids()
    main_pid = state.get("demo")
    main_alive = bool(main_pid) and main_pid != os.getpid() and _ours(main_pid)
    children = [p for p in state.get("children", {}).values() if _ours(p)]
    if not main_alive and not children:
        print("demo: no demo is running")
        _remove_pids()
        return 0
    if main_alive:
        print(f"demo: stopping the demo (pid {main_pid})")
        os.kill(main_pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(main_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(main_pid):
            os.kill(main_pid, signal.SIGKILL)
        children = [p for p in children if _ours(p)]
    if children:
        print(f"demo: stopping {len(children)} leftover process(es): {' '.join(map(str, children))}")
        _terminate(children)
    _remove_pids()
    print("demo: stopped")
    return 0


def busy_ports(ports: list[int]) -> list[int]:
    busy = []
    for port in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            busy.append(port)
        finally:
            s.close()
    return busy


# --- the tour -----------------------------------------------------------

class Step:
    """
    One tour stop: a curl command (with an optional C{| grep} or
    C{| head}), and what C{--check} expects of its output.
    """

    def __init__(self, title: str, port: int, path: str = "/", headers: dict[str, str] | None = None,
                 include: bool = False, grep: str | None = None, tail: int | None = None,
                 repeat: int = 1, check: Callable[[str], str | None] | None = None, note: str = ""):
        self.title = title
        self.port = port
        self.path = path
        self.headers = headers or {}
        self.include = include
        self.grep = grep
        self.tail = tail
        self.repeat = repeat
        self.check = check
        self.note = note

    def command(self) -> str:
        parts = ["curl -s"]
        if self.include:
            parts.append("-i")
        for k, v in self.headers.items():
            parts.append(f"-H '{k}: {v}'")
        parts.append(f"http://{HOST}:{self.port}{self.path}")
        cmd = " ".join(parts)
        if self.grep is not None:
            cmd += f" | grep -E '{self.grep}'"
        if self.tail is not None:
            cmd += f" | tail -n {self.tail}"
        if self.repeat > 1:
            cmd = f"for i in {' '.join(str(i + 1) for i in range(self.repeat))}; do {cmd}; done"
        return cmd

    def run(self, curl: str | None) -> str:
        if curl is not None:
            try:
                result = subprocess.run(["sh", "-c", self.command()], check=False, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=20)
                out = result.stdout
            except subprocess.TimeoutExpired as e:
                out = (e.stdout or b"") + b"\n(timed out after 20 s)\n"
            return out.decode("utf-8", "replace").replace("\r\n", "\n")
        return "".join(self._emulate() for _ in range(self.repeat))

    def _emulate(self) -> str:
        """
        What the command prints, done with http.client (no curl here).
        """
        status, headers, body = http_get(self.port, self.path, self.headers)
        if status == 0:
            return f"curl: (7) Failed to connect to {HOST} port {self.port}\n"
        text = ""
        if self.include:
            reason = http.client.responses.get(status, "")
            text = f"HTTP/1.1 {status} {reason}\n" + "".join(f"{k}: {v}\n" for k, v in headers) + "\n"
        text += body.decode("utf-8", "replace")
        lines = text.splitlines(keepends=True)
        if self.grep is not None:
            lines = [line for line in lines if re.search(self.grep, line)]
        if self.tail is not None:
            lines = lines[-self.tail:]
        return "".join(lines)


def _json_body(out: str) -> Any:
    try:
        return json.loads(out[out.index("{"):])
    except ValueError:
        return None


def check_default(out: str) -> str | None:
    doc = _json_body(out)
    if not isinstance(doc, dict) or not isinstance(doc.get("backend"), dict):
        return "no frontend JSON with a backend answer"
    backend = doc["backend"]
    headers = backend.get("headers", {})
    if backend.get("version") != "v1":
        return f"expected backend v1, got {backend.get('version')!r}"
    if not doc.get("request_id") or headers.get("x-request-id") != doc["request_id"]:
        return "x-request-id did not follow the request from frontend to backend"
    if headers.get("x-mesh-source") != "frontend":
        return "the outbound listener's add-header filter did not set x-mesh-source"
    if "x-forwarded-for" not in headers:
        return "no x-forwarded-for at the backend"
    return None


def check_v2(out: str) -> str | None:
    return None if '"version": "v2"' in out and '"v1"' not in out else "expected backend v2 only"


def check_rejected(out: str) -> str | None:
    first = out.split("\n", 1)[0]
    if " 403" not in first:
        return f"expected 403, got {first!r}"
    if "rejected by reject-header filter" not in out:
        return "no reject-header body"
    return None


def check_tcp(out: str) -> str | None:
    seen = set(re.findall(r'"version": "(v\d)"', out))
    if seen != {"v1", "v2"}:
        return f"expected both v1 and v2 over the tcp listener, saw {sorted(seen)}"
    return None


def check_metrics(out: str) -> str | None:
    for needle in ('destination_service="backend-v1"', 'destination_service="backend-v2"',
                   'response_code="200"', 'response_code="403"', 'source_workload="frontend"'):
        if needle not in out:
            return f"no istio_requests_total series with {needle}"
    return None


def check_clusters(out: str) -> str | None:
    clusters = ("frontend", "backend", "backend-v1", "backend-v2")
    missing = [c for c in clusters if f'\n  "{c}": {{' not in "\n" + out]
    if missing:
        return f"missing clusters {missing}"
    if re.search(r'"backend-v1": \{\n(?:.*\n)*?\s*"upstream_requests": [1-9]', out) is None:
        return "backend-v1 counted no upstream requests"
    return None


def check_config(out: str) -> str | None:
    if not re.search(r'"version": 1\n', out) or "frontend-sidecar.yaml" not in out:
        return "expected version 1 loaded from frontend-sidecar.yaml"
    return None


def tour_steps() -> list[Step]:
    admin = FRONTEND_ADMIN
    return [
        Step("Default route: frontend's sidecar -> frontend -> its sidecar's outbound listener -> backend v1",
             FRONTEND_INBOUND, check=check_default,
             note="One x-request-id follows the request through every hop; the add-header filter "
                  "set x-mesh-source,\n# each sidecar appended to x-forwarded-for."),
        Step("Header route: x-version: v2 (propagated by the app) sends it to backend v2",
             FRONTEND_INBOUND, headers={"x-version": "v2"}, grep='"version"', check=check_v2),
        Step("A filter from examples/filters (reject-header) answers locally",
             FRONTEND_INBOUND, headers={"x-tenant": "evil"}, include=True, check=check_rejected),
        Step(f"An L4 (protocol: tcp) listener :{FRONTEND_TCP}: one connection each, round-robin over "
             "both versions",
             FRONTEND_TCP, grep='"version"', repeat=2, check=check_tcp),
        Step("Admin: Istio-named metrics", admin, "/stats/prometheus", grep="^istio_requests_total",
             check=check_metrics),
        Step("Admin: clusters, their endpoints and counters (just the main lines)", admin, "/clusters",
             grep='^  "|"address"|"upstream_requests"', check=check_clusters),
        Step("Admin: the running config (its tail; the file as loaded is under \"config\")", admin,
             "/config_dump", tail=4, check=check_config),
    ]


def run_tour(check: bool) -> list[str]:
    """
    Run every step, printing the command and its output.

    @return: the failures (empty if all is well or not checking).
    """
    # TXMESH_DEMO_CURL=none: act as if curl were not installed (tests use it).
    curl = None if os.environ.get("TXMESH_DEMO_CURL") == "none" else shutil.which("curl")
    print("\n=== Tour: try these yourself while the demo runs ===")
    if curl is None:
        print("(curl is not installed: each command below is run with Python's http.client instead,\n"
              " printing what curl would print; apt-get install curl to run them yourself)")
    failures = []
    for i, step in enumerate(tour_steps(), 1):
        print(f"\n# {i}. {step.title}")
        print(f"$ {step.command()}")
        out = step.run(curl)
        sys.stdout.write(out if out.endswith("\n") or not out else out + "\n")
        if step.note:
            print(f"# {step.note}")
        if check and step.check is not None:
            problem = step.check(out)
            if problem is None:
                print("# check: ok")
            else:
                print(f"# check: FAILED: {problem}")
                failures.append(f"step {i} ({step.command()}): {problem}")
        sys.stdout.flush()
    return failures


# --- running the demo -----------------------------------------------------

class Stop(Exception):
    pass


def _on_signal(signum: int, frame: Any) -> None:
    raise Stop(signal.Signals(signum).name)


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])


def start(comps: list[Component]) -> None:
    os.makedirs(STATE_DIR, exist_ok=True)
    env = child_env()
    me = os.getpid()
    for c in comps:
        with open(c.log, "wb") as log:
            c.process = subprocess.Popen(
                c.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=STATE_DIR, env=env, start_new_session=True, preexec_fn=_die_with_parent(me))  # noqa: PLW1509 (no threads here)
        _write_pids(me, {x.name: x.process.pid for x in comps if x.process is not None})


def wait_ready(comps: list[Component], timeout: float) -> str | None:
    """
    @return: C{None} once every component is ready, else what went wrong.
    """
    deadline = time.monotonic() + timeout
    pending = list(comps)
    while pending:
        for c in list(pending):
            code = c.process.poll()
            if code is not None:
                return f"{c.name} exited with status {code} while starting; its log ({c.log}):\n" + _tail(c.log)
            if c.is_ready():
                pending.remove(c)
        if not pending:
            return None
        if time.monotonic() > deadline:
            return (f"not ready after {timeout:.0f}s: {', '.join(c.name for c in pending)}\n"
                    + "\n".join(f"  {c.name} ({c.log}):\n{_tail(c.log, 10)}" for c in pending))
        time.sleep(0.1)
    return None


def stop_all(comps: list[Component]) -> None:
    pids = [c.process.pid for c in comps if c.process is not None and c.process.poll() is None]
    if pids:
        _terminate(pids)
    for c in comps:
        if c.process is not None:
            try:
                c.process.wait(1)
            except subprocess.TimeoutExpired:
                pass
    _remove_pids()


def print_map(comps: list[Component], elapsed: float) -> None:
    rel = os.path.relpath(STATE_DIR, os.getcwd()) if STATE_DIR.startswith(os.getcwd()) else STATE_DIR
    print(f"""
demo: the mesh is up ({len(comps)} processes, ready in {elapsed:.1f}s; logs in {rel}/)

  curl ─► :15810 frontend-sidecar ─► :15800 frontend ─► :15811 frontend-sidecar (outbound)
             x-version: v2 ─► :15830 backend-v2-sidecar ─► :15802 backend v2
             otherwise     ─► :15820 backend-v1-sidecar ─► :15801 backend v1
  curl ─► :15812 frontend-sidecar (tcp listener) ─► round-robin over :15820 and :15830
  admin:  :15819 frontend-sidecar, :15829 backend-v1-sidecar, :15839 backend-v2-sidecar
""")
    sys.stdout.flush()


def _say(line: str) -> None:
    """
    Print while shutting down, where stdout may be a closed pipe.
    """
    try:
        print(line, flush=True)
    except OSError:
        pass


def run(check: bool) -> int:
    comps = components()
    ports = sorted({p for c in comps for p in c.ports})

    state = _read_pids()
    if state.get("demo") and state["demo"] != os.getpid() and _ours(state["demo"]):
        print(f"demo: a demo is already running (pid {state['demo']}); stop it with: scripts/demo --stop",
              file=sys.stderr)
        return 1
    leftovers = [p for p in state.get("children", {}).values() if _ours(p)]
    if leftovers:
        print(f"demo: stopping leftover demo processes {' '.join(map(str, leftovers))}", file=sys.stderr)
        _terminate(leftovers)
    busy = busy_ports(ports)
    if busy:
        print(f"demo: port(s) {', '.join(map(str, busy))} on {HOST} are in use (the demo needs "
              f"{ports[0]}-{ports[-1]}); is a demo running elsewhere? see: ss -ltnp | grep ':158'",
              file=sys.stderr)
        return 1

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    status = 0
    try:
        began = time.monotonic()
        print(f"demo: starting {', '.join(c.name for c in comps)}")
        sys.stdout.flush()
        start(comps)
        problem = wait_ready(comps, START_TIMEOUT)
        if problem is not None:
            print(f"demo: {problem}", file=sys.stderr)
            return 1
        print_map(comps, time.monotonic() - began)
        failures = run_tour(check)
        if check:
            if failures:
                print(f"\ndemo --check: FAILED ({len(failures)} of {len(tour_steps())} steps)")
                for f in failures:
                    print(f"  {f}")
                for c in comps:
                    print(f"--- {c.name} ({c.log})\n{_tail(c.log, 15)}")
                status = 1
            else:
                print(f"\ndemo --check: OK ({len(tour_steps())} steps)")
            return status
        print("\ndemo: running. Ctrl-C here (or scripts/demo --stop elsewhere) stops it.")
        sys.stdout.flush()
        while True:
            for c in comps:
                code = c.process.poll()
                if code is not None:
                    print(f"demo: {c.name} exited unexpectedly with status {code}; its log:\n{_tail(c.log)}",
                          file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except Stop as e:
        print(f"\ndemo: {e} received")
        return 0 if not check else 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        _say("demo: stopping all processes...")
        stop_all(comps)
        _say("demo: stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo", description="Run txmesh's demo mesh and a short tour of it.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true",
                       help="start, run the tour, check its results, stop; exit 0 if all is well, 1 if not")
    group.add_argument("--stop", action="store_true", help="stop a demo left running")
    args = parser.parse_args(argv)
    if args.stop:
        return stop_command()
    return run(args.check)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # Output piped into something like head, which has gone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
