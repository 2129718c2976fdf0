"""
Throwaway network namespaces for tests that change netfilter rules
(C{ip netns add txmesh-test-<pid>-<n>}); the host's own rules are never
touched.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

_counter = itertools.count()


def skip_reason(*programs: str) -> str | None:
    """
    @param programs: programs the test runs inside the namespace, besides
        C{ip}.
    @return: why namespace tests cannot run here, or C{None} if they can.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (ip netns add, iptables); run scripts/test as root"
    for program in ("ip", *programs):
        if shutil.which(program) is None:
            return f"{program} not found: install iproute2 and iptables (scripts/test does)"
    return None


class NetworkNamespace:
    """
    A network namespace with its loopback up, deleted at the test's cleanup.

    @ivar name: e.g. C{txmesh-test-1234-0}.
    """

    def __init__(self, testcase: Any) -> None:
        """
        @param testcase: the test; the namespace is deleted at its cleanup.
        @raise unittest.SkipTest: (via C{testcase.skipTest}) the namespace
            cannot be made.
        """
        self.name = f"txmesh-test-{os.getpid()}-{next(_counter)}"
        made = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True, check=False)
        if made.returncode != 0:
            testcase.skipTest(f"ip netns add failed: {made.stderr.strip()}")
        testcase.addCleanup(subprocess.run, ["ip", "netns", "delete", self.name], capture_output=True, check=False)
        self.check(["ip", "link", "set", "lo", "up"])

    def run(self, command: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """
        Run a command inside the namespace.

        @return: the finished process (text output captured).
        """
        return subprocess.run(["ip", "netns", "exec", self.name, *command], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def check(self, command: Sequence[str], timeout: float = 60) -> str:
        """
        Run a command inside the namespace; it must succeed.

        @return: its stdout.
        @raise AssertionError: it failed (with its stderr).
        """
        done = self.run(command, timeout)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} in {self.name}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    def txmesh(self, *args: str) -> subprocess.CompletedProcess:
        """
        Run C{txmesh ARGS...} (this checkout's) inside the namespace.
        """
        return self.run([sys.executable, "-m", "txmesh.cli", *args])
