"""
Run the txmesh demo mesh on 127.0.0.1: a txmesh-pilot (the control plane,
with the Istio documents and C{mesh.yaml} of C{examples/demo/pilot/}),
sample apps, a txmesh-proxy sidecar beside each app, bootstrapped to the
pilot over TLS with a join token each, and a Zipkin-compatible trace
collector (C{collector.py}); then a short tour of the mesh's three promises:
traffic management (the routing changed live), security (mutual TLS
between sidecars with the pilot's workload certificates, a plaintext client
refused, an AuthorizationPolicy's 403) and observability (a trace across
sidecars, Istio metrics, an access log line).

Started by C{scripts/demo} (which makes the virtualenv first)::

    scripts/demo            # start, run the tour, stay up until Ctrl-C / SIGTERM
    scripts/demo --check    # start, run the tour, assert its results, stop; exit 0/1
    scripts/demo --stop     # stop a demo left running

State (logs, pids, the pilot's config directory with the CA and token key
it generates, the sidecars' bootstrap files and join tokens) lives in
C{.demo/} at the repository root, or in C{$TXMESH_DEMO_DIR}; each start
copies C{examples/demo/pilot/} and the sidecar files there afresh.  This
file uses only the standard library, so C{--stop} works without the
virtualenv.
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
START_TIMEOUT = float(os.environ.get("TXMESH_DEMO_START_TIMEOUT", "30"))
MARKER = os.path.join(ROOT, "examples", "demo")  # in the apps' command lines
STATE_MARKER = os.path.join(STATE_DIR, "")  # in the pilot's and the sidecars'
PILOT_DIR = os.path.join(STATE_DIR, "pilot")
# Each sidecar and its workload's service account.
SERVICE_ACCOUNTS = {"backend-v1-sidecar": "backend", "backend-v2-sidecar": "backend", "frontend-sidecar": "frontend"}
SIDECARS = tuple(SERVICE_ACCOUNTS)

HOST = "127.0.0.1"
FRONTEND_INBOUND = 15810
FRONTEND_OUTBOUND = 15811
FRONTEND_TCP = 15812
FRONTEND_ADMIN = 15819
BACKEND_V1_INBOUND = 15820
BACKEND_V1_OUTBOUND = 15821
BACKEND_V1_ADMIN = 15829
COLLECTOR = 15809
PILOT_CHANNEL = 15840
PILOT_API = 15841
PILOT_URL = f"http://{HOST}:{PILOT_API}"
NAMESPACE = "demo"
TRUST_DOMAIN = "cluster.local"
# The trace the tour starts with its own traceparent (W3C's example id), so
# it can ask the collector for it by id.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Component:
    """
    One process of the demo: a sample app (ready when its port accepts), a
    sidecar (ready when its admin C{/ready} answers 200) or the pilot (ready
    when its operator API's C{/status} answers 200).
    """

    def __init__(self, name: str, argv: list[str], ports: list[int], ready_port: int, ready_path: str | None):
        self.name = name
        self.argv = argv
        self.ports = ports
        self.ready_port = ready_port
        self.ready_path = ready_path
        self.process: subprocess.Popen | None = None
        self.log = os.path.join(STATE_DIR, name + ".log")

    def is_ready(self) -> bool:
        if self.ready_path is None:
            try:
                with socket.create_connection((HOST, self.ready_port), timeout=0.5):
                    return True
            except OSError:
                return False
        status, _, _ = http_get(self.ready_port, self.ready_path, timeout=1.0)
        return status == 200


def yaml_ports(path: str) -> list[int]:
    """
    @return: the ports of a sidecar config's listeners and admin endpoint
        (its C{tcp:PORT:interface=...} endpoint strings), and of the inbound
        listener it asks the pilot for (C{pilot.inbound_port}).
    """
    with open(path) as f:
        text = f.read()
    found = re.findall(r"\btcp:(\d+):|^\s+inbound_port:\s*(\d+)", text, re.M)
    return [int(port) for pair in found for port in pair if port]


def admin_port(path: str) -> int:
    with open(path) as f:
        text = f.read()
    m = re.search(r"^admin:\s*\n\s+address:\s*tcp:(\d+):", text, re.M)
    if m is None:
        raise SystemExit(f"demo: no admin address in {path}")
    return int(m.group(1))


def txmesh_argv() -> list[str]:
    """
    @return: how to run the C{txmesh} command of this Python environment.
    """
    script = os.path.join(os.path.dirname(sys.executable), "txmesh")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "txmesh.cli"]


def pilot_component() -> Component:
    return Component(
        "pilot",
        twistd_argv() + ["-n", "--pidfile=", "txmesh-pilot", "--config-dir", PILOT_DIR,
                         "--listen", f"tcp:{PILOT_CHANNEL}:interface={HOST}",
                         "--api", f"tcp:{PILOT_API}:interface={HOST}", "--poll-interval", "0.2",
                         "--metrics", "none"],
        [PILOT_CHANNEL, PILOT_API], PILOT_API, "/status")


def twistd_argv() -> list[str]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return [twistd] if os.path.exists(twistd) else [
        sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def components() -> list[Component]:
    """
    @return: the apps and the sidecars, in starting order (the pilot is
        L{pilot_component}, started before them).
    """
    python = sys.executable
    services = os.path.join(HERE, "services.py")
    out = [
        # First: the sidecars report spans to it from their first request.
        Component("collector", [python, os.path.join(HERE, "collector.py"), "--port", str(COLLECTOR)],
                  [COLLECTOR], COLLECTOR, "/api/v2/services"),
        Component("backend-v1", [python, services, "--role", "backend", "--version", "v1", "--port", "15801"],
                  [15801], 15801, None),
        Component("backend-v2", [python, services, "--role", "backend", "--version", "v2", "--port", "15802"],
                  [15802], 15802, None),
        Component("frontend", [python, services, "--role", "frontend", "--port", "15800",
                               "--backend-url", "http://backend/", "--connect-to", f"{HOST}:{FRONTEND_OUTBOUND}"],
                  [15800], 15800, None),
    ]
    for name in SIDECARS:
        source = os.path.join(HERE, name + ".yaml")
        # The sidecar runs from its copy in the state directory, where the
        # pilot section's relative paths (CA file, join token) lead.
        config = os.path.join(STATE_DIR, name + ".yaml")
        out.append(Component(
            name,
            twistd_argv() + ["-n", "--pidfile=", "txmesh-proxy", "--config", config, "--drain-timeout", "1"],
            yaml_ports(source), admin_port(source), "/ready"))
    return out


def prepare_state() -> str | None:
    """
    Fill the state directory afresh: the pilot's config directory (a copy
    of C{examples/demo/pilot/}, so the CA and token key it generates and the
    tour's live changes stay out of the repository) and the sidecars'
    bootstrap files.

    @return: C{None}, or what went wrong.
    """
    os.makedirs(STATE_DIR, exist_ok=True)
    try:
        shutil.rmtree(PILOT_DIR, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, "pilot"), PILOT_DIR)
        for name in SIDECARS:
            shutil.copyfile(os.path.join(HERE, name + ".yaml"), os.path.join(STATE_DIR, name + ".yaml"))
            if os.path.exists(token_file(name)):
                os.unlink(token_file(name))
    except OSError as e:
        return f"cannot prepare {STATE_DIR}: {e}"
    return None


def token_file(sidecar: str) -> str:
    """
    @return: where a sidecar's join token is kept (its bootstrap's
        C{pilot.token_file}, relative to the state directory).
    """
    return os.path.join(STATE_DIR, sidecar + ".token")


def make_tokens() -> str | None:
    """
    Make each sidecar's join token with C{txmesh token create} (signed with
    the key the pilot generated in its CA directory); one per sidecar, as a
    join token admits one proxy.

    @return: C{None}, or what went wrong.
    """
    for sidecar, account in SERVICE_ACCOUNTS.items():
        argv = txmesh_argv() + ["token", "create", "--config-dir", PILOT_DIR, "--namespace", NAMESPACE,
                                "--service-account", account]
        print(f"demo: {display(argv)} > {rel(token_file(sidecar))}")
        try:
            done = subprocess.run(argv, env=child_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=30, check=False)
        except subprocess.TimeoutExpired:
            return "txmesh token create took over 30 s"
        if done.returncode != 0 or not done.stdout.strip():
            return f"txmesh token create failed ({done.returncode}): {done.stderr.strip()}"
        fd = os.open(token_file(sidecar), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(done.stdout.strip() + "\n")
    return None


def rel(path: str) -> str:
    """
    @return: C{path} relative to the repository when it is inside it.
    """
    return os.path.relpath(path, ROOT) if path.startswith(os.path.join(ROOT, "")) else path


def display(argv: list[str]) -> str:
    """
    @return: a command as a person would type it from the repository root.
    """
    if argv[:2] == [sys.executable, "-m"]:
        argv = ["python", "-m"] + argv[2:]
    return " ".join(rel(a) if os.path.isabs(a) else a for a in argv)


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
    status, response_headers, body, _ = http_request("GET", port, path, headers, timeout)
    return status, response_headers, body


def http_request(method: str, port: int, path: str, headers: dict[str, str] | None = None,
                 timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes, str]:
    """
    @return: C{(status, headers, body, error)}: status 0 and what curl
        would say (C{curl: (52) Empty reply from server}) if the request
        failed, else an empty error.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, headers={"User-Agent": "curl/demo", "Accept": "*/*", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read(), ""
    except ConnectionRefusedError:
        return 0, [], b"", f"curl: (7) Failed to connect to {HOST} port {port}: Connection refused"
    except (http.client.RemoteDisconnected, http.client.IncompleteRead):
        return 0, [], b"", "curl: (52) Empty reply from server"
    except ConnectionResetError:
        return 0, [], b"", "curl: (56) Recv failure: Connection reset by peer"
    except (OSError, http.client.HTTPException) as e:
        return 0, [], b"", f"curl: (56) Failure when receiving data from the peer ({e})"
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
    cmdline = _cmdline(pid)
    return MARKER in cmdline or STATE_MARKER in cmdline


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
    One tour stop: a curl command (with an optional C{| grep}, C{| tail} or
    a loop counted with C{| sort | uniq -c}), and what C{--check} expects
    of its output.
    """

    def __init__(self, title: str, port: int, path: str = "/", headers: dict[str, str] | None = None,
                 include: bool = False, grep: str | None = None, tail: int | None = None,
                 repeat: int = 1, count: bool = False, check: Callable[[str], str | None] | None = None,
                 note: str = "", method: str = "GET", show_error: bool = False,
                 before: Callable[[], None] | None = None):
        """
        @param method: the request's method (C{curl -X METHOD} unless GET).
        @param show_error: C{curl -sS}: say why a request failed.
        @param before: run (bounded) before the command, to wait for what
            it shows (spans reaching the collector, say).
        """
        self.title = title
        self.port = port
        self.path = path
        self.headers = headers or {}
        self.method = method
        self.show_error = show_error
        self.before = before
        self.include = include
        self.grep = grep
        self.tail = tail
        self.repeat = repeat
        self.count = count
        self.check = check
        self.note = note

    def command(self) -> str:
        parts = ["curl -sS" if self.show_error else "curl -s"]
        if self.include:
            parts.append("-i")
        if self.method != "GET":
            parts.append(f"-X {self.method}")
        for k, v in self.headers.items():
            parts.append(f"-H '{k}: {v}'")
        parts.append(f"http://{HOST}:{self.port}{self.path}")
        cmd = " ".join(parts)
        if self.grep is not None:
            cmd += f" | grep -E '{self.grep}'"
        if self.tail is not None:
            cmd += f" | tail -n {self.tail}"
        if self.repeat > 1:
            seq = " ".join(str(i + 1) for i in range(self.repeat)) if self.repeat <= 3 else f"$(seq {self.repeat})"
            cmd = f"for i in {seq}; do {cmd}; done"
        if self.count:
            cmd += " | sort | uniq -c"
        return cmd

    def run(self, curl: str | None) -> str:
        if self.before is not None:
            self.before()
        if curl is not None:
            try:
                result = subprocess.run(["sh", "-c", self.command()], check=False, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=30)
                out = result.stdout
            except subprocess.TimeoutExpired as e:
                out = (e.stdout or b"") + b"\n(timed out after 30 s)\n"
            return out.decode("utf-8", "replace").replace("\r\n", "\n")
        out = "".join(self._emulate() for _ in range(self.repeat))
        if self.count:
            lines = sorted(out.splitlines())
            out = "".join(f"{lines.count(line):7d} {line}\n" for line in sorted(set(lines)))
        return out

    def verify(self, out: str) -> str | None:
        return None if self.check is None else self.check(out)

    def _emulate(self) -> str:
        """
        What the command prints, done with http.client (no curl here).
        """
        status, headers, body, error = http_request(self.method, self.port, self.path, self.headers)
        if status == 0:
            return error + "\n" if self.show_error else ""
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


class TxmeshStep(Step):
    """
    One tour stop that runs the C{txmesh} operator command against the
    demo's pilot.

    @ivar expect_status: the exit status C{--check} expects.
    @ivar await_push: after the command, wait (bounded) until the pilot has
        pushed a new config and every sidecar has ACKed it, so the next
        step's traffic sees the change.
    """

    def __init__(self, title: str, args: list[str], check: Callable[[str], str | None] | None = None,
                 expect_status: int = 0, await_push: bool = False, note: str = ""):
        super().__init__(title, PILOT_API, check=check, note=note)
        self.args = args
        self.expect_status = expect_status
        self.await_push = await_push
        self.status: int | None = None

    def argv(self) -> list[str]:
        return txmesh_argv() + ["--pilot", PILOT_URL] + self.args

    def command(self) -> str:
        return display(self.argv())

    def run(self, curl: str | None) -> str:
        before = acked_versions()
        try:
            done = subprocess.run(self.argv(), check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, cwd=ROOT, env=child_env(), timeout=30)
            self.status = done.returncode
            out = done.stdout.decode("utf-8", "replace")
        except subprocess.TimeoutExpired as e:
            self.status = None
            out = (e.stdout or b"").decode("utf-8", "replace") + "\n(timed out after 30 s)\n"
        if self.status not in (0, None):
            out += f"(exit status {self.status})\n"
        if self.await_push and self.status == 0:
            waited = wait_pushed(before, PUSH_TIMEOUT)
            if waited is None:
                out += f"(no sidecar ACKed a new config within {PUSH_TIMEOUT:.0f} s)\n"
            else:
                out += f"(pushed: all {len(before)} sidecars ACKed the new config {waited:.2f} s after the command)\n"
        return out

    def verify(self, out: str) -> str | None:
        if self.status != self.expect_status:
            return f"expected exit status {self.expect_status}, got {self.status}"
        if self.await_push and "(pushed: " not in out:
            return "the change did not reach the sidecars"
        return super().verify(out)


class LogStep(Step):
    """
    One tour stop that shows the last line of a demo process's log (in the
    state directory) containing a string: C{grep -F STRING LOG | tail -n 1},
    done in Python.  It waits (bounded) for such a line, as the line is
    written when the stream ends, a moment after its response.
    """

    def __init__(self, title: str, log: str, needle: str, check: Callable[[str], str | None] | None = None,
                 note: str = ""):
        super().__init__(title, 0, check=check, note=note)
        self.log = os.path.join(STATE_DIR, log)
        self.needle = needle

    def command(self) -> str:
        return f"grep -F '{self.needle}' {rel(self.log)} | tail -n 1"

    def run(self, curl: str | None) -> str:
        deadline = time.monotonic() + 2.0
        while True:
            try:
                with open(self.log, encoding="utf-8", errors="replace") as f:
                    lines = [line for line in f if self.needle in line]
            except OSError:
                lines = []
            if lines or time.monotonic() > deadline:
                return lines[-1] if lines else ""
            time.sleep(0.05)


PUSH_TIMEOUT = 10.0


def pilot_proxies() -> list[dict[str, Any]]:
    """
    @return: the pilot's C{GET /proxies}, or C{[]} if it cannot be had.
    """
    status, _, body = http_get(PILOT_API, "/proxies", timeout=2.0)
    if status != 200:
        return []
    try:
        proxies = json.loads(body)
    except ValueError:
        return []
    return proxies if isinstance(proxies, list) else []


def acked_versions() -> dict[str, Any]:
    return {p.get("id"): p.get("acked_version") for p in pilot_proxies()}


def wait_pushed(before: dict[str, Any], timeout: float) -> float | None:
    """
    Wait until every sidecar in C{before} is SYNCED at another version.

    @return: the seconds it took, or C{None} after C{timeout}.
    """
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        now = {p.get("id"): p for p in pilot_proxies()}
        if all(i in now and now[i].get("status") == "SYNCED" and now[i].get("acked_version") != v
               for i, v in before.items()):
            return time.monotonic() - began
        time.sleep(0.05)
    return None


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
    if headers.get("host") != "backend":
        return f"expected the frontend's call to be for host 'backend', got {headers.get('host')!r}"
    if "URI=spiffe://" not in headers.get("x-forwarded-client-cert", ""):
        return "no x-forwarded-client-cert at the backend: the hop to it was not mutual TLS"
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


def check_status(out: str) -> str | None:
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1}
    wrong = {s: rows.get(s) for s in SIDECARS if rows.get(s) != "SYNCED"}
    return f"expected every sidecar SYNCED, got {wrong}" if wrong else None


def check_routes(out: str) -> str | None:
    for needle in ("outbound ", "[x-version]", "|backend.demo.svc.cluster.local (v2)",
                   "|backend.demo.svc.cluster.local (v1)"):
        if needle not in out:
            return f"no {needle!r} in the pushed routes"
    return None


def check_applied(out: str) -> str | None:
    return None if "applied " in out else "the pilot did not apply the file"


def _versions_counted(out: str) -> dict[str, int]:
    return {v: int(n) for n, v in re.findall(r'^\s*(\d+)\s+"version": "(v\d)"', out, re.M)}


def check_split(out: str) -> str | None:
    seen = _versions_counted(out)
    if set(seen) != {"v1", "v2"}:
        return f"expected both v1 and v2 with the 50/50 canary, saw {seen}"
    return None


def check_refused(out: str) -> str | None:
    if "refused" not in out or "subset 'v3' is not defined" not in out:
        return "expected the pilot to refuse the file, saying subset 'v3' is not defined"
    return None


def check_v1_only(out: str) -> str | None:
    seen = _versions_counted(out)
    if set(seen) != {"v1"}:
        return f"expected only v1 after the restore, saw {seen}"
    return None


def spiffe(service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}"


def check_identity(out: str) -> str | None:
    xfcc = re.findall(r'"x-forwarded-client-cert": "([^"]*)"', out)
    if not xfcc:
        return "no x-forwarded-client-cert at the backend: the hop to it was not mutual TLS"
    if f"URI={spiffe('frontend')}" not in xfcc[0]:
        return f"expected the caller's identity URI={spiffe('frontend')}, got {xfcc[0]!r}"
    if f"By={spiffe('backend')}" not in xfcc[0]:
        return f"expected By={spiffe('backend')} (the backend sidecar's own identity), got {xfcc[0]!r}"
    return None


def check_plaintext_refused(out: str) -> str | None:
    if "HTTP/" in out or '"version"' in out:
        return "a plaintext request reached the backend through its STRICT inbound listener"
    if "curl: (" not in out:
        return "expected curl to report the connection failing"
    return None


def check_rbac_denied(out: str) -> str | None:
    first = out.split("\n", 1)[0]
    if " 403" not in first:
        return f"expected 403 from the AuthorizationPolicy, got {first!r}"
    if "RBAC: access denied" not in out:
        return "expected the body 'RBAC: access denied'"
    return None


def check_trace_propagated(out: str) -> str | None:
    parent = re.search(r'"traceparent": "00-([0-9a-f]{32})-([0-9a-f]{16})-01"', out)
    if parent is None:
        return "the backend got no sampled traceparent"
    if parent.group(1) != TRACE_ID:
        return f"expected trace {TRACE_ID} to reach the backend, got {parent.group(1)}"
    if parent.group(2) == TRACEPARENT.split("-")[2]:
        return "the sidecars did not start spans of their own (the backend got the caller's span id)"
    return None


def trace_spans(trace_id: str) -> list[dict[str, Any]]:
    """
    @return: the collector's spans of one trace, or C{[]}.
    """
    status, _, body = http_get(COLLECTOR, f"/api/v2/trace/{trace_id}", timeout=2.0)
    try:
        spans = json.loads(body) if status == 200 else []
    except ValueError:
        return []
    return spans if isinstance(spans, list) else []


def wait_trace(trace_id: str = TRACE_ID, timeout: float = 5.0) -> None:
    """
    Wait until the collector has the tour's trace from both sidecars (they
    report in batches, every C{flush_interval}), or C{timeout} has passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = trace_spans(trace_id)
        if len(spans) >= 3 and len({s.get("localEndpoint", {}).get("serviceName") for s in spans}) >= 2:
            return
        time.sleep(0.1)


def check_trace(out: str) -> str | None:
    kinds = re.findall(r'"kind": "(\w+)"', out)
    if kinds.count("SERVER") < 2 or kinds.count("CLIENT") < 1:
        return f"expected 3 spans (frontend server, frontend client, backend server), got kinds {kinds}"
    services = set(re.findall(r'"serviceName": "([^"]+)"', out))
    if not {"frontend", "backend-v1"} <= services:
        return f"expected spans of both the frontend's and backend v1's sidecars, saw {sorted(services)}"
    if set(re.findall(r'"traceId": "([0-9a-f]+)"', out)) != {TRACE_ID}:
        return f"expected every span in trace {TRACE_ID}"
    ids = set(re.findall(r'"id": "([0-9a-f]{16})"', out))
    parents = re.findall(r'"parentId": "([0-9a-f]{16})"', out)
    if len([p for p in parents if p in ids]) < 2:
        return "expected the spans to link parent to child (server -> client -> server)"
    return None


def check_metrics(out: str) -> str | None:
    for needle in ('reporter="destination"', 'source_workload="frontend"', 'destination_workload="backend-v1"',
                   f'source_principal="{spiffe("frontend")}"', 'connection_security_policy="mutual_tls"',
                   'response_code="200"', 'response_code="403"'):
        if needle not in out:
            return f"no istio_requests_total series with {needle}"
    return None


def check_access_log(out: str) -> str | None:
    if '"DELETE / ' not in out or " 403 " not in out or "RBACD" not in out:
        return "expected the DELETE's access log line with 403 and response flag RBACD"
    return None


def check_clusters(out: str) -> str | None:
    pushed = "outbound|80||backend.demo.svc.cluster.local"
    missing = [c for c in ("frontend", "backend", pushed) if f'\n  "{c}": {{' not in "\n" + out]
    if missing:
        return f"missing clusters {missing}"
    if re.search(r'"outbound\|80\|\|backend.demo.svc.cluster.local": \{\n(?:.*\n)*?\s*"upstream_requests": [1-9]',
                 out) is None:
        return "the pushed backend cluster counted no upstream requests"
    return None


def check_config(out: str) -> str | None:
    if "frontend-sidecar.yaml" not in out:
        return "expected the bootstrap loaded from frontend-sidecar.yaml"
    return None


def tour_steps() -> list[Step]:
    admin = FRONTEND_ADMIN
    # Relative to the repository, where txmesh runs, as a person would type them.
    routes = rel(os.path.join(HERE, "pilot", "istio", "backend-routes.yaml"))
    canary = rel(os.path.join(HERE, "canary-50-50.yaml"))
    bad = rel(os.path.join(HERE, "bad-route.yaml"))
    return [
        Step("Default route: frontend's sidecar -> frontend -> its sidecar's outbound listener -> backend v1",
             FRONTEND_INBOUND, check=check_default,
             note="One x-request-id follows the request through every hop; the frontend called host "
                  "\"backend\", which\n# the outbound listener (pushed by the pilot) routed to subset v1, "
                  "over mutual TLS (x-forwarded-client-cert);\n# each sidecar appended to x-forwarded-for; "
                  "traceparent and x-b3-* carry the trace (see the tracing steps)."),
        Step("Header route: x-version: v2 (propagated by the app) sends it to backend v2",
             FRONTEND_INBOUND, headers={"x-version": "v2"}, grep='"version"', check=check_v2),
        Step("A filter from examples/filters (reject-header) answers locally",
             FRONTEND_INBOUND, headers={"x-tenant": "evil"}, include=True, check=check_rejected),
        Step(f"An L4 (protocol: tcp) listener :{FRONTEND_TCP}: one connection each, round-robin over "
             "both versions",
             FRONTEND_TCP, grep='"version"', repeat=2, check=check_tcp),
        TxmeshStep("The control plane: every sidecar connected to the pilot and running its latest config",
                   ["proxy-status"], check=check_status),
        TxmeshStep("The routes the pilot pushed to frontend's sidecar, translated from "
                   "examples/demo/pilot/istio/backend-routes.yaml",
                   ["proxy-config", "routes", "frontend-sidecar"], check=check_routes),
        TxmeshStep("A canary rollout, live: half of backend's default traffic to v2 (validated, written and "
                   "pushed by the pilot)",
                   ["apply", "-f", canary, "--name", "backend-routes.yaml"],
                   check=check_applied, await_push=True),
        Step("... and requests now reach both versions", FRONTEND_INBOUND, grep='"version"', repeat=20,
             count=True, check=check_split),
        TxmeshStep("A mistake: a VirtualService routing to subset v3, which no DestinationRule defines",
                   ["apply", "-f", bad, "--name", "backend-routes.yaml"],
                   check=check_refused, expect_status=1,
                   note="Refused at the pilot with the file, field and reason; nothing was written or pushed."),
        Step("... so traffic is unchanged: still the canary", FRONTEND_INBOUND, grep='"version"', repeat=20,
             count=True, check=check_split),
        TxmeshStep("Restore the original routes", ["apply", "-f", routes], check=check_applied, await_push=True),
        Step("... and the default route is v1 again", FRONTEND_INBOUND, grep='"version"', repeat=5,
             count=True, check=check_v1_only),
        # --- security: zero trust ---
        Step("Zero trust: the hop to backend is mutual TLS with the workload certificates the pilot issued; "
             "backend's\n#    sidecar checked the caller's and tells the app who called (URI=) and who "
             "answered (By=)",
             FRONTEND_INBOUND, grep='"(x-forwarded-client-cert|version)"', check=check_identity,
             note="No app changed: the backend app only echoes the header its sidecar set. Mutual TLS is "
                  "automatic: the\n# ServiceEntry's endpoints carry security.istio.io/tlsMode: istio, so "
                  "the pushed clusters use ISTIO_MUTUAL."),
        Step(f"PeerAuthentication STRICT (pilot/istio/backend-security.yaml): a plaintext client going "
             f"straight to backend\n#    v1's sidecar (:{BACKEND_V1_INBOUND}) is refused",
             BACKEND_V1_INBOUND, show_error=True, check=check_plaintext_refused,
             note="No certificate, no request: the inbound listener takes only TLS with a mesh certificate."),
        Step("AuthorizationPolicy backend-readers: backend allows GET and HEAD from frontend's identity only; "
             "a DELETE\n#    sent through frontend's sidecar (what a caller beside the frontend uses) is "
             "answered by backend's sidecar",
             FRONTEND_OUTBOUND, headers={"Host": "backend"}, method="DELETE", include=True,
             check=check_rbac_denied),
        Step(f"... and identity, not the network, decides: the same GET sent through backend v1's own "
             f"sidecar (:{BACKEND_V1_OUTBOUND},\n#    {spiffe('backend')}) is refused too",
             BACKEND_V1_OUTBOUND, headers={"Host": "backend"}, include=True, check=check_rbac_denied),
        # --- observability ---
        Step("Tracing: a request carrying a W3C traceparent; each sidecar starts a span and passes the "
             "trace on (the\n#    frontend app copies traceparent to its call, as Istio's sample apps do)",
             FRONTEND_INBOUND, headers={"traceparent": TRACEPARENT}, grep='"(traceparent|x-b3-[a-z]+)"',
             check=check_trace_propagated),
        Step(f"... and the trace, as the sidecars reported it to the demo's Zipkin-compatible collector "
             f"(:{COLLECTOR}):\n#    frontend's server and client spans and backend v1's server span, "
             "linked parent to child",
             COLLECTOR, f"/api/v2/trace/{TRACE_ID}", grep='"(traceId|id|parentId|kind|name|serviceName)"',
             check=check_trace, before=wait_trace,
             note="Telemetry comes from pilot/mesh.yaml: every pushed listener reports spans (sampling 100%), "
                  "Istio metrics\n# and an access log; the frontend's static inbound listener names its "
                  "tracing filter itself."),
        Step("Metrics: istio_requests_total at backend v1's sidecar, with Istio's labels: who called "
             "(source_workload,\n#    source_principal), who answered, the response code and "
             "connection_security_policy=\"mutual_tls\"",
             BACKEND_V1_ADMIN, "/stats/prometheus", grep="^istio_requests_total", check=check_metrics),
        LogStep("Access log: the DELETE's line in backend v1's sidecar's log (Envoy's format); "
                "response flag RBACD says why it was 403",
                "backend-v1-sidecar.log", '"DELETE / ', check=check_access_log),
        Step("Admin: clusters, static and pushed, their endpoints and counters (just the main lines)", admin,
             "/clusters", grep='^  "|"address"|"upstream_requests"', check=check_clusters),
        Step("Admin: the running config (its tail; the bootstrap file as loaded is under \"config\")", admin,
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
        print("(curl is not installed: each curl command below is run with Python's http.client instead,\n"
              " printing what curl would print; apt-get install curl to run them yourself)")
    failures = []
    for i, step in enumerate(tour_steps(), 1):
        print(f"\n# {i}. {step.title}")
        print(f"$ {step.command()}")
        sys.stdout.flush()
        out = step.run(curl)
        sys.stdout.write(out if out.endswith("\n") or not out else out + "\n")
        if step.note:
            print(f"# {step.note}")
        if check:
            problem = step.verify(out)
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


def start(comps: list[Component], everything: list[Component]) -> None:
    """
    Start C{comps}; record the pids of all of C{everything} started so far.
    """
    os.makedirs(STATE_DIR, exist_ok=True)
    env = child_env()
    me = os.getpid()
    for c in comps:
        with open(c.log, "wb") as log:
            c.process = subprocess.Popen(
                c.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=STATE_DIR, env=env, start_new_session=True, preexec_fn=_die_with_parent(me))  # noqa: PLW1509 (no threads here)
        _write_pids(me, {x.name: x.process.pid for x in everything if x.process is not None})


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


def wait_synced(comps: list[Component], timeout: float) -> str | None:
    """
    Wait until the pilot reports every sidecar connected and SYNCED (its
    first push applied) and every sidecar has its workload certificate
    (its admin C{/pilot}), so the tour starts on the pilot's routes and
    the mutual TLS between sidecars works from its first request.

    @return: C{None}, or what went wrong.
    """
    deadline = time.monotonic() + timeout
    admin = {c.name: c.ready_port for c in comps if c.name in SIDECARS}
    while True:
        for c in comps:
            code = c.process.poll()
            if code is not None:
                return f"{c.name} exited with status {code}; its log ({c.log}):\n" + _tail(c.log)
        proxies = {p.get("id"): p for p in pilot_proxies()}
        pending = [s for s in SIDECARS if proxies.get(s, {}).get("status") != "SYNCED"]
        no_certificate = [s for s in SIDECARS if s not in pending and not has_certificate(admin[s])]
        if not pending and not no_certificate:
            return None
        if time.monotonic() > deadline:
            return (f"sidecars not SYNCED with the pilot (or without a workload certificate) after {timeout:.0f}s: "
                    + ", ".join([f"{s} ({proxies.get(s, {}).get('status', 'not connected')})" for s in pending]
                                + [f"{s} (no workload certificate)" for s in no_certificate])
                    + "\n" + "\n".join(f"  {s} ({os.path.join(STATE_DIR, s + '.log')}):\n"
                                       f"{_tail(os.path.join(STATE_DIR, s + '.log'), 10)}"
                                       for s in pending + no_certificate))
        time.sleep(0.1)


def has_certificate(admin_port: int) -> bool:
    """
    @return: whether the sidecar whose admin is on C{admin_port} has its
        workload certificate from the pilot (its C{/pilot} page says so).
    """
    status, _, body = http_get(admin_port, "/pilot", timeout=2.0)
    try:
        identity = json.loads(body).get("identity") if status == 200 else None
    except (ValueError, AttributeError):
        return False
    return isinstance(identity, dict) and identity.get("certificate") is True


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
    state = os.path.relpath(STATE_DIR, os.getcwd()) if STATE_DIR.startswith(os.getcwd()) else STATE_DIR
    print(f"""
demo: the mesh is up ({len(comps)} processes, ready in {elapsed:.1f}s; logs in {state}/)

  pilot:  :{PILOT_CHANNEL} channel (TLS; join tokens) ─► every sidecar's outbound listener and clusters
          :{PILOT_API} operator API: {display(txmesh_argv())} --pilot {PILOT_URL} proxy-status
          config: {state}/pilot/istio/*.yaml (copied from examples/demo/pilot/)
          {state}/pilot/mesh.yaml: telemetry (tracing, metrics, access log) on every pushed listener
  curl ─► :15810 frontend-sidecar ─► :15800 frontend ─► :15811 frontend-sidecar (outbound, from the pilot)
             x-version: v2 ═mTLS═► :15830 backend-v2-sidecar ─► :15802 backend v2
             otherwise     ═mTLS═► :15820 backend-v1-sidecar ─► :15801 backend v1
             (:15820, :15830 from the pilot: STRICT mutual TLS, AuthorizationPolicy backend-readers)
  curl ─► :15812 frontend-sidecar (tcp listener) ═mTLS═► round-robin over :15820 and :15830
  spans:  every sidecar ─► :{COLLECTOR} collector (Zipkin v2 API: /api/v2/trace/TRACEID, /api/v2/traces)
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
    pilot = pilot_component()
    apps_and_sidecars = components()
    comps = [pilot] + apps_and_sidecars
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
        problem = prepare_state()
        if problem is None:
            print(f"demo: starting the pilot ({display(pilot.argv)})")
            sys.stdout.flush()
            start([pilot], comps)
            problem = wait_ready([pilot], START_TIMEOUT)
        if problem is None:
            problem = make_tokens()
        if problem is None:
            print(f"demo: starting {', '.join(c.name for c in apps_and_sidecars)}")
            sys.stdout.flush()
            start(apps_and_sidecars, comps)
            remaining = max(1.0, START_TIMEOUT - (time.monotonic() - began))
            problem = wait_ready(comps, remaining)
        if problem is None:
            remaining = max(1.0, START_TIMEOUT - (time.monotonic() - began))
            problem = wait_synced(comps, remaining)
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
