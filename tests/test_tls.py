"""
Downstream TLS termination: the context builder (L{txmesh.proxy.tls}), the
listener's C{tls} config section, and real TLS clients (curl, Python's
C{ssl}) through an in-process proxy to a plaintext upstream.

Certificates (an ECDSA P-256 CA and a server certificate it signs) are made
at test time with C{cryptography}.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import socket
import ssl
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import ProxyHarness, RecordingFactory, curl, fixed_response, listen_upstream
from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.config.model import ListenerConfig, ListenerTLS
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory
from txmesh.proxy.http1_server import HTTP1ServerFactory
from txmesh.proxy.service import ProxyService
from txmesh.proxy.tls import TLSConfigError, TLSListenerFactory, negotiated_protocol, server_options

# Generation


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem_key(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca() -> tuple[x509.Certificate, Any]:
    """
    @return: a self-signed CA certificate and its key.
    """
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "txmesh test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_server_cert(ca: x509.Certificate, ca_key: Any, cn: str = "localhost",
                     names: tuple[str, ...] = ("localhost",), client: bool = False) -> tuple[x509.Certificate, Any]:
    """
    @param names: the DNS names it is for.
    @param client: a client certificate (extended key usage C{clientAuth}).
    @return: a certificate for C{names} and C{127.0.0.1} signed by C{ca},
        and its key.
    """
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            *(x509.DNSName(n) for n in names), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client
                                              else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


class Certificates:
    """
    A CA and a server certificate written as PEM files in a temporary
    directory: C{ca.pem}, C{server.pem}, C{server.key}.
    """

    def __init__(self, testcase: Any):
        self.dir = tempfile.mkdtemp(prefix="txmesh-tls-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.ca, self.ca_key = make_ca()
        self.write("ca.pem", pem_cert(self.ca))
        self.renew()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write(self, name: str, data: bytes) -> str:
        with open(self.path(name), "wb") as f:
            f.write(data)
        return self.path(name)

    def renew(self, cn: str = "localhost") -> x509.Certificate:
        """
        Issue a new server certificate and key and write them.
        """
        self.cert, self.key = make_server_cert(self.ca, self.ca_key, cn)
        self.cert_pem, self.key_pem = pem_cert(self.cert), pem_key(self.key)
        self.write("server.pem", self.cert_pem)
        self.write("server.key", self.key_pem)
        return self.cert


def _registry() -> FilterRegistry:
    return FilterRegistry(http=[RouterFactory()])


# The context builder


class ServerOptionsTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.certs = Certificates(self)

    def test_builds_context_with_chain(self) -> None:
        options = server_options(self.certs.cert_pem + pem_cert(self.certs.ca), self.certs.key_pem)
        self.assertIsNotNone(options.getContext())

    def test_mismatched_key(self) -> None:
        e = self.assertRaises(TLSConfigError, server_options, self.certs.cert_pem, pem_key(_key()))
        self.assertEqual(e.part, "private_key")
        self.assertIn("does not match", e.reason)

    def test_garbage_certificate(self) -> None:
        e = self.assertRaises(TLSConfigError, server_options, b"not a certificate", self.certs.key_pem)
        self.assertEqual(e.part, "certificate")

    def test_garbage_key(self) -> None:
        e = self.assertRaises(TLSConfigError, server_options, self.certs.cert_pem, b"-----BEGIN PRIVATE KEY-----\n")
        self.assertEqual(e.part, "private_key")

    def test_bad_alpn(self) -> None:
        e = self.assertRaises(TLSConfigError, server_options, self.certs.cert_pem, self.certs.key_pem, [b"spdy/3"])
        self.assertEqual(e.part, "alpn")

    def test_bad_min_version(self) -> None:
        e = self.assertRaises(TLSConfigError, server_options, self.certs.cert_pem, self.certs.key_pem,
                              min_version="1.1")
        self.assertEqual(e.part, "min_version")

    def test_client_ca_for_mtls(self) -> None:
        options = server_options(self.certs.cert_pem, self.certs.key_pem, client_ca_pem=pem_cert(self.certs.ca))
        self.assertTrue(options.verify)
        e = self.assertRaises(TLSConfigError, server_options, self.certs.cert_pem, self.certs.key_pem,
                              client_ca_pem=b"junk")
        self.assertEqual(e.part, "client_ca")

    def test_negotiated_protocol_of_plain_transport(self) -> None:
        self.assertIsNone(negotiated_protocol(object()))


# The config section

LISTENER = """
listeners:
  - name: https
    address: "tcp:0:interface=127.0.0.1"
    routes: [{match: {prefix: /}, cluster: app}]
    tls:
%s
clusters:
  - {name: app, endpoints: ["127.0.0.1:1"]}
"""


class LoaderTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.certs = Certificates(self)
        self.source = self.certs.path("proxy.yaml")

    def load(self, tls: str) -> Any:
        text = LISTENER % "\n".join("      " + line for line in tls.strip().splitlines())
        return ConfigLoader(_registry()).load_bytes(text.encode(), self.source)

    def fails(self, tls: str) -> ConfigError:
        return self.assertRaises(ConfigError, self.load, tls)

    def test_defaults_and_relative_paths(self) -> None:
        listener = self.load("certificate: server.pem\nprivate_key: server.key").listeners[0]
        self.assertEqual(listener.scheme, b"https")
        self.assertEqual(listener.tls.alpn, (b"h2", b"http/1.1"))
        self.assertEqual(listener.tls.min_version, "1.2")
        self.assertEqual(listener.tls.certificate_pem, self.certs.cert_pem)
        self.assertEqual(listener.tls.certificate, "server.pem")

    def test_plain_listener_is_http(self) -> None:
        text = (LISTENER % "").replace("    tls:\n", "")
        listener = ConfigLoader(_registry()).load_bytes(text.encode(), self.source).listeners[0]
        self.assertEqual((listener.scheme, listener.tls), (b"http", None))

    def test_options(self) -> None:
        tls = self.load("certificate: server.pem\nprivate_key: server.key\nalpn: [http/1.1]\nmin_version: '1.3'")
        self.assertEqual(tls.listeners[0].tls.alpn, (b"http/1.1",))
        self.assertEqual(tls.listeners[0].tls.min_version, "1.3")
        unquoted = self.load("certificate: server.pem\nprivate_key: server.key\nmin_version: 1.3")
        self.assertEqual(unquoted.listeners[0].tls.min_version, "1.3")

    def test_missing_file(self) -> None:
        e = self.fails("certificate: nowhere.pem\nprivate_key: server.key")
        self.assertEqual(e.source, self.source)
        self.assertEqual(e.field, "listeners[0].tls.certificate")
        self.assertIn("cannot read", e.reason)
        self.assertIn("nowhere.pem", e.reason)

    def test_missing_field(self) -> None:
        e = self.fails("certificate: server.pem")
        self.assertEqual((e.field, e.reason), ("listeners[0].tls.private_key", "is required (a PEM file, or private_key_pem with the PEM text)"))

    def test_garbage_pem(self) -> None:
        self.certs.write("garbage.pem", b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
        e = self.fails("certificate: garbage.pem\nprivate_key: server.key")
        self.assertEqual(e.field, "listeners[0].tls.certificate")
        self.assertIn("not a PEM certificate", e.reason)
        self.assertIn("garbage.pem", e.reason)

    def test_garbage_key(self) -> None:
        self.certs.write("garbage.key", b"hello")
        e = self.fails("certificate: server.pem\nprivate_key: garbage.key")
        self.assertEqual(e.field, "listeners[0].tls.private_key")
        self.assertIn("not a PEM private key", e.reason)

    def test_mismatched_key(self) -> None:
        self.certs.write("other.key", pem_key(_key()))
        e = self.fails("certificate: server.pem\nprivate_key: other.key")
        self.assertEqual(e.field, "listeners[0].tls.private_key")
        self.assertIn("does not match the certificate", e.reason)
        self.assertIn("other.key", e.reason)

    def test_bad_alpn(self) -> None:
        e = self.fails("certificate: server.pem\nprivate_key: server.key\nalpn: [http/1.1, spdy/3]")
        self.assertEqual(e.field, "listeners[0].tls.alpn[1]")
        self.assertIn("spdy/3", e.reason)

    def test_empty_alpn(self) -> None:
        e = self.fails("certificate: server.pem\nprivate_key: server.key\nalpn: []")
        self.assertEqual(e.field, "listeners[0].tls.alpn")

    def test_bad_min_version(self) -> None:
        e = self.fails("certificate: server.pem\nprivate_key: server.key\nmin_version: '1.1'")
        self.assertEqual(e.field, "listeners[0].tls.min_version")

    def test_unknown_field(self) -> None:
        e = self.fails("certificate: server.pem\nprivate_key: server.key\nciphers: ALL")
        self.assertEqual(e.field, "listeners[0].tls.ciphers")

    def test_inline_pem_client_ca_and_sni(self) -> None:
        other, other_key = make_server_cert(self.certs.ca, self.certs.ca_key, "api", names=("api.example.com",))
        self.certs.write("api.pem", pem_cert(other))
        self.certs.write("api.key", pem_key(other_key))
        cert = json.dumps(self.certs.cert_pem.decode())
        key = json.dumps(self.certs.key_pem.decode())
        tls = self.load(f"certificate_pem: {cert}\nprivate_key_pem: {key}\nclient_ca: ca.pem\n"
                        "sni: [{server_names: [api.example.com, '*.api.example.com'], certificate: api.pem, "
                        "private_key: api.key}]").listeners[0].tls
        self.assertEqual((tls.certificate, tls.certificate_pem), ("<inline>", self.certs.cert_pem))
        self.assertTrue(tls.client_ca_pem.startswith(b"-----BEGIN CERTIFICATE-----"))
        [entry] = tls.sni
        self.assertEqual(entry.server_names, ("api.example.com", "*.api.example.com"))
        self.assertEqual(entry.certificate_pem, pem_cert(other))
        self.assertEqual(entry.client_ca_pem, b"")

    def test_sni_errors(self) -> None:
        e = self.fails("certificate: server.pem\nprivate_key: server.key\nsni: [{certificate: server.pem, "
                       "private_key: server.key}]")
        self.assertEqual((e.field, e.reason), ("listeners[0].tls.sni[0].server_names", "is required"))
        self.certs.write("other.key", pem_key(_key()))
        e = self.fails("certificate: server.pem\nprivate_key: server.key\nsni: [{server_names: [a], "
                       "certificate: server.pem, private_key: other.key}]")
        self.assertEqual(e.field, "listeners[0].tls.sni[0].private_key")
        self.assertIn("other.key", e.reason)
        e = self.fails("certificate: server.pem\ncertificate_pem: x\nprivate_key: server.key")
        self.assertEqual(e.field, "listeners[0].tls.certificate")
        self.assertIn("not both", e.reason)
        e = self.fails("certificate: server.pem\nprivate_key: server.key\nserver_names: [a]")
        self.assertEqual(e.field, "listeners[0].tls.server_names")


# Real sockets

PROXY = """
    listeners:
      - name: https
        address: "tcp:0:interface=127.0.0.1"
        routes: [{match: {prefix: /}, cluster: app}]
        tls: {certificate: server.pem, private_key: server.key, min_version: "{min_version}",
               alpn: {alpn}}
    clusters:
      - {name: app, endpoints: ["127.0.0.1:{up}"]}
    """


def _ssl_get(port: int, ca: str, alpn: list[str] | None = None,
             maximum: ssl.TLSVersion | None = None) -> tuple[str | None, bytes, str, bytes]:
    """
    A blocking TLS client (run it in a thread): one GET.

    @return: the ALPN result, the server's certificate (DER), the TLS
        version and everything received.
    """
    ctx = ssl.create_default_context(cafile=ca)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            info = tls.selected_alpn_protocol(), tls.getpeercert(binary_form=True), tls.version()
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return (*info, data)


class TLSProxyTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, min_version: str = "1.2", alpn: str = "[h2, http/1.1]") -> Any:
        self.upstream = RecordingFactory(fixed_response(b"hello"))
        up = yield listen_upstream(self, self.upstream)
        self.proxy = ProxyHarness(self, _registry())
        self.certs = Certificates(self)
        # The config lives beside the certificates: its paths are relative.
        self.proxy.path = self.certs.path("proxy.yaml")
        yield self.proxy.start(PROXY, up=up, min_version=min_version, alpn=alpn)
        self.port = self.proxy.port("https")
        self.url = f"https://localhost:{self.port}/"
        self.ca = self.certs.path("ca.pem")

    @defer.inlineCallbacks
    def test_curl_through_to_plain_upstream(self) -> None:
        yield self.start()
        out, err, code = yield curl("--cacert", self.ca, self.url)
        self.assertEqual((code, out), (0, b"hello"), err)
        self.assertIn(b"\r\nx-forwarded-proto: https\r\n", self.upstream.all_received().lower())

    @defer.inlineCallbacks
    def test_tls_1_1_refused(self) -> None:
        yield self.start()
        out, err, code = yield curl("--cacert", self.ca, "--tlsv1.0", "--tls-max", "1.1", self.url)
        self.assertNotEqual(code, 0)
        self.assertEqual(self.upstream.received, [])

    @defer.inlineCallbacks
    def test_min_version_1_3(self) -> None:
        yield self.start("1.3")
        out, err, code = yield curl("--cacert", self.ca, "--tls-max", "1.2", self.url)
        self.assertNotEqual(code, 0)
        alpn, _, version, data = yield deferToThread(_ssl_get, self.port, self.ca)
        self.assertEqual(version, "TLSv1.3")
        self.assertTrue(data.endswith(b"hello"), data)

    @defer.inlineCallbacks
    def test_curl_http1_alpn(self) -> None:
        yield self.start()
        out, err, code = yield curl("--cacert", self.ca, "--http1.1", "-o", "/dev/null", "-w", "%{http_version}",
                                    self.url)
        self.assertEqual((code, out), (0, b"1.1"), err)

    @defer.inlineCallbacks
    def test_ssl_client_alpn(self) -> None:
        yield self.start()
        alpn, der, version, data = yield deferToThread(_ssl_get, self.port, self.ca, ["http/1.1"])
        self.assertEqual(alpn, "http/1.1")
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertTrue(data.endswith(b"hello"), data)

    @defer.inlineCallbacks
    def test_ssl_client_tls_1_1_refused(self) -> None:
        yield self.start()
        d = deferToThread(_ssl_get, self.port, self.ca, None, ssl.TLSVersion.TLSv1_1)
        yield self.assertFailure(d, ssl.SSLError, OSError)

    @defer.inlineCallbacks
    def test_alpn_config_limits_offer(self) -> None:
        """
        A listener configured with C{alpn: [http/1.1]} does not offer h2, so
        h2-capable clients (curl by default) fall back instead of failing.
        """
        yield self.start(alpn="[http/1.1]")
        alpn = yield deferToThread(_ssl_alpn, self.port, self.ca, ["h2", "http/1.1"])
        self.assertEqual(alpn, "http/1.1")
        out, err, code = yield curl("--cacert", self.ca, "-w", "|%{http_version}", self.url)
        self.assertEqual((code, out), (0, b"hello|1.1"), err)

    def test_http1_only_factory_is_not_offered_h2(self) -> None:
        """
        ALPN offers only what the listener's factory speaks: offering h2 in
        front of an HTTP/1.1-only server would break h2-capable clients.
        """
        certs = Certificates(self)
        tls = ListenerTLS("server.pem", "server.key", certs.cert_pem, certs.key_pem)
        listener = ListenerConfig("https", "tcp:0", tls=tls, scheme=b"https")
        options = ProxyService._tls_options(None, listener, HTTP1ServerFactory(None))
        self.assertEqual(options._acceptableProtocols, [b"http/1.1"])

    @defer.inlineCallbacks
    def test_curl_http2(self) -> None:
        if importlib.util.find_spec("txmesh.proxy.listener") is None:
            raise unittest.SkipTest("no HTTP/2 listener factory yet (txmesh.proxy.listener)")
        yield self.start()
        alpn = yield deferToThread(_ssl_alpn, self.port, self.ca, ["h2", "http/1.1"])
        if alpn != "h2":
            raise unittest.SkipTest("the proxy's HTTP listeners do not speak HTTP/2 yet")
        out, err, code = yield curl("--cacert", self.ca, "--http2", "-w", "|%{http_version}", self.url)
        self.assertEqual((code, out), (0, b"hello|2"), err)
        self.assertIn(b"\r\nx-forwarded-proto: https\r\n", self.upstream.all_received().lower())

    @defer.inlineCallbacks
    def test_negotiated_protocol_helper(self) -> None:
        """
        L{negotiated_protocol} tells the ALPN result to the protocol inside
        TLS once data flows.
        """
        certs = Certificates(self)
        seen: list[bytes | None] = []

        class Echo(Protocol):
            def dataReceived(self, data: bytes) -> None:
                seen.append(negotiated_protocol(self.transport))
                self.transport.write(data)
                self.transport.loseConnection()

        options = server_options(certs.cert_pem, certs.key_pem)
        factory = TLSListenerFactory(options, Factory.forProtocol(Echo), clock=reactor)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        alpn = yield deferToThread(_ssl_alpn, port.getHost().port, certs.path("ca.pem"), ["h2"], b"x")
        self.assertEqual((alpn, seen), ("h2", [b"h2"]))

    @defer.inlineCallbacks
    def test_reload_uses_new_certificate(self) -> None:
        yield self.start()
        _, before, _, _ = yield deferToThread(_ssl_get, self.port, self.ca)
        self.assertEqual(before, self.certs.cert.public_bytes(serialization.Encoding.DER))
        renewed = self.certs.renew("localhost")
        applied = yield self.proxy.service.reload()
        self.assertTrue(applied)
        _, after, _, data = yield deferToThread(_ssl_get, self.port, self.ca)
        self.assertEqual(after, renewed.public_bytes(serialization.Encoding.DER))
        self.assertTrue(data.endswith(b"hello"), data)

    @defer.inlineCallbacks
    def test_reload_with_bad_key_keeps_serving(self) -> None:
        yield self.start()
        self.certs.write("server.key", pem_key(_key()))
        applied = yield self.proxy.service.reload()
        self.assertFalse(applied)
        self.flushLoggedErrors()
        out, err, code = yield curl("--cacert", self.ca, self.url)
        self.assertEqual((code, out), (0, b"hello"), err)


def _ssl_alpn(port: int, ca: str, alpn: list[str], send: bytes = b"") -> str | None:
    """
    A blocking TLS handshake (run it in a thread).

    @return: the protocol the server chose from C{alpn}.
    """
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            if send:
                tls.sendall(send)
                tls.recv(1024)
            return tls.selected_alpn_protocol()
