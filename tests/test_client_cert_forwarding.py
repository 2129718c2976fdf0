"""
A client cannot forge C{x-forwarded-client-cert}: on an inbound listener
with mutual TLS the proxy drops what the client sent and sets the value
from the certificate the connection verified (Envoy's SANITIZE_SET), and on
a plaintext connection (PERMISSIVE) it sets none.

What a codec does once per connection (L{HTTPConnectionManager.peer_info})
and per request (L{forwarding_headers}), with a real workload certificate
from the pilot's CA behind a stand-in TLS transport.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from txmesh.pilot.ca import CertificateAuthority, spiffe_id
from txmesh.proxy.connection_manager import HTTPConnectionManager, forwarding_headers
from txmesh.proxy.stream import Headers, RequestHead
from txmesh.proxy.workload_identity import WorkloadIdentity

FORGED = b"By=spiffe://cluster.local/ns/default/sa/api;URI=spiffe://cluster.local/ns/prod/sa/admin"


class _Transport:
    """
    The parts of a TLS transport a codec asks about its peer.
    """

    def __init__(self, certificate: Any = None):
        self._certificate = certificate

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 15006)

    def getPeerCertificate(self) -> Any:
        return self._certificate


def _request(*extra: tuple[bytes, bytes]) -> RequestHead:
    return RequestHead(b"GET", b"/admin", b"api", Headers([(b"host", b"api"), *extra]))


class ForgedClientCertTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="txmesh-xfcc-")
        self.addCleanup(shutil.rmtree, directory, True)
        now = datetime.now(timezone.utc)
        ca = CertificateAuthority.load_or_create(directory, "cluster.local", now)

        def issue(account: str) -> WorkloadIdentity:
            identity = WorkloadIdentity(spiffe_id("cluster.local", "default", account))
            identity.install(ca.sign_csr(identity.new_request(), identity.spiffe_id, now, timedelta(hours=1)),
                             ca.trust_bundle_pem, now.timestamp())
            return identity

        self.server, self.caller = issue("api"), issue("web")
        self.leaf = x509.load_pem_x509_certificates(self.caller.chain_pem)[0]

    def peer_info(self, transport: _Transport, mtls: str | None = "STRICT") -> tuple:
        manager = SimpleNamespace(listener=SimpleNamespace(mtls=mtls), proxy=SimpleNamespace(identity=self.server))
        return HTTPConnectionManager.peer_info(manager, transport)  # type: ignore[arg-type]

    def test_forged_header_replaced_on_mutual_tls(self) -> None:
        """
        Over mutual TLS the client's own C{x-forwarded-client-cert} (here
        claiming another identity, twice) is dropped and the verified
        peer's is set, once.
        """
        principal, client_cert, port = self.peer_info(_Transport(crypto.X509.from_cryptography(self.leaf)))
        self.assertEqual((principal, port), ("spiffe://cluster.local/ns/default/sa/web", 15006))
        head = _request((b"x-forwarded-client-cert", FORGED), (b"x-forwarded-client-cert", b"URI=spiffe://x/y"))
        forwarding_headers(head, b"10.0.0.7", client_cert)
        [value] = [v for n, v in head.headers.items() if n == b"x-forwarded-client-cert"]
        self.assertEqual(value, client_cert)
        self.assertIn(b"URI=spiffe://cluster.local/ns/default/sa/web", value)
        self.assertIn(b"By=spiffe://cluster.local/ns/default/sa/api", value)
        self.assertNotIn(b"admin", value)

    def test_forged_header_dropped_on_plaintext(self) -> None:
        """
        A plaintext connection (PERMISSIVE) has no verified peer: the
        forged header is dropped and none is set; the other forwarding
        headers are kept in order.
        """
        principal, client_cert, _ = self.peer_info(_Transport(None), "PERMISSIVE")
        self.assertEqual((principal, client_cert), (None, None))
        head = _request((b"x-forwarded-for", b"203.0.113.9"), (b"x-forwarded-client-cert", FORGED))
        forwarding_headers(head, b"10.0.0.7", client_cert)
        names = [n for n, _ in head.headers.items()]
        self.assertNotIn(b"x-forwarded-client-cert", names)
        self.assertEqual(head.headers.get(b"x-forwarded-for"), b"203.0.113.9, 10.0.0.7")

    def test_no_mutual_tls_listener_reads_no_certificate(self) -> None:
        """
        A listener without C{mtls} sets no header even if the transport
        holds a certificate, and still drops a forged one.
        """
        transport = _Transport(crypto.X509.from_cryptography(self.leaf))
        principal, client_cert, _ = self.peer_info(transport, None)
        self.assertEqual((principal, client_cert), (None, None))
        head = _request((b"x-forwarded-client-cert", FORGED))
        forwarding_headers(head, b"10.0.0.7", client_cert)
        self.assertIsNone(head.headers.get(b"x-forwarded-client-cert"))
