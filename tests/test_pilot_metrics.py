"""
Tests for L{txmesh.pilot.metrics}: an in-process pilot on loopback driven by
channel clients, its counters read from its own registry, and C{/metrics}
served and parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import IServiceMaker
from twisted.internet import defer, reactor
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from tests.test_pilot import SERVICE_ENTRY, SERVICES, TIMEOUT, VIRTUAL_SERVICE, ChannelClient, _pause, write
from tests.test_pilot_channel import LABELS, _PilotCase
from txmesh.pilot.channel_security import ca_directory, token_authority
from txmesh.pilot.messages import (
    Ack,
    CertificateDenied,
    CertificateIssued,
    CertificateRequest,
    Hello,
    Nack,
    Node,
    Ping,
    Push,
    Refused,
)
from txmesh.pilot.metrics import PilotMetrics
from txmesh.pilot.service import PilotService
from txmesh.proxy.pilot_client import pilot_tls_options
from txmesh.proxy.workload_identity import WorkloadIdentity

PUSHED_TYPES = ("listeners", "clusters")


def sample(metrics: PilotMetrics, name: str, **labels: str) -> float:
    """
    @return: the value of one sample of C{metrics}' registry (0 if absent).
    """
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class PilotMetricsTests(TestCase):
    """
    A plaintext pilot with C{/metrics} on an ephemeral loopback port.
    """

    def setUp(self) -> defer.Deferred:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.mkdir(os.path.join(self.dir, "istio"))
        os.mkdir(os.path.join(self.dir, "services"))
        self.istio = os.path.join(self.dir, "istio", "mesh.yaml")
        self.services = os.path.join(self.dir, "services", "svc.yaml")
        write(self.istio, SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE % "5s")
        write(self.services, SERVICES)
        self.pilot = PilotService(self.dir, reactor, "tcp:0:interface=127.0.0.1", None, poll_interval=0.05,
                                  metrics_listen="tcp:0:interface=127.0.0.1")
        self.metrics = self.pilot.metrics
        self.addCleanup(self.pilot.stopService)
        return self.pilot.startService()

    def value(self, name: str, **labels: str) -> float:
        return sample(self.metrics, name, **labels)

    @defer.inlineCallbacks
    def connect(self) -> Any:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = ChannelClient()
        port = self.pilot.channel_port.getHost().port
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    @defer.inlineCallbacks
    def hello(self, node_id: str = "p1") -> Any:
        client = yield self.connect()
        client.send(Hello(node=Node(id=node_id, workload="a-v1", labels=LABELS)))
        push = yield client.next()
        self.assertIsInstance(push, Push)
        return client, push

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
    def get(self, path: str) -> Any:
        port = self.pilot.metrics_port.getHost().port
        d = Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        d.addTimeout(TIMEOUT, reactor)
        response = yield d
        body = yield readBody(response)
        return response, body

    def test_starts_at_zero(self) -> None:
        """
        Before any proxy: nothing connected, nothing pushed, the first
        config is generation 1 and the file registry has no error.
        """
        self.assertEqual(self.value("txmesh_pilot_proxies_connected"), 0)
        self.assertEqual(self.value("txmesh_pilot_config_generation"), 1)
        self.assertEqual(self.value("txmesh_pilot_push_duration_seconds_count"), 0)
        for name in ("acks", "nacks", "config_rejected", "certificates_signed", "certificates_denied",
                     "proxies_refused"):
            self.assertEqual(self.value(f"txmesh_pilot_{name}_total"), 0, name)
        [registry] = self.pilot.registry.registries
        self.assertEqual(self.value("txmesh_pilot_registry_errors", registry=registry.name), 0)

    @defer.inlineCallbacks
    def test_push_ack_nack(self) -> Any:
        """
        A hello pushes every type; an ACK and a NACK are counted; a route
        change pushes the listeners only, once per proxy, and its latency is
        observed per push; a closed channel is no longer connected.
        """
        one, first = yield self.hello("p1")
        two, _ = yield self.hello("p2")
        self.assertEqual(self.value("txmesh_pilot_proxies_connected"), 2)
        for resource_type in first.versions:
            self.assertEqual(self.value("txmesh_pilot_pushes_total", type=resource_type), 2, resource_type)
        self.assertTrue(set(PUSHED_TYPES) <= set(first.versions), first.versions)
        # The first pushes answer hellos, not a config change: no latency.
        self.assertEqual(self.value("txmesh_pilot_push_duration_seconds_count"), 0)

        one.send(Ack(nonce=first.nonce, version=first.version))
        yield self.wait_for(lambda: self.value("txmesh_pilot_acks_total") == 1)

        write(self.istio, SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE % "7s")
        second = yield one.next(timeout=2)
        yield two.next(timeout=2)
        self.assertEqual(list(second.versions), ["listeners"])
        self.assertEqual(self.value("txmesh_pilot_pushes_total", type="listeners"), 4)
        self.assertEqual(self.value("txmesh_pilot_pushes_total", type="clusters"), 2)
        self.assertEqual(self.value("txmesh_pilot_config_generation"), 2)
        self.assertEqual(self.value("txmesh_pilot_push_duration_seconds_count"), 2)
        self.assertGreater(self.value("txmesh_pilot_push_duration_seconds_sum"), 0)
        self.assertEqual(self.value("txmesh_pilot_push_duration_seconds_bucket", le="+Inf"), 2)

        one.send(Nack(nonce=second.nonce, version=second.version, error="no such filter"))
        yield self.wait_for(lambda: self.value("txmesh_pilot_nacks_total") == 1)
        self.assertEqual(self.value("txmesh_pilot_acks_total"), 1)

        two.transport.loseConnection()
        yield self.wait_for(lambda: self.value("txmesh_pilot_proxies_connected") == 1)

    @defer.inlineCallbacks
    def test_config_rejected(self) -> Any:
        """
        An invalid change is counted and does not move the generation.
        """
        write(self.istio, "kind: [unclosed\n")
        yield self.wait_for(lambda: self.pilot.config_error is not None)
        self.assertEqual(self.value("txmesh_pilot_config_rejected_total"), 1)
        self.assertEqual(self.value("txmesh_pilot_config_generation"), 1)

    @defer.inlineCallbacks
    def test_proxy_refused(self) -> Any:
        """
        A proxy refused at hello is counted, never connected.
        """
        client = yield self.connect()
        client.send(Ping(id=1))
        refused = yield client.next()
        self.assertIsInstance(refused, Refused)
        self.assertEqual(self.value("txmesh_pilot_proxies_refused_total"), 1)
        self.assertEqual(self.value("txmesh_pilot_proxies_connected"), 0)

    @defer.inlineCallbacks
    def test_registry_errors(self) -> Any:
        """
        A registry whose source is broken shows 1 until it is fixed.
        """
        [registry] = self.pilot.registry.registries
        write(self.services, "services: [unclosed\n")
        yield self.wait_for(lambda: self.value("txmesh_pilot_registry_errors", registry=registry.name) == 1)
        write(self.services, SERVICES)
        yield self.wait_for(lambda: self.value("txmesh_pilot_registry_errors", registry=registry.name) == 0)

    @defer.inlineCallbacks
    def test_served(self) -> Any:
        """
        C{GET /metrics} serves the Prometheus text format, which
        prometheus-client's parser reads back with the pilot's families;
        other paths are 404.
        """
        yield self.hello()
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        [content_type] = response.headers.getRawHeaders(b"content-type")
        self.assertEqual(content_type, CONTENT_TYPE_LATEST.encode("ascii"))
        families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}
        for name in ("txmesh_pilot_proxies_connected", "txmesh_pilot_pushes", "txmesh_pilot_push_duration_seconds",
                     "txmesh_pilot_acks", "txmesh_pilot_nacks", "txmesh_pilot_config_rejected",
                     "txmesh_pilot_certificates_signed", "txmesh_pilot_certificates_denied",
                     "txmesh_pilot_proxies_refused", "txmesh_pilot_registry_errors",
                     "txmesh_pilot_config_generation"):
            self.assertIn(name, families)
        [connected] = families["txmesh_pilot_proxies_connected"].samples
        self.assertEqual(connected.value, 1)
        self.assertEqual(families["txmesh_pilot_pushes"].type, "counter")
        self.assertEqual(families["txmesh_pilot_push_duration_seconds"].type, "histogram")
        pushed = {s.labels["type"]: s.value for s in families["txmesh_pilot_pushes"].samples
                  if s.name == "txmesh_pilot_pushes_total"}
        self.assertEqual(pushed["listeners"], 1)
        response, _ = yield self.get("/other")
        self.assertEqual(response.code, 404)

    @defer.inlineCallbacks
    def test_stopped(self) -> Any:
        """
        Stopping the pilot closes the metrics port.
        """
        port = self.pilot.metrics_port
        yield self.pilot.stopService()
        self.assertFalse(port.connected)


class PilotMetricsOffTests(SynchronousTestCase):
    """
    Without C{metrics_listen} nothing listens, but the counts are kept.
    """

    def test_off_by_default(self) -> None:
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        os.mkdir(os.path.join(tmp, "istio"))
        pilot = PilotService(tmp, reactor, "tcp:0:interface=127.0.0.1", None)
        self.assertIsNone(pilot.metrics_port)
        self.assertIsInstance(pilot.metrics, PilotMetrics)
        self.assertEqual(sample(pilot.metrics, "txmesh_pilot_proxies_connected"), 0)

    def test_own_registries(self) -> None:
        """
        Two L{PilotMetrics} never share counts (no global registry).
        """
        one, two = PilotMetrics(), PilotMetrics()
        one.acks.inc()
        self.assertEqual(sample(one, "txmesh_pilot_acks_total"), 1)
        self.assertEqual(sample(two, "txmesh_pilot_acks_total"), 0)


class CertificateMetricsTests(_PilotCase):
    """
    Certificate decisions and refused credentials on a pilot with a CA are
    counted.
    """

    security = True

    def token(self, account: str = "web") -> str:
        return token_authority(ca_directory(self.dir)).create("default", account, reactor.seconds(), 3600)

    @defer.inlineCallbacks
    def admitted(self, credential: str) -> Any:
        address = f"tcp:127.0.0.1:{self.pilot.channel_port.getHost().port}"
        tls = pilot_tls_options(None, self.channel_security.root_pem, address, None, reactor.seconds())
        client = yield self.connect(tls)
        client.send(Hello(node=Node(id="p1", namespace="default", labels=LABELS), credential=credential))
        first = yield client.next()
        return client, first

    @defer.inlineCallbacks
    def certify(self, client: Any, identity: WorkloadIdentity, request_id: int = 1) -> Any:
        client.send(CertificateRequest(id=request_id, csr=identity.new_request().decode()))
        answer = yield client.next()
        return answer

    @defer.inlineCallbacks
    def test_signed_and_denied_counted(self) -> Any:
        metrics = self.pilot.metrics
        client, _ = yield self.admitted(self.token(account="web"))
        issued = yield self.certify(client, WorkloadIdentity("spiffe://cluster.local/ns/default/sa/web"))
        self.assertIsInstance(issued, CertificateIssued)
        denied = yield self.certify(client, WorkloadIdentity("spiffe://cluster.local/ns/default/sa/admin"), 2)
        self.assertIsInstance(denied, CertificateDenied)
        self.assertEqual(sample(metrics, "txmesh_pilot_certificates_signed_total"), 1)
        self.assertEqual(sample(metrics, "txmesh_pilot_certificates_denied_total"), 1)

    @defer.inlineCallbacks
    def test_bad_credential_refused_counted(self) -> Any:
        client, refused = yield self.admitted("not-a-token")
        self.assertIsInstance(refused, Refused)
        self.assertEqual(sample(self.pilot.metrics, "txmesh_pilot_proxies_refused_total"), 1)


class PluginOptionTests(SynchronousTestCase):
    """
    C{twistd txmesh-pilot --metrics}.
    """

    def parse(self, *args: str) -> Any:
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        maker = makers["txmesh-pilot"]
        options = maker.options()
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        options.parseOptions(["--config-dir", tmp, "--insecure", *args])
        return maker, options

    def test_default_is_istiod_monitoring_port(self) -> None:
        maker, options = self.parse()
        self.assertEqual(options["metrics"], "tcp:15014:interface=127.0.0.1")
        service = maker.makeService(options)
        self.assertEqual(service._metrics_listen, "tcp:15014:interface=127.0.0.1")

    def test_none_turns_it_off(self) -> None:
        maker, options = self.parse("--metrics", "none")
        self.assertIsNone(options["metrics"])
        self.assertIsNone(maker.makeService(options)._metrics_listen)

    def test_endpoint(self) -> None:
        _, options = self.parse("--metrics", "tcp:9914:interface=0.0.0.0")
        self.assertEqual(options["metrics"], "tcp:9914:interface=0.0.0.0")
