"""
Tests for L{txmesh.capture.original_dst}: unit tests on fake sockets, and
real C{REDIRECT}ed connections in a network namespace of the test's own.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import sys
import textwrap
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.netns import NetworkNamespace, skip_reason
from txmesh.capture.original_dst import OriginalDestinationFactory, original_destination


class FakeSocket(socket.socket):
    """
    A socket whose C{getsockopt} answers from a table.
    """

    def __init__(self, family: int, local: Any, answers: dict[int, Any]) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self._local = local
        self.answers = answers

    def getsockname(self) -> Any:
        return self._local

    def getsockopt(self, level: int, option: int, size: int = 0) -> Any:  # type: ignore[override]
        assert option == 80
        answer = self.answers.get(level, OSError(errno.ENOENT, "no such"))
        if isinstance(answer, Exception):
            raise answer
        return answer


class HandleTransport(StringTransport):
    def __init__(self, handle: Any) -> None:
        super().__init__()
        self.handle = handle

    def getHandle(self) -> Any:
        return self.handle


def _in(host: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + b"\0" * 8


def _in6(host: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, host) + b"\0" * 4)


class OriginalDestinationTests(SynchronousTestCase):
    """
    L{original_destination} decodes C{SO_ORIGINAL_DST}.
    """

    def _lookup(self, family: int, local: Any, answers: dict[int, Any]) -> Any:
        sock = FakeSocket(family, local, answers)
        self.addCleanup(sock.close)
        return original_destination(HandleTransport(sock))

    def test_ipv4(self) -> None:
        """
        C{SOL_IP} gives a C{sockaddr_in}.
        """
        self.assertEqual(self._lookup(socket.AF_INET, ("127.0.0.1", 15001), {0: _in("10.1.2.3", 8080)}),
                         ("10.1.2.3", 8080))

    def test_ipv6(self) -> None:
        """
        C{SOL_IPV6} gives a C{sockaddr_in6}.
        """
        self.assertEqual(self._lookup(socket.AF_INET6, ("::1", 15001, 0, 0), {41: _in6("2001:db8::7", 443)}),
                         ("2001:db8::7", 443))

    def test_ipv4_on_dual_stack(self) -> None:
        """
        An IPv4 connection on an IPv6 socket is asked at the IPv4 level.
        """
        self.assertEqual(self._lookup(socket.AF_INET6, ("::ffff:127.0.0.1", 15001, 0, 0),
                                      {0: _in("10.1.2.3", 80)}), ("10.1.2.3", 80))

    def test_not_redirected(self) -> None:
        """
        No conntrack entry (C{ENOENT}), no netfilter (C{ENOPROTOOPT}), or an
        original destination that is the local address: C{None}.
        """
        self.assertIsNone(self._lookup(socket.AF_INET, ("127.0.0.1", 15001), {}))
        self.assertIsNone(self._lookup(socket.AF_INET, ("127.0.0.1", 15001),
                                       {0: OSError(errno.ENOPROTOOPT, "no")}))
        self.assertIsNone(self._lookup(socket.AF_INET, ("10.0.0.5", 8080), {0: _in("10.0.0.5", 8080)}))
        self.assertIsNone(self._lookup(socket.AF_INET6, ("::ffff:10.0.0.5", 8080, 0, 0),
                                       {0: _in("10.0.0.5", 8080)}))

    def test_other_errors_raise(self) -> None:
        """
        Any other C{getsockopt} error is not hidden.
        """
        with self.assertRaises(OSError):
            self._lookup(socket.AF_INET, ("127.0.0.1", 1), {0: OSError(errno.EBADF, "bad")})

    def test_no_socket(self) -> None:
        """
        A transport without an IP socket (in memory, UNIX): C{None}.
        """
        self.assertIsNone(original_destination(StringTransport()))
        self.assertIsNone(original_destination(object()))
        unix = socket.socket(socket.AF_UNIX)
        self.addCleanup(unix.close)
        self.assertIsNone(original_destination(HandleTransport(unix)))

    def test_wrapped_transport(self) -> None:
        """
        A TLS-style wrapper is looked through to the TCP transport under it.
        """
        sock = FakeSocket(socket.AF_INET, ("127.0.0.1", 15001), {0: _in("10.1.2.3", 8080)})
        self.addCleanup(sock.close)

        class Wrapper:
            transport = HandleTransport(sock)

            def getHandle(self) -> object:
                return object()  # an OpenSSL connection, say

        self.assertEqual(original_destination(Wrapper()), ("10.1.2.3", 8080))


class Recording(Protocol):
    def __init__(self) -> None:
        self.made = False
        self.data = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class FactoryTests(SynchronousTestCase):
    """
    L{OriginalDestinationFactory} looks the destination up once and hands it
    to the wrapped protocol's transport.
    """

    def _connect(self, answers: dict[int, Any], require: bool) -> tuple[Any, Recording, HandleTransport]:
        sock = FakeSocket(socket.AF_INET, ("127.0.0.1", 15001), answers)
        self.addCleanup(sock.close)
        inner = Recording()
        factory = OriginalDestinationFactory(Factory.forProtocol(lambda: inner), require=require, name="outbound")
        protocol = factory.buildProtocol(None)
        transport = HandleTransport(sock)
        protocol.makeConnection(transport)
        return protocol, inner, transport

    def test_redirected(self) -> None:
        """
        The wrapped protocol's transport answers L{original_destination}.
        """
        _, inner, _ = self._connect({0: _in("10.1.2.3", 8080)}, require=True)
        self.assertTrue(inner.made)
        self.assertEqual(inner.transport.original_destination, ("10.1.2.3", 8080))
        self.assertEqual(original_destination(inner.transport), ("10.1.2.3", 8080))

    def test_not_redirected(self) -> None:
        """
        Without C{require}, a direct connection goes on with C{None}; with
        it, the connection is closed and the wrapped protocol never sees it.
        """
        _, inner, _ = self._connect({}, require=False)
        self.assertTrue(inner.made)
        self.assertIsNone(original_destination(inner.transport))

        protocol, inner, transport = self._connect({}, require=True)
        self.assertFalse(inner.made)
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        protocol.connectionLost(None)
        self.assertEqual((inner.data, inner.lost), (b"", False))


# Runs inside the namespace: a listener behind OriginalDestinationFactory
# tells each client what original_destination said; prints the answers.
_SCRIPT = textwrap.dedent("""
    import json, sys
    from twisted.internet import defer, endpoints, task
    from twisted.internet.protocol import Factory, Protocol
    from txmesh.capture.original_dst import OriginalDestinationFactory, original_destination

    class Tell(Protocol):
        def connectionMade(self):
            self.transport.write(json.dumps(original_destination(self.transport)).encode())
            self.transport.loseConnection()

    class Read(Protocol):
        def __init__(self):
            self.data, self.done = b"", defer.Deferred()
        def dataReceived(self, data):
            self.data += data
        def connectionLost(self, reason):
            self.done.callback(self.data.decode())

    async def main(reactor, spec):
        factory = OriginalDestinationFactory(Factory.forProtocol(Tell), require=spec["require"])
        port = await endpoints.serverFromString(reactor, spec["listen"]).listen(factory)
        answers = []
        for host, dport in spec["connect"]:
            kind = endpoints.TCP6ClientEndpoint if ":" in host else endpoints.TCP4ClientEndpoint
            client = await kind(reactor, host, dport, timeout=5).connect(Factory.forProtocol(Read))
            answers.append(await client.done)
        await defer.maybeDeferred(port.stopListening)
        print(json.dumps(answers))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor, json.loads(sys.argv[1]))))
""")


class NamespaceTests(SynchronousTestCase):
    """
    Real redirected connections in a network namespace.
    """

    def setUp(self) -> None:
        reason = skip_reason("iptables")
        if reason:
            self.skipTest(reason)
        self.ns = NetworkNamespace(self)

    def _serve(self, listen: str, connect: list[tuple[str, int]], require: bool = False) -> list[Any]:
        spec = json.dumps({"listen": listen, "connect": connect, "require": require})
        out = self.ns.check([sys.executable, "-c", _SCRIPT, spec], timeout=30)
        return [json.loads(answer) if answer else answer for answer in json.loads(out)]

    def test_ipv4(self) -> None:
        """
        A connection to 198.51.100.7:8080 C{REDIRECT}ed to a local listener
        is recovered as C{("198.51.100.7", 8080)}; a direct connection gives
        C{None}.
        """
        # With an explicit source: else the client's address is 0.0.0.0.
        self.ns.check(["ip", "route", "add", "198.51.100.0/24", "dev", "lo", "src", "127.0.0.1"])
        self.ns.check(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "198.51.100.7",
                       "--dport", "8080", "-j", "REDIRECT", "--to-ports", "15001"])
        answers = self._serve("tcp:15001:interface=127.0.0.1", [("198.51.100.7", 8080), ("127.0.0.1", 15001)])
        self.assertEqual(answers, [["198.51.100.7", 8080], None])

    def test_ipv6(self) -> None:
        """
        The same over IPv6 (C{IP6T_SO_ORIGINAL_DST}).
        """
        if self.ns.run(["ip6tables", "-t", "nat", "-S"]).returncode != 0:
            self.skipTest("ip6tables nat table not available")
        self.ns.check(["ip", "-6", "route", "add", "2001:db8::/64", "dev", "lo"])
        self.ns.check(["ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "2001:db8::7",
                       "--dport", "443", "-j", "REDIRECT", "--to-ports", "15001"])
        answers = self._serve(r"tcp6:15001:interface=\:\:1", [("2001:db8::7", 443), ("::1", 15001)])
        self.assertEqual(answers, [["2001:db8::7", 443], None])

    def test_capture_rules(self) -> None:
        """
        With C{txmesh iptables --apply}, an application's connection to a
        remote address reaches the outbound capture listener, which recovers
        where it was going; a direct connection to the capture port is
        refused by a C{require} listener.
        """
        # A veth pair: the route to 198.51.100.0/24 must not be loopback
        # (loopback traffic of applications is not captured, as in Istio).
        made = self.ns.run(["ip", "link", "add", "txm0", "type", "veth", "peer", "name", "txm1"])
        if made.returncode != 0:
            self.skipTest(f"cannot make a veth pair: {made.stderr.strip()}")
        self.ns.check(["ip", "addr", "add", "198.51.100.1/24", "dev", "txm0"])
        self.ns.check(["ip", "link", "set", "txm0", "up"])
        self.ns.check(["ip", "link", "set", "txm1", "up"])
        applied = self.ns.txmesh("iptables", "--apply", "-b", "")
        self.assertEqual(applied.returncode, 0, applied.stderr)
        answers = self._serve("tcp:15001:interface=127.0.0.1", [("198.51.100.7", 8080), ("127.0.0.1", 15001)],
                              require=True)
        self.assertEqual(answers, [["198.51.100.7", 8080], ""])
