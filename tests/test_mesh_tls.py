"""
Mutual TLS between proxies (L{txmesh.proxy.mesh_tls}) over real loopback
sockets, with workload identities signed by a real
L{txmesh.pilot.ca.CertificateAuthority} in a temporary directory.

Each test listens on C{127.0.0.1:0} with L{MeshServerCreator} (STRICT) or
L{PermissiveFactory} and connects with L{MeshClientCreator}; the server
echoes what it receives and records who its peer is.  Certificates the CA
would never issue (expired, not yet valid) are built here with
C{cryptography}, signed with the CA's own key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from txmesh.config.model import ClusterConfig, Endpoint, UpstreamTLS
from txmesh.identity import certificate_identity
from txmesh.pilot.ca import CertificateAuthority, spiffe_id
from txmesh.proxy.cluster import upstream_tls
from txmesh.proxy.mesh_tls import (
    MeshClientCreator,
    MeshServerCreator,
    PeerIdentityError,
    PermissiveFactory,
    client_cert_header,
    downstream_identity,
)
from txmesh.proxy.tls import TLSListenerFactory
from txmesh.proxy.workload_identity import WorkloadIdentity

TRUST_DOMAIN = "cluster.local"
WAIT = 5.0
"""Seconds any single wait may take before the test fails."""

OPENSSL = shutil.which("openssl")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def bounded(d: Deferred, seconds: float = WAIT) -> Deferred:
    return d.addTimeout(seconds, reactor)


# --- identities -------------------------------------------------------------------


def issue(ca: CertificateAuthority, account: str, roots_pem: bytes | None = None,
          now: datetime | None = None, ttl: timedelta = timedelta(hours=1)) -> WorkloadIdentity:
    """
    @return: an identity for C{spiffe://cluster.local/ns/default/sa/<account>}
        with a certificate C{ca} signed from its CSR, trusting C{roots_pem}
        (default: the CA's trust bundle).
    """
    now = now or _now()
    identity = WorkloadIdentity(spiffe_id(ca.trust_domain, "default", account))
    chain = ca.sign_csr(identity.new_request(), identity.spiffe_id, now, ttl)
    identity.install(chain, roots_pem if roots_pem is not None else ca.trust_bundle_pem, now.timestamp())
    return identity


def renew(ca: CertificateAuthority, identity: WorkloadIdentity) -> None:
    """
    Give C{identity} a new key and certificate, as the pilot client does at
    half-life.
    """
    now = _now()
    chain = ca.sign_csr(identity.new_request(), identity.spiffe_id, now, timedelta(hours=1))
    identity.install(chain, identity.roots_pem, now.timestamp())


def issue_outside_ca(ca: CertificateAuthority, account: str, not_before: datetime,
                     not_after: datetime) -> WorkloadIdentity:
    """
    @return: an identity whose certificate, signed by C{ca}'s key, has a
        validity window C{sign_csr} would never give (expired, or not yet
        valid).
    """
    identity = WorkloadIdentity(spiffe_id(ca.trust_domain, "default", account))
    csr = x509.load_pem_x509_csr(identity.new_request())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.spiffe_id)]),
                       critical=True)
        .sign(ca._key, hashes.SHA256())
    )
    identity.install(cert.public_bytes(serialization.Encoding.PEM), ca.trust_bundle_pem, _now().timestamp())
    return identity


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_cert(subject: str, key: Any, issuer: str, issuer_key: Any) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def plugged_intermediate_ca(directory: str) -> CertificateAuthority:
    """
    @return: an operator-provided CA whose signing certificate is an
        intermediate under a root of its own (Istio's plug-in C{cacerts}).
    """
    os.makedirs(directory, mode=0o700)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("test root", root_key, "test root", root_key)
    key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _ca_cert("test intermediate", key, "test root", root_key)
    pem = serialization.Encoding.PEM
    files = {
        "ca-key.pem": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "ca-cert.pem": intermediate.public_bytes(pem),
        "cert-chain.pem": root.public_bytes(pem),
    }
    for name, data in files.items():
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return CertificateAuthority.load_or_create(directory, TRUST_DOMAIN, _now())


# --- the two ends ------------------------------------------------------------------


@implementer(IHandshakeListener)
class Echo(Protocol):
    """
    The server end: echoes, and records who the peer is at the first bytes.
    """

    def __init__(self, factory: EchoFactory):
        self.factory = factory
        self.peer: tuple[str | None, Any] | None = None
        self.handshake_done = False
        self.lost: Deferred = Deferred()
        self.reason: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None:
            self.peer = downstream_identity(self.transport)
            self.factory.peers.put(self)
        self.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.lost.callback(None)


class EchoFactory(Factory):
    noisy = False

    def __init__(self) -> None:
        self.peers: DeferredQueue = DeferredQueue()
        self.connections: list[Echo] = []

    def buildProtocol(self, addr: Any) -> Echo:
        p = Echo(self)
        self.connections.append(p)
        return p


@implementer(IHandshakeListener)
class Client(Protocol):
    """
    The client end: sends, collects the echo, notes how the connection ended.
    """

    def __init__(self) -> None:
        self.received = b""
        self.handshake_done = False
        self.lost: Deferred = Deferred()
        self.reason: Failure | None = None
        self._waiting: tuple[int, Deferred] | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def exchange(self, data: bytes) -> Deferred:
        """
        @return: a L{Deferred} firing with the echo of C{data}, or with
            C{None} if the connection is lost first.
        """
        self.received = b""
        d: Deferred = Deferred()
        self._waiting = (len(data), d)
        self.transport.write(data)
        return bounded(d)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._waiting is not None and len(self.received) >= self._waiting[0]:
            d, self._waiting = self._waiting[1], None
            d.callback(self.received)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        if self._waiting is not None:
            d, self._waiting = self._waiting[1], None
            d.callback(None)
        self.lost.callback(None)

    def peer_identity(self) -> str | None:
        return certificate_identity(self.transport.getPeerCertificate())


class LogCapture:
    """
    The text of every event logged while it is installed.
    """

    def __init__(self, case: unittest.TestCase):
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]


class MeshTLSTestCase(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txmesh-mesh-tls-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = CertificateAuthority.load_or_create(os.path.join(self.dir, "ca"), TRUST_DOMAIN, _now())
        self.clients: list[Client] = []
        self.factories: list[EchoFactory] = []
        self.log = LogCapture(self)
        self.addCleanup(self._close_all)

    @inlineCallbacks
    def _close_all(self) -> Any:
        pending = []
        for p in [*self.clients, *(c for f in self.factories for c in f.connections)]:
            if not p.lost.called:
                p.transport.abortConnection()
                pending.append(p.lost)
        if pending:
            yield bounded(DeferredList(pending))

    # -- listening and connecting --

    def listen(self, factory: Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def strict(self, identity: WorkloadIdentity) -> tuple[int, EchoFactory]:
        echo = EchoFactory()
        self.factories.append(echo)
        return self.listen(TLSMemoryBIOFactory(MeshServerCreator(identity), False, echo)), echo

    @inlineCallbacks
    def connect(self, port: int, creator: Any = None) -> Any:
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=int(WAIT))
        if creator is not None:
            endpoint = wrapClientTLS(creator, endpoint)
        client = yield bounded(connectProtocol(endpoint, Client()))
        self.clients.append(client)
        return client

    @inlineCallbacks
    def refused(self, port: int, creator: Any, echo: EchoFactory) -> Any:
        """
        Connect and try one exchange, which must fail: the connection is
        closed at both ends and the server's app never sees a byte.

        @return: C{(client reason, server reason)}.
        """
        client = yield self.connect(port, creator)
        answer = yield client.exchange(b"hello")
        self.assertIsNone(answer, "the peer was accepted")
        yield bounded(client.lost)
        server = echo.connections[-1]
        yield bounded(server.lost)
        self.assertIsNone(server.peer, "the server's app got data from a refused peer")
        self.assertFalse(server.handshake_done)
        return str(client.reason.value), str(server.reason.value)

    def assertLogged(self, text: str) -> None:
        texts = self.log.texts()
        self.assertTrue(any(text in t for t in texts), f"{text!r} not logged; logged: {texts}")


class MutualTLSTests(MeshTLSTestCase):
    """
    A good exchange and the identities each end sees.
    """

    @inlineCallbacks
    def test_exchange(self) -> Any:
        """
        Both ends present certificates; the server learns the client's SPIFFE
        ID and the C{x-forwarded-client-cert} value; the client checked the
        server's.
        """
        server_id = issue(self.ca, "server")
        client_id = issue(self.ca, "client")
        port, echo = self.strict(server_id)
        client = yield self.connect(port, MeshClientCreator(client_id, allowed=[server_id.spiffe_id]))
        answer = yield client.exchange(b"hello")
        self.assertEqual(answer, b"hello")
        self.assertTrue(client.handshake_done)
        self.assertEqual(client.peer_identity(), "spiffe://cluster.local/ns/default/sa/server")

        server = yield bounded(echo.peers.get())
        peer_id, certificate = server.peer
        self.assertEqual(peer_id, "spiffe://cluster.local/ns/default/sa/client")
        leaf = x509.load_pem_x509_certificates(client_id.chain_pem)[0]
        self.assertEqual(certificate, leaf)
        header = client_cert_header(server_id.spiffe_id, peer_id, certificate).decode()
        digest = leaf.fingerprint(hashes.SHA256()).hex()
        self.assertEqual(header, f"By=spiffe://cluster.local/ns/default/sa/server;Hash={digest};"
                                 "URI=spiffe://cluster.local/ns/default/sa/client")

    @inlineCallbacks
    def test_any_peer_of_the_trust_domain(self) -> Any:
        """
        With no C{allowed} list the client accepts any peer of its trust
        domain.
        """
        port, _ = self.strict(issue(self.ca, "server"))
        client = yield self.connect(port, MeshClientCreator(issue(self.ca, "client")))
        self.assertEqual((yield client.exchange(b"x")), b"x")

    @inlineCallbacks
    def test_intermediate_chain(self) -> Any:
        """
        With an operator CA whose signing certificate is an intermediate,
        each end sends the intermediate after its leaf and the other end
        verifies up to the root alone.
        """
        ca = plugged_intermediate_ca(os.path.join(self.dir, "plugged"))
        self.assertEqual(len(ca.chain_pem.split(b"-----END CERTIFICATE-----")) - 1, 1)
        self.assertNotIn(ca.chain_pem, ca.trust_bundle_pem)
        port, echo = self.strict(issue(ca, "server"))
        client = yield self.connect(port, MeshClientCreator(issue(ca, "client")))
        self.assertEqual((yield client.exchange(b"x")), b"x")
        server = yield bounded(echo.peers.get())
        self.assertEqual(server.peer[0], "spiffe://cluster.local/ns/default/sa/client")

    @inlineCallbacks
    def test_tls_listener_factory(self) -> Any:
        """
        L{TLSListenerFactory}, as the proxy's listeners use it, with a
        L{MeshServerCreator}.
        """
        echo = EchoFactory()
        self.factories.append(echo)
        port = self.listen(TLSListenerFactory(MeshServerCreator(issue(self.ca, "server")), echo, clock=reactor))
        client = yield self.connect(port, MeshClientCreator(issue(self.ca, "client")))
        self.assertEqual((yield client.exchange(b"x")), b"x")
        server = yield bounded(echo.peers.get())
        self.assertEqual(server.peer[0], "spiffe://cluster.local/ns/default/sa/client")


@implementer(IOpenSSLClientConnectionCreator)
class OnlyTLS11:
    """
    A client that offers TLS 1.1 and nothing newer (security level 0, so
    this OpenSSL sends the hello at all).
    """

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        context.set_min_proto_version(SSL.TLS1_1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        return connection


class ProtocolTests(MeshTLSTestCase):
    """
    What a mesh listener agrees to: ALPN as offered, TLS 1.2 at least.
    """

    @inlineCallbacks
    def test_alpn(self) -> Any:
        """
        A listener offering C{h2} and C{http/1.1} agrees on C{h2} with a
        client that offers it, and on C{http/1.1} with one that offers only
        that.
        """
        echo = EchoFactory()
        self.factories.append(echo)
        creator = MeshServerCreator(issue(self.ca, "server"), alpn=[b"h2", b"http/1.1"])
        port = self.listen(TLSMemoryBIOFactory(creator, False, echo))
        client_id = issue(self.ca, "client")
        for offered, agreed in (([b"h2", b"http/1.1"], b"h2"), ([b"http/1.1"], b"http/1.1"), ([b"h2"], b"h2")):
            client = yield self.connect(port, MeshClientCreator(client_id, offered))
            self.assertEqual((yield client.exchange(b"x")), b"x")
            self.assertEqual(client.transport.negotiatedProtocol, agreed, offered)

    @inlineCallbacks
    def test_tls11_refused(self) -> Any:
        """
        A client that speaks at most TLS 1.1 is refused at the handshake:
        the app never sees it.
        """
        port, echo = self.strict(issue(self.ca, "server"))
        client_reason, server_reason = yield self.refused(port, OnlyTLS11(), echo)
        self.assertIn("unsupported protocol", server_reason)
        self.assertIn("protocol version", client_reason)


class StrictAndPermissiveTests(MeshTLSTestCase):
    @inlineCallbacks
    def test_strict_refuses_client_without_certificate(self) -> Any:
        """
        STRICT: a TLS client that presents no certificate (server-auth only)
        is refused.
        """
        server_id = issue(self.ca, "server")
        port, echo = self.strict(server_id)
        no_certificate = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2)
        _, server_reason = yield self.refused(port, no_certificate, echo)
        self.assertIn("peer did not return a certificate", server_reason)

    @inlineCallbacks
    def test_strict_refuses_plaintext(self) -> Any:
        """
        STRICT: plaintext bytes never reach the app.
        """
        port, echo = self.strict(issue(self.ca, "server"))
        yield self.refused(port, None, echo)

    @inlineCallbacks
    def test_permissive_takes_both(self) -> Any:
        """
        PERMISSIVE: plaintext and mutual TLS on one port, told apart; the
        plaintext peer has no identity.
        """
        server_id = issue(self.ca, "server")
        plain, tls = EchoFactory(), EchoFactory()
        self.factories += [plain, tls]
        wrapped = TLSListenerFactory(MeshServerCreator(server_id), tls, clock=reactor)
        port = self.listen(PermissiveFactory(wrapped, plain))

        plaintext = yield self.connect(port)
        self.assertEqual((yield plaintext.exchange(b"GET / HTTP/1.1\r\n\r\n")), b"GET / HTTP/1.1\r\n\r\n")
        seen = yield bounded(plain.peers.get())
        self.assertEqual(seen.peer, (None, None))
        self.assertIsNone(client_cert_header(server_id.spiffe_id, *seen.peer))

        mutual = yield self.connect(port, MeshClientCreator(issue(self.ca, "client"), allowed=[server_id.spiffe_id]))
        self.assertEqual((yield mutual.exchange(b"hello")), b"hello")
        seen = yield bounded(tls.peers.get())
        self.assertEqual(seen.peer[0], "spiffe://cluster.local/ns/default/sa/client")
        self.assertEqual(len(plain.connections), 1)
        self.assertEqual(len(tls.connections), 1)

        # Both still work side by side.
        self.assertEqual((yield plaintext.exchange(b"again")), b"again")
        self.assertEqual((yield mutual.exchange(b"again")), b"again")


class RefusedPeerTests(MeshTLSTestCase):
    """
    Peers each end must refuse, and what it says about them.
    """

    @inlineCallbacks
    def test_wrong_spiffe_id(self) -> Any:
        """
        The client refuses a server of the mesh whose SPIFFE ID is not
        allowed, and logs why.
        """
        port, echo = self.strict(issue(self.ca, "impostor"))
        allowed = "spiffe://cluster.local/ns/default/sa/server"
        client_reason, _ = yield self.refused(port, MeshClientCreator(issue(self.ca, "client"), allowed=[allowed]),
                                              echo)
        self.assertIsInstance(self.clients[-1].reason.value, PeerIdentityError)
        expected = f"the peer is spiffe://cluster.local/ns/default/sa/impostor, not one of {allowed}"
        self.assertEqual(client_reason, expected)
        self.assertLogged(f"upstream refused: {expected}")

    @inlineCallbacks
    def test_other_service_account_of_the_cluster(self) -> Any:
        """
        An C{ISTIO_MUTUAL} cluster whose SANs are its service's accounts (as
        the pilot writes them from service discovery) refuses a server of
        the same trust domain with another service account, through the
        proxy's own L{upstream_tls}, and logs why.
        """
        expected = spiffe_id(TRUST_DOMAIN, "default", "reviews")
        cluster = ClusterConfig("outbound|9080||reviews", (Endpoint("127.0.0.1", 9080),),
                                tls=UpstreamTLS(mode="ISTIO_MUTUAL", subject_alt_names=(expected,)))
        creator = upstream_tls(cluster, cluster.endpoints[0], b"http/1.1", issue(self.ca, "client"))
        port, echo = self.strict(issue(self.ca, "ratings"))
        client_reason, _ = yield self.refused(port, creator, echo)
        reason = f"the peer is spiffe://cluster.local/ns/default/sa/ratings, not one of {expected}"
        self.assertEqual(client_reason, reason)
        self.assertLogged(f"upstream refused: {reason}")

        # The service's own account is taken.
        port, _ = self.strict(issue(self.ca, "reviews"))
        client = yield self.connect(port, upstream_tls(cluster, cluster.endpoints[0], b"http/1.1",
                                                       issue(self.ca, "client")))
        self.assertEqual((yield client.exchange(b"x")), b"x")

    @inlineCallbacks
    def test_other_trust_domain(self) -> Any:
        """
        With no C{allowed} list, a server whose SPIFFE ID is of another trust
        domain (its certificate chains to a root the client trusts) is
        refused.
        """
        other = CertificateAuthority.load_or_create(os.path.join(self.dir, "other"), "other.example", _now())
        bundle = self.ca.root_pem + other.root_pem
        port, echo = self.strict(issue(other, "server", roots_pem=bundle))
        client_reason, _ = yield self.refused(port, MeshClientCreator(issue(self.ca, "client", roots_pem=bundle)),
                                              echo)
        self.assertIn("is not of trust domain cluster.local", client_reason)
        self.assertLogged("upstream refused: the peer spiffe://other.example/ns/default/sa/server "
                          "is not of trust domain cluster.local")

    @inlineCallbacks
    def test_expired_server(self) -> Any:
        now = _now()
        server_id = issue_outside_ca(self.ca, "server", now - timedelta(days=2), now - timedelta(days=1))
        port, echo = self.strict(server_id)
        client_reason, server_reason = yield self.refused(port, MeshClientCreator(issue(self.ca, "client")), echo)
        self.assertIn("certificate verify failed", client_reason)
        # The refused end is told why, in the TLS alert.
        self.assertIn('certificate expired', server_reason)

    @inlineCallbacks
    def test_expired_client(self) -> Any:
        now = _now()
        client_id = issue_outside_ca(self.ca, "client", now - timedelta(days=2), now - timedelta(days=1))
        port, echo = self.strict(issue(self.ca, "server"))
        client_reason, server_reason = yield self.refused(port, MeshClientCreator(client_id), echo)
        self.assertIn("certificate verify failed", server_reason)
        # The refused end is told why, in the TLS alert.
        self.assertIn('certificate expired', client_reason)

    @inlineCallbacks
    def test_not_yet_valid_server(self) -> Any:
        now = _now()
        server_id = issue_outside_ca(self.ca, "server", now + timedelta(days=1), now + timedelta(days=2))
        port, echo = self.strict(server_id)
        client_reason, server_reason = yield self.refused(port, MeshClientCreator(issue(self.ca, "client")), echo)
        self.assertIn("certificate verify failed", client_reason)
        # The refused end is told why, in the TLS alert.
        self.assertIn('bad certificate', server_reason)
        self.assertLogged("peer certificate spiffe://cluster.local/ns/default/sa/server refused: "
                          "it is not valid yet (depth 0)")

    @inlineCallbacks
    def test_not_yet_valid_client(self) -> Any:
        now = _now()
        client_id = issue_outside_ca(self.ca, "client", now + timedelta(days=1), now + timedelta(days=2))
        port, echo = self.strict(issue(self.ca, "server"))
        client_reason, server_reason = yield self.refused(port, MeshClientCreator(client_id), echo)
        self.assertIn("certificate verify failed", server_reason)
        # The refused end is told why, in the TLS alert.
        self.assertIn('bad certificate', client_reason)
        self.assertLogged("peer certificate spiffe://cluster.local/ns/default/sa/client refused: "
                          "it is not valid yet (depth 0)")

    @inlineCallbacks
    def test_foreign_ca_server(self) -> Any:
        """
        A server whose certificate comes from another CA (same trust domain,
        another root) is refused by the client.
        """
        foreign = CertificateAuthority.load_or_create(os.path.join(self.dir, "foreign"), TRUST_DOMAIN, _now())
        port, echo = self.strict(issue(foreign, "server"))
        client_reason, server_reason = yield self.refused(port, MeshClientCreator(issue(self.ca, "client")), echo)
        self.assertIn("certificate verify failed", client_reason)
        # The refused end is told why, in the TLS alert.
        self.assertIn('unknown ca', server_reason)
        # The peer sends its (foreign) root after its leaf: the root is refused.
        self.assertLogged("peer certificate txmesh root CA cluster.local refused: "
                          "its chain ends in a root that is not trusted (depth 1)")

    @inlineCallbacks
    def test_foreign_ca_client(self) -> Any:
        foreign = CertificateAuthority.load_or_create(os.path.join(self.dir, "foreign"), TRUST_DOMAIN, _now())
        port, echo = self.strict(issue(self.ca, "server"))
        # The client trusts the server's root too: only the server's check fails.
        client_id = issue(foreign, "client", roots_pem=foreign.root_pem + self.ca.root_pem)
        client_reason, server_reason = yield self.refused(port, MeshClientCreator(client_id), echo)
        self.assertIn("certificate verify failed", server_reason)
        # The refused end is told why, in the TLS alert.
        self.assertIn('unknown ca', client_reason)
        # The peer sends its (foreign) root after its leaf: the root is refused.
        self.assertLogged("peer certificate txmesh root CA cluster.local refused: "
                          "its chain ends in a root that is not trusted (depth 1)")

    @inlineCallbacks
    def test_refused_certificate_logged(self) -> Any:
        """
        An end that refuses its peer's certificate chain (here an expired
        client) logs why, as the client logs a SPIFFE ID it refuses.
        """
        now = _now()
        client_id = issue_outside_ca(self.ca, "client", now - timedelta(days=2), now - timedelta(days=1))
        port, echo = self.strict(issue(self.ca, "server"))
        yield self.refused(port, MeshClientCreator(client_id), echo)
        self.assertLogged("expired")

    @inlineCallbacks
    def test_revoked_root(self) -> Any:
        """
        After a root rotation the old root is trusted during the overlap;
        once it is dropped from a proxy's trust bundle
        (L{WorkloadIdentity.update_roots}), a peer still holding a
        certificate under it is refused, in both directions.
        """
        ca_dir = os.path.join(self.dir, "ca")
        old_client = issue(self.ca, "client")
        old_server = issue(self.ca, "old-server")
        rotated = CertificateAuthority.rotate_root(ca_dir, TRUST_DOMAIN, _now())
        self.assertEqual(len(rotated.previous_roots), 1)
        server_id = issue(rotated, "server")
        port, echo = self.strict(server_id)

        # Overlap: every bundle holds both roots.
        for identity in (old_client, old_server):
            identity.update_roots(rotated.trust_bundle_pem)
        client = yield self.connect(port, MeshClientCreator(old_client))
        self.assertEqual((yield client.exchange(b"x")), b"x")

        # The old root removed from the server's trust bundle.
        server_id.update_roots(rotated.root_pem)
        _, server_reason = yield self.refused(port, MeshClientCreator(old_client), echo)
        self.assertIn("certificate verify failed", server_reason)
        # The peer sends its (foreign) root after its leaf: the root is refused.
        self.assertLogged("peer certificate txmesh root CA cluster.local refused: "
                          "its chain ends in a root that is not trusted (depth 1)")

        # And a client trusting only the new root refuses an old server.
        new_client = issue(rotated, "client", roots_pem=rotated.root_pem)
        old_port, old_echo = self.strict(old_server)
        client_reason, _ = yield self.refused(old_port, MeshClientCreator(new_client), old_echo)
        self.assertIn("certificate verify failed", client_reason)
        # The peer sends its (foreign) root after its leaf: the root is refused.
        self.assertLogged("peer certificate txmesh root CA cluster.local refused: "
                          "its chain ends in a root that is not trusted (depth 1)")


class RotationTests(MeshTLSTestCase):
    @inlineCallbacks
    def test_new_certificate_for_new_connections(self) -> Any:
        """
        After L{WorkloadIdentity.install} of a new certificate, new
        connections (both as server and as client) present it, while a
        connection opened before keeps working.
        """
        server_id = issue(self.ca, "server")
        client_id = issue(self.ca, "client")
        port, echo = self.strict(server_id)
        creator = MeshClientCreator(client_id, allowed=[server_id.spiffe_id])

        before = yield self.connect(port, creator)
        self.assertEqual((yield before.exchange(b"one")), b"one")
        first_server_cert = before.transport.getPeerCertificate().to_cryptography()
        first_client_cert = (yield bounded(echo.peers.get())).peer[1]

        renew(self.ca, server_id)
        renew(self.ca, client_id)
        new_server_cert = x509.load_pem_x509_certificates(server_id.chain_pem)[0]
        new_client_cert = x509.load_pem_x509_certificates(client_id.chain_pem)[0]
        self.assertNotEqual(new_server_cert, first_server_cert)

        after = yield self.connect(port, creator)
        self.assertEqual((yield after.exchange(b"two")), b"two")
        self.assertEqual(after.transport.getPeerCertificate().to_cryptography(), new_server_cert)
        self.assertEqual((yield bounded(echo.peers.get())).peer[1], new_client_cert)
        self.assertNotEqual(new_client_cert, first_client_cert)

        # The first connection is still up, on its first certificates.
        self.assertEqual((yield before.exchange(b"three")), b"three")
        self.assertEqual(before.transport.getPeerCertificate().to_cryptography(), first_server_cert)


class OpenSSLVerifyTests(unittest.TestCase):
    """
    The chains the CA issues verify with the real C{openssl verify}.
    """

    def setUp(self) -> None:
        if OPENSSL is None:
            raise unittest.SkipTest("openssl binary not found: cannot cross-check issued chains")
        self.dir = tempfile.mkdtemp(prefix="txmesh-mesh-tls-openssl-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def verify(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([OPENSSL, "verify", *args], capture_output=True, text=True, timeout=10, check=False)

    def test_intermediate_chain(self) -> None:
        """
        C{openssl verify -CAfile root.pem -untrusted chain.pem leaf.pem} of a
        workload chain under an intermediate succeeds, and fails without the
        intermediate.
        """
        ca = plugged_intermediate_ca(os.path.join(self.dir, "ca"))
        identity = issue(ca, "web")
        chain = x509.load_pem_x509_certificates(identity.chain_pem)
        self.assertEqual(len(chain), 2)
        pem = serialization.Encoding.PEM
        leaf = self.write("leaf.pem", chain[0].public_bytes(pem))
        untrusted = self.write("chain.pem", b"".join(c.public_bytes(pem) for c in chain[1:]))
        root = self.write("root.pem", ca.root_pem)
        ok = self.verify("-CAfile", root, "-untrusted", untrusted, leaf)
        self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
        self.assertIn(f"{leaf}: OK", ok.stdout)
        ok = self.verify("-CAfile", root, "-untrusted", untrusted, "-purpose", "sslclient", leaf)
        self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
        ok = self.verify("-CAfile", root, "-untrusted", untrusted, "-purpose", "sslserver", leaf)
        self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
        missing = self.verify("-CAfile", root, leaf)
        self.assertNotEqual(missing.returncode, 0, missing.stdout)

    def test_generated_root(self) -> None:
        """
        A leaf of the generated root verifies against C{root-cert.pem}, and
        not against another CA's root.
        """
        ca = CertificateAuthority.load_or_create(os.path.join(self.dir, "ca"), TRUST_DOMAIN, _now())
        identity = issue(ca, "web")
        leaf = self.write("leaf.pem", identity.chain_pem)
        ok = self.verify("-CAfile", os.path.join(self.dir, "ca", "root-cert.pem"), leaf)
        self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
        other = CertificateAuthority.load_or_create(os.path.join(self.dir, "other"), TRUST_DOMAIN, _now())
        bad = self.verify("-CAfile", self.write("other.pem", other.root_pem), leaf)
        self.assertNotEqual(bad.returncode, 0, bad.stdout)
