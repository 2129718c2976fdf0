"""
The proxy's workload identity: key, CSR, the certificate the pilot signs,
renewal at half-life, keeping it across restarts; and the proxy's pilot
client getting and renewing it over a real channel.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import tempfile
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import sleep
from txmesh.identity import requested_identity
from txmesh.pilot.ca import CertificateAuthority
from txmesh.pilot.channel_security import ca_directory, load_channel_security, token_authority
from txmesh.pilot.messages import Node
from txmesh.pilot.service import PilotService
from txmesh.proxy.pilot_client import PilotClient, pilot_tls_options
from txmesh.proxy.workload_identity import IdentityError, WorkloadIdentity, token_service_account

WEB = "spiffe://cluster.local/ns/default/sa/web"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


class WorkloadIdentityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = CertificateAuthority.load_or_create(os.path.join(self.dir, "ca"), "cluster.local", NOW)

    def sign(self, identity: WorkloadIdentity, name: str = WEB, ttl: timedelta = timedelta(hours=1)) -> bytes:
        return self.ca.sign_csr(identity.new_request(), name, NOW, ttl)

    def test_csr_asks_for_the_identity(self) -> None:
        self.assertEqual(requested_identity(WorkloadIdentity(WEB).new_request()), WEB)

    def test_install_and_renewal_time(self) -> None:
        identity = WorkloadIdentity(WEB)
        seen = []
        identity.subscribe(seen.append)
        identity.install(self.sign(identity), self.ca.root_pem, NOW.timestamp())
        self.assertEqual(seen, [identity])
        self.assertTrue(identity.valid_at(NOW.timestamp()))
        self.assertFalse(identity.valid_at(NOW.timestamp() + 3601))
        # Half-way from when it was taken, not from the back-dated start.
        self.assertEqual(identity.renew_at(), NOW.timestamp() + 1800)
        self.assertIn(b"PRIVATE KEY", identity.key_pem)

    def test_refused_certificates_keep_the_current_one(self) -> None:
        identity = WorkloadIdentity(WEB)
        with self.assertRaises(IdentityError):
            identity.install(b"x", self.ca.root_pem, 0)  # nothing pending
        chain = self.sign(identity)
        identity.install(chain, self.ca.root_pem, NOW.timestamp())
        other = WorkloadIdentity(WEB)
        identity.new_request()
        with self.assertRaises(IdentityError) as e:
            identity.install(self.sign(other), self.ca.root_pem, NOW.timestamp())  # another key
        self.assertIn("not for the key", str(e.exception))
        identity.new_request()
        with self.assertRaises(IdentityError) as e:
            identity.install(b"-----BEGIN CERTIFICATE-----\ngarbage\n", self.ca.root_pem, NOW.timestamp())
        self.assertIn("does not parse", str(e.exception))
        self.assertEqual(identity.chain_pem, chain)

    def test_wrong_identity_refused(self) -> None:
        identity = WorkloadIdentity(WEB)
        chain = self.ca.sign_csr(identity.new_request(), "spiffe://cluster.local/ns/default/sa/admin", NOW,
                                 timedelta(hours=1))
        with self.assertRaises(IdentityError) as e:
            identity.install(chain, self.ca.root_pem, NOW.timestamp())
        self.assertIn("sa/admin", str(e.exception))

    def test_kept_across_restarts(self) -> None:
        keep = os.path.join(self.dir, "identity")
        identity = WorkloadIdentity(WEB, keep)
        identity.install(self.sign(identity), self.ca.root_pem, NOW.timestamp())
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(keep, "key.pem")).st_mode), 0o600)
        again = WorkloadIdentity(WEB, keep)
        self.assertTrue(again.load(NOW.timestamp() + 60))
        self.assertEqual((again.chain_pem, again.key_pem), (identity.chain_pem, identity.key_pem))
        self.assertFalse(WorkloadIdentity(WEB, keep).load(NOW.timestamp() + 7200))  # expired
        self.assertFalse(WorkloadIdentity("spiffe://cluster.local/ns/default/sa/x", keep).load(NOW.timestamp()))
        self.assertFalse(WorkloadIdentity(WEB, os.path.join(self.dir, "none")).load(NOW.timestamp()))

    def test_token_service_account(self) -> None:
        token = token_authority(os.path.join(self.dir, "ca")).create("default", "reviews", NOW.timestamp(), 60)
        self.assertEqual(token_service_account(token), "reviews")
        self.assertIsNone(token_service_account("garbage"))
        self.assertIsNone(token_service_account("a.!!!.c"))


class PilotClientCertificateTests(TestCase):
    """
    L{PilotClient} gets a certificate with its join token, renews it at
    half-life with a new key, and reconnects with it.
    """

    @defer.inlineCallbacks
    def test_issue_renew_reconnect(self) -> Any:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        os.mkdir(os.path.join(directory, "istio"))
        security = load_channel_security(ca_directory(directory), "cluster.local", reactor,
                                         workload_ttl=timedelta(minutes=10))
        pilot = PilotService(directory, reactor, "tcp:0:interface=127.0.0.1", None, security=security)
        yield pilot.startService()
        self.addCleanup(pilot.stopService)
        address = f"tcp:127.0.0.1:{pilot.channel_port.getHost().port}"
        identity = WorkloadIdentity(WEB)
        token = token_authority(ca_directory(directory)).create("default", "web", reactor.seconds(), 600)
        client = PilotClient(
            [address], Node(id="web-1"), reactor, lambda doc: None, random.Random(0), backoff_base=0.05,
            backoff_max=0.2, credential=token, identity=identity,
            tls=lambda a: pilot_tls_options(None, security.root_pem, a, identity, reactor.seconds()),
        )
        client.start()
        self.addCleanup(client.stop)
        yield wait(lambda: identity.chain_pem is not None)
        first = identity.chain_pem
        # Renewal is scheduled at half-life (about five minutes from now).
        self.assertLess(abs(client._renewal.getTime() - identity.renew_at()), 1)
        self.assertLess(abs(identity.renew_at() - reactor.seconds() - 300), 5)
        client._renewal.reset(0)  # make half-life now
        yield wait(lambda: identity.chain_pem != first)
        leaf = x509.load_pem_x509_certificates(identity.chain_pem)[0]
        self.assertNotEqual(leaf.public_key().public_numbers(),
                            x509.load_pem_x509_certificates(first)[0].public_key().public_numbers())
        self.assertEqual(pilot.certificates_signed, 2)
        # The join token is spent; the certificate gets the proxy back in.
        pilot.channels[0].transport.loseConnection()
        yield wait(lambda: client.connected_address is None)
        yield wait(lambda: len(pilot.channels) == 1 and pilot.channels[0].identity == WEB)
        self.assertIsNone(client.last_error)


    @defer.inlineCallbacks
    def test_ca_unreachable_at_renewal(self) -> Any:
        """
        The pilot (the CA) is gone when the certificate is due for renewal:
        the proxy keeps its current certificate, and renews by itself once
        a pilot is back on the address, reconnecting with that certificate.
        """
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        os.mkdir(os.path.join(directory, "istio"))
        security = load_channel_security(ca_directory(directory), "cluster.local", reactor,
                                         workload_ttl=timedelta(minutes=10))
        pilot = PilotService(directory, reactor, "tcp:0:interface=127.0.0.1", None, security=security)
        yield pilot.startService()
        port = pilot.channel_port.getHost().port
        identity = WorkloadIdentity(WEB)
        token = token_authority(ca_directory(directory)).create("default", "web", reactor.seconds(), 600)
        client = PilotClient(
            [f"tcp:127.0.0.1:{port}"], Node(id="web-1"), reactor, lambda doc: None, random.Random(0),
            backoff_base=0.05, backoff_max=0.2, credential=token, identity=identity,
            tls=lambda a: pilot_tls_options(None, security.root_pem, a, identity, reactor.seconds()),
        )
        client.start()
        self.addCleanup(client.stop)
        yield wait(lambda: identity.chain_pem is not None)
        first = identity.chain_pem
        yield pilot.stopService()
        yield wait(lambda: client.connected_address is None)
        # Half-life passes while the CA is away.
        due = identity.renew_at
        self.patch(identity, "renew_at", lambda: reactor.seconds() - 1 if identity.chain_pem == first else due())
        if client._renewal is not None and client._renewal.active():
            client._renewal.reset(0)
        yield sleep(0.5)
        self.assertEqual(identity.chain_pem, first)  # still serving with the old one
        back = PilotService(directory, reactor, f"tcp:{port}:interface=127.0.0.1", None, security=security)
        yield back.startService()
        self.addCleanup(back.stopService)
        yield wait(lambda: identity.chain_pem != first)
        self.assertEqual(back.certificates_signed, 1)
        yield wait(lambda: len(back.channels) == 1 and back.channels[0].identity == WEB)


@defer.inlineCallbacks
def wait(condition: Any, timeout: float = 10.0) -> Any:
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in time")
        yield sleep(0.02)
