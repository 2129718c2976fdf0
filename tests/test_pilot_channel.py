"""
The channel's second half: per-type partial pushes, resumption from the
versions a hello carries, keepalive, and the secure channel (TLS with the
mesh CA, join tokens bound to a namespace).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from cryptography import x509
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_pilot import SERVICE_ENTRY, SERVICES, VIRTUAL_SERVICE, ChannelClient, write
from txmesh.identity import certificate_identity
from txmesh.observability.audit import AuditLog
from txmesh.pilot.ca import client_tls_options
from txmesh.pilot.channel_security import (
    PREVIOUS_TOKEN_KEYS_FILE,
    TOKEN_KEY_FILE,
    ca_directory,
    load_channel_security,
    token_authority,
)
from txmesh.pilot.keepalive import Keepalive
from txmesh.pilot.messages import (
    Ack,
    CertificateDenied,
    CertificateIssued,
    CertificateRequest,
    Hello,
    Nack,
    Node,
    Ping,
    Pong,
    Push,
    Refused,
)
from txmesh.pilot.server import APP_PORT_LABEL, INBOUND_PORT_LABEL, OUTBOUND_ADDRESS_LABEL
from txmesh.pilot.service import PilotService
from txmesh.pilot.tokens import finish_key_rotation, rotate_key
from txmesh.proxy.pilot_client import pilot_tls_options
from txmesh.proxy.workload_identity import WorkloadIdentity

LABELS = {INBOUND_PORT_LABEL: "15006", APP_PORT_LABEL: "9080"}


class KeepaliveTests(SynchronousTestCase):
    """
    L{Keepalive} on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pings: list[int] = []
        self.expired: list[float] = []
        self.keepalive = Keepalive(self.clock, 10, 30, self.pings.append, self.expired.append)
        self.keepalive.start()

    def test_busy_channel_sends_no_ping(self) -> None:
        for _ in range(10):
            self.clock.advance(5)
            self.keepalive.received()
        self.assertEqual((self.pings, self.expired), ([], []))

    def test_quiet_channel_pinged_then_expires(self) -> None:
        self.clock.advance(10)
        self.assertEqual(self.pings, [1])
        self.clock.advance(10)
        self.assertEqual(self.pings, [1, 2])
        self.clock.advance(10)
        self.assertEqual(self.expired, [30])
        self.clock.advance(100)
        self.assertEqual((self.pings, self.expired), ([1, 2], [30]))

    def test_answer_resets_quiet(self) -> None:
        self.clock.advance(10)
        self.keepalive.received()
        self.clock.advance(25)
        self.assertEqual(self.expired, [])
        self.clock.advance(5)
        self.assertEqual(self.expired, [30])

    def test_stop(self) -> None:
        self.keepalive.stop()
        self.clock.advance(100)
        self.assertEqual((self.pings, self.expired, self.clock.getDelayedCalls()), ([], [], []))

    def test_bad_settings(self) -> None:
        self.assertRaises(ValueError, Keepalive, self.clock, 0, 1, print, print)
        self.assertRaises(ValueError, Keepalive, self.clock, 10, 5, print, print)


class _PilotCase(TestCase):
    security = False
    keepalive: tuple[float, float] | None = (15.0, 45.0)
    audit_path: str | None = None

    def setUp(self) -> defer.Deferred:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.mkdir(os.path.join(self.dir, "istio"))
        os.mkdir(os.path.join(self.dir, "services"))
        self.istio = os.path.join(self.dir, "istio", "mesh.yaml")
        write(self.istio, SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE % "5s")
        write(os.path.join(self.dir, "services", "svc.yaml"), SERVICES)
        self.channel_security = None
        if self.security:
            self.channel_security = load_channel_security(ca_directory(self.dir), "cluster.local", reactor)
        audit = None
        if self.security:
            self.audit_path = os.path.join(self.dir, "audit.log")
            audit = AuditLog.open(self.audit_path)
            self.addCleanup(audit.close)
        self.pilot = PilotService(self.dir, reactor, "tcp:0:interface=127.0.0.1", None, poll_interval=0.05,
                                  security=self.channel_security, keepalive=self.keepalive, audit=audit)
        self.addCleanup(self.pilot.stopService)
        return self.pilot.startService()

    @defer.inlineCallbacks
    def connect(self, tls: Any = None) -> Any:
        port = self.pilot.channel_port.getHost().port
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        client = ChannelClient()
        yield connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client


class PartialPushTests(_PilotCase):
    """
    Pushes carry only the types whose content changed; a reconnecting proxy
    gets only what it lacks.
    """

    @defer.inlineCallbacks
    def synced(self, versions: dict | None = None, node_id: str = "p1") -> Any:
        client = yield self.connect()
        client.send(Hello(node=Node(id=node_id, workload="a-v1", labels=LABELS), versions=versions or {}))
        push = yield client.next()
        client.send(Ack(nonce=push.nonce, version=push.version))
        return client, push

    @defer.inlineCallbacks
    def wait_status(self, status: str) -> Any:
        for _ in range(250):
            if [p["status"] for p in self.pilot.proxies()] == [status]:
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail(f"never {status}: {self.pilot.proxies()}")

    @defer.inlineCallbacks
    def test_first_push_carries_every_type_with_versions(self) -> Any:
        client, push = yield self.synced()
        self.assertEqual(sorted(push.resources), ["clusters", "listeners"])
        self.assertEqual(sorted(push.versions), ["clusters", "listeners"])
        self.assertEqual(push.versions, self.pilot.channels[0].snapshot.per_type_versions)

    @defer.inlineCallbacks
    def test_route_change_pushes_listeners_only(self) -> Any:
        client, first = yield self.synced()
        write(self.istio, SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE % "7s")
        second = yield client.next(timeout=2)
        self.assertEqual(list(second.resources), ["listeners"])
        self.assertNotEqual(second.version, first.version)
        self.assertEqual(second.versions["listeners"], self.pilot.channels[0].snapshot.per_type_versions["listeners"])

    @defer.inlineCallbacks
    def test_endpoint_change_pushes_clusters_only(self) -> Any:
        client, _ = yield self.synced()
        write(self.istio, SERVICE_ENTRY.replace("10.0.0.1", "10.0.0.2") + "---\n" + VIRTUAL_SERVICE % "5s")
        second = yield client.next(timeout=2)
        self.assertEqual(list(second.resources), ["clusters"])
        self.assertIn("10.0.0.2", str(second.resources["clusters"]))

    @defer.inlineCallbacks
    def test_resume_with_current_versions_gets_no_push(self) -> Any:
        """
        A proxy that says hello with the versions it applied from the
        current config is SYNCED at once and gets no push.
        """
        client, push = yield self.synced()
        client.transport.loseConnection()
        yield client.closed()
        again = yield self.connect()
        again.send(Hello(node=Node(id="p1", workload="a-v1", labels=LABELS), versions=dict(push.versions)))
        yield self.wait_status("SYNCED")
        self.assertEqual(self.pilot.proxies()[0]["acked_version"], push.version)
        again.send(Ping(id=1))
        self.assertEqual((yield again.next()), Pong(id=1))

    @defer.inlineCallbacks
    def test_resume_pushes_only_what_changed_meanwhile(self) -> Any:
        client, push = yield self.synced()
        client.transport.loseConnection()
        yield client.closed()
        write(self.istio, SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE % "9s")
        yield task.deferLater(reactor, 0.4, lambda: None)
        again = yield self.connect()
        again.send(Hello(node=Node(id="p1", workload="a-v1", labels=LABELS), versions=dict(push.versions)))
        resumed = yield again.next()
        self.assertEqual(list(resumed.resources), ["listeners"])

    @defer.inlineCallbacks
    def test_nacked_types_resent_with_next_change(self) -> Any:
        """
        After a NACK the proxy still has the old content, so the next push
        compares with that: a cluster change also carries the listeners the
        proxy refused.
        """
        client, _ = yield self.synced()
        write(self.istio, SERVICE_ENTRY + "---\n" + VIRTUAL_SERVICE % "7s")
        refused = yield client.next(timeout=2)
        client.send(Nack(nonce=refused.nonce, version=refused.version, error="no"))
        yield self.wait_status("NACKED")
        write(self.istio, SERVICE_ENTRY.replace("10.0.0.1", "10.0.0.3") + "---\n" + VIRTUAL_SERVICE % "7s")
        third = yield client.next(timeout=2)
        self.assertEqual(sorted(third.resources), ["clusters", "listeners"])
        client.send(Ack(nonce=third.nonce, version=third.version))
        yield self.wait_status("SYNCED")

    @defer.inlineCallbacks
    def test_outbound_address_label(self) -> Any:
        client = yield self.connect()
        client.send(Hello(node=Node(id="p9", labels={OUTBOUND_ADDRESS_LABEL: "tcp:15901:interface=127.0.0.9"})))
        push = yield client.next()
        outbound = [listener for listener in push.resources["listeners"] if listener["name"] == "outbound"]
        self.assertEqual(outbound[0]["address"], "tcp:15901:interface=127.0.0.9")


class PilotKeepaliveTests(_PilotCase):
    """
    The pilot pings a quiet proxy and drops a silent one.
    """

    keepalive = (0.1, 0.3)

    @defer.inlineCallbacks
    def test_silent_proxy_dropped(self) -> Any:
        client = yield self.connect()
        client.send(Hello(node=Node(id="quiet", labels=LABELS)))
        push = yield client.next()
        self.assertIsInstance(push, Push)
        ping = yield client.next(timeout=1)
        self.assertIsInstance(ping, Ping)
        yield client.closed(timeout=2)
        self.assertEqual(self.pilot.channels, [])

    @defer.inlineCallbacks
    def test_answering_proxy_kept(self) -> Any:
        client = yield self.connect()
        client.send(Hello(node=Node(id="lively", labels=LABELS)))
        yield client.next()
        for _ in range(5):
            ping = yield client.next(timeout=1)
            client.send(Pong(id=ping.id))
        self.assertTrue(client.transport.connected)
        self.assertEqual(len(self.pilot.channels), 1)


class SecureChannelTests(_PilotCase):
    """
    The default channel: TLS with the pilot's CA-issued certificate, and a
    join token bound to the proxy's namespace.
    """

    security = True

    def tls(self, root: bytes | None = None, name: str = "127.0.0.1") -> Any:
        return client_tls_options(name, root or self.channel_security.root_pem)

    def token(self, namespace: str = "default", ttl: float = 3600) -> str:
        return token_authority(ca_directory(self.dir)).create(namespace, "web", reactor.seconds(), ttl)

    @defer.inlineCallbacks
    def hello(self, credential: str, namespace: str = "default") -> Any:
        client = yield self.connect(self.tls())
        client.send(Hello(node=Node(id="p1", namespace=namespace, labels=LABELS), credential=credential))
        message = yield client.next()
        return client, message

    @defer.inlineCallbacks
    def test_valid_token_over_tls(self) -> Any:
        client, message = yield self.hello(self.token())
        self.assertIsInstance(message, Push)

    @defer.inlineCallbacks
    def test_no_credential_refused(self) -> Any:
        client, message = yield self.hello("")
        self.assertIsInstance(message, Refused)
        self.assertIn("join token", message.reason)
        yield client.closed()
        self.assertEqual(self.pilot.channels, [])

    @defer.inlineCallbacks
    def test_expired_token_refused(self) -> Any:
        stale = token_authority(ca_directory(self.dir)).create("default", "web", reactor.seconds() - 7200, 3600)
        client, message = yield self.hello(stale)
        self.assertIsInstance(message, Refused)
        self.assertIn("expired", message.reason)

    @defer.inlineCallbacks
    def test_forged_token_refused(self) -> Any:
        token = self.token()
        client, message = yield self.hello(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))
        self.assertIsInstance(message, Refused)

    @defer.inlineCallbacks
    def test_token_for_another_namespace_refused(self) -> Any:
        client, message = yield self.hello(self.token("payments"), namespace="default")
        self.assertIsInstance(message, Refused)
        self.assertIn("payments", message.reason)

    @defer.inlineCallbacks
    def test_previous_key_admitted_during_overlap_then_refused(self) -> Any:
        """
        A running pilot takes a token key rotation without a restart: a
        token of the previous key is admitted during the overlap, new
        tokens carry the new key, and after the overlap the previous key's
        tokens are refused, naming the key.
        """
        ca_dir = ca_directory(self.dir)
        old_kid = token_authority(ca_dir).key_id
        during, after = self.token(), self.token()
        new_kid, _ = rotate_key(os.path.join(ca_dir, TOKEN_KEY_FILE), os.path.join(ca_dir, PREVIOUS_TOKEN_KEYS_FILE))

        client, message = yield self.hello(during)
        self.assertIsInstance(message, Push)
        client.transport.loseConnection()
        yield client.closed()
        fresh = self.token()
        self.assertEqual(token_authority(ca_dir).verify(fresh, reactor.seconds()).key_id, new_kid)

        self.assertEqual(finish_key_rotation(os.path.join(ca_dir, PREVIOUS_TOKEN_KEYS_FILE)), (old_kid,))
        client, message = yield self.hello(after)
        self.assertIsInstance(message, Refused)
        self.assertIn(f"join token signed by unknown key {old_kid}", message.reason)
        yield client.closed()
        client, message = yield self.hello(fresh)
        self.assertIsInstance(message, Push)

    @defer.inlineCallbacks
    def test_unusable_key_files_keep_the_old_keys(self) -> Any:
        """
        Token key files the pilot cannot use are logged, and the keys it
        had still check tokens.
        """
        token = self.token()
        with open(os.path.join(ca_directory(self.dir), PREVIOUS_TOKEN_KEYS_FILE), "w") as f:
            f.write("not hex\n")
        client, message = yield self.hello(token)
        self.assertIsInstance(message, Push)

    @defer.inlineCallbacks
    def test_client_trusting_another_root_fails_handshake(self) -> Any:
        other = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, other, True)
        foreign = load_channel_security(other, "cluster.local", reactor)
        client = yield self.connect(self.tls(root=foreign.root_pem))
        client.send(Hello(node=Node(id="p1", labels=LABELS), credential=self.token()))
        yield client.closed()
        self.assertEqual(self.pilot.channels, [])

    @defer.inlineCallbacks
    def test_plaintext_client_gets_nothing(self) -> Any:
        client = yield self.connect()
        client.send(Hello(node=Node(id="p1", labels=LABELS), credential=self.token()))
        yield client.closed()
        self.assertEqual(self.pilot.channels, [])


class WorkloadCertificateTests(_PilotCase):
    """
    Workload certificates over the channel: a join token is good once and
    names the only identity the pilot signs; the certificate then is the
    credential.
    """

    security = True

    def token(self, namespace: str = "default", account: str = "web") -> str:
        return token_authority(ca_directory(self.dir)).create(namespace, account, reactor.seconds(), 3600)

    @defer.inlineCallbacks
    def admitted(self, credential: str, identity: WorkloadIdentity | None = None, namespace: str = "default") -> Any:
        address = f"tcp:127.0.0.1:{self.pilot.channel_port.getHost().port}"
        tls = pilot_tls_options(None, self.channel_security.root_pem, address, identity, reactor.seconds())
        client = yield self.connect(tls)
        client.send(Hello(node=Node(id="p1", namespace=namespace, labels=LABELS), credential=credential))
        first = yield client.next()
        return client, first

    @defer.inlineCallbacks
    def certify(self, client: Any, identity: WorkloadIdentity, request_id: int = 1) -> Any:
        client.send(CertificateRequest(id=request_id, csr=identity.new_request().decode()))
        answer = yield client.next()
        return answer

    @defer.inlineCallbacks
    def test_csr_signed_for_the_token_identity(self) -> Any:
        client, push = yield self.admitted(self.token())
        self.assertIsInstance(push, Push)
        identity = WorkloadIdentity("spiffe://cluster.local/ns/default/sa/web")
        issued = yield self.certify(client, identity)
        self.assertIsInstance(issued, CertificateIssued)
        self.assertEqual(issued.id, 1)
        identity.install(issued.chain.encode(), issued.roots.encode(), reactor.seconds())
        self.assertTrue(identity.valid_at(reactor.seconds()))
        self.assertEqual(issued.roots.encode(), self.channel_security.root_pem)
        self.assertEqual(self.pilot.certificates_signed, 1)

    @defer.inlineCallbacks
    def test_other_identity_denied_channel_kept(self) -> Any:
        client, _ = yield self.admitted(self.token(account="web"))
        denied = yield self.certify(client, WorkloadIdentity("spiffe://cluster.local/ns/default/sa/admin"))
        self.assertIsInstance(denied, CertificateDenied)
        self.assertIn("asks for spiffe://cluster.local/ns/default/sa/admin", denied.reason)
        self.assertIn("grants spiffe://cluster.local/ns/default/sa/web", denied.reason)
        client.send(CertificateRequest(id=2, csr="-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n"))
        garbage = yield client.next()
        self.assertIsInstance(garbage, CertificateDenied)
        self.assertIn("not a PEM certificate signing request", garbage.reason)
        client.send(Ping(id=3))
        self.assertEqual((yield client.next()), Pong(id=3))
        self.assertEqual(self.pilot.certificates_signed, 0)

    def audited(self) -> list[dict]:
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]

    @defer.inlineCallbacks
    def test_replayed_token_refused(self) -> Any:
        token = self.token()
        client, first = yield self.admitted(token)
        self.assertIsInstance(first, Push)
        again, refused = yield self.admitted(token)
        self.assertIsInstance(refused, Refused)
        self.assertIn("was used already", refused.reason)
        [record] = self.audited()
        self.assertEqual((record["method"], record["path"], record["decision"]), ("HELLO", "p1", "DENY"))
        self.assertIn("was used already", record["reason"])

    @defer.inlineCallbacks
    def test_certificate_decisions_audited(self) -> Any:
        client, _ = yield self.admitted(self.token(account="web"))
        yield self.certify(client, WorkloadIdentity("spiffe://cluster.local/ns/default/sa/web"))
        yield self.certify(client, WorkloadIdentity("spiffe://cluster.local/ns/default/sa/admin"), 2)
        records = self.audited()
        self.assertEqual([(r["method"], r["decision"], r["source_principal"]) for r in records],
                         [("CSR", "ALLOW", "spiffe://cluster.local/ns/default/sa/web"),
                          ("CSR", "DENY", "spiffe://cluster.local/ns/default/sa/web")])
        self.assertIn("asks for spiffe://cluster.local/ns/default/sa/admin", records[1]["reason"])

    @defer.inlineCallbacks
    def test_certificate_is_the_credential_on_reconnect(self) -> Any:
        client, _ = yield self.admitted(self.token())
        identity = WorkloadIdentity("spiffe://cluster.local/ns/default/sa/web")
        issued = yield self.certify(client, identity)
        identity.install(issued.chain.encode(), issued.roots.encode(), reactor.seconds())
        client.transport.loseConnection()
        yield client.closed()
        again, push = yield self.admitted("", identity)
        self.assertIsInstance(push, Push)
        self.assertEqual(self.pilot.channels[0].identity, "spiffe://cluster.local/ns/default/sa/web")
        renewed = yield self.certify(again, identity, 7)
        self.assertIsInstance(renewed, CertificateIssued)
        leaf = x509.load_pem_x509_certificates(renewed.chain.encode())[0]
        self.assertEqual(certificate_identity(leaf), identity.spiffe_id)

    @defer.inlineCallbacks
    def test_certificate_for_another_namespace_refused(self) -> Any:
        client, _ = yield self.admitted(self.token())
        identity = WorkloadIdentity("spiffe://cluster.local/ns/default/sa/web")
        issued = yield self.certify(client, identity)
        identity.install(issued.chain.encode(), issued.roots.encode(), reactor.seconds())
        again, refused = yield self.admitted("", identity, namespace="payments")
        self.assertIsInstance(refused, Refused)
        self.assertIn("for namespace 'default'", refused.reason)

    @defer.inlineCallbacks
    def test_foreign_client_certificate_fails_handshake(self) -> Any:
        other = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, other, True)
        foreign = load_channel_security(other, "cluster.local", reactor)
        identity = WorkloadIdentity("spiffe://cluster.local/ns/default/sa/web")
        csr = identity.new_request()
        chain = foreign.ca.sign_csr(csr, identity.spiffe_id, foreign._now(), foreign.workload_ttl)
        identity.install(chain, foreign.root_pem, reactor.seconds())
        address = f"tcp:127.0.0.1:{self.pilot.channel_port.getHost().port}"
        # Trusts the right root for the pilot, but presents a foreign-CA certificate.
        tls = pilot_tls_options(None, self.channel_security.root_pem, address, identity, reactor.seconds())
        client = yield self.connect(tls)
        client.send(Hello(node=Node(id="p1", labels=LABELS)))
        yield client.closed()
        self.assertEqual(self.pilot.channels, [])
