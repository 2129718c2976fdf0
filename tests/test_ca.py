"""
Tests for L{txmesh.pilot.ca}: the CA directory (generated and
operator-provided), server certificates, CSR signing, and TLS between
L{server_tls_options} and L{client_tls_options} on loopback sockets.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from service_identity import VerificationError as ServiceIdentityError
from twisted.internet import defer, reactor
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest

from txmesh.pilot.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_CHAIN_FILE,
    CLOCK_SKEW,
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    CAError,
    CertificateAuthority,
    IssuedCertificate,
    client_tls_options,
    parse_spiffe_id,
    server_tls_options,
    spiffe_id,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
TD = "cluster.local"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(cn: str, issuer: tuple[Any, x509.Certificate] | None = None, ca: bool = True,
             days: int = 365) -> tuple[Any, x509.Certificate]:
    """
    An operator's CA certificate: self-signed, or signed by C{issuer}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "operator"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_key, signer_name = (key, name) if issuer is None else (issuer[0], issuer[1].subject)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(signer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
    )
    return key, builder.sign(signer_key, hashes.SHA256())


def _csr(key: Any, cn: str = "requested", dns: str = "evil.example") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _write(directory: str, name: str, data: bytes) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def _server_verifier(root_pem: bytes, name: x509.verification.Subject, at: datetime = NOW) -> Any:
    store = verification.Store(x509.load_pem_x509_certificates(root_pem))
    return verification.PolicyBuilder().store(store).time(at).build_server_verifier(name)


class SpiffeIdTests(unittest.SynchronousTestCase):
    def test_format(self) -> None:
        self.assertEqual(spiffe_id("cluster.local", "default", "bookinfo-reviews"),
                         "spiffe://cluster.local/ns/default/sa/bookinfo-reviews")

    def test_round_trip(self) -> None:
        self.assertEqual(parse_spiffe_id("spiffe://td/ns/a/sa/b"), ("td", "a", "b"))

    def test_invalid_parts_are_named(self) -> None:
        for args, field in [(("Cluster.local", "a", "b"), "trust_domain"), (("", "a", "b"), "trust_domain"),
                            (("td/x", "a", "b"), "trust_domain"), (("td", "Default", "b"), "namespace"),
                            (("td", "-a", "b"), "namespace"), (("td", "a" * 64, "b"), "namespace"),
                            (("td", "a", ""), "service_account"), (("td", "a", "b.c"), "service_account")]:
            e = self.assertRaises(ValueError, spiffe_id, *args)
            self.assertTrue(str(e).startswith(f"{field}:"), (args, str(e)))

    def test_parse_refuses_other_shapes(self) -> None:
        for value in ["spiffe://td/ns/a", "spiffe://td/ns/a/sa/b/c", "https://td/ns/a/sa/b",
                      "spiffe://td/ns/A/sa/b", "spiffe://td/sa/b/ns/a"]:
            self.assertRaises(ValueError, parse_spiffe_id, value)


class GeneratedRootTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(self.mktemp(), "ca")

    def test_creates_directory_and_root(self) -> None:
        ca = CertificateAuthority.load_or_create(self.dir, TD, NOW)
        self.assertTrue(ca.generated)
        self.assertEqual(sorted(os.listdir(self.dir)), [ROOT_CERT_FILE, ROOT_KEY_FILE])
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, ROOT_KEY_FILE)).st_mode), 0o600)
        with open(os.path.join(self.dir, ROOT_CERT_FILE), "rb") as f:
            self.assertEqual(f.read(), ca.root_pem)
        with open(os.path.join(self.dir, ROOT_KEY_FILE), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)

        root = x509.load_pem_x509_certificate(ca.root_pem)
        self.assertEqual(root.subject.rfc4514_string(), "CN=txmesh root CA cluster.local,O=txmesh")
        self.assertEqual(root.issuer, root.subject)
        root.verify_directly_issued_by(root)
        constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = root.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.key_cert_sign and usage.value.crl_sign)
        self.assertFalse(usage.value.digital_signature)
        self.assertEqual(root.not_valid_after_utc - NOW, timedelta(days=3650))
        self.assertEqual(ca.chain_pem, b"")

    def test_reload_uses_the_same_root(self) -> None:
        first = CertificateAuthority.load_or_create(self.dir, TD, NOW)
        second = CertificateAuthority.load_or_create(self.dir, TD, NOW + timedelta(days=30))
        self.assertEqual(second.root_pem, first.root_pem)
        issued = second.issue_server_certificate(["pilot.mesh"], [], NOW, timedelta(hours=1))
        _server_verifier(first.root_pem, x509.DNSName("pilot.mesh")).verify(
            x509.load_pem_x509_certificate(issued.certificate_pem), [])

    def test_existing_empty_directory(self) -> None:
        os.makedirs(self.dir)
        ca = CertificateAuthority.load_or_create(self.dir, TD, NOW)
        self.assertTrue(ca.generated)

    def test_missing_certificate_is_not_regenerated(self) -> None:
        CertificateAuthority.load_or_create(self.dir, TD, NOW)
        os.unlink(os.path.join(self.dir, ROOT_CERT_FILE))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, ROOT_CERT_FILE))
        self.assertIn("missing, but root-key.pem exists", str(e))
        self.assertFalse(os.path.exists(os.path.join(self.dir, ROOT_CERT_FILE)))

    def test_missing_key(self) -> None:
        CertificateAuthority.load_or_create(self.dir, TD, NOW)
        os.unlink(os.path.join(self.dir, ROOT_KEY_FILE))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, ROOT_KEY_FILE))

    def test_mismatched_key(self) -> None:
        CertificateAuthority.load_or_create(self.dir, TD, NOW)
        _write(self.dir, ROOT_KEY_FILE, _key_pem(ec.generate_private_key(ec.SECP256R1())))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(str(e), f"{os.path.join(self.dir, ROOT_KEY_FILE)}: does not match root-cert.pem "
                                 "(its public key differs)")

    def test_garbage_files(self) -> None:
        CertificateAuthority.load_or_create(self.dir, TD, NOW)
        _write(self.dir, ROOT_CERT_FILE, b"not a certificate")
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, ROOT_CERT_FILE))
        self.assertIn("not a PEM certificate", e.reason)
        _write(self.dir, ROOT_KEY_FILE, b"not a key")
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, ROOT_KEY_FILE))
        self.assertIn("not a PEM private key", e.reason)

    def test_unreadable_file(self) -> None:
        # A directory where the key should be: unreadable even for root.
        os.makedirs(os.path.join(self.dir, ROOT_KEY_FILE))
        _write(self.dir, ROOT_CERT_FILE, b"")
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, ROOT_KEY_FILE))
        self.assertIn("cannot read", e.reason)

    def test_other_trust_domain(self) -> None:
        CertificateAuthority.load_or_create(self.dir, TD, NOW)
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, "other.mesh", NOW)
        self.assertIn("made for trust domain 'cluster.local', not 'other.mesh'", str(e))

    def test_expired_root(self) -> None:
        CertificateAuthority.load_or_create(self.dir, TD, NOW)
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD,
                              NOW + timedelta(days=3651))
        self.assertIn("expired at", str(e))

    def test_naive_now(self) -> None:
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, datetime(2026, 1, 1))
        self.assertIn("timezone-aware", str(e))
        self.assertFalse(os.path.exists(self.dir))

    def test_bad_trust_domain(self) -> None:
        self.assertRaises(ValueError, CertificateAuthority.load_or_create, self.dir, "Not A Domain", NOW)


class OperatorCATests(unittest.SynchronousTestCase):
    """
    C{ca-key.pem}, C{ca-cert.pem} and C{cert-chain.pem} as Istio's plug-in
    CA takes them.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.root = _make_ca("operator root", days=3000)
        self.intermediate = _make_ca("operator intermediate", issuer=self.root)

    def test_intermediate_with_chain(self) -> None:
        key, cert = self.intermediate
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert))
        # As Istio's tooling writes it: the intermediate, then the root.
        _write(self.dir, CERT_CHAIN_FILE, _pem(cert) + _pem(self.root[1]))
        ca = CertificateAuthority.load_or_create(self.dir, TD, NOW)
        self.assertFalse(ca.generated)
        self.assertEqual(ca.root_pem, _pem(self.root[1]))
        self.assertEqual(ca.chain_pem, _pem(cert))
        self.assertFalse(os.path.exists(os.path.join(self.dir, ROOT_KEY_FILE)))
        self.assertFalse(os.path.exists(os.path.join(self.dir, ROOT_CERT_FILE)))

        issued = ca.issue_server_certificate(["pilot.mesh"], [], NOW, timedelta(hours=1))
        self.assertEqual(issued.chain_pem, _pem(cert))
        leaf = x509.load_pem_x509_certificate(issued.certificate_pem)
        self.assertEqual(leaf.issuer, cert.subject)
        chain = _server_verifier(ca.root_pem, x509.DNSName("pilot.mesh")).verify(
            leaf, x509.load_pem_x509_certificates(issued.chain_pem))
        self.assertEqual(chain[-1], self.root[1])

    def test_intermediate_with_root_file(self) -> None:
        key, cert = self.intermediate
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert))
        _write(self.dir, ROOT_CERT_FILE, _pem(self.root[1]))
        ca = CertificateAuthority.load_or_create(self.dir, TD, NOW)
        self.assertEqual(ca.root_pem, _pem(self.root[1]))
        self.assertEqual(ca.chain_pem, _pem(cert))

    def test_operator_root(self) -> None:
        key, cert = self.root
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert))
        ca = CertificateAuthority.load_or_create(self.dir, TD, NOW)
        self.assertEqual(ca.root_pem, _pem(cert))
        self.assertEqual(ca.chain_pem, b"")
        self.assertEqual(os.listdir(self.dir).count(ROOT_KEY_FILE), 0)

    def test_rsa_operator_root(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa root")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(NOW - timedelta(days=1))
                .not_valid_after(NOW + timedelta(days=10))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert))
        ca = CertificateAuthority.load_or_create(self.dir, TD, NOW)
        chain = ca.sign_csr(_csr(ec.generate_private_key(ec.SECP256R1())), "spiffe://cluster.local/ns/a/sa/b",
                            NOW, timedelta(hours=1))
        x509.load_pem_x509_certificate(chain).verify_directly_issued_by(cert)

    def test_intermediate_without_root(self) -> None:
        key, cert = self.intermediate
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, CA_CERT_FILE))
        self.assertIn("no root was given", e.reason)

    def test_chain_to_another_root(self) -> None:
        key, cert = self.intermediate
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert))
        _write(self.dir, CERT_CHAIN_FILE, _pem(_make_ca("stranger")[1]))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, CERT_CHAIN_FILE))
        self.assertIn("the chain is broken", e.reason)

    def test_certificate_without_key(self) -> None:
        _write(self.dir, CA_CERT_FILE, _pem(self.root[1]))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, CA_KEY_FILE))

    def test_key_does_not_match(self) -> None:
        _write(self.dir, CA_KEY_FILE, _key_pem(self.intermediate[0]))
        _write(self.dir, CA_CERT_FILE, _pem(self.root[1]))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, CA_KEY_FILE))
        self.assertIn("does not match ca-cert.pem", e.reason)

    def test_not_a_ca_certificate(self) -> None:
        key, cert = _make_ca("leaf", issuer=self.root, ca=False)
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert))
        _write(self.dir, CERT_CHAIN_FILE, _pem(self.root[1]))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, CA_CERT_FILE))
        self.assertIn("not a CA certificate", e.reason)

    def test_chain_without_ca_files(self) -> None:
        _write(self.dir, CERT_CHAIN_FILE, _pem(self.root[1]))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, CERT_CHAIN_FILE))

    def test_expired_certificates_are_named_by_file(self) -> None:
        root = _make_ca("short root", days=0)
        key, cert = _make_ca("intermediate", issuer=root)
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert))
        _write(self.dir, CERT_CHAIN_FILE, _pem(root[1]))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, CERT_CHAIN_FILE))
        self.assertIn("'CN=short root,O=operator' expired at 2026-03-01T12:00:00+00:00", e.reason)
        key, cert = _make_ca("short intermediate", issuer=self.root, days=0)
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert))
        _write(self.dir, CERT_CHAIN_FILE, _pem(self.root[1]))
        e = self.assertRaises(CAError, CertificateAuthority.load_or_create, self.dir, TD, NOW)
        self.assertEqual(e.path, os.path.join(self.dir, CA_CERT_FILE))

    def test_leaf_does_not_outlive_the_ca(self) -> None:
        key, cert = self.intermediate
        _write(self.dir, CA_KEY_FILE, _key_pem(key))
        _write(self.dir, CA_CERT_FILE, _pem(cert) + _pem(self.root[1]))
        ca = CertificateAuthority.load_or_create(self.dir, TD, NOW)
        issued = ca.issue_server_certificate(["pilot.mesh"], [], NOW, timedelta(days=1000))
        self.assertEqual(issued.expires, cert.not_valid_after_utc)


class IssueTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = CertificateAuthority.load_or_create(self.mktemp(), TD, NOW)

    def test_server_certificate(self) -> None:
        issued = self.ca.issue_server_certificate(["pilot.mesh", "Pilot.Example.com"], ["127.0.0.1", "::1"], NOW,
                                                  timedelta(hours=12))
        self.assertIsInstance(issued, IssuedCertificate)
        leaf = x509.load_pem_x509_certificate(issued.certificate_pem)
        key = serialization.load_pem_private_key(issued.private_key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        self.assertEqual(leaf.public_key(), key.public_key())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["pilot.mesh", "pilot.example.com"])
        self.assertEqual([str(a) for a in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1", "::1"])
        self.assertEqual(san.get_values_for_type(x509.UniformResourceIdentifier), [])
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertFalse(leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(leaf.subject.rfc4514_string(), "CN=pilot.mesh,O=txmesh")
        self.assertEqual(leaf.not_valid_before_utc, NOW - CLOCK_SKEW)
        self.assertEqual(leaf.not_valid_after_utc, NOW + timedelta(hours=12))
        self.assertEqual(issued.expires, NOW + timedelta(hours=12))
        self.assertEqual(issued.chain_pem, b"")
        self.assertEqual(issued.full_chain_pem, issued.certificate_pem)

        for name in [x509.DNSName("pilot.mesh"), x509.DNSName("pilot.example.com"),
                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]:
            _server_verifier(self.ca.root_pem, name).verify(leaf, [])
        self.assertRaises(verification.VerificationError,
                          _server_verifier(self.ca.root_pem, x509.DNSName("other.mesh")).verify, leaf, [])
        self.assertRaises(verification.VerificationError,
                          _server_verifier(self.ca.root_pem, x509.DNSName("pilot.mesh"),
                                           NOW + timedelta(hours=13)).verify, leaf, [])

    def test_server_certificate_pyopenssl_store(self) -> None:
        issued = self.ca.issue_server_certificate(["pilot.mesh"], [], NOW, timedelta(hours=1))
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(x509.load_pem_x509_certificate(self.ca.root_pem)))
        store.set_time(NOW.replace(tzinfo=None))
        leaf = crypto.X509.from_cryptography(x509.load_pem_x509_certificate(issued.certificate_pem))
        crypto.X509StoreContext(store, leaf).verify_certificate()
        other = CertificateAuthority.load_or_create(self.mktemp(), TD, NOW)
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(x509.load_pem_x509_certificate(other.root_pem)))
        self.assertRaises(crypto.X509StoreContextError, crypto.X509StoreContext(store, leaf).verify_certificate)

    def test_server_certificate_bad_input(self) -> None:
        for dns, ips, ttl, expected in [
            ([], [], timedelta(hours=1), "at least one DNS name or IP address"),
            (["bad name"], [], timedelta(hours=1), "dns_names: 'bad name'"),
            (["-x.mesh"], [], timedelta(hours=1), "dns_names: '-x.mesh'"),
            (["a..b"], [], timedelta(hours=1), "dns_names"),
            ([], ["300.1.1.1"], timedelta(hours=1), "ip_addresses: '300.1.1.1'"),
            (["pilot.mesh"], [], timedelta(0), "ttl must be positive"),
        ]:
            e = self.assertRaises(CAError, self.ca.issue_server_certificate, dns, ips, NOW, ttl)
            self.assertIn(expected, str(e))

    def test_ip_only_certificate(self) -> None:
        issued = self.ca.issue_server_certificate([], ["10.0.0.7"], NOW, timedelta(hours=1))
        leaf = x509.load_pem_x509_certificate(issued.certificate_pem)
        self.assertEqual(leaf.subject.rfc4514_string(), "CN=10.0.0.7,O=txmesh")


class SignCSRTests(unittest.SynchronousTestCase):
    SPIFFE = "spiffe://cluster.local/ns/default/sa/reviews"

    def setUp(self) -> None:
        self.ca = CertificateAuthority.load_or_create(self.mktemp(), TD, NOW)

    def test_signs_with_spiffe_id_only(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = self.ca.sign_csr(_csr(key), self.SPIFFE, NOW, timedelta(hours=1))
        certs = x509.load_pem_x509_certificates(pem)
        self.assertEqual(len(certs), 1)
        leaf = certs[0]
        self.assertEqual(leaf.public_key(), key.public_key())
        self.assertEqual(len(leaf.subject), 0)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertTrue(san.critical)
        self.assertEqual(list(san.value), [x509.UniformResourceIdentifier(self.SPIFFE)])
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(set(eku), {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH})
        self.assertFalse(leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(leaf.not_valid_after_utc, NOW + timedelta(hours=1))

        store = verification.Store([x509.load_pem_x509_certificate(self.ca.root_pem)])
        verifier = verification.PolicyBuilder().store(store).time(NOW).build_client_verifier()
        verified = verifier.verify(leaf, [])
        self.assertEqual(list(verified.subjects or []), [x509.UniformResourceIdentifier(self.SPIFFE)])

    def test_bad_signature(self) -> None:
        der = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1()), cn="aaaaaaaa")).public_bytes(
            serialization.Encoding.DER)
        self.assertEqual(der.count(b"aaaaaaaa"), 1)
        tampered = x509.load_der_x509_csr(der.replace(b"aaaaaaaa", b"aaaaaaab"))
        self.assertFalse(tampered.is_signature_valid)
        e = self.assertRaises(CAError, self.ca.sign_csr, tampered.public_bytes(serialization.Encoding.PEM),
                              self.SPIFFE, NOW, timedelta(hours=1))
        self.assertIn("signature does not verify", str(e))

    def test_rsa_key_refused(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        e = self.assertRaises(CAError, self.ca.sign_csr, _csr(key), self.SPIFFE, NOW, timedelta(hours=1))
        self.assertEqual(str(e), "the CSR's key must be ECDSA P-256, got RSA 2048")

    def test_other_curve_refused(self) -> None:
        key = ec.generate_private_key(ec.SECP384R1())
        e = self.assertRaises(CAError, self.ca.sign_csr, _csr(key), self.SPIFFE, NOW, timedelta(hours=1))
        self.assertEqual(str(e), "the CSR's key must be ECDSA P-256, got ECDSA secp384r1")

    def test_garbage(self) -> None:
        e = self.assertRaises(CAError, self.ca.sign_csr, b"hello", self.SPIFFE, NOW, timedelta(hours=1))
        self.assertIn("not a PEM certificate signing request", str(e))

    def test_spiffe_id_checked(self) -> None:
        csr = _csr(ec.generate_private_key(ec.SECP256R1()))
        e = self.assertRaises(CAError, self.ca.sign_csr, csr, "spiffe://other.mesh/ns/a/sa/b", NOW,
                              timedelta(hours=1))
        self.assertIn("not in this CA's trust domain 'cluster.local'", str(e))
        e = self.assertRaises(CAError, self.ca.sign_csr, csr, "spiffe://cluster.local/a/b", NOW, timedelta(hours=1))
        self.assertIn("is not a workload identity", str(e))

    def test_chain_from_intermediate(self) -> None:
        directory = self.mktemp()
        root = _make_ca("root")
        key, cert = _make_ca("intermediate", issuer=root)
        _write(directory, CA_KEY_FILE, _key_pem(key))
        _write(directory, CA_CERT_FILE, _pem(cert))
        _write(directory, CERT_CHAIN_FILE, _pem(root[1]))
        ca = CertificateAuthority.load_or_create(directory, TD, NOW)
        certs = x509.load_pem_x509_certificates(
            ca.sign_csr(_csr(ec.generate_private_key(ec.SECP256R1())), self.SPIFFE, NOW, timedelta(hours=1)))
        self.assertEqual(certs[1:], [cert])
        verifier = verification.PolicyBuilder().store(verification.Store([root[1]])).time(NOW) \
            .build_client_verifier()
        verifier.verify(certs[0], certs[1:])


class _Echo(Protocol):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


class _EchoFactory(Factory):
    protocol = _Echo

    def __init__(self) -> None:
        self.connections: list[_Echo] = []


class _PingClient(Protocol):
    """
    Sends C{ping}; L{done} fires with the echo and the server's certificate,
    or fails with the reason the connection was lost.
    """

    def __init__(self) -> None:
        self.received = b""
        self.peer: Any = None
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"ping":
            self.peer = self.transport.getPeerCertificate()
            self.version = self.transport.getHandle().get_protocol_version_name()
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if self.received == b"ping":
            self.done.callback((self.received, self.peer, self.version))
        else:
            self.done.errback(reason)


class LoopbackTLSTests(unittest.TestCase):
    """
    Real sockets on 127.0.0.1: the pilot's side from an endpoint string
    wrapped in TLS, a proxy's side via C{wrapClientTLS}.
    """

    timeout = 20

    def setUp(self) -> None:
        self.ca = CertificateAuthority.load_or_create(self.mktemp(), TD, NOW)
        # Handshakes check validity against the real clock.
        real_now = datetime.now(timezone.utc)
        self.issued = self.ca.issue_server_certificate(["pilot.mesh"], ["127.0.0.1"], real_now, timedelta(hours=1))

    @defer.inlineCallbacks
    def exchange(self, client_options: Any, server_options: Any = None) -> Any:
        factory = _EchoFactory()
        tls = TLSMemoryBIOFactory(server_options or server_tls_options(self.issued, None), False, factory)
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tls)
        self.addCleanup(port.stopListening)
        endpoint = wrapClientTLS(client_options, clientFromString(reactor, f"tcp:127.0.0.1:{port.getHost().port}"))
        client = _PingClient()
        yield connectProtocol(endpoint, client)
        try:
            result = yield client.done
        finally:
            # Let the server see its side close, so the reactor is clean.
            yield defer.gatherResults([c.lost for c in factory.connections])
        return result

    @defer.inlineCallbacks
    def test_echo(self) -> None:
        data, peer, version = yield self.exchange(client_tls_options("pilot.mesh", self.ca.root_pem))
        self.assertEqual(data, b"ping")
        self.assertEqual(peer.to_cryptography(), x509.load_pem_x509_certificate(self.issued.certificate_pem))
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    @defer.inlineCallbacks
    def test_echo_by_ip_address(self) -> None:
        data, _, _ = yield self.exchange(client_tls_options("127.0.0.1", self.ca.root_pem))
        self.assertEqual(data, b"ping")

    @defer.inlineCallbacks
    def test_client_trusting_another_root_fails(self) -> None:
        other = CertificateAuthority.load_or_create(self.mktemp(), TD, NOW)
        d = self.exchange(client_tls_options("pilot.mesh", other.root_pem))
        failure = yield self.assertFailure(d, SSL.Error)
        self.assertIn("certificate verify failed", str(failure))

    @defer.inlineCallbacks
    def test_wrong_hostname_fails(self) -> None:
        d = self.exchange(client_tls_options("other.mesh", self.ca.root_pem))
        failure = yield self.assertFailure(d, ServiceIdentityError)
        self.assertIn("other.mesh", str(failure))

    @defer.inlineCallbacks
    def test_mutual_tls_requires_a_client_certificate(self) -> None:
        server = server_tls_options(self.issued, self.ca.root_pem)
        d = self.exchange(client_tls_options("pilot.mesh", self.ca.root_pem), server)
        yield self.assertFailure(d, SSL.Error)

    @defer.inlineCallbacks
    def test_tls_1_1_client_refused(self) -> None:
        from twisted.internet.ssl import CertificateOptions, TLSVersion

        client = CertificateOptions(insecurelyLowerMinimumTo=TLSVersion.TLSv1_0, lowerMaximumSecurityTo=TLSVersion.TLSv1_1)
        d = self.exchange(client)
        yield self.assertFailure(d, SSL.Error)


class TLSOptionsTests(unittest.SynchronousTestCase):
    def test_client_needs_roots(self) -> None:
        e = self.assertRaises(CAError, client_tls_options, "pilot.mesh", b"")
        self.assertIn("never the system's", str(e))
        self.assertRaises(CAError, client_tls_options, "pilot.mesh", b"garbage")

    def test_server_options_refuse_mismatched_key(self) -> None:
        ca = CertificateAuthority.load_or_create(self.mktemp(), TD, NOW)
        one = ca.issue_server_certificate(["a.mesh"], [], NOW, timedelta(hours=1))
        two = ca.issue_server_certificate(["b.mesh"], [], NOW, timedelta(hours=1))
        mixed = IssuedCertificate(two.private_key_pem, one.certificate_pem, b"", one.expires)
        e = self.assertRaises(CAError, server_tls_options, mixed)
        self.assertIn("does not match the certificate", str(e))

    def test_server_minimum_version(self) -> None:
        ca = CertificateAuthority.load_or_create(self.mktemp(), TD, NOW)
        options = server_tls_options(ca.issue_server_certificate(["a.mesh"], [], NOW, timedelta(hours=1)))
        self.assertIsNone(options._acceptableProtocols)
        context = options.getContext()
        self.assertTrue(context.set_options(0) & SSL.OP_NO_TLSv1_1)
