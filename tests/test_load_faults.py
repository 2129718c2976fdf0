"""
Load with faults, bounded in time: C{wrk} keeps a proxy busy while its
configuration changes underneath it, and the client must count zero
non-2xx responses and zero socket errors.

  - the route config is changed 50 times (file rewritten, SIGHUP), the
    route's cluster flipping between two nginx upstreams;
  - the pilot a proxy takes its config from is killed and restarted (the
    proxy serves on its last good config, then resyncs);
  - the proxy is replaced: a second one starts on the same ports
    (C{--reuse-port}), then the first gets SIGTERM and drains.

Each run is bounded (C{wrk -d}), and the figures are logged.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.python import log
from twisted.trial import unittest

from tests.support import Nginx, curl, free_port, sleep
from tests.test_mesh_processes import TXMESH, PilotProcess, join_token
from tests.test_proxy_process import TWISTD, ProxyProcess
from tests.test_rotation_under_load import WRK, parse_wrk

DURATION = 6

UPSTREAMS = """
    server {{ listen 127.0.0.1:{a}; location / {{ return 200 "a\\n"; }} }}
    server {{ listen 127.0.0.1:{b}; location / {{ return 200 "b\\n"; }} }}
"""

STATIC = """
    node: {{id: t, workload: t, namespace: default}}
    admin: {{address: "tcp:{{admin}}:interface=127.0.0.1"}}
    listeners:
      - name: http
        address: "tcp:{{http}}:interface=127.0.0.1"
        http_filters: [{{name: metrics}}]
        routes:
          - {{name: generation-{generation}, match: {{prefix: /}}, cluster: {target}}}
    clusters:
      - {{name: a, endpoints: ["127.0.0.1:{a}"]}}
      - {{name: b, endpoints: ["127.0.0.1:{b}"]}}
"""

ISTIO = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {a}}}}}]
"""

SIDECAR = """\
node: {id: client, workload: client, namespace: default}
admin: {address: "tcp:{admin}:interface=127.0.0.1"}
pilot:
  outbound_address: "tcp:{http}:interface=127.0.0.1"
  backoff_base: 0.1
  backoff_max: 0.5
"""


class LoadWithFaultsTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> Any:
        if WRK is None:
            raise unittest.SkipTest("wrk is not installed (scripts/test installs it)")
        if not os.path.exists(TWISTD) or not os.path.exists(TXMESH):
            raise unittest.SkipTest(f"no twistd/txmesh next to {sys.executable} (pip install -e .)")
        self.ports = {"a": free_port(), "b": free_port()}
        nginx = Nginx(self, UPSTREAMS.format(**self.ports))
        return defer.gatherResults([nginx.wait_listening(p) for p in self.ports.values()])

    def load(self, *args: str) -> defer.Deferred:
        """
        Start C{wrk} for L{DURATION} seconds in a thread.
        """
        return deferToThread(
            subprocess.run, [WRK, "-t1", "-c4", f"-d{DURATION}s", "--timeout", "5s", *args],
            capture_output=True, text=True, timeout=DURATION + 30, check=False)

    def check(self, done: subprocess.CompletedProcess, what: str, read_errors: int = 0) -> dict[str, int]:
        """
        @param read_errors: how many of wrk's socket errors may be reads (a
            connection the drain closed just as wrk sent a request on it).
        """
        log.msg(f"wrk during {what} (exit {done.returncode}):\n{done.stdout}{done.stderr}")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        figures = parse_wrk(done.stdout)
        reads = int(m.group(1)) if (m := re.search(r"Socket errors: connect \d+, read (\d+)", done.stdout)) else 0
        self.assertLessEqual(reads, read_errors, done.stdout)
        self.assertEqual((figures["non2xx"], figures["socket_errors"] - reads), (0, 0), done.stdout)
        self.assertGreater(figures["requests"], 500, done.stdout)
        return figures

    @defer.inlineCallbacks
    def test_fifty_route_changes_under_load(self) -> Any:
        proxy = ProxyProcess(self)
        proxy.write(STATIC.format(generation=0, target="a", **self.ports))
        proxy.start()
        yield proxy.wait_ready()
        before = yield proxy.config_version()
        load = self.load(proxy.http + "/")
        yield sleep(0.5)
        for generation in range(1, 51):
            proxy.write(STATIC.format(generation=generation, target="ab"[generation % 2], **self.ports))
            proxy.reload()
            yield sleep(0.08)
        done = yield load
        self.check(done, "50 route changes")
        after = yield proxy.config_version()
        # SIGHUPs that arrive together may be served by one reload.
        self.assertGreater(after - before, 25, (before, after))
        out, _, _ = yield curl("-s", proxy.http + "/")
        self.assertEqual(out, b"a\n")  # generation 50: cluster a

    @defer.inlineCallbacks
    def test_pilot_restart_under_load(self) -> Any:
        config_dir = tempfile.mkdtemp(prefix="txmesh-load-")
        self.addCleanup(shutil.rmtree, config_dir, True)
        os.mkdir(os.path.join(config_dir, "istio"))
        with open(os.path.join(config_dir, "istio", "web.yaml"), "w") as f:
            f.write(ISTIO.format(**self.ports))
        pilot = PilotProcess(self, config_dir, "pilot")
        yield pilot.start()
        proxy = ProxyProcess(self)
        proxy.write(SIDECAR)
        proxy.start("--pilot", pilot.address, "--pilot-ca", os.path.join(config_dir, "ca", "root-cert.pem"),
                    "--pilot-token-file", join_token(config_dir, "client"))
        yield proxy.wait_ready()
        deadline = reactor.seconds() + 15
        while True:
            out, _, _ = yield curl("-s", "-H", "host: web", proxy.http + "/")
            if out == b"a\n":
                break
            self.assertLess(reactor.seconds(), deadline, "the pushed route never served")
            yield sleep(0.1)
        load = self.load("-H", "Host: web", proxy.http + "/")  # wrk drops its own Host for "Host"
        yield sleep(1)
        pilot.process.send_signal(signal.SIGKILL)
        pilot.process.wait(5)
        yield sleep(1.5)
        yield pilot.start()
        done = yield load
        self.check(done, "a pilot restart")
        # Resynced with the restarted pilot.
        deadline = reactor.seconds() + 15
        while True:
            status = yield pilot.get("/proxies")
            if [p["status"] for p in status] == ["SYNCED"]:
                break
            self.assertLess(reactor.seconds(), deadline, f"the proxy did not resync: {status}")
            yield sleep(0.1)

    @defer.inlineCallbacks
    def test_replacement_while_draining(self) -> Any:
        """
        A new proxy starts on the same ports (both with C{--reuse-port}),
        then the old one is sent SIGTERM: it stops accepting, answers what
        is in flight with C{Connection: close}, and exits; the client
        reconnects to the new one.  No response is lost or fails; the only
        errors allowed are reads on a connection the drain closed at the
        instant a request was sent on it (a clean close, at most one per
        connection).
        """
        old = ProxyProcess(self)
        old.write(STATIC.format(generation=0, target="a", **self.ports))
        old.start("--reuse-port", "--drain-timeout", "2")
        yield old.wait_ready()
        new = ProxyProcess(self)
        new.ports = dict(old.ports, admin=free_port())
        new.write(STATIC.format(generation=0, target="b", **self.ports))
        load = self.load(old.http + "/")
        yield sleep(1)
        new.start("--reuse-port")
        yield new.wait_ready()
        yield sleep(0.5)
        old.process.send_signal(signal.SIGTERM)
        done = yield load
        self.assertIn(old.process.wait(10), (0, -signal.SIGTERM))  # twistd re-raises the signal
        self.check(done, "a replacement and a drain", read_errors=4)
        out, _, _ = yield curl("-s", new.http + "/")
        self.assertEqual(out, b"b\n")
