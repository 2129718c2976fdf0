"""
The control plane end to end with real processes: pilots and proxies are
C{twistd} children, the operator uses the real C{txmesh} command, the
channel is TLS with join tokens, and traffic comes from real clients.

One test walks the whole story the control plane promises:

  1. one pilot, three proxies, two upstream services: all SYNCED;
  2. a route change reaches every proxy's live traffic within a second;
  3. a bad route file is refused at the pilot with its reason; proxies untouched;
  4. the pilot killed: traffic keeps flowing on last-known-good;
  5. the pilot restarted: proxies resync (a change made meanwhile arrives);
  6. two replicas, one killed: proxies move to the other.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.python import log
from twisted.trial import unittest

from tests.support import RecordingFactory, curl, fixed_response, free_port, listen_upstream, sleep
from tests.test_proxy_process import TWISTD, ProxyProcess, _stop_process, child_env, wait_port

TXMESH = os.path.join(os.path.dirname(sys.executable), "txmesh")

ISTIO = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
    - {{address: 127.0.0.1, ports: {{http: {web_v1}}}, labels: {{version: v1}}}}
    - {{address: 127.0.0.1, ports: {{http: {web_v2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api}}
spec:
  hosts: [api]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {api}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: web
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web]
  http: [{{route: [{{destination: {{host: web, subset: {subset}}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api}}
spec:
  hosts: [api]
  http: [{{route: [{{destination: {{host: api}}}}]}}]
"""

PROXY = """\
node: {{id: {node}, workload: {node}, namespace: default}}
admin: {{address: "tcp:{{admin}}:interface=127.0.0.1"}}
pilot:
  addresses: [{addresses}]
  ca_file: {ca_file}
  token_file: {token_file}
  outbound_address: "tcp:{{http}}:interface=127.0.0.1"
  backoff_base: 0.1
  backoff_max: 0.5
"""

# The third proxy names its pilots, root and token on the command line
# (twistd txmesh-proxy --pilot ...); its file only places its ports.
PROXY_BY_OPTIONS = """\
node: {{id: {node}, workload: {node}, namespace: default}}
admin: {{address: "tcp:{{admin}}:interface=127.0.0.1"}}
pilot:
  outbound_address: "tcp:{{http}}:interface=127.0.0.1"
  backoff_base: 0.1
  backoff_max: 0.5
"""


class PilotProcess:
    """
    C{twistd -n txmesh-pilot} as a child process on fixed free ports.
    """

    def __init__(self, testcase: Any, config_dir: str, name: str):
        self._case = testcase
        self.config_dir = config_dir
        self.name = name
        self.port = free_port()
        self.api_port = free_port()
        self.metrics_port = free_port()
        self.log_path = os.path.join(config_dir, f"{name}.log")
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @defer.inlineCallbacks
    def start(self) -> Any:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "txmesh-pilot", "--config-dir", self.config_dir,
                 "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                 "--api", f"tcp:{self.api_port}:interface=127.0.0.1", "--poll-interval", "0.1",
                 "--metrics", f"tcp:{self.metrics_port}:interface=127.0.0.1"],
                cwd=self.config_dir, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        self._case.addCleanup(self.stop)
        yield wait_port(self.process, self.api_port, f"pilot {self.name}")

    def kill(self) -> None:
        """
        SIGKILL: no goodbye to the proxies.
        """
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _stop_process(self.process)
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        log.msg(f"txmesh-pilot {self.name} output:\n{text}")
        if "Traceback" in text or "Unhandled" in text:
            raise AssertionError(f"txmesh-pilot {self.name} logged an error:\n{text}")

    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        out, _, code = yield curl("--max-time", "2", "-s", self.api + path)
        assert code == 0, (path, code)
        return json.loads(out)


def join_token(config_dir: str, account: str, namespace: str = "default") -> str:
    """
    Make a join token with the real C{txmesh token create} (each is good
    once) and write it beside the pilot's config.

    @return: the file holding it.
    @raise AssertionError: the command failed.
    """
    made = run_txmesh("token", "create", "--config-dir", config_dir, "--namespace", namespace,
                      "--service-account", account)
    if made.returncode != 0:
        raise AssertionError(f"txmesh token create failed: {made.stderr}")
    path = os.path.join(config_dir, f"{namespace}-{account}.token")
    with open(path, "w") as f:
        f.write(made.stdout.strip())
    return path


def run_txmesh(*args: str, pilot: PilotProcess | None = None) -> subprocess.CompletedProcess:
    env = child_env()
    if pilot is not None:
        env["TXMESH_PILOT"] = pilot.api
    return subprocess.run([TXMESH, *args], env=env, capture_output=True, text=True, timeout=30, check=False)


class ControlPlaneTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> Any:
        if not os.path.exists(TWISTD) or not os.path.exists(TXMESH):
            raise unittest.SkipTest(f"no twistd/txmesh next to {sys.executable} (pip install -e .)")
        self.dir = tempfile.mkdtemp(prefix="txmesh-mesh-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.mkdir(os.path.join(self.dir, "istio"))

    def write_istio(self, text: str) -> float:
        """
        Replace the route file atomically; return when it was written.
        """
        path = os.path.join(self.dir, "istio", "mesh.yaml")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return reactor.seconds()

    def istio(self, subset: str) -> str:
        return ISTIO.format(subset=subset, **self.ports)

    @defer.inlineCallbacks
    def body(self, proxy: ProxyProcess, host: str) -> Any:
        out, _, code = yield curl("--max-time", "2", "-s", "-H", f"Host: {host}", proxy.http + "/")
        return out if code == 0 else None

    @defer.inlineCallbacks
    def wait_all(self, proxies: list[ProxyProcess], host: str, body: bytes, timeout: float = 15.0) -> Any:
        """
        Poll until every proxy answers C{body} for C{host}.

        @return: seconds it took.
        """
        start = reactor.seconds()
        pending = list(proxies)
        while pending:
            answers = yield defer.gatherResults([self.body(p, host) for p in pending])
            pending = [p for p, answer in zip(pending, answers, strict=True) if answer != body]
            if pending and reactor.seconds() - start > timeout:
                self.fail(f"{len(pending)} proxies never answered {body!r} for {host}")
            if pending:
                yield sleep(0.02)
        return reactor.seconds() - start

    def proxy_status(self, pilot: PilotProcess) -> list[dict[str, Any]]:
        done = run_txmesh("proxy-status", "-o", "json", pilot=pilot)
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout)

    @defer.inlineCallbacks
    def wait_synced(self, pilot: PilotProcess, count: int, timeout: float = 15.0) -> Any:
        deadline = reactor.seconds() + timeout
        while True:
            proxies = yield pilot.get("/proxies")
            if len(proxies) == count and all(p["status"] == "SYNCED" for p in proxies):
                return proxies
            if reactor.seconds() > deadline:
                self.fail(f"not all {count} proxies SYNCED on {pilot.name}: {proxies}")
            yield sleep(0.05)

    @defer.inlineCallbacks
    def test_control_plane_story(self) -> Any:
        upstreams = {}
        for name in ("web_v1", "web_v2", "api"):
            port = yield listen_upstream(self, RecordingFactory(fixed_response(name.encode())))
            upstreams[name] = port
        self.ports = upstreams
        self.write_istio(self.istio("v1"))

        pilot_a = PilotProcess(self, self.dir, "a")
        pilot_b = PilotProcess(self, self.dir, "b")
        yield pilot_a.start()

        proxies = []
        root = os.path.join(self.dir, "ca", "root-cert.pem")
        for i in range(2):
            proxy = ProxyProcess(self)
            proxy.write(PROXY.format(node=f"client-{i}", addresses=f'"{pilot_a.address}", "{pilot_b.address}"',
                                     ca_file=root, token_file=join_token(self.dir, f"client-{i}")))
            proxy.start()
            proxies.append(proxy)
        proxy = ProxyProcess(self)
        proxy.write(PROXY_BY_OPTIONS.format(node="client-2"))
        proxy.start("--pilot", f"127.0.0.1:{pilot_a.port}", "--pilot", pilot_b.address,
                    "--pilot-ca", root, "--pilot-token-file", join_token(self.dir, "client-2"))
        proxies.append(proxy)
        for proxy in proxies:
            yield proxy.wait_ready()

        # 1. All three serve both services and show SYNCED, through the CLI.
        yield self.wait_all(proxies, "web", b"web_v1")
        yield self.wait_all(proxies, "api", b"api")
        yield self.wait_synced(pilot_a, 3)
        status = self.proxy_status(pilot_a)
        self.assertEqual(sorted((p["id"], p["status"]) for p in status),
                         [(f"client-{i}", "SYNCED") for i in range(3)])
        table = run_txmesh("proxy-status", pilot=pilot_a).stdout
        self.assertEqual(table.count("SYNCED"), 3, table)

        # 2. A route change reaches every proxy within a second.
        self.write_istio(self.istio("v2"))
        took = yield self.wait_all(proxies, "web", b"web_v2")
        log.msg(f"route change served by all 3 proxies after {took:.3f} s")
        self.assertLess(took, 1.0)
        synced = yield self.wait_synced(pilot_a, 3)
        version = {p["acked_version"] for p in synced}
        self.assertEqual(len(version), 3)  # per-node versions, all acked

        # 3. A bad route file is refused at the pilot, with its reason; no push, no NACK.
        self.write_istio(self.istio("v3"))
        deadline = reactor.seconds() + 10
        while True:
            status = yield pilot_a.get("/status")
            if not status["config"]["ok"] or reactor.seconds() > deadline:
                break
            yield sleep(0.05)
        self.assertIn("mesh.yaml", status["config"]["error"])
        self.assertIn("v3", status["config"]["error"])
        after = yield pilot_a.get("/proxies")
        self.assertEqual([(p["status"], p["nacked_version"]) for p in after], [("SYNCED", None)] * 3)
        self.assertEqual({p["acked_version"] for p in after}, version)
        yield self.wait_all(proxies, "web", b"web_v2", timeout=1)

        # 4. The pilot dies: traffic flows on last-known-good.
        self.write_istio(self.istio("v2"))
        yield sleep(0.5)
        pilot_a.kill()
        for _ in range(5):
            yield self.wait_all(proxies, "web", b"web_v2", timeout=1)
            yield self.wait_all(proxies, "api", b"api", timeout=1)
        for proxy in proxies:
            out, _, _ = yield curl("-s", proxy.admin + "/pilot")
            self.assertIsNone(json.loads(out)["connected"])

        # 5. A change made while it was down arrives when it comes back.
        self.write_istio(self.istio("v1"))
        yield pilot_a.start()
        took = yield self.wait_all(proxies, "web", b"web_v1")
        log.msg(f"proxies resynced {took:.3f} s after the pilot restarted")
        yield self.wait_synced(pilot_a, 3)

        # 6. Two replicas; the one the proxies use dies; they move to the other.
        yield pilot_b.start()
        pilot_a.kill()
        yield self.wait_synced(pilot_b, 3)
        self.write_istio(self.istio("v2"))
        took = yield self.wait_all(proxies, "web", b"web_v2")
        log.msg(f"route change through replica b after {took:.3f} s")
        status = self.proxy_status(pilot_b)
        self.assertEqual([p["status"] for p in status], ["SYNCED"] * 3)
        for proxy in proxies:
            out, _, _ = yield curl("-s", proxy.admin + "/pilot")
            self.assertEqual(json.loads(out)["connected"], pilot_b.address)
        # Last, the operator's view of one proxy, through the CLI.
        routes = run_txmesh("proxy-config", "routes", "client-2", pilot=pilot_b)
        self.assertEqual(routes.returncode, 0, routes.stderr)
        self.assertIn("outbound|80||web.default.svc.cluster.local (v2)", routes.stdout)
        yield pilot_a.start()  # for stop(): a clean exit rather than a killed process
