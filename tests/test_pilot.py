"""
Tests for L{txmesh.pilot.service} and L{txmesh.pilot.server}: a real pilot on
loopback sockets, driven by a small test-only channel client.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import time
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from txmesh.config.loader import ConfigLoader
from txmesh.filters.registry import FilterRegistry
from txmesh.pilot.messages import (
    Ack,
    ChannelDecoder,
    ChannelProtocolError,
    Hello,
    Nack,
    Node,
    Ping,
    Pong,
    Push,
    Refused,
    encode,
)
from txmesh.pilot.server import APP_PORT_LABEL, INBOUND_PORT_LABEL, snapshot_node
from txmesh.pilot.service import PilotService

TIMEOUT = 5.0

SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: a, namespace: default}
spec:
  hosts: [a.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
"""

VIRTUAL_SERVICE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: default}
spec:
  hosts: [a.example.com]
  http:
    - route: [{destination: {host: a.example.com, port: {number: 80}}}]
      timeout: %s
"""

SERVICES = """\
services:
  - host: b.default.svc.cluster.local
    ports: [{name: http, number: 8080, protocol: HTTP}]
    endpoints: [{address: 127.0.0.1, port: 18080}]
"""


OTHER_SERVICES = """\
services:
  - host: c.default.svc.cluster.local
    ports: [{name: http, number: 8080, protocol: HTTP}]
    endpoints: [{address: 127.0.0.1, port: 18090}]
"""


def capture_log(case: Any) -> list[dict[str, Any]]:
    """
    @return: a list that receives every log event until C{case} ends.
    """
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def logged(events: list[dict[str, Any]], text: str) -> list[str]:
    """
    @return: the formatted events that contain C{text}.
    """
    return [m for m in (formatEvent(e) for e in events) if text in m]


class ChannelClient(protocol.Protocol):
    """
    The proxy's end, just enough to test the pilot: decodes messages into
    a queue and notes when the connection closes.
    """

    def __init__(self) -> None:
        self.decoder = ChannelDecoder()
        self.messages: defer.DeferredQueue = defer.DeferredQueue()
        self.lost: defer.Deferred = defer.Deferred()
        self.error: ChannelProtocolError | None = None

    def dataReceived(self, data: bytes) -> None:
        try:
            for m in self.decoder.receive_data(data):
                self.messages.put(m)
        except ChannelProtocolError as e:
            self.error = e
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def send(self, message: Any) -> None:
        self.transport.write(encode(message))

    def next(self, timeout: float = TIMEOUT) -> defer.Deferred:
        d = self.messages.get()
        d.addTimeout(timeout, reactor)
        return d

    def closed(self, timeout: float = TIMEOUT) -> defer.Deferred:
        d = defer.Deferred()
        self.lost.addCallback(lambda _: d.callback(None) if not d.called else None)
        d.addTimeout(timeout, reactor)
        return d


def write(path: str, text: str) -> None:
    """
    Write C{text} and move the mtime forward explicitly, so the change is
    seen whatever the file system's timestamp resolution.
    """
    before = os.stat(path).st_mtime_ns if os.path.exists(path) else 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    stamp = max(before + 1_000_000_000, time.time_ns())
    os.utime(path, ns=(stamp, stamp))


class PilotTests(TestCase):
    """
    A pilot on loopback with a directory of Istio and service files.
    """

    def setUp(self) -> defer.Deferred:
        self.dir = tempfile.mkdtemp()
        os.mkdir(os.path.join(self.dir, "istio"))
        os.mkdir(os.path.join(self.dir, "services"))
        self.istio = os.path.join(self.dir, "istio", "mesh.yaml")
        write(self.istio, SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE % "5s")
        write(os.path.join(self.dir, "services", "svc.yaml"), SERVICES)
        self.pilot = PilotService(
            self.dir, reactor, "tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1", poll_interval=0.05
        )
        self.addCleanup(self.pilot.stopService)
        return self.pilot.startService()

    @defer.inlineCallbacks
    def connect(self) -> Any:
        port = self.pilot.channel_port.getHost().port
        client = ChannelClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    @defer.inlineCallbacks
    def hello(self, node_id: str = "p1") -> Any:
        client = yield self.connect()
        client.send(Hello(node=Node(id=node_id, workload="a-v1", labels={INBOUND_PORT_LABEL: "15006",
                                                                          APP_PORT_LABEL: "9080"})))
        push = yield client.next()
        self.assertIsInstance(push, Push)
        return client, push

    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        port = self.pilot.api_port.getHost().port
        d = Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        d.addTimeout(TIMEOUT, reactor)
        response = yield d
        body = yield readBody(response)
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def wait_for(self, check: Any, timeout: float = TIMEOUT) -> Any:
        """
        Poll C{check()} until it is true, bounded in time.
        """
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() > deadline:
                self.fail("condition not met in time")
            yield _pause(0.02)

    @defer.inlineCallbacks
    def test_hello_push_ack(self) -> Any:
        """
        A proxy saying hello gets a push its loader accepts; its ACK shows as
        SYNCED on C{/proxies}.
        """
        client, push = yield self.hello()
        ConfigLoader(FilterRegistry.from_plugins()).load_document(
            {"listeners": push.resources["listeners"], "clusters": push.resources["clusters"]}
        )
        names = sorted(listener["name"] for listener in push.resources["listeners"])
        self.assertEqual(names, ["inbound", "outbound"])
        code, proxies = yield self.get("/proxies")
        self.assertEqual((code, [p["status"] for p in proxies]), (200, ["STALE"]))
        client.send(Ack(nonce=push.nonce, version=push.version))
        yield self.wait_for(lambda: self.pilot.proxies()[0]["status"] == "SYNCED")
        code, proxies = yield self.get("/proxies")
        self.assertEqual(proxies[0]["id"], "p1")
        self.assertEqual(proxies[0]["acked_version"], push.version)
        self.assertEqual(proxies[0]["pushed_version"], push.version)
        code, doc = yield self.get("/proxies/p1/config")
        self.assertEqual((code, doc["listeners"]), (200, push.resources["listeners"]))
        code, _ = yield self.get("/proxies/nobody/config")
        self.assertEqual(code, 404)
        code, services = yield self.get("/services")
        self.assertEqual(list(services), ["b.default.svc.cluster.local"])
        code, status = yield self.get("/status")
        self.assertTrue(status["config"]["ok"])
        self.assertTrue(status["registry"]["ok"])

    @defer.inlineCallbacks
    def test_nack(self) -> Any:
        """
        A NACK keeps the channel open and shows on C{/proxies} with its error.
        """
        client, push = yield self.hello()
        client.send(Nack(nonce=push.nonce, version=push.version, error="no such filter"))
        yield self.wait_for(lambda: self.pilot.proxies()[0]["status"] == "NACKED")
        code, proxies = yield self.get("/proxies")
        self.assertEqual(proxies[0]["last_nack_error"], "no such filter")
        self.assertEqual(proxies[0]["acked_version"], None)
        client.send(Ping(id=2))
        pong = yield client.next()
        self.assertEqual(pong, Pong(id=2))

    @defer.inlineCallbacks
    def test_wrong_version_closes(self) -> Any:
        """
        An ACK naming the current nonce but another version closes the channel.
        """
        client, push = yield self.hello()
        client.send(Ack(nonce=push.nonce, version="not-" + push.version))
        yield client.closed()

    @defer.inlineCallbacks
    def test_registry_change_pushes(self) -> Any:
        """
        A new service registration routed to by Istio reaches the proxy.
        """
        client, first = yield self.hello()
        write(self.istio, SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE.replace(
            "host: a.example.com, port: {number: 80}", "host: b, port: {number: 8080}") % "5s")
        second = yield client.next(timeout=1.5)
        self.assertIn("outbound|8080||b.default.svc.cluster.local", [c["name"] for c in second.resources["clusters"]])
        write(os.path.join(self.dir, "services", "svc.yaml"), SERVICES.replace("18080", "18081"))
        third = yield client.next(timeout=1.5)
        self.assertIn("18081", json.dumps(third.resources["clusters"]))

    @defer.inlineCallbacks
    def test_ping(self) -> Any:
        """
        A ping is answered with a pong of the same id.
        """
        client, _ = yield self.hello()
        client.send(Ping(id=7))
        pong = yield client.next()
        self.assertEqual(pong, Pong(id=7))

    @defer.inlineCallbacks
    def test_change_pushes(self) -> Any:
        """
        Changing an Istio file pushes a new version within about a second.
        """
        client, first = yield self.hello()
        client.send(Ack(nonce=first.nonce, version=first.version))
        write(self.istio, SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE % "7s")
        second = yield client.next(timeout=1.5)
        self.assertIsInstance(second, Push)
        self.assertNotEqual(second.version, first.version)
        self.assertNotEqual(second.nonce, first.nonce)

    @defer.inlineCallbacks
    def test_invalid_change_kept(self) -> Any:
        """
        An invalid Istio file pushes nothing, shows on C{/status}, and the
        last good config is kept (and given to a new proxy).
        """
        client, first = yield self.hello()
        write(self.istio, "kind: [unclosed\n")
        yield self.wait_for(lambda: self.pilot.config_error is not None)
        code, status = yield self.get("/status")
        self.assertFalse(status["config"]["ok"])
        self.assertIn("mesh.yaml", status["config"]["error"])
        # A pong arrives after anything the pilot wrote before it.
        client.send(Ping(id=3))
        pong = yield client.next()
        self.assertEqual(pong, Pong(id=3))
        _, other = yield self.hello("p2")
        self.assertEqual(other.resources, first.resources)

    @defer.inlineCallbacks
    def test_garbage_closes_one_channel(self) -> Any:
        """
        Bytes that are not a frame close that channel only.
        """
        good, _ = yield self.hello("good")
        bad, _ = yield self.hello("bad")
        bad.transport.write(b"\xff\xff\xff\xffgarbage")
        yield bad.closed()
        yield self.wait_for(lambda: [p["id"] for p in self.pilot.proxies()] == ["good"])
        good.send(Ping(id=1))
        pong = yield good.next()
        self.assertEqual(pong, Pong(id=1))

    @defer.inlineCallbacks
    def test_invalid_json_frame_closes_one_channel(self) -> Any:
        """
        A well-framed message whose body is not JSON closes that channel
        only; another proxy's channel keeps working.
        """
        good, _ = yield self.hello("good")
        bad, _ = yield self.hello("bad")
        body = b'{"type": "ping", "id": '
        bad.transport.write(struct.pack(">I", len(body)) + body)
        yield bad.closed()
        yield self.wait_for(lambda: [p["id"] for p in self.pilot.proxies()] == ["good"])
        good.send(Ping(id=4))
        pong = yield good.next()
        self.assertEqual(pong, Pong(id=4))

    @defer.inlineCallbacks
    def test_registry_garbage_keeps_endpoints(self) -> Any:
        """
        A service registration file turned to garbage keeps the last known
        endpoints, says so in the log, and shows the registry's error on
        C{GET /status}.
        """
        events = capture_log(self)
        services = os.path.join(self.dir, "services", "svc.yaml")
        write(services, "services: [\n")
        yield self.wait_for(lambda: not self.pilot.status()["registry"]["ok"])
        code, status = yield self.get("/status")
        self.assertEqual(code, 200)
        self.assertFalse(status["registry"]["ok"])
        self.assertIn("svc.yaml", status["registry"]["error"])
        self.assertIn("not valid YAML", status["registry"]["error"])
        [part] = status["registry"]["registries"]
        self.assertFalse(part["ok"])
        self.assertIn("not valid YAML", part["error"])
        self.assertTrue(status["config"]["ok"])
        code, view = yield self.get("/services")
        self.assertEqual(list(view), ["b.default.svc.cluster.local"])
        self.assertEqual(view["b.default.svc.cluster.local"]["endpoints"][0]["port"], 18080)
        [warning] = logged(events, "keeping the last known endpoints")
        self.assertIn("svc.yaml", warning)

    @defer.inlineCallbacks
    def test_mesh_change_pushes(self) -> Any:
        """
        A valid change to C{CONFIG_DIR/mesh.yaml} is taken while the pilot
        runs and pushed to the proxies it affects.
        """
        client, first = yield self.hello()
        write(os.path.join(self.dir, "mesh.yaml"), "app_host: 10.0.0.9\n")
        second = yield client.next(timeout=1.5)
        self.assertIsInstance(second, Push)
        self.assertIn("10.0.0.9", json.dumps(second.resources["clusters"]))
        self.assertEqual(self.pilot.mesh.app_host, "10.0.0.9")
        code, status = yield self.get("/status")
        self.assertEqual(status["mesh"], {"ok": True, "error": None, "restart_needed": []})

    @defer.inlineCallbacks
    def test_invalid_mesh_kept(self) -> Any:
        """
        An invalid C{mesh.yaml} is refused with its file, field and reason in
        the log and on C{GET /status}; nothing is pushed and the last good
        settings keep serving, until the file is fixed.
        """
        events = capture_log(self)
        client, first = yield self.hello()
        mesh = os.path.join(self.dir, "mesh.yaml")
        write(mesh, "app_host: 10.0.0.9\ntrust_domian: example.org\n")
        yield self.wait_for(lambda: self.pilot.mesh_error is not None)
        code, status = yield self.get("/status")
        self.assertFalse(status["mesh"]["ok"])
        self.assertIn(mesh, status["mesh"]["error"])
        self.assertIn("trust_domian", status["mesh"]["error"])
        self.assertIn("unknown field", status["mesh"]["error"])
        [line] = logged(events, "keeping the last good mesh settings")
        self.assertIn("trust_domian", line)
        # A pong arrives after anything the pilot wrote before it.
        client.send(Ping(id=5))
        pong = yield client.next()
        self.assertEqual(pong, Pong(id=5))
        self.assertEqual(self.pilot.mesh.app_host, "127.0.0.1")
        write(mesh, "app_host: 10.0.0.9\n")
        second = yield client.next(timeout=1.5)
        self.assertIn("10.0.0.9", json.dumps(second.resources["clusters"]))
        self.assertIsNone(self.pilot.status()["mesh"]["error"])

    @defer.inlineCallbacks
    def test_mesh_registries_swapped(self) -> Any:
        """
        A new C{registries} list in C{mesh.yaml} stops the old registries and
        serves from the new ones.
        """
        client, first = yield self.hello()
        old = self.pilot.registry
        os.mkdir(os.path.join(self.dir, "more"))
        write(os.path.join(self.dir, "more", "svc.yaml"), OTHER_SERVICES)
        write(os.path.join(self.dir, "mesh.yaml"), "registries: [{type: file, path: more}]\n")
        second = yield client.next(timeout=1.5)
        self.assertIn("c.default.svc.cluster.local", json.dumps(second.resources))
        self.assertIsNot(self.pilot.registry, old)
        code, view = yield self.get("/services")
        self.assertEqual(list(view), ["c.default.svc.cluster.local"])
        self.assertEqual([r._loop for r in old.registries], [None])

    @defer.inlineCallbacks
    def test_message_before_hello_refused(self) -> Any:
        """
        A first message that is not hello is refused and the channel closed.
        """
        client = yield self.connect()
        client.send(Ping(id=1))
        refused = yield client.next()
        self.assertIsInstance(refused, Refused)
        self.assertIn("hello", refused.reason)
        yield client.closed()

    @defer.inlineCallbacks
    def test_bad_port_label_refused(self) -> Any:
        """
        A port label that is not a port number is refused.
        """
        client = yield self.connect()
        client.send(Hello(node=Node(id="x", labels={APP_PORT_LABEL: "http"})))
        refused = yield client.next()
        self.assertIsInstance(refused, Refused)
        self.assertIn(APP_PORT_LABEL, refused.reason)


def _pause(seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class SnapshotNodeTests(TestCase):
    """
    L{snapshot_node} takes the ports from the node's labels.
    """

    def test_ports(self) -> None:
        node = snapshot_node(Node(id="n", labels={INBOUND_PORT_LABEL: "15006", APP_PORT_LABEL: "9080"}))
        self.assertEqual((node.inbound_port, node.app_port), (15006, 9080))
        self.assertEqual(snapshot_node(Node(id="n")).inbound_port, None)



class PilotClockTests(SynchronousTestCase):
    """
    The pilot's timing and C{mesh.yaml} reloads on a fake reactor: no
    sockets, no sleeping.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        os.mkdir(os.path.join(self.dir, "istio"))
        os.mkdir(os.path.join(self.dir, "services"))
        write(os.path.join(self.dir, "services", "svc.yaml"), SERVICES)
        self.mesh = os.path.join(self.dir, "mesh.yaml")
        self.clock = MemoryReactorClock()
        self.pilot = PilotService(self.dir, self.clock, "tcp:0:interface=127.0.0.1", None, poll_interval=0.2)

    def start(self) -> None:
        self.successResultOf(self.pilot.startService())
        self.addCleanup(lambda: self.successResultOf(self.pilot.stopService()))

    def elapse(self, seconds: float) -> None:
        """
        Move the clock on in small steps, as time passes: what a call made
        on the way schedules runs on the way too.
        """
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(0.01, end - self.clock.seconds()))

    def pushes(self, changes: list[float], until: float) -> list[float]:
        """
        Report a change at each time of C{changes} and run the clock to
        C{until}.

        @return: the times the config was rebuilt (when pushes go out).
        """
        built = []
        for t in sorted(changes) + [until]:
            while self.clock.seconds() < t:
                generation = self.pilot.config_version
                self.clock.advance(min(0.01, t - self.clock.seconds()))
                if self.pilot.config_version != generation:
                    built.append(round(self.clock.seconds(), 3))
            if t < until:
                self.pilot._schedule()
        return built

    def test_changes_within_debounce_push_once(self) -> None:
        """
        Several changes within the debounce window make one push, the
        debounce after the last of them.
        """
        self.assertEqual(self.pushes([0.0, 0.05, 0.09], until=2.0), [0.19])

    def test_churn_pushes_by_debounce_max(self) -> None:
        """
        Changes arriving faster than the debounce for ever still push, no
        later than C{debounce_max} after the first pending change.
        """
        changes = [i * 0.05 for i in range(60)]  # 3 s of churn
        built = self.pushes(changes, until=4.0)
        self.assertEqual(built[0], self.pilot.debounce_max)
        # The last change (2.95 s) is in the third push's batch (2 s to 3 s).
        self.assertEqual(len(built), 3, built)
        for before, after in zip(built, built[1:], strict=False):
            self.assertLessEqual(after - before, self.pilot.debounce_max + 0.01 + 1e-9)

    def test_mesh_reload(self) -> None:
        """
        A change to C{mesh.yaml} is seen at the next poll and its live
        settings are built into the next config.
        """
        self.start()
        generation = self.pilot.config_version
        write(self.mesh, "outbound_traffic_policy: {mode: REGISTRY_ONLY}\ntelemetry: {metrics: false}\n")
        self.elapse(0.2)
        self.assertEqual(self.pilot.config_version, generation)  # debounced
        self.elapse(self.pilot.debounce)
        self.assertEqual(self.pilot.config_version, generation + 1)
        self.assertEqual(self.pilot.mesh.outbound_traffic_policy, "REGISTRY_ONLY")
        self.assertFalse(self.pilot.mesh.telemetry.metrics)

    def test_mesh_removed(self) -> None:
        """
        Removing C{mesh.yaml} goes back to the defaults.
        """
        write(self.mesh, "outbound_traffic_policy: {mode: REGISTRY_ONLY}\n")
        self.pilot = PilotService(self.dir, self.clock, "tcp:0:interface=127.0.0.1", None, poll_interval=0.2)
        self.start()
        self.assertEqual(self.pilot.mesh.outbound_traffic_policy, "REGISTRY_ONLY")
        os.remove(self.mesh)
        self.elapse(0.5)
        self.assertEqual(self.pilot.mesh.outbound_traffic_policy, "ALLOW_ANY")

    def test_invalid_mesh_refused(self) -> None:
        """
        An invalid C{mesh.yaml} changes nothing (not even its valid fields)
        and is shown in the status until fixed.
        """
        events = capture_log(self)
        self.start()
        generation = self.pilot.config_version
        write(self.mesh, "app_host: 10.0.0.9\nregistries: [{type: dns}]\n")
        self.elapse(0.5)
        self.assertEqual(self.pilot.config_version, generation)
        self.assertEqual(self.pilot.mesh.app_host, "127.0.0.1")
        status = self.pilot.status()["mesh"]
        self.assertFalse(status["ok"])
        self.assertIn("registries[0].names", status["error"])
        self.assertIn("required", status["error"])
        self.assertEqual(len(logged(events, "keeping the last good mesh settings")), 1)
        self.assertEqual(self.pilot.metrics.config_rejected._value.get(), 1)
        write(self.mesh, "app_host: 10.0.0.9\n")
        self.elapse(0.5)
        self.assertEqual(self.pilot.mesh.app_host, "10.0.0.9")
        self.assertTrue(self.pilot.status()["mesh"]["ok"])

    def test_restart_needed(self) -> None:
        """
        A change to what the CA was made with is logged as needing a
        restart, shown in the status, and not taken; the rest of the file
        is.
        """
        events = capture_log(self)
        self.start()
        write(self.mesh, "trust_domain: example.org\nworkload_cert_ttl: 1h\napp_host: 10.0.0.9\n")
        self.elapse(0.5)
        self.assertEqual(self.pilot.status()["mesh"],
                         {"ok": True, "error": None, "restart_needed": ["trust_domain", "workload_cert_ttl"]})
        self.assertEqual(self.pilot.mesh.trust_domain, "cluster.local")
        self.assertEqual(self.pilot.mesh.app_host, "10.0.0.9")
        [line] = logged(events, "needs a restart")
        self.assertIn("trust_domain, workload_cert_ttl", line)
        write(self.mesh, "app_host: 10.0.0.9\n")
        self.elapse(0.5)
        self.assertEqual(self.pilot.restart_needed, ())

    def test_registries_swapped(self) -> None:
        """
        A new C{registries} list replaces the registries: the old ones are
        stopped, the new ones started, and a change from an old one no
        longer schedules a push.
        """
        self.start()
        old = self.pilot.registry
        os.mkdir(os.path.join(self.dir, "more"))
        write(os.path.join(self.dir, "more", "svc.yaml"), OTHER_SERVICES)
        write(self.mesh, "registries: [{type: file, path: more}]\n")
        self.elapse(0.2)
        self.assertIsNot(self.pilot.registry, old)
        self.assertEqual(list(self.pilot.services()), ["c.default.svc.cluster.local"])
        self.assertEqual([r._loop for r in old.registries], [None])
        self.elapse(self.pilot.debounce)
        self.assertEqual(list(self.pilot.mesh.registry), ["c.default.svc.cluster.local"])
        generation = self.pilot.config_version
        self.pilot._registry_changed(old)
        self.elapse(1.0)
        self.assertEqual(self.pilot.config_version, generation)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class PluginTests(TestCase):
    """
    The C{txmesh-pilot} twistd plugin.
    """

    def maker(self) -> Any:
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("txmesh-pilot", makers)
        return makers["txmesh-pilot"]

    def test_options(self) -> None:
        """
        C{--config-dir} is required; the endpoints default to loopback.
        """
        maker = self.maker()
        options = maker.options()
        self.assertRaises(usage.UsageError, options.parseOptions, [])
        options = maker.options()
        self.assertRaises(usage.UsageError, options.parseOptions, ["--config-dir", "/nowhere/at/all"])
        options = maker.options()
        options.parseOptions(["--config-dir", tempfile.mkdtemp()])
        self.assertEqual(options["listen"], "tcp:15010:interface=127.0.0.1")
        self.assertEqual(options["api"], "tcp:15011:interface=127.0.0.1")
        service = maker.makeService(options)
        self.assertIsInstance(service, PilotService)

    @defer.inlineCallbacks
    def test_help(self) -> Any:
        """
        C{twistd txmesh-pilot --help} prints Twisted-style usage and exits 0.
        """
        if not os.path.exists(TWISTD):
            raise SkipTest(f"no twistd next to {sys.executable}")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
        d = getProcessOutputAndValue(TWISTD, ("-n", "--pidfile=", "txmesh-pilot", "--help"), env=env, path=REPO)
        d.addTimeout(30, reactor)
        out, err, code = yield d
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("Usage: twistd [options] txmesh-pilot --config-dir DIR [options]", text)
        self.assertRegex(text, r"-d, --config-dir=\s+Directory holding mesh.yaml, istio/")
        self.assertRegex(text, r"--listen=.*\[default:\s+tcp:15010:interface=127.0.0.1\]")
