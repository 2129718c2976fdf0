"""
TLS for listeners: OpenSSL context factories built from PEM data, ALPN,
and a listener factory that adds TLS to each new connection.

L{server_options} is the one place a server-side TLS context is made.  It
takes plain values (PEM bytes and options) so that certificates read from
files today and SVIDs issued by the mesh CA later (mTLS: C{client_ca_pem})
go through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import INegotiated
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory

ALPN_PROTOCOLS: tuple[bytes, ...] = (b"h2", b"http/1.1")
"""
Protocols a listener may offer in ALPN.
"""

T = TypeVar("T")

MIN_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


class TLSConfigError(ValueError):
    """
    Certificate, key or options that cannot make a TLS context.

    @ivar part: which input is wrong: C{certificate}, C{private_key},
        C{client_ca}, C{alpn} or C{min_version}.
    @ivar reason: what is wrong.
    """

    def __init__(self, part: str, reason: str):
        self.part = part
        self.reason = reason
        super().__init__(f"{part}: {reason}")


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_certificates(pem: bytes, part: str = "certificate") -> list[x509.Certificate]:
    """
    @return: every certificate in C{pem}, in file order.
    @raise TLSConfigError: if C{pem} holds no parseable certificate.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise TLSConfigError(part, f"not a PEM certificate ({e})") from None
    if not certs:
        raise TLSConfigError(part, "no PEM certificate found")
    return certs


def load_private_key(pem: bytes) -> Any:
    """
    @return: the private key in C{pem} (unencrypted).
    @raise TLSConfigError: if C{pem} is not an unencrypted PEM private key.
    """
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise TLSConfigError("private_key", "the key is encrypted; give an unencrypted key") from None
    except ValueError as e:
        raise TLSConfigError("private_key", f"not a PEM private key ({e})") from None


def server_options(
    certificate_pem: bytes,
    private_key_pem: bytes,
    alpn: Sequence[bytes] = ALPN_PROTOCOLS,
    min_version: str = "1.2",
    client_ca_pem: bytes | None = None,
    require_client_certificate: bool = True,
) -> CertificateOptions:
    """
    Build the OpenSSL options of a TLS server.

    @param certificate_pem: the certificate chain, leaf first.
    @param private_key_pem: the leaf's private key, unencrypted.
    @param alpn: protocols offered in ALPN, most preferred first; empty to
        offer none.
    @param min_version: C{"1.2"} or C{"1.3"}; older versions are refused.
    @param client_ca_pem: when given, client certificates are checked
        against these CAs (mutual TLS).
    @param require_client_certificate: with C{client_ca_pem}, whether a
        client must present one (else one presented must still verify).
    @return: options for L{TLSMemoryBIOFactory} (with a context already
        built, so any error surfaces here and not on the first connection).
    @raise TLSConfigError: naming the input that is wrong and why.
    """
    certs = load_certificates(certificate_pem)
    key = load_private_key(private_key_pem)
    if _public_der(certs[0].public_key()) != _public_der(key.public_key()):
        raise TLSConfigError("private_key", "does not match the certificate (its public key differs)")
    for proto in alpn:
        if proto not in ALPN_PROTOCOLS:
            raise TLSConfigError("alpn", f"unsupported protocol {proto!r} (known: "
                                         f"{', '.join(p.decode() for p in ALPN_PROTOCOLS)})")
    if min_version not in MIN_VERSIONS:
        raise TLSConfigError("min_version", f"must be one of {', '.join(MIN_VERSIONS)}, got {min_version!r}")
    verify: dict[str, Any] = {}
    if client_ca_pem is not None:
        roots = load_certificates(client_ca_pem, "client_ca")
        verify = dict(verify=True, requireCertificate=require_client_certificate,
                      caCerts=[crypto.X509.from_cryptography(c) for c in roots])
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(certs[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in certs[1:]],
        acceptableProtocols=list(alpn) or None,
        raiseMinimumTo=MIN_VERSIONS[min_version],
        **verify,
    )
    try:
        options.getContext()
    except SSL.Error as e:
        raise TLSConfigError("certificate", f"OpenSSL refused the certificate or key: {e}") from None
    return options


def server_name_matches(pattern: str, name: str) -> bool:
    """
    Match a TLS server name against a host pattern as gateways write them:
    C{*} matches any name (and none), C{*.example.com} any name under
    C{example.com}, anything else only itself.  Case does not matter.
    """
    pattern = pattern.lower()
    name = name.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def select_by_server_name(entries: Sequence[tuple[Sequence[str], T]], name: str | None) -> T | None:
    """
    Pick what serves the TLS server name C{name} (SNI): an exact pattern
    wins over a wildcard, a longer wildcard over a shorter one, and C{*}
    comes last, as in Envoy's filter chain match.

    @param entries: C{(patterns, value)} pairs.
    @param name: the client's SNI, or C{None} if it sent none (then only
        C{*} matches).
    @return: the value of the best match, or C{None}.
    """
    best: tuple[int, T] | None = None
    for patterns, value in entries:
        for pattern in patterns:
            if name is None:
                if pattern != "*":
                    continue
            elif not server_name_matches(pattern, name):
                continue
            rank = 0 if pattern == "*" else (len(pattern) if pattern.startswith("*.") else 1 << 16)
            if best is None or rank > best[0]:
                best = (rank, value)
    return None if best is None else best[1]


def add_server_name_certificates(options: CertificateOptions,
                                 entries: Sequence[tuple[Sequence[str], CertificateOptions]]) -> CertificateOptions:
    """
    Serve other certificates on the same port, chosen by the client's SNI
    (a gateway's several servers): when a name matches one of C{entries},
    the handshake switches to its context (certificate, key, client CA and
    verification); otherwise C{options}' own certificate is used.

    @param options: the default, from L{server_options}.
    @param entries: C{(server name patterns, options)} pairs, each from
        L{server_options}.
    @return: C{options}, whose context now chooses by SNI.
    """
    if not entries:
        return options
    chosen = [(patterns, (o.getContext(), o.verify, o.requireCertificate)) for patterns, o in entries]

    def on_server_name(connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        picked = select_by_server_name(chosen, name)
        if picked is None:
            return
        context, verify, require = picked
        connection.set_context(context)
        # OpenSSL keeps the first context's verification mode on the
        # connection: set the chosen one's.
        mode = SSL.VERIFY_NONE
        if verify:
            mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if require else 0)
        connection.set_verify(mode)

    options.getContext().set_tlsext_servername_callback(on_server_name)
    return options


def negotiated_protocol(transport: Any) -> bytes | None:
    """
    @return: the ALPN protocol agreed on C{transport} (C{b"h2"},
        C{b"http/1.1"}), or C{None} if the transport is not TLS, the
        handshake has not finished, or no protocol was agreed.

    A protocol under L{TLSMemoryBIOFactory} is connected before the
    handshake; to learn the result as soon as it exists, provide
    L{twisted.internet.interfaces.IHandshakeListener} (its
    C{handshakeCompleted} is called once), or read it on first data.
    """
    if not INegotiated.providedBy(transport):
        return None
    try:
        return transport.negotiatedProtocol
    except (AttributeError, SSL.Error):
        return None


class TLSListenerFactory(Factory):
    """
    Adds TLS to the connections of a wrapped factory, with options that can
    be replaced: a new certificate is used by new connections while open
    ones keep the context they started with.

    @ivar wrapped: the plaintext factory.
    """

    noisy = False

    def __init__(self, options: Any, wrapped: Any, clock: Any = None):
        """
        @param options: from L{server_options}.
        @param wrapped: the factory of the protocol inside TLS.
        @param clock: L{IReactorTime} for the TLS layer's timers.
        """
        self.wrapped = wrapped
        self._clock = clock
        self.set_options(options)

    def set_options(self, options: Any) -> None:
        """
        Use C{options} for connections accepted from now on.
        """
        self.options = options
        self._tls = TLSMemoryBIOFactory(options, False, self.wrapped, clock=self._clock)

    def buildProtocol(self, addr: Any) -> Any:
        return self._tls.buildProtocol(addr)

    def logPrefix(self) -> str:
        return self._tls.logPrefix()


def client_options(
    host: str,
    alpn: Sequence[bytes],
    ca_certificate_pem: bytes = b"",
    sni: str | None = None,
    client_certificate_pem: bytes = b"",
    private_key_pem: bytes = b"",
) -> Any:
    """
    Build the OpenSSL options of a TLS client to an upstream.

    @param host: the endpoint's host; the certificate must name it (or
        C{sni}).
    @param alpn: protocols to offer (C{[b"h2"]} or C{[b"http/1.1"]}).
    @param ca_certificate_pem: PEM roots to trust; empty for the system's.
    @param client_certificate_pem: a client certificate chain (leaf first)
        to present (Istio's C{MUTUAL}), or empty for none.
    @param private_key_pem: its key.
    @return: an C{IOpenSSLClientConnectionCreator} for C{connectSSL}.
    @raise TLSConfigError: if the CA bundle, the certificate or the key
        does not parse, or the key is not the certificate's.
    """
    from twisted.internet.ssl import (
        Certificate,
        KeyPair,
        PrivateCertificate,
        optionsForClientTLS,
        platformTrust,
        trustRootFromCertificates,
    )

    if ca_certificate_pem:
        roots = [Certificate(crypto.X509.from_cryptography(c))
                 for c in load_certificates(ca_certificate_pem, "ca_certificate")]
        trust: Any = trustRootFromCertificates(roots)
    else:
        trust = platformTrust()
    client = None
    extra: dict[str, Any] = {}
    if client_certificate_pem:
        certs = load_certificates(client_certificate_pem, "client_certificate")
        key = load_private_key(private_key_pem)
        if _public_der(certs[0].public_key()) != _public_der(key.public_key()):
            raise TLSConfigError("private_key", "does not match the client certificate (its public key differs)")
        client = PrivateCertificate.fromCertificateAndKeyPair(
            Certificate(crypto.X509.from_cryptography(certs[0])),
            KeyPair(crypto.PKey.from_cryptography_key(key)))
        if len(certs) > 1:
            extra["extraCertChain"] = [crypto.X509.from_cryptography(c) for c in certs[1:]]
    return optionsForClientTLS(sni or host, trustRoot=trust, clientCertificate=client,
                               acceptableProtocols=list(alpn) or None, extraCertificateOptions=extra or None)
