"""
Throwaway network namespaces for tests that change netfilter rules
(C{ip netns add txmesh-test-<pid>-<n>}); the host's own rules are never
touched.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
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
        self._testcase = testcase
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

    def spawn(self, command: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """
        Start a command inside the namespace; at the test's cleanup (before
        the namespace is deleted) it gets C{SIGTERM}, then C{SIGKILL} after
        5 seconds.

        @param kwargs: for L{subprocess.Popen}.
        @return: the process (C{ip netns exec} execs the command, so this is
            the command's own process).
        """
        process = subprocess.Popen(["ip", "netns", "exec", self.name, *command], **kwargs)

        def stop() -> None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

        self._testcase.addCleanup(stop)
        return process

    def etc_file(self, name: str, text: str) -> None:
        """
        Give the namespace its own C{/etc/NAME} (e.g. C{hosts}): C{ip netns
        exec} bind-mounts C{/etc/netns/<namespace>/NAME} over it for the
        commands it runs.  Removed at the test's cleanup.
        """
        directory = os.path.join("/etc/netns", self.name)
        os.makedirs(directory, exist_ok=True)
        self._testcase.addCleanup(shutil.rmtree, directory, True)
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)


class Segment:
    """
    A private Ethernet segment between namespaces: a bridge in a namespace
    of its own (the host's interfaces and firewall are never touched), and
    a veth pair from it to each attached namespace.  Everything goes with
    the namespaces at the test's cleanup.
    """

    def __init__(self, testcase: Any, prefix_length: int = 24) -> None:
        """
        @param testcase: the test; the segment is deleted at its cleanup.
        @param prefix_length: of the addresses given to L{attach}.
        """
        self.switch = NetworkNamespace(testcase)
        self._prefix_length = prefix_length
        self._ports = itertools.count()
        self.switch.check(["ip", "link", "add", "br0", "type", "bridge"])
        self.switch.check(["ip", "link", "set", "br0", "up"])

    def attach(self, namespace: NetworkNamespace, address: str, device: str = "eth0") -> None:
        """
        Plug C{namespace} into the segment as C{device}, with C{address}.
        """
        port = f"port{next(self._ports)}"
        self.switch.check(["ip", "link", "add", port, "type", "veth", "peer", "name", device,
                           "netns", namespace.name])
        self.switch.check(["ip", "link", "set", port, "master", "br0", "up"])
        namespace.check(["ip", "addr", "add", f"{address}/{self._prefix_length}", "dev", device])
        namespace.check(["ip", "link", "set", device, "up"])
