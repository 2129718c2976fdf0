"""
Root rotation with an overlap window, end to end on loopback: the pilot
notices C{txmesh ca rotate}, pushes the two-root trust bundle, signs with the
new root; peers holding certificates of either root talk mutual TLS during
the overlap; after C{finish-rotation} a peer still holding an old-root
certificate is refused.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from tests.test_workload_identity import wait
from txmesh.cli import ca_command
from txmesh.pilot.ca import CertificateAuthority
from txmesh.pilot.channel_security import ca_directory, load_channel_security, token_authority
from txmesh.pilot.messages import Node
from txmesh.pilot.service import PilotService
from txmesh.proxy.mesh_tls import MeshClientCreator, MeshServerCreator, downstream_identity
from txmesh.proxy.pilot_client import PilotClient, pilot_tls_options
from txmesh.proxy.workload_identity import WorkloadIdentity


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        identity, _ = downstream_identity(self.transport)
        self.transport.write(data + b" from " + (identity or "?").encode())


class _Client(protocol.Protocol):
    def __init__(self) -> None:
        self.answer: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"hello")

    def dataReceived(self, data: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.answer.called:
            self.answer.errback(reason)


class RootRotationTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.mkdir(os.path.join(self.dir, "istio"))
        self.ca_dir = ca_directory(self.dir)
        security = load_channel_security(self.ca_dir, "cluster.local", reactor, workload_ttl=timedelta(hours=1))
        self.root1 = security.root_pem
        self.pilot = PilotService(self.dir, reactor, "tcp:0:interface=127.0.0.1", None, poll_interval=0.05,
                                  security=security)
        yield self.pilot.startService()
        self.addCleanup(self.pilot.stopService)

    def proxy(self, account: str) -> tuple[PilotClient, WorkloadIdentity]:
        address = f"tcp:127.0.0.1:{self.pilot.channel_port.getHost().port}"
        identity = WorkloadIdentity(f"spiffe://cluster.local/ns/default/sa/{account}")
        token = token_authority(self.ca_dir).create("default", account, reactor.seconds(), 600)
        client = PilotClient(
            [address], Node(id=account), reactor, lambda doc: None, random.Random(0), backoff_base=0.05,
            backoff_max=0.2, credential=token, identity=identity,
            # The bootstrap's root file: whatever the pilot's CA trusts when
            # the proxy starts (a new proxy gets the new bundle).
            tls=lambda a: pilot_tls_options(None, self.pilot.security.root_pem, a, identity, reactor.seconds()),
        )
        client.start()
        self.addCleanup(client.stop)
        return client, identity

    @defer.inlineCallbacks
    def exchange(self, server: WorkloadIdentity, client: WorkloadIdentity) -> Any:
        factory = TLSMemoryBIOFactory(MeshServerCreator(server), False, protocol.Factory.forProtocol(_Echo))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        endpoint = wrapClientTLS(MeshClientCreator(client), TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                                                port.getHost().port))
        proto = yield connectProtocol(endpoint, _Client())
        try:
            answer = yield proto.answer.addTimeout(5, reactor)
        finally:
            proto.transport.loseConnection()
        return answer

    @defer.inlineCallbacks
    def test_rotation_with_overlap_then_old_root_refused(self) -> Any:
        client_a, old = self.proxy("old")
        yield wait(lambda: old.chain_pem is not None)
        self.assertEqual(old.roots_pem, self.root1)

        self.assertEqual(ca_command("rotate", self.dir, None, "cluster.local", reactor.seconds(),
                                    open(os.devnull, "w"), open(os.devnull, "w")), 0)
        # The pilot notices and pushes the two-root bundle to the proxy.
        yield wait(lambda: old.roots_pem is not None and old.roots_pem.count(b"BEGIN CERTIFICATE") == 2)
        root2 = CertificateAuthority.load_or_create(self.ca_dir, "cluster.local",
                                                    datetime.now(timezone.utc)).root_pem
        self.assertTrue(old.roots_pem.startswith(root2))

        # A new proxy joins over the new serving certificate and gets a
        # certificate from the new root; old and new talk both ways.
        client_b, new = self.proxy("new")
        yield wait(lambda: new.chain_pem is not None)
        answer = yield self.exchange(new, old)
        self.assertEqual(answer, b"hello from spiffe://cluster.local/ns/default/sa/old")
        answer = yield self.exchange(old, new)
        self.assertEqual(answer, b"hello from spiffe://cluster.local/ns/default/sa/new")

        # The overlap ends while "old" still holds its old-root certificate.
        old_chain = old.chain_pem
        self.assertEqual(ca_command("finish-rotation", self.dir, None, None, reactor.seconds(),
                                    open(os.devnull, "w"), open(os.devnull, "w")), 0)
        yield wait(lambda: new.roots_pem.count(b"BEGIN CERTIFICATE") == 1)
        self.assertEqual(old.chain_pem, old_chain)
        yield self.assertFailure(self.exchange(new, old), SSL.Error, ConnectionLost, ConnectionDone)

        # Renewing moves "old" to the new root; then it is accepted again.
        client_a._renewal.reset(0)
        yield wait(lambda: old.chain_pem != old_chain)
        answer = yield self.exchange(new, old)
        self.assertEqual(answer, b"hello from spiffe://cluster.local/ns/default/sa/old")
