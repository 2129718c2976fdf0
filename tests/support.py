"""
Shared fixtures for integration tests: an in-process proxy on loopback
ports, recording upstreams, raw clients, and real external programs (nginx,
curl) run as child processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from txmesh.filters.registry import FilterRegistry
from txmesh.proxy.service import ProxyService

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
CURL = shutil.which("curl")


def free_port() -> int:
    """
    @return: a TCP port on 127.0.0.1 that was free a moment ago (for
        external programs that cannot report the port they bound).
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def busy_ports(ports: tuple[int, ...]) -> list[int]:
    """
    @return: those of C{ports} on 127.0.0.1 that something else holds (for
        tests of programs with fixed ports, which skip rather than collide).
    """
    busy = []
    for port in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            busy.append(port)
        finally:
            s.close()
    return busy


def sleep(seconds: float) -> defer.Deferred:
    """
    Wait on the reactor; only for tests that drive real external processes.
    """
    d: defer.Deferred = defer.Deferred()
    call = reactor.callLater(seconds, d.callback, None)
    d.addErrback(lambda f: call.cancel() if call.active() else None)
    return d


@defer.inlineCallbacks
def poll_until(check: Any, what: str, timeout: float = 15.0, every: float = 0.1) -> Any:
    """
    Call C{check} (which may return a Deferred) until its result is true;
    only for tests that drive real external processes.

    @return: a Deferred of that result, failing with C{AssertionError}
        naming C{what} after C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = yield check()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        yield sleep(every)


class ProxyHarness:
    """
    A L{ProxyService} running in the test's reactor from a YAML template.

    Write C{{upstream}}-style placeholders in the YAML and pass their values
    to L{start}; listeners should use port 0 (C{tcp:0:interface=127.0.0.1})
    and L{port} tells the bound port.
    """

    def __init__(self, testcase: Any, registry: FilterRegistry | None = None):
        self._case = testcase
        self._registry = registry
        self.service: ProxyService | None = None
        self.path = os.path.join(tempfile.mkdtemp(prefix="txmesh-test-"), "proxy.yaml")
        testcase.addCleanup(shutil.rmtree, os.path.dirname(self.path), True)

    def write(self, yaml_text: str, **values: Any) -> None:
        """
        Write the config file (C{{name}} placeholders filled from C{values}).
        """
        text = textwrap.dedent(yaml_text)
        for k, v in values.items():
            text = text.replace("{" + k + "}", str(v))
        with open(self.path, "w") as f:
            f.write(text)

    @defer.inlineCallbacks
    def start(self, yaml_text: str, **values: Any) -> Any:
        """
        Write the config and start the proxy; stops at test cleanup.
        """
        self.write(yaml_text, **values)
        self.service = ProxyService(self.path, reactor, registry=self._registry, drain_timeout=1.0)
        self.service.load_initial()
        yield self.service.startService()
        self._case.addCleanup(self.service.stopService)
        return self.service

    def port(self, listener: str = "http") -> int:
        """
        @return: the bound port of a listener.
        """
        return self.service.listening_port(listener).getHost().port

    def admin_port(self) -> int:
        return self.service.admin_port().getHost().port


class RecordingProtocol(Protocol):
    """
    An upstream that records every byte it receives and answers with
    C{factory.respond(protocol, data)}.
    """

    def connectionMade(self) -> None:
        self.received = b""
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.factory.received.append(data)
        if self.factory.respond is not None:
            self.factory.respond(self, data)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.closed.append(self)
        waiters, self.factory.close_waiters = self.factory.close_waiters, []
        for d in waiters:
            d.callback(self)


class RecordingFactory(Factory):
    """
    Factory of L{RecordingProtocol}s; C{received} holds every chunk any
    connection got.
    """

    protocol = RecordingProtocol
    noisy = False

    def __init__(self, respond: Callable[[RecordingProtocol, bytes], None] | None = None):
        self.respond = respond
        self.received: list[bytes] = []
        self.connections: list[RecordingProtocol] = []
        self.closed: list[RecordingProtocol] = []
        self.close_waiters: list[defer.Deferred] = []

    def all_received(self) -> bytes:
        return b"".join(self.received)

    def next_close(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.close_waiters.append(d)
        return d


def fixed_response(body: bytes = b"hello", status: bytes = b"200 OK", extra: bytes = b"") -> Callable:
    """
    @return: a C{respond} callable answering every complete request head
        with a fixed content-length response (keep-alive).
    """

    def respond(proto: RecordingProtocol, data: bytes) -> None:
        # Answer once per request head seen (requests without bodies).
        buf = getattr(proto, "_pending", b"") + data
        while b"\r\n\r\n" in buf:
            _, buf = buf.split(b"\r\n\r\n", 1)
            proto.transport.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-length: " + str(len(body)).encode()
                + b"\r\n" + extra + b"\r\n" + body)
        proto._pending = buf

    return respond


@defer.inlineCallbacks
def listen_upstream(testcase: Any, factory: Factory) -> Any:
    """
    Listen with C{factory} on 127.0.0.1:0; closed at cleanup.

    @return: the port number.
    """
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


class RawClient(Protocol):
    """
    A client that writes raw bytes and collects everything it receives.
    """

    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred = defer.Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for cond, d in list(self._waiters):
            if cond(self.data):
                self._waiters.remove((cond, d))
                d.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        for _, d in self._waiters:
            d.callback(self.data)
        self._waiters = []
        self.closed.callback(self.data)

    def wait_for(self, cond: Callable[[bytes], bool], timeout: float = 10) -> defer.Deferred:
        """
        @return: a Deferred firing with all data once C{cond(data)} holds
            (or the connection closes, or C{timeout} passes).
        """
        if cond(self.data):
            return defer.succeed(self.data)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((cond, d))
        return d.addTimeout(timeout, reactor)


@defer.inlineCallbacks
def raw_connect(testcase: Any, port: int) -> Any:
    """
    @return: a connected L{RawClient}; aborted at cleanup.
    """
    client = RawClient()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    testcase.addCleanup(lambda: client.transport.abortConnection())
    return client


@defer.inlineCallbacks
def raw_exchange(testcase: Any, port: int, data: bytes, timeout: float = 10) -> Any:
    """
    Send C{data}, then collect the reply until the server closes.
    """
    client = yield raw_connect(testcase, port)
    client.transport.write(data)
    result = yield client.closed.addTimeout(timeout, reactor)
    return result


def count_responses(data: bytes) -> int:
    return data.count(b"HTTP/1.1 ")


@defer.inlineCallbacks
def curl(*args: str) -> Any:
    """
    Run curl; returns C{(stdout, stderr, exit code)}.
    """
    if CURL is None:
        raise SkipTest("curl is not installed")
    out, err, code = yield getProcessOutputAndValue(CURL, ("-sS", "--max-time", "30") + args, env=os.environ)
    return out, err, code


class Nginx:
    """
    A real nginx, run from a temporary prefix with the C{http} block given.
    """

    def __init__(self, testcase: Any, http_block: str):
        if NGINX is None:
            raise SkipTest("nginx is not installed")
        self.prefix = tempfile.mkdtemp(prefix="txmesh-nginx-")
        os.makedirs(os.path.join(self.prefix, "logs"))
        conf = os.path.join(self.prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(textwrap.dedent(f"""\
                daemon off;
                worker_processes 1;
                error_log {self.prefix}/logs/error.log;
                pid {self.prefix}/nginx.pid;
                events {{ worker_connections 1024; }}
                http {{
                  access_log off;
                  client_body_temp_path {self.prefix}/body;
                  proxy_temp_path {self.prefix}/proxy;
                  fastcgi_temp_path {self.prefix}/fastcgi;
                  uwsgi_temp_path {self.prefix}/uwsgi;
                  scgi_temp_path {self.prefix}/scgi;
                """) + textwrap.dedent(http_block) + "\n}\n")
        self.process = subprocess.Popen(
            [NGINX, "-p", self.prefix, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        testcase.addCleanup(self.stop)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.prefix, True)

    @defer.inlineCallbacks
    def wait_listening(self, port: int, timeout: float = 10.0) -> Any:
        """
        Wait until nginx accepts on C{port}.
        """
        deadline = reactor.seconds() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("nginx exited: " + self.process.stderr.read().decode("utf-8", "replace"))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                if reactor.seconds() > deadline:
                    raise
            yield sleep(0.05)
