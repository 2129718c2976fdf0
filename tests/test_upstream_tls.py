"""
TLS origination to clusters (DestinationRule C{tls.mode: SIMPLE}): HTTP/1.1
and h2 over TLS to real upstreams, certificate verification, and config
errors.
"""

import datetime
import os
import textwrap

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.trial import unittest

from tests.support import Nginx, ProxyHarness, curl, free_port
from tests.test_tls import Certificates
from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory

PROXY = """
listeners:
  - name: http
    address: "tcp:0:interface=127.0.0.1"
    routes: [{match: {prefix: /}, cluster: app}]
clusters:
  - name: app
    endpoints: ["127.0.0.1:{port}"]
    http2: {http2}
    tls: {tls}
"""


def nginx_tls(testcase, certs, port):
    return Nginx(testcase, f"""
        server {{
          listen 127.0.0.1:{port} ssl http2;
          ssl_certificate {certs.path("server.pem")};
          ssl_certificate_key {certs.path("server.key")};
          location / {{ default_type text/plain; return 200 "proto=$server_protocol sni=$ssl_server_name\\n"; }}
        }}
        """)


class UpstreamTLSTests(unittest.TestCase):
    @defer.inlineCallbacks
    def proxy_to_tls(self, http2, tls):
        certs = Certificates(self)
        port = free_port()
        nginx = nginx_tls(self, certs, port)
        yield nginx.wait_listening(port)
        h = ProxyHarness(self)
        tls_yaml = tls.replace("CA", certs.path("ca.pem"))
        yield h.start(PROXY, port=port, http2="true" if http2 else "false", tls=tls_yaml)
        out, err, code = yield curl("-i", f"http://127.0.0.1:{h.port()}/")
        return out, h

    @defer.inlineCallbacks
    def test_http11_over_tls(self):
        out, _ = yield self.proxy_to_tls(False, "{ca_certificate: CA, sni: localhost}")
        self.assertIn(b"200 OK", out)
        self.assertIn(b"proto=HTTP/1.1 sni=localhost", out)

    @defer.inlineCallbacks
    def test_h2_over_tls(self):
        """
        C{http2: true} with C{tls}: ALPN negotiates h2 with the upstream.
        """
        out, _ = yield self.proxy_to_tls(True, "{ca_certificate: CA, sni: localhost}")
        self.assertIn(b"200 OK", out)
        self.assertIn(b"proto=HTTP/2.0 sni=localhost", out)

    @defer.inlineCallbacks
    def test_untrusted_upstream_is_refused(self):
        """
        An upstream whose certificate the cluster's CA did not sign gets no
        request: the client sees a 503 with an upstream failure flag.
        """
        other = Certificates(self)
        out, h = yield self.proxy_to_tls(False, "{ca_certificate: " + other.path("ca.pem") + "}")
        self.assertIn(b"503 Service Unavailable", out)
        self.assertRegex(out, rb"x-txmesh-flags: U[CF]")

    @defer.inlineCallbacks
    def test_name_mismatch_is_refused(self):
        out, _ = yield self.proxy_to_tls(False, "{ca_certificate: CA, sni: not-the-server.example}")
        self.assertIn(b"503 Service Unavailable", out)


def client_certificate(certs, cn="proxy-client"):
    """
    Write C{client.pem} and C{client.key}: a client certificate from the
    test CA (no extended key usage, so any purpose).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(certs.ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(certs.ca_key, hashes.SHA256())
    )
    certs.write("client.pem", cert.public_bytes(serialization.Encoding.PEM))
    certs.write("client.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))


class UpstreamMutualTLSTests(unittest.TestCase):
    """
    DestinationRule C{tls.mode: MUTUAL}: the proxy presents a client
    certificate from files to an upstream that requires one.
    """

    @defer.inlineCallbacks
    def start(self, tls):
        certs = Certificates(self)
        client_certificate(certs)
        port = free_port()
        nginx = Nginx(self, f"""
            server {{
              listen 127.0.0.1:{port} ssl;
              ssl_certificate {certs.path("server.pem")};
              ssl_certificate_key {certs.path("server.key")};
              ssl_client_certificate {certs.path("ca.pem")};
              ssl_verify_client on;
              location / {{ default_type text/plain; return 200 "client=$ssl_client_s_dn\n"; }}
            }}
            """)
        yield nginx.wait_listening(port)
        h = ProxyHarness(self)
        yield h.start(PROXY, port=port, http2="false", tls=tls.replace("DIR", certs.dir))
        out, _, _ = yield curl("-i", f"http://127.0.0.1:{h.port()}/")
        return out

    @defer.inlineCallbacks
    def test_client_certificate_presented(self):
        out = yield self.start("{mode: MUTUAL, ca_certificate: DIR/ca.pem, sni: localhost, "
                               "client_certificate: DIR/client.pem, private_key: DIR/client.key}")
        self.assertIn(b"200 OK", out)
        self.assertIn(b"client=CN=proxy-client", out)

    @defer.inlineCallbacks
    def test_without_it_refused(self):
        out = yield self.start("{ca_certificate: DIR/ca.pem, sni: localhost}")
        self.assertIn(b"400", out)  # nginx: "No required SSL certificate was sent"


class UpstreamTLSConfigTests(unittest.SynchronousTestCase):
    def load(self, tls, dir_=None):
        text = textwrap.dedent(PROXY).replace("{port}", "443").replace("{http2}", "false").replace("{tls}", tls)
        source = os.path.join(dir_ or "/nonexistent", "proxy.yaml")
        return ConfigLoader(FilterRegistry(http=[RouterFactory()])).load_bytes(text.encode(), source)

    def test_missing_ca_file(self):
        with self.assertRaises(ConfigError) as cm:
            self.load("{ca_certificate: nope.pem}")
        self.assertEqual(cm.exception.field, "clusters[0].tls.ca_certificate")
        self.assertIn("cannot read", cm.exception.reason)

    def test_garbage_ca_file(self):
        certs = Certificates(self)
        certs.write("bad.pem", b"not a certificate")
        with self.assertRaises(ConfigError) as cm:
            self.load("{ca_certificate: bad.pem}", certs.dir)
        self.assertEqual(cm.exception.field, "clusters[0].tls.ca_certificate")

    def test_mutual_needs_key_and_certificate(self):
        certs = Certificates(self)
        with self.assertRaises(ConfigError) as cm:
            self.load("{mode: MUTUAL, client_certificate: server.pem}", certs.dir)
        self.assertEqual(cm.exception.field, "clusters[0].tls.private_key")
        with self.assertRaises(ConfigError) as cm:
            self.load("{mode: MUTUAL, client_certificate: server.pem, private_key: ca.pem}", certs.dir)
        self.assertIn("clusters[0].tls", cm.exception.field)
        with self.assertRaises(ConfigError) as cm:
            self.load("{client_certificate: server.pem}", certs.dir)
        self.assertEqual((cm.exception.field, cm.exception.reason),
                         ("clusters[0].tls.client_certificate", "only with mode: MUTUAL"))

    def test_loaded(self):
        certs = Certificates(self)
        config = self.load("{ca_certificate: ca.pem, sni: svc.example}", certs.dir)
        tls = config.clusters[0].tls
        self.assertEqual((tls.ca_certificate, tls.sni), ("ca.pem", "svc.example"))
        self.assertTrue(tls.ca_certificate_pem.startswith(b"-----BEGIN CERTIFICATE-----"))


class IstioSimpleTLSTests(unittest.SynchronousTestCase):
    def test_simple_mode(self):
        """
        DestinationRule C{tls.mode: SIMPLE} becomes the cluster's TLS, the
        CA file read relative to the proxy config.
        """
        certs = Certificates(self)
        certs.write("dr.yaml", textwrap.dedent("""
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: api}
            spec:
              hosts: [api.example.com]
              ports: [{number: 443, name: https, protocol: HTTP}]
              resolution: STATIC
              endpoints: [{address: 127.0.0.1}]
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: api}
            spec:
              host: api.example.com
              trafficPolicy: {tls: {mode: SIMPLE, caCertificates: ca.pem, sni: api.example.com}}
            """).encode())
        text = "istio: {files: [dr.yaml]}\nlisteners: [{name: out, address: 'tcp:0', istio_routes: true}]\n"
        config = ConfigLoader(FilterRegistry(http=[RouterFactory()])).load_bytes(
            text.encode(), os.path.join(certs.dir, "proxy.yaml"))
        [cluster] = [c for c in config.clusters if c.tls is not None]
        self.assertEqual((cluster.tls.ca_certificate, cluster.tls.sni), ("ca.pem", "api.example.com"))
        self.assertTrue(cluster.tls.ca_certificate_pem.startswith(b"-----BEGIN CERTIFICATE-----"))
