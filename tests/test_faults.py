"""
Upstream faults, each mapped to its status and Envoy response flag, with
the proxy recovering by itself: an upstream that never answers, a host
name that does not resolve, an upstream that resets while the request body
is still arriving, and one that comes back after being down.  Real
loopback sockets, the proxy in-process.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from tests.support import (
    ProxyHarness,
    RecordingFactory,
    fixed_response,
    free_port,
    listen_upstream,
    poll_until,
    raw_exchange,
)
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory

CONFIG = """
    listeners:
      - name: http
        address: "tcp:0:interface=127.0.0.1"
        routes:
          - {name: silent, match: {prefix: /silent}, cluster: silent, timeout: 0.3s}
          - {name: nowhere, match: {prefix: /nowhere}, cluster: nowhere}
          - {name: reset, match: {prefix: /reset}, cluster: reset}
          - {name: later, match: {prefix: /later}, cluster: later}
          - {name: ok, match: {prefix: /}, cluster: ok}
    clusters:
      - {name: silent, endpoints: ["127.0.0.1:{silent}"]}
      - {name: nowhere, endpoints: ["does-not-exist.invalid:80"], connect_timeout: 2s}
      - {name: reset, endpoints: ["127.0.0.1:{reset}"]}
      - {name: later, endpoints: ["127.0.0.1:{later}"], connect_timeout: 1s}
      - {name: ok, endpoints: ["127.0.0.1:{ok}"]}
"""


class _Silent(Protocol):
    """
    Reads everything, answers nothing.
    """

    def connectionMade(self) -> None:
        self.factory.open.append(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.remove(self)


class _ResetAfterSomeBody(Protocol):
    """
    Reads a little of the request, then aborts the connection.
    """

    def connectionMade(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) > 2048:
            self.transport.abortConnection()


def flags(data: bytes) -> bytes:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"x-txmesh-flags:"):
            return line.split(b":", 1)[1].strip()
    return b""


class FaultTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.silent = Factory.forProtocol(_Silent)
        self.silent.open = []
        ports = {
            "silent": (yield listen_upstream(self, self.silent)),
            "reset": (yield listen_upstream(self, Factory.forProtocol(_ResetAfterSomeBody))),
            "ok": (yield listen_upstream(self, RecordingFactory(fixed_response(b"ok")))),
            "later": free_port(),
        }
        self.ports = ports
        self.h = ProxyHarness(self, registry=FilterRegistry(http=[RouterFactory()]))
        yield self.h.start(CONFIG, **ports)

    def get(self, path: str, extra: bytes = b"") -> defer.Deferred:
        return raw_exchange(self, self.h.port(), b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n"
                            b"Connection: close\r\n" + extra + b"\r\n")

    @defer.inlineCallbacks
    def test_upstream_never_answers(self) -> Any:
        """
        504 with flag UT at the route timeout; the upstream connection is
        closed, not left hanging; the next request is handled the same way.
        """
        for _ in range(2):
            data = yield self.get("/silent")
            self.assertTrue(data.startswith(b"HTTP/1.1 504 "), data)
            self.assertEqual(flags(data), b"UT")
        # The close reaches the upstream server in the same poll as the
        # response reaches the client, in either order.
        yield poll_until(lambda: defer.succeed(not self.silent.open), "the upstream connection closed", 5, 0.01)
        data = yield self.get("/")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)

    @defer.inlineCallbacks
    def test_name_that_does_not_resolve(self) -> Any:
        """
        A DNS failure is a connect failure: 503 with flag UF; other routes
        are unaffected.
        """
        data = yield self.get("/nowhere")
        self.assertTrue(data.startswith(b"HTTP/1.1 503 "), data)
        self.assertEqual(flags(data), b"UF")
        data = yield self.get("/")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)

    @defer.inlineCallbacks
    def test_upstream_resets_mid_request_body(self) -> Any:
        """
        An upstream that resets while the request body is still coming:
        503 with flag UC (nothing of a response had started), and the
        proxy serves the next request.
        """
        body = b"x" * 64 * 1024
        data = yield raw_exchange(
            self, self.h.port(),
            b"POST /reset HTTP/1.1\r\nHost: a\r\nConnection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        self.assertTrue(data.startswith(b"HTTP/1.1 503 "), data)
        self.assertEqual(flags(data), b"UC")
        data = yield self.get("/")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)

    @defer.inlineCallbacks
    def test_upstream_back_after_being_down(self) -> Any:
        """
        Down: 503 UF.  Up again: served, with no operator action.
        """
        data = yield self.get("/later")
        self.assertTrue(data.startswith(b"HTTP/1.1 503 "), data)
        self.assertEqual(flags(data), b"UF")
        port = yield TCP4ServerEndpoint(reactor, self.ports["later"], interface="127.0.0.1").listen(
            RecordingFactory(fixed_response(b"back")))
        self.addCleanup(port.stopListening)
        data = yield self.get("/later")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertTrue(data.endswith(b"back"), data)
