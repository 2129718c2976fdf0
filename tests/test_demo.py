"""
The demo mesh (C{scripts/demo}, C{examples/demo/}) still starts and does
what its tour says: C{scripts/demo --check} is run as a child process, in
this test's own Python environment (C{TXMESH_VENV}, so nothing is installed
and no network is needed). The mesh is a pilot, three apps and their
sidecars, and a trace collector; the tour changes the pilot's routes live,
shows mutual TLS and an AuthorizationPolicy between the sidecars, and the
metrics, trace and access log they report.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from twisted.trial import unittest

from tests.support import busy_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "scripts", "demo")
DEMO_PORTS = (15800, 15801, 15802, 15809, 15810, 15811, 15812, 15819, 15820, 15821, 15829, 15830, 15831, 15839,
              15840, 15841)
TIMEOUT = 120
TOUR_STEPS = 22


class DemoTests(unittest.TestCase):
    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("the demo script is written for Linux")
        if shutil.which("bash") is None:
            raise unittest.SkipTest("bash is not installed")
        self.venv = os.environ.get("TXMESH_VENV") or sys.prefix
        if not os.access(os.path.join(self.venv, "bin", "python"), os.X_OK):
            raise unittest.SkipTest(f"no {self.venv}/bin/python to hand to scripts/demo as TXMESH_VENV")
        self.state = os.path.abspath(self.mktemp())

    def demo(self, *args: str, **env: str) -> tuple[int, str]:
        """
        Run C{scripts/demo ARGS}; fail the test if it takes longer than
        L{TIMEOUT} seconds (after killing it and whatever it started).
        """
        full_env = dict(os.environ, TXMESH_VENV=self.venv, TXMESH_DEMO_DIR=self.state, CI="true", **env)
        process = subprocess.Popen(
            ["bash", DEMO, *args], cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            text = out.decode("utf-8", "replace")
            self.fail(f"scripts/demo {' '.join(args)} took over {TIMEOUT}s:\n{text}")
        return process.returncode, out.decode("utf-8", "replace")

    def assertLogsClean(self) -> None:
        for name in sorted(os.listdir(self.state)):
            if name.endswith(".log"):
                with open(os.path.join(self.state, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                self.assertNotIn("Traceback", text, f"{name}:\n{text}")
                self.assertNotIn("Unhandled", text, f"{name}:\n{text}")

    def test_check(self) -> None:
        """
        C{scripts/demo --check} starts the mesh (the pilot first), runs the
        tour with its assertions and stops everything: with curl when it is
        installed, and with the demo's curl-less fallback.  Then a demo left
        running stops with C{scripts/demo --stop}.
        """
        # One test method for both runs: trial --jobs must never run two
        # demos at once, they use the same fixed ports.
        busy = busy_ports(DEMO_PORTS)
        if busy:
            raise unittest.SkipTest(f"demo ports {busy} are in use (a demo running? scripts/demo --stop)")
        variants = [{"TXMESH_DEMO_CURL": "none"}]
        if shutil.which("curl") is not None:
            variants.insert(0, {})
        for env in variants:
            code, out = self.demo("--check", **env)
            self.assertEqual(code, 0, f"scripts/demo --check ({env}) failed:\n{out}")
            self.assertIn(f"demo --check: OK ({TOUR_STEPS} steps)", out)
            self.assertIn("$ curl -s -H 'x-version: v2' http://127.0.0.1:15810/", out)
            self.assertIn(" --pilot http://127.0.0.1:15841 proxy-status\n", out)
            self.assertIn(" apply -f examples/demo/canary-50-50.yaml --name backend-routes.yaml\n", out)
            self.assertIn("txmesh apply: refused, nothing changed: ", out)
            # Security: the caller's identity from mutual TLS, a plaintext
            # client refused, the AuthorizationPolicy's 403.
            self.assertIn("URI=spiffe://cluster.local/ns/demo/sa/frontend", out)
            self.assertIn("$ curl -sS http://127.0.0.1:15820/\ncurl: (", out)
            self.assertIn("$ curl -s -i -X DELETE -H 'Host: backend' http://127.0.0.1:15811/\nHTTP/1.1 403 ", out)
            self.assertIn("\nRBAC: access denied\n", out)
            # Observability: the trace from the collector, the metrics, the
            # access log line.
            self.assertIn("$ curl -s http://127.0.0.1:15809/api/v2/trace/4bf92f3577b34da6a3ce929d0e0e4736 ", out)
            self.assertIn('connection_security_policy="mutual_tls"', out)
            self.assertIn('"DELETE / HTTP/1.1" 403 RBACD ', out)
            self.assertIn("demo: stopped", out)
            self.assertLogsClean()
            self.assertFalse(os.path.exists(os.path.join(self.state, "pids.json")))
            self.assertEqual(busy_ports(DEMO_PORTS), [], "the demo left ports open")
            # The pilot's generated CA and the join tokens are in the state
            # directory, never in the repository.
            self.assertTrue(os.path.exists(os.path.join(self.state, "pilot", "ca", "root-cert.pem")))
            self.assertTrue(os.path.exists(os.path.join(self.state, "frontend-sidecar.token")))
            self.assertFalse(os.path.exists(os.path.join(REPO, "examples", "demo", "pilot", "ca")))
        self.check_stop()

    def check_stop(self) -> None:
        """
        A demo left running (the foreground C{scripts/demo}) is stopped by
        C{scripts/demo --stop} from elsewhere: every process, the pilot too.
        """
        full_env = dict(os.environ, TXMESH_VENV=self.venv, TXMESH_DEMO_DIR=self.state, CI="true",
                        TXMESH_DEMO_CURL="none")
        log = os.path.join(os.path.abspath(self.mktemp()) + ".log")
        with open(log, "wb") as out:
            running = subprocess.Popen(["bash", DEMO], cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:
                with open(log, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if "demo: running." in text:
                    break
                if running.poll() is not None or time.monotonic() > deadline:
                    self.fail(f"scripts/demo did not come up:\n{text}")
                time.sleep(0.2)
            self.assertEqual(len(busy_ports(DEMO_PORTS)), len(DEMO_PORTS))
            code, out = self.demo("--stop")
            self.assertEqual(code, 0, out)
            self.assertIn("demo: stopped", out)
            running.wait(15)
        finally:
            if running.poll() is None:
                os.killpg(running.pid, signal.SIGKILL)
                running.wait()
        self.assertEqual(busy_ports(DEMO_PORTS), [], "--stop left ports open (the pilot's: 15840, 15841)")
        self.assertFalse(os.path.exists(os.path.join(self.state, "pids.json")))

    def test_stop_when_not_running(self) -> None:
        """
        C{scripts/demo --stop} with no demo running says so and succeeds.
        """
        code, out = self.demo("--stop")
        self.assertEqual((code, out.strip()), (0, "demo: no demo is running"))
