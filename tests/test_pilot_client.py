"""
The proxy's end of the pilot channel: L{PilotClient} and its use by
L{ProxyService}, against a fake pilot on real loopback sockets, and the
reconnect backoff against a memory reactor.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import textwrap
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support import RecordingFactory, fixed_response, listen_upstream, raw_exchange, sleep
from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.filters.registry import FilterRegistry
from txmesh.pilot.messages import Ack, ChannelDecoder, Hello, Nack, Node, Ping, Pong, Push, Refused, encode
from txmesh.proxy.pilot_client import PilotClient, backoff_delay
from txmesh.proxy.service import ProxyService


@defer.inlineCallbacks
def wait_until(condition: Any, timeout: float = 10.0) -> Any:
    """
    Poll C{condition()} on the reactor until it is true; fail after
    C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        yield sleep(0.01)


class FakePilotProtocol(Protocol):
    def connectionMade(self) -> None:
        self.decoder = ChannelDecoder()
        self.received: list[Any] = []
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        for message in self.decoder.receive_data(data):
            self.received.append(message)
            self.factory.received.append(message)
            if isinstance(message, Hello) and self.factory.on_hello is not None:
                self.factory.on_hello(self)

    def send(self, message: Any) -> None:
        self.transport.write(encode(message))

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.append(self)


class FakePilot(Factory):
    """
    A pilot that records what proxies send; C{on_hello(protocol)} decides
    what happens after a Hello.
    """

    protocol = FakePilotProtocol
    noisy = False

    def __init__(self, on_hello: Any = None):
        self.on_hello = on_hello
        self.connections: list[FakePilotProtocol] = []
        self.lost: list[FakePilotProtocol] = []
        self.received: list[Any] = []
        self.port: Any = None

    def of_type(self, cls: type) -> list[Any]:
        return [m for m in self.received if isinstance(m, cls)]

    @defer.inlineCallbacks
    def listen(self, testcase: TestCase) -> Any:
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self)
        testcase.addCleanup(self.shutdown)
        return f"tcp:127.0.0.1:{self.port.getHost().port}"

    def shutdown(self) -> Any:
        for conn in self.connections:
            conn.transport.abortConnection()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


def resources(upstream_port: int) -> dict:
    return {
        "clusters": [{"name": "app", "endpoints": [f"127.0.0.1:{upstream_port}"]}],
        "listeners": [{"name": "http", "address": "tcp:0:interface=127.0.0.1",
                       "routes": [{"cluster": "app"}]}],
    }


REQUEST = b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n"


class ProxyWithPilotTests(TestCase):
    """
    A L{ProxyService} with a C{pilot} section, against fake pilots.
    """

    @defer.inlineCallbacks
    def start_proxy(self, *addresses: str, static: str = "") -> Any:
        tmp = tempfile.mkdtemp(prefix="txmesh-pilot-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "bootstrap.yaml")
        listed = ", ".join(f'"{a}"' for a in addresses)
        with open(path, "w") as f:
            f.write(textwrap.dedent(f"""\
                node: {{id: reviews-v1.default, app: reviews, version: v1, labels: {{team: books}}}}
                pilot:
                  addresses: [{listed}]
                  inbound_port: 15006
                  app_port: 9080
                  insecure: true
                """) + textwrap.dedent(static))
        service = ProxyService(path, reactor, registry=FilterRegistry.from_plugins(), drain_timeout=1.0,
                               pilot_backoff_base=0.02, pilot_backoff_max=0.1)
        service.load_initial()
        yield service.startService()
        self.addCleanup(service.stopService)
        return service

    @defer.inlineCallbacks
    def upstream(self, body: bytes = b"pushed") -> Any:
        port = yield listen_upstream(self, RecordingFactory(fixed_response(body)))
        return port

    @defer.inlineCallbacks
    def get(self, service: ProxyService) -> Any:
        port = service.listening_port("http").getHost().port
        data = yield raw_exchange(self, port, REQUEST)
        return data

    @defer.inlineCallbacks
    def test_hello_push_ack_and_serve(self) -> Any:
        """
        The proxy says Hello with its node (ports as labels), applies a
        push, acks it, and serves the pushed route.
        """
        upstream = yield self.upstream()
        pilot = FakePilot(lambda p: p.send(Push(version="v1", nonce="n1", resources=resources(upstream))))
        address = yield pilot.listen(self)
        service = yield self.start_proxy(address)
        yield wait_until(lambda: pilot.of_type(Ack))
        [hello] = pilot.of_type(Hello)
        self.assertEqual(hello.node.id, "reviews-v1.default")
        self.assertEqual(hello.node.app, "reviews")
        self.assertEqual(dict(hello.node.labels), {"team": "books", "txmesh.io/inbound-port": "15006",
                                                   "txmesh.io/app-port": "9080"})
        self.assertEqual(hello.versions, {})
        self.assertEqual(pilot.of_type(Ack), [Ack(nonce="n1", version="v1")])
        data = yield self.get(service)
        self.assertIn(b"200 OK", data)
        self.assertTrue(data.endswith(b"pushed"))
        status = service.pilot_status()
        self.assertEqual(status["connected"], address)
        self.assertEqual(status["acked_version"], "v1")
        self.assertEqual(status["versions"], {"clusters": "v1", "listeners": "v1"})

    @defer.inlineCallbacks
    def test_invalid_push_nacked_old_config_serves(self) -> Any:
        """
        A push the loader refuses is nacked with the reason; the previous
        config keeps serving.
        """
        upstream = yield self.upstream()
        pilot = FakePilot(lambda p: p.send(Push(version="v1", nonce="n1", resources=resources(upstream))))
        address = yield pilot.listen(self)
        service = yield self.start_proxy(address)
        yield wait_until(lambda: pilot.of_type(Ack))
        bad = resources(upstream)
        bad["listeners"][0]["routes"] = [{"cluster": "nope"}]
        pilot.connections[0].send(Push(version="v2", nonce="n2", resources=bad))
        yield wait_until(lambda: pilot.of_type(Nack))
        [nack] = pilot.of_type(Nack)
        self.assertEqual((nack.nonce, nack.version), ("n2", "v2"))
        self.assertIn("unknown cluster 'nope'", nack.error)
        self.assertIn("listeners[0].routes[0].cluster", nack.error)
        data = yield self.get(service)
        self.assertTrue(data.endswith(b"pushed"))
        status = service.pilot_status()
        self.assertEqual(status["acked_version"], "v1")
        self.assertIn("unknown cluster", status["last_error"])

    @defer.inlineCallbacks
    def test_partial_push_keeps_other_types(self) -> Any:
        """
        A push without C{listeners} keeps the last pushed listeners (state of
        the world per type); unknown types are skipped, not refused.
        """
        upstream = yield self.upstream()
        other = yield self.upstream(b"other")
        pilot = FakePilot(lambda p: p.send(Push(version="v1", nonce="n1", resources=resources(upstream))))
        address = yield pilot.listen(self)
        service = yield self.start_proxy(address)
        yield wait_until(lambda: pilot.of_type(Ack))
        pilot.connections[0].send(Push(version="v2", nonce="n2", resources={
            "clusters": resources(other)["clusters"], "widgets": [{"x": 1}]}))
        yield wait_until(lambda: len(pilot.of_type(Ack)) == 2)
        self.assertEqual(pilot.of_type(Ack)[1], Ack(nonce="n2", version="v2"))
        data = yield self.get(service)
        self.assertTrue(data.endswith(b"other"))
        self.assertEqual(service.pilot_status()["versions"], {"clusters": "v2", "listeners": "v1"})

    @defer.inlineCallbacks
    def test_per_type_versions_recorded_and_resumed(self) -> Any:
        """
        The per-type versions of a push are recorded and sent back in the
        next hello, so a pilot can resume.
        """
        upstream = yield self.upstream()
        pilot = FakePilot(lambda p: p.send(Push(version="v1", nonce="n1", resources=resources(upstream),
                                                versions={"listeners": "L1", "clusters": "C1"})))
        address = yield pilot.listen(self)
        service = yield self.start_proxy(address)
        yield wait_until(lambda: pilot.of_type(Ack))
        self.assertEqual(service.pilot_status()["versions"], {"listeners": "L1", "clusters": "C1"})
        pilot.connections[0].transport.loseConnection()
        yield wait_until(lambda: len(pilot.of_type(Hello)) == 2)
        self.assertEqual(pilot.of_type(Hello)[1].versions, {"listeners": "L1", "clusters": "C1"})

    @defer.inlineCallbacks
    def test_static_resources_kept_beside_pushed(self) -> Any:
        """
        The bootstrap's own listeners and clusters stay beside the pushed
        ones (Envoy's static and dynamic resources); a pushed listener that
        takes a static one's name is refused with a NACK naming it.
        """
        upstream = yield self.upstream()
        local = yield self.upstream(b"static")
        pilot = FakePilot(lambda p: p.send(Push(version="v1", nonce="n1", resources=resources(upstream))))
        address = yield pilot.listen(self)
        service = yield self.start_proxy(address, static=f"""\
            clusters: [{{name: local, endpoints: ["127.0.0.1:{local}"]}}]
            listeners: [{{name: local, address: "tcp:0:interface=127.0.0.1", routes: [{{cluster: local}}]}}]
            """)
        yield wait_until(lambda: pilot.of_type(Ack))
        self.assertTrue((yield self.get(service)).endswith(b"pushed"))
        port = service.listening_port("local").getHost().port
        self.assertTrue((yield raw_exchange(self, port, REQUEST)).endswith(b"static"))
        clashing = resources(upstream)
        clashing["listeners"][0]["name"] = "local"
        pilot.connections[0].send(Push(version="v2", nonce="n2", resources=clashing))
        yield wait_until(lambda: pilot.of_type(Nack))
        self.assertIn("local", pilot.of_type(Nack)[0].error)
        self.assertIn("static listeners", pilot.of_type(Nack)[0].error)
        self.assertTrue((yield self.get(service)).endswith(b"pushed"))

    @defer.inlineCallbacks
    def test_file_reload_keeps_pushed_config(self) -> Any:
        """
        With a pilot, reloading the bootstrap file does not replace the
        pushed config.
        """
        upstream = yield self.upstream()
        pilot = FakePilot(lambda p: p.send(Push(version="v1", nonce="n1", resources=resources(upstream))))
        address = yield pilot.listen(self)
        service = yield self.start_proxy(address)
        yield wait_until(lambda: pilot.of_type(Ack))
        applied = yield service.reload()
        self.assertFalse(applied)
        data = yield self.get(service)
        self.assertTrue(data.endswith(b"pushed"))

    @defer.inlineCallbacks
    def test_pilot_gone_keeps_serving(self) -> Any:
        """
        When the pilot goes away the proxy keeps serving its last config
        and keeps trying to reconnect.
        """
        upstream = yield self.upstream()
        pilot = FakePilot(lambda p: p.send(Push(version="v1", nonce="n1", resources=resources(upstream))))
        address = yield pilot.listen(self)
        service = yield self.start_proxy(address)
        yield wait_until(lambda: pilot.of_type(Ack))
        yield pilot.shutdown()
        yield wait_until(lambda: service.pilot_status()["connected"] is None)
        yield wait_until(lambda: "cannot connect" in (service.pilot_status()["last_error"] or ""))
        data = yield self.get(service)
        self.assertTrue(data.endswith(b"pushed"))
        self.assertEqual(service.pilot_status()["acked_version"], "v1")

    @defer.inlineCallbacks
    def test_next_address_after_close(self) -> Any:
        """
        When the first pilot closes the channel, the proxy reconnects to the
        second address and resumes with its applied versions.
        """
        upstream = yield self.upstream()
        first = FakePilot(lambda p: (p.send(Push(version="v1", nonce="a1", resources=resources(upstream))),
                                     reactor.callLater(0.05, p.transport.loseConnection)))
        second = FakePilot(lambda p: p.send(Push(version="v2", nonce="b1", resources=resources(upstream))))
        first_address = yield first.listen(self)
        second_address = yield second.listen(self)
        service = yield self.start_proxy(first_address, second_address)
        yield wait_until(lambda: second.of_type(Ack))
        [hello] = second.of_type(Hello)
        self.assertEqual(hello.versions, {"clusters": "v1", "listeners": "v1"})
        self.assertEqual(first.of_type(Ack), [Ack(nonce="a1", version="v1")])
        self.assertEqual(second.of_type(Ack), [Ack(nonce="b1", version="v2")])
        self.assertEqual(service.pilot_status()["connected"], second_address)
        data = yield self.get(service)
        self.assertTrue(data.endswith(b"pushed"))

    @defer.inlineCallbacks
    def test_refused_then_reconnect(self) -> Any:
        """
        A pilot that refuses the proxy closes; the proxy tries again later
        and is served when accepted.
        """
        upstream = yield self.upstream()

        def on_hello(p: FakePilotProtocol) -> None:
            if len(p.factory.connections) == 1:
                p.send(Refused(reason="bad credential"))
                p.transport.loseConnection()
            else:
                p.send(Push(version="v1", nonce="n1", resources=resources(upstream)))

        pilot = FakePilot(on_hello)
        address = yield pilot.listen(self)
        service = yield self.start_proxy(address)
        yield wait_until(lambda: pilot.of_type(Ack))
        self.assertEqual(len(pilot.of_type(Hello)), 2)
        self.assertIn("refused: bad credential", service.pilot_status()["last_error"])
        data = yield self.get(service)
        self.assertTrue(data.endswith(b"pushed"))

    @defer.inlineCallbacks
    def test_ping_answered_and_garbage_closes(self) -> Any:
        """
        A ping is answered with a pong; bytes that are not a message close
        the channel, and the proxy reconnects.
        """
        pilot = FakePilot(lambda p: p.send(Ping(id=7)))
        address = yield pilot.listen(self)
        service = yield self.start_proxy(address)
        yield wait_until(lambda: pilot.of_type(Pong))
        self.assertEqual(pilot.of_type(Pong), [Pong(id=7)])
        pilot.connections[0].transport.write(b"\x00\x00\x00\x02{]")
        yield wait_until(lambda: len(pilot.of_type(Hello)) == 2)
        self.assertIn("protocol error", service.pilot_status()["last_error"])


class LoaderPilotSectionTests(TestCase):
    def setUp(self) -> None:
        self.loader = ConfigLoader(FilterRegistry.from_plugins())

    def test_pilot_section(self) -> None:
        config = self.loader.load_bytes(b"pilot: {addresses: ['tcp:127.0.0.1:15010'], inbound_port: 15006, insecure: true}\n")
        self.assertEqual(config.listeners, ())
        self.assertEqual(config.pilot.addresses, ("tcp:127.0.0.1:15010",))
        self.assertEqual((config.pilot.inbound_port, config.pilot.app_port), (15006, None))

    def test_listeners_required_without_pilot(self) -> None:
        with self.assertRaises(ConfigError) as e:
            self.loader.load_bytes(b"clusters: []\n")
        self.assertEqual(e.exception.field, "listeners")

    def test_bad_address(self) -> None:
        with self.assertRaises(ConfigError) as e:
            self.loader.load_bytes(b"pilot: {addresses: ['bogus:1']}\n")
        self.assertEqual(e.exception.field, "pilot.addresses[0]")

    def test_no_addresses(self) -> None:
        with self.assertRaises(ConfigError) as e:
            self.loader.load_bytes(b"pilot: {addresses: []}\n")
        self.assertEqual(e.exception.field, "pilot.addresses")

    def test_tls_needs_ca_file(self) -> None:
        with self.assertRaises(ConfigError) as e:
            self.loader.load_bytes(b"pilot: {addresses: ['tcp:127.0.0.1:1']}\n")
        self.assertEqual((e.exception.field, e.exception.reason), ("pilot.ca_file", "is required"))

    def test_tls_and_token_files(self) -> None:
        from txmesh.pilot.channel_security import load_channel_security

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        security = load_channel_security(os.path.join(directory, "ca"), "cluster.local", reactor)
        with open(os.path.join(directory, "root.pem"), "wb") as f:
            f.write(security.root_pem)
        with open(os.path.join(directory, "token"), "w") as f:
            f.write("txm1.abc.def\n")
        path = os.path.join(directory, "proxy.yaml")
        with open(path, "w") as f:
            f.write("pilot: {addresses: ['tcp:127.0.0.1:1'], ca_file: root.pem, token_file: token,"
                    " outbound_address: 'tcp:15001:interface=127.0.0.2'}\n")
        pilot = self.loader.load_file(path).pilot
        self.assertEqual((pilot.ca_pem, pilot.token, pilot.insecure), (security.root_pem, "txm1.abc.def", False))
        self.assertEqual(pilot.outbound_address, "tcp:15001:interface=127.0.0.2")
        with open(path, "w") as f:
            f.write("pilot: {addresses: ['tcp:127.0.0.1:1'], ca_file: token}\n")
        with self.assertRaises(ConfigError) as e:
            self.loader.load_file(path)
        self.assertEqual(e.exception.field, "pilot.ca_file")

    def test_unknown_field(self) -> None:
        with self.assertRaises(ConfigError) as e:
            self.loader.load_bytes(b"pilot: {addresses: ['tcp:127.0.0.1:1'], insecure: true, port: 3}\n")
        self.assertEqual(e.exception.field, "pilot.port")


class BackoffTests(TestCase):
    """
    The reconnect schedule: full jitter, exponential, capped.
    """

    def test_backoff_delay(self) -> None:
        rng, expected = random.Random(42), random.Random(42)
        delays = [backoff_delay(n, rng, 0.5, 15.0) for n in range(10)]
        self.assertEqual(delays, [expected.uniform(0, min(15.0, 0.5 * 2**n)) for n in range(10)])
        for n, delay in enumerate(delays):
            self.assertTrue(0 <= delay <= min(15.0, 0.5 * 2**n))

    def test_backoff_capped_for_large_attempts(self) -> None:
        self.assertLessEqual(backoff_delay(5000, random.Random(1), 0.5, 15.0), 15.0)

    def test_schedule_and_address_rotation(self) -> None:
        """
        Each failed connection waits the next backoff delay, then tries the
        next address.
        """
        clock = MemoryReactorClock()
        client = PilotClient(["tcp:127.0.0.1:1001", "tcp:127.0.0.1:1002"], Node(id="p"), clock,
                             lambda doc: None, random.Random(7), backoff_base=1.0, backoff_max=4.0)
        client.start()
        expected = random.Random(7)
        ports = []
        for n in range(6):
            host, port, factory = clock.tcpClients[-1][:3]
            ports.append(port)
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            [call] = clock.getDelayedCalls()
            delay = call.getTime() - clock.seconds()
            self.assertAlmostEqual(delay, expected.uniform(0, min(4.0, 1.0 * 2**n)))
            clock.advance(delay)
        self.assertEqual(ports, [1001, 1002] * 3)
        self.assertIn("cannot connect", client.status()["last_error"])
        client.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_empty_addresses(self) -> None:
        with self.assertRaises(ValueError):
            PilotClient([], Node(id="p"), MemoryReactorClock(), lambda doc: None, random.Random(1))
