"""
The Bookinfo walkthrough (C{examples/bookinfo/walkthrough.py}) still shows
what its steps say: it is run with C{--check} as a child process, with this
test's own Python environment, and must assert every step and exit 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from twisted.trial import unittest

from tests.support import busy_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALKTHROUGH = os.path.join(REPO, "examples", "bookinfo", "walkthrough.py")
PORTS = (19080, 19081, 19082, 19083, 19084, 19085, 19086, 19090, 19091, 19099)
TIMEOUT = 120


class BookinfoWalkthroughTests(unittest.TestCase):
    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("the walkthrough is written for Linux")
        venv = os.environ.get("TXMESH_VENV") or sys.prefix
        self.python = os.path.join(venv, "bin", "python")
        if not os.access(self.python, os.X_OK):
            raise unittest.SkipTest(f"no {self.python} to run the walkthrough with")
        busy = busy_ports(PORTS)
        if busy:
            raise unittest.SkipTest(f"ports {busy} on 127.0.0.1 are in use")
        self.state = os.path.abspath(self.mktemp())

    def test_check(self) -> None:
        """
        C{walkthrough.py --check} starts Bookinfo's backends and a proxy,
        runs every step with its assertions (canary, A/B, fault delay,
        circuit breaking, retries with outlier ejection, rollout by SIGHUP),
        stops everything and exits 0.
        """
        env = dict(os.environ, TXMESH_BOOKINFO_DIR=self.state, PYTHONUNBUFFERED="1")
        process = subprocess.Popen(
            [self.python, WALKTHROUGH, "--check"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            # The walkthrough leads its own group; its children lead theirs
            # and get SIGTERM when it dies (PR_SET_PDEATHSIG).
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            self.fail(f"walkthrough.py --check took over {TIMEOUT}s:\n{out.decode('utf-8', 'replace')}")
        text = out.decode("utf-8", "replace")
        self.assertEqual(process.returncode, 0, text)
        self.assertIn("walkthrough --check: OK", text)
        self.assertNotIn("check: FAILED", text)
        self.assertIn("walkthrough: stopped", text)
        self.assertEqual(busy_ports(PORTS), [], "the walkthrough left a process listening")
        for name in sorted(os.listdir(self.state)):
            if name.endswith(".log"):
                with open(os.path.join(self.state, name), encoding="utf-8", errors="replace") as f:
                    log = f.read()
                self.assertNotIn("Traceback", log, f"{name}:\n{log}")
                self.assertNotIn("Unhandled", log, f"{name}:\n{log}")
