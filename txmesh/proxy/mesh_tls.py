"""
Mutual TLS between proxies with the workload identity
(L{txmesh.proxy.workload_identity}): Istio's C{ISTIO_MUTUAL}.

  - L{MeshServerCreator}: a listener's TLS with the proxy's certificate,
    asking for the peer's and checking it against the mesh trust bundle;
  - L{PermissiveFactory}: Istio's PERMISSIVE mode, mutual TLS or plaintext
    told apart per connection by the first byte;
  - L{MeshClientCreator}: an upstream connection presenting the proxy's
    certificate and accepting only a peer whose SPIFFE ID is allowed;
  - L{downstream_identity} and L{client_cert_header}: who the peer of an
    accepted connection is, and the C{x-forwarded-client-cert} value that
    tells the app.

The creators read the identity at each new connection, so a renewed
certificate or a rotated trust bundle is used from the next connection on
while open connections keep theirs.  TLS 1.2 at least; ALPN as the caller
says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import tcp
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.identity import certificate_identity, trust_domain_of
from txmesh.proxy.tls import load_certificates, load_private_key
from txmesh.proxy.workload_identity import WorkloadIdentity

log = Logger()

TLS_HANDSHAKE = 0x16
"""The first byte of a TLS connection (a handshake record)."""


class PeerIdentityError(Exception):
    """
    The peer's certificate does not name an identity this connection
    accepts.
    """


def _options(identity: WorkloadIdentity, alpn: Sequence[bytes], require_peer: bool) -> CertificateOptions:
    chain = load_certificates(identity.chain_pem)
    roots = load_certificates(identity.roots_pem, "roots")
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(load_private_key(identity.key_pem)),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        verify=True,
        requireCertificate=require_peer,
        caCerts=[crypto.X509.from_cryptography(c) for c in roots],
        acceptableProtocols=list(alpn) or None,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


class _IdentityContexts:
    """
    An OpenSSL context built from the identity's current material, rebuilt
    when the identity changes.
    """

    def __init__(self, identity: WorkloadIdentity, alpn: Sequence[bytes], require_peer: bool):
        self._identity = identity
        self._alpn = tuple(alpn)
        self._require_peer = require_peer
        self._built_for: tuple[bytes | None, bytes | None] | None = None
        self._context: SSL.Context | None = None

    def context(self) -> SSL.Context | None:
        """
        @return: the context for a new connection, or C{None} while the
            proxy has no certificate yet.
        """
        identity = self._identity
        if identity.chain_pem is None or identity.roots_pem is None:
            return None
        material = (identity.chain_pem, identity.roots_pem)
        if material != self._built_for:
            context = _options(identity, self._alpn, self._require_peer).getContext()
            mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if self._require_peer else 0)
            context.set_verify(mode, _log_refusal)
            # Twisted offers ALPN per connection it makes, and its server
            # callback (set on every context) finds the protocols through
            # the connection's app data; these connections are made here, so
            # a client's offer would fail the handshake.  Both go on the
            # context instead.
            if self._alpn:
                context.set_alpn_protos(list(self._alpn))
            context.set_alpn_select_callback(self._select)
            self._context = context
            self._built_for = material
        return self._context

    def _select(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in self._alpn:
            if protocol in offered:
                return protocol
        # No ALPN answer, rather than a failed handshake, as Envoy does.
        return SSL.NO_OVERLAPPING_PROTOCOLS


# Verification errors (OpenSSL's X509_V_ERR_*) a mesh peer runs into.
_VERIFY_ERRORS = {
    2: "its issuer is not a trusted root (unknown CA)",
    7: "its signature does not verify",
    9: "it is not valid yet",
    10: "it has expired",
    18: "it is self-signed and not trusted",
    19: "its chain ends in a root that is not trusted",
    20: "its issuer is not a trusted root (unknown CA, or a root no longer trusted)",
    21: "its chain cannot be checked (unable to verify the first certificate)",
}


def _log_refusal(connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
    """
    OpenSSL's verification callback: keep its verdict, and say in the log
    why a peer certificate was refused.
    """
    if not ok:
        try:
            who = certificate_identity(certificate) or certificate.get_subject().CN or "?"
        except Exception:
            who = "?"
        reason = _VERIFY_ERRORS.get(errno, f"X.509 verification error {errno}")
        log.warn("peer certificate {who} refused: {reason} (depth {depth})", who=who, reason=reason, depth=depth)
    return bool(ok)


@implementer(IOpenSSLServerConnectionCreator)
class MeshServerCreator:
    """
    TLS for a listener that speaks mutual TLS with other proxies.
    """

    def __init__(self, identity: WorkloadIdentity, alpn: Sequence[bytes] = (), require_peer: bool = True):
        """
        @param identity: this proxy's certificate and the mesh trust bundle.
        @param alpn: protocols to agree on, most preferred first.
        @param require_peer: refuse a client with no certificate (STRICT).
        """
        self._contexts = _IdentityContexts(identity, alpn, require_peer)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = self._contexts.context()
        if context is None:
            log.warn("mutual TLS connection refused: this proxy has no workload certificate yet")
            # A context without a certificate: the handshake fails.
            context = SSL.Context(SSL.TLS_METHOD)
        return SSL.Connection(context, None)


@implementer(IOpenSSLClientConnectionCreator)
class MeshClientCreator:
    """
    TLS for a connection to another proxy: present this proxy's certificate
    and accept only a peer whose SPIFFE ID is allowed.

    The chain is verified by OpenSSL against the mesh trust bundle; the
    identity is then the certificate's one SPIFFE URI SAN, compared whole
    with the allowed IDs (the pilot writes the destination's service
    accounts there).  C{service_identity} is not used: its C{URI_ID} is
    RFC 6125's, which compares a URI's scheme and DNS name only and refuses
    C{spiffe://td/ns/NS/sa/SA} (the path, which holds the namespace and the
    account, is not a DNS name).  An exact comparison is what the SPIFFE
    specification asks for.
    """

    def __init__(self, identity: WorkloadIdentity, alpn: Sequence[bytes] = (), allowed: Sequence[str] = ()):
        """
        @param allowed: the SPIFFE IDs the peer may have; empty for any in
            this proxy's trust domain (the pilot knows no accounts for the
            destination).
        """
        self._identity = identity
        self._contexts = _IdentityContexts(identity, alpn, True)
        self._allowed = tuple(allowed)

    def check(self, peer_id: str | None) -> None:
        """
        @raise PeerIdentityError: C{peer_id} is not an identity this
            connection accepts.
        """
        if peer_id is None:
            raise PeerIdentityError("the peer's certificate carries no SPIFFE ID")
        if self._allowed:
            if peer_id not in self._allowed:
                raise PeerIdentityError(f"the peer is {peer_id}, not one of {', '.join(self._allowed)}")
        elif trust_domain_of(peer_id) != trust_domain_of(self._identity.spiffe_id):
            raise PeerIdentityError(f"the peer {peer_id} is not of trust domain "
                                    f"{trust_domain_of(self._identity.spiffe_id)}")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = self._contexts.context()
        if context is None:
            raise PeerIdentityError("this proxy has no workload certificate yet")
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_info_callback(self._info)
        return connection

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        # Checked once the chain has verified (OpenSSL checks it against the
        # trust bundle), as Twisted checks host names.
        if not where & SSL.SSL_CB_HANDSHAKE_DONE:
            return
        certificate = connection.get_peer_certificate()
        try:
            self.check(certificate_identity(certificate) if certificate is not None else None)
        except PeerIdentityError as e:
            log.warn("upstream refused: {reason}", reason=str(e))
            connection.get_app_data().failVerification(Failure())


def peer_certificate(transport: Any) -> Any:
    """
    @return: the verified certificate the peer of a TLS C{transport}
        presented (a C{cryptography} certificate), or C{None} (plaintext, or
        no certificate).
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        certificate = get()
    except SSL.Error:
        return None
    return certificate.to_cryptography() if certificate is not None else None


def downstream_identity(transport: Any) -> tuple[str | None, Any]:
    """
    @return: the SPIFFE ID of the peer of an accepted connection (or
        C{None}) and its certificate (or C{None}).
    """
    certificate = peer_certificate(transport)
    if certificate is None:
        return None, None
    return certificate_identity(certificate), certificate


def client_cert_header(own_id: str | None, peer_id: str | None, certificate: Any) -> bytes | None:
    """
    The C{x-forwarded-client-cert} value for a request that came over mutual
    TLS, as Envoy's SANITIZE_SET writes it: C{By=<this proxy>;Hash=<sha256
    of the peer certificate>;URI=<peer SPIFFE ID>}.

    @return: the value, or C{None} when the peer presented no certificate.
    """
    if certificate is None:
        return None
    from cryptography.hazmat.primitives import serialization

    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    parts = []
    if own_id:
        parts.append(f"By={own_id}")
    parts.append(f"Hash={digest}")
    if peer_id:
        parts.append(f"URI={peer_id}")
    return ";".join(parts).encode("ascii")


class _Sniffer(Protocol):
    """
    Holds a connection until its first byte says TLS or not, then hands it
    to the TLS factory's or the plaintext factory's protocol.
    """

    def __init__(self, choose: PermissiveFactory, addr: Any):
        self._choose = choose
        self._addr = addr
        self._inner: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if not data:
            return
        factory = self._choose.tls if data[0] == TLS_HANDSHAKE else self._choose.plain
        inner = factory.buildProtocol(self._addr)
        if inner is None:
            self.transport.loseConnection()
            return
        self._inner = inner
        transport = self.transport
        if isinstance(transport, tcp.Connection) and transport.protocol is self:
            transport.protocol = inner
        inner.makeConnection(transport)
        inner.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._inner is not None:
            self._inner.connectionLost(reason)


class PermissiveFactory(Factory):
    """
    Istio's PERMISSIVE mode: a connection that starts with a TLS handshake
    goes to C{tls} (mutual TLS), any other to C{plain}.

    @ivar tls: the factory for TLS connections (a TLS wrapper).
    @ivar plain: the factory for plaintext connections.
    """

    noisy = False

    def __init__(self, tls: Any, plain: Any):
        self.tls = tls
        self.plain = plain

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Sniffer(self, addr)

    def doStart(self) -> None:
        self.tls.doStart()
        self.plain.doStart()

    def doStop(self) -> None:
        self.tls.doStop()
        self.plain.doStop()
