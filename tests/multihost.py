"""
Pieces of the multi-host mesh test (L{tests.test_multihost_mesh}): a host
is a network namespace on a shared L{Segment}; the pilot, the sidecars and
the apps are real processes inside them.

The sample apps are plain Python that knows nothing of the mesh: no txmesh
import, no proxy environment variables.  They reach each other by service
name (a C{hosts} file entry, as a cluster IP) and the kernel's C{REDIRECT}
rules hand their connections to the sidecar.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import yaml

from tests.netns import NetworkNamespace, Segment
from tests.test_proxy_process import TWISTD, child_env

T = TypeVar("T")

PROXY_UID = 1337
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
PILOT_PORT = 15010
PILOT_API_PORT = 15011
PILOT_METRICS_PORT = 15014
COLLECTOR_PORT = 9411

# Answers every GET with who it is and the request it got.
SERVER_APP = textwrap.dedent("""
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    name, version, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = json.dumps({"service": name, "version": version, "path": self.path,
                               "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
""")

# A client and server: GET /call?url=URL&n=N makes N plain urllib GETs to
# URL, one after the other, and answers with what each got.
CLIENT_APP = textwrap.dedent("""
    import json, sys, urllib.error, urllib.parse, urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(url):
        try:
            with opener.open(url, timeout=10) as r:
                return {"status": r.status, "body": r.read().decode()}
        except urllib.error.HTTPError as e:
            return {"status": e.code, "body": e.read().decode("utf-8", "replace"),
                    "flags": e.headers.get("x-txmesh-flags", "")}
        except OSError as e:
            return {"status": 0, "error": str(e)}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            results = [get(query["url"][0]) for _ in range(int(query.get("n", ["1"])[0]))]
            body = json.dumps(results).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
""")

# A Zipkin-compatible collector: keeps what is POSTed to /api/v2/spans and
# gives it all back at GET /spans.
COLLECTOR = textwrap.dedent("""
    import json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    spans, lock = [], threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, code, body=b""):
            self.send_response(code)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            data = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.path != "/api/v2/spans":
                return self.reply(404)
            try:
                got = json.loads(data)
            except ValueError:
                return self.reply(400)
            with lock:
                spans.extend(got)
            self.reply(202)

        def do_GET(self):
            with lock:
                body = json.dumps(spans).encode()
            self.reply(200, body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
""")

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def prometheus_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """
    @return: the samples of metric C{name} in a Prometheus text exposition,
        as C{(labels, value)}.
    """
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is not None and m.group("name") == name:
            out.append((dict(_LABEL.findall(m.group("labels") or "")), float(m.group("value"))))
    return out


def total(samples: Sequence[tuple[dict[str, str], float]], **labels: str) -> float:
    """
    @return: the sum of the samples whose labels include C{labels}.
    """
    return sum(value for have, value in samples if all(have.get(k) == v for k, v in labels.items()))


def until(check: Callable[[], T | None], what: str, timeout: float, every: float = 0.1) -> T:
    """
    Call C{check} until it returns something true, at most C{timeout}
    seconds.

    @return: what it returned.
    @raise AssertionError: it did not within C{timeout}; the message says
        what was waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)


def app_env() -> dict[str, str]:
    """
    @return: the environment of an app: this one's without any proxy
        variable (the apps use the mesh only through capture).
    """
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


class Host:
    """
    A machine of the mesh: a network namespace on the segment, with an
    address and a directory of its own (readable by the proxy's user).
    """

    def __init__(self, testcase: Any, segment: Segment, name: str, address: str, root: str):
        self.name = name
        self.address = address
        self.ns = NetworkNamespace(testcase)
        segment.attach(self.ns, address)
        self.dir = os.path.join(root, name)
        os.mkdir(self.dir)
        os.chmod(self.dir, 0o755)
        self._case = testcase

    def log(self, what: str) -> str:
        return os.path.join(self.dir, f"{what}.log")

    def spawn(self, what: str, command: Sequence[str], env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen:
        """
        Run C{command} in this host's namespace, its output to
        C{<dir>/<what>.log}.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        with open(self.log(what), "ab") as out:
            return self.ns.spawn(command, cwd=self.dir, env=dict(env if env is not None else app_env()),
                                 stdout=out, stderr=subprocess.STDOUT, **kwargs)

    def http(self, url: str, timeout: float = 5) -> tuple[int, str]:
        """
        GET C{url} from inside this host with curl, as root (loopback
        addresses are never captured).

        @return: the status (0 when there was no answer) and the body.
        """
        done = self.ns.run(["curl", "-s", "--noproxy", "*", "--max-time", str(timeout), "-o", "-",
                            "-w", "\n%{http_code}", url], timeout=timeout + 10)
        body, _, status = done.stdout.rpartition("\n")
        return (int(status) if done.returncode == 0 and status.isdigit() else 0), body

    def read_log(self, what: str) -> str:
        try:
            with open(self.log(what), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


class Pilot:
    """
    C{twistd txmesh-pilot} on a host, serving proxies on C{ADDRESS:15010};
    its operator API and metrics are on the host's loopback.
    """

    def __init__(self, host: Host, config_dir: str):
        self.host = host
        self.config_dir = config_dir
        self.process: subprocess.Popen | None = None

    @property
    def root_cert(self) -> str:
        return os.path.join(self.config_dir, "ca", "root-cert.pem")

    def start(self, timeout: float = 20) -> None:
        self.process = self.host.spawn("pilot", [
            TWISTD, "-n", "--pidfile=", "txmesh-pilot", "--config-dir", self.config_dir,
            "--listen", f"tcp:{PILOT_PORT}:interface={self.host.address}",
            "--api", f"tcp:{PILOT_API_PORT}:interface=127.0.0.1",
            "--metrics", f"tcp:{PILOT_METRICS_PORT}:interface=127.0.0.1",
            "--server-names", self.host.address, "--poll-interval", "0.1"], env=child_env())

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"txmesh-pilot exited with {self.process.returncode}:\n"
                                     f"{self.host.read_log('pilot')}")
            return self.host.http(f"http://127.0.0.1:{PILOT_API_PORT}/status", 1)[0] == 200

        until(ready, "txmesh-pilot answering its API", timeout)

    def get(self, path: str) -> Any:
        status, body = self.host.http(f"http://127.0.0.1:{PILOT_API_PORT}{path}")
        if status != 200:
            raise AssertionError(f"pilot API {path}: {status} {body}")
        return json.loads(body)


class Sidecar:
    """
    A transparent sidecar: C{txmesh iptables --apply} in the host's
    namespace, and C{twistd txmesh-proxy} as the proxy's user (whose
    connections the rules leave alone), bootstrapped from the pilot with a
    join token.
    """

    def __init__(self, host: Host, pilot: Pilot, workload: str, app: str, version: str, account: str,
                 token_file: str, app_port: int | None = None, inbound_ports: Sequence[int] = (),
                 static: Mapping[str, Any] | None = None):
        """
        @param app_port: the app's port behind the pilot-pushed inbound
            listener (on C{INBOUND_PORT}), or C{None} for no inbound side.
        @param inbound_ports: the ports whose inbound connections are
            redirected to C{INBOUND_PORT}.
        @param static: static C{listeners} and C{clusters} for the bootstrap
            file.
        """
        self.host = host
        self.pilot = pilot
        self.node_id = f"{workload}-1"
        self.workload = workload
        self.app = app
        self.version = version
        self.account = account
        self.token_file = token_file
        self.app_port = app_port
        self.inbound_ports = inbound_ports
        self.static = dict(static or {})
        self.process: subprocess.Popen | None = None

    def capture(self) -> None:
        """
        Apply the capture rules, as an init container would.
        """
        done = self.host.ns.txmesh("iptables", "--apply", "--proxy-uid", str(PROXY_UID),
                                   "--outbound-capture-port", str(OUTBOUND_PORT),
                                   "--inbound-capture-port", str(INBOUND_PORT),
                                   "--inbound-ports", ",".join(str(p) for p in self.inbound_ports))
        if done.returncode != 0:
            raise AssertionError(f"txmesh iptables --apply on {self.host.name}: {done.stderr}")

    def redirected(self, chain: str) -> int:
        """
        @param chain: C{TXMESH_REDIRECT} (outbound) or C{TXMESH_IN_REDIRECT}
            (inbound).
        @return: how many connections the chain's C{REDIRECT} rule has sent
            to the proxy (the C{nat} table sees each connection's first
            packet only).
        """
        listed = self.host.ns.check(["iptables", "-t", "nat", "-L", chain, "-n", "-v", "-x"])
        return sum(int(line.split()[0]) for line in listed.splitlines() if "REDIRECT" in line.split()[2:3])

    def start(self) -> None:
        bootstrap = os.path.join(self.host.dir, "bootstrap.yaml")
        document = {
            "node": {"app": self.app, "version": self.version, "labels": {"app": self.app, "version": self.version}},
            "admin": {"address": f"tcp:{ADMIN_PORT}:interface=127.0.0.1"},
            "pilot": {"backoff_base": 0.1, "backoff_max": 0.5},
            **self.static,
        }
        with open(bootstrap, "w") as f:
            yaml.safe_dump(document, f)
        root = os.path.join(self.host.dir, "root-cert.pem")
        with open(self.pilot.root_cert, "rb") as src, open(root, "wb") as dst:
            dst.write(src.read())
        inbound = ["--inbound-port", str(INBOUND_PORT), "--app-port", str(self.app_port)] if self.app_port else []
        self.process = self.host.spawn("proxy", [
            "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
            TWISTD, "-n", "--pidfile=", "txmesh-proxy", "--config", bootstrap,
            "--pilot", f"{self.pilot.host.address}:{PILOT_PORT}", "--pilot-ca", root,
            "--pilot-token-file", self.token_file, "--node-id", self.node_id, "--namespace", "default",
            "--workload", self.workload, "--service-account", self.account, "--capture", *inbound],
            env=child_env())

    def wait_ready(self, timeout: float = 20) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"txmesh-proxy on {self.host.name} exited with {self.process.returncode}:\n"
                                     f"{self.host.read_log('proxy')}")
            return self.admin_status("/ready") == 200

        until(ready, f"txmesh-proxy on {self.host.name} ready", timeout)

    def admin_status(self, path: str) -> int:
        return self.host.http(f"http://127.0.0.1:{ADMIN_PORT}{path}", 1)[0]

    def admin(self, path: str) -> str:
        status, body = self.host.http(f"http://127.0.0.1:{ADMIN_PORT}{path}")
        if status != 200:
            raise AssertionError(f"{self.host.name} admin {path}: {status} {body}")
        return body

    def metric(self, name: str) -> list[tuple[dict[str, str], float]]:
        return prometheus_samples(self.admin("/stats/prometheus"), name)


def python(script: str, *args: str) -> list[str]:
    """
    @return: the command running C{script} (source text) with C{args}.
    """
    return [sys.executable, "-c", script, *args]
