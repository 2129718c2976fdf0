"""
How the pilot protects its channel: TLS with a certificate from the mesh CA
(L{txmesh.pilot.ca}), and a join token (L{txmesh.pilot.tokens}) in every
proxy's L{Hello}, bound to the proxy's namespace; or, when C{mesh.yaml} has
C{kubernetes_auth}, the pod's Kubernetes service-account token, checked by
the API server (L{txmesh.pilot.token_review}).

    CONFIG_DIR/ca/root-cert.pem   the mesh root: what proxies trust (pilot.ca_file)
    CONFIG_DIR/ca/root-key.pem    its key (0600), or ca-key.pem/ca-cert.pem from the operator
    CONFIG_DIR/ca/token.key       the key join tokens are signed with (0600)
    CONFIG_DIR/ca/token-previous.keys
                                  during a key rotation, the keys that still verify (0600)
    CONFIG_DIR/ca/used-tokens     join tokens already used (each is good once)
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmesh.identity import requested_identity
from txmesh.pilot.ca import (
    CAError,
    CertificateAuthority,
    check_dns_label,
    parse_spiffe_id,
    server_tls_options,
    spiffe_id,
)
from txmesh.pilot.messages import Hello
from txmesh.pilot.token_review import ServiceAccount, TokenReviewer, TokenReviewError
from txmesh.pilot.tokens import (
    TOKEN_PREFIX,
    InvalidCredential,
    TokenAuthority,
    TokenKeyError,
    UsedTokens,
    load_or_create_key,
    load_previous_keys,
)

TOKEN_KEY_FILE = "token.key"
PREVIOUS_TOKEN_KEYS_FILE = "token-previous.keys"
"""During a token key rotation, the keys that verify but no longer sign."""
USED_TOKENS_FILE = "used-tokens"
DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
"""How long a workload certificate lasts unless C{mesh.yaml} says (proxies renew at half-life)."""
SERVER_CERT_TTL = timedelta(days=365)
"""How long the pilot's own serving certificate lasts; a new one is issued at every start."""

DEFAULT_SERVER_NAMES = ("txmesh-pilot", "localhost", "127.0.0.1", "::1")
"""Names every pilot certificate carries, besides the host's own name."""


def ca_directory(config_dir: str) -> str:
    """
    @return: where the pilot keeps its CA and token key.
    """
    return os.path.join(config_dir, "ca")


def token_authority(ca_dir: str) -> TokenAuthority:
    """
    @return: the authority that signs and checks join tokens, with the key
        in C{ca_dir} (created on first use).
    """
    os.makedirs(ca_dir, mode=0o700, exist_ok=True)
    return TokenAuthority(load_or_create_key(os.path.join(ca_dir, TOKEN_KEY_FILE)),
                          previous=load_previous_keys(os.path.join(ca_dir, PREVIOUS_TOKEN_KEYS_FILE)))


def token_keys_signature(ca_dir: str) -> object:
    """
    @return: what changes when C{txmesh token rotate-key} or
        C{finish-key-rotation} changes the token key files (each is
        replaced by a rename, so its inode changes even within one clock
        tick).
    """
    stamp = []
    for name in (TOKEN_KEY_FILE, PREVIOUS_TOKEN_KEYS_FILE):
        try:
            st = os.stat(os.path.join(ca_dir, name))
        except OSError:
            stamp.append(None)
        else:
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamp)


@attrs.frozen
class Admission:
    """
    The pilot's answer to a proxy's hello.

    @ivar identity: the SPIFFE ID the proxy may have certificates for, or
        C{None} (a plaintext pilot signs nothing).
    @ivar refusal: why the proxy is refused, or C{None} when admitted.
    """

    identity: str | None = None
    refusal: str | None = None


class CertificateRefused(Exception):
    """
    A CSR the pilot will not sign; C{str()} says why.
    """


@attrs.define
class ChannelSecurity:
    """
    The pilot end of a secure channel.

    A proxy proves who it is with a workload certificate from this CA (the
    TLS client certificate, checked against the mesh root) or, before it
    has one, with a join token, good once, or (with a C{reviewer}) with its
    pod's Kubernetes service-account token, good until it expires.  Each
    names its identity
    C{spiffe://<trust domain>/ns/<namespace>/sa/<service account>}, which
    is the only identity the pilot signs for that channel.

    @ivar server_options: TLS server options with the pilot's certificate,
        asking clients for an optional certificate.
    @ivar tokens: checks the proxies' join tokens; read again from the CA
        directory when its token key files change (a key rotation), so a
        running pilot takes a rotation at the next join token.
    @ivar clock: the time tokens and certificates are checked and made at.
    @ivar ca: signs workload certificates.
    @ivar used_tokens: the join tokens already used.
    @ivar workload_ttl: the lifetime of workload certificates.
    @ivar server_names: the extra names of the pilot's certificate.
    @ivar reviewer: checks Kubernetes service-account tokens with the API
        server, or C{None} to accept join tokens only.
    """

    server_options: Any
    tokens: TokenAuthority
    clock: IReactorTime
    ca: CertificateAuthority
    used_tokens: UsedTokens
    workload_ttl: timedelta = DEFAULT_WORKLOAD_TTL
    server_names: tuple[str, ...] = ()
    reviewer: TokenReviewer | None = None
    _tokens_stamp: object = attrs.field(init=False)

    _log = Logger()

    @_tokens_stamp.default
    def _initial_tokens_stamp(self) -> object:
        return token_keys_signature(self.ca.directory)

    def _current_tokens(self) -> TokenAuthority:
        """
        The token authority, read again if the key files changed.  Checked
        at each join token rather than by the pilot's CA poll: a key
        rotation needs no new serving certificate nor a push to proxies,
        and the next token sees it at once.
        """
        stamp = token_keys_signature(self.ca.directory)
        if stamp != self._tokens_stamp:
            try:
                self.tokens = token_authority(self.ca.directory)
            except (TokenKeyError, OSError) as e:
                self._log.error("the join-token key files changed but cannot be used, keeping the old keys: "
                                "{error}", error=str(e))
            else:
                self._log.info("join-token keys reloaded: signing with {kid}, also accepting {previous}",
                               kid=self.tokens.key_id, previous=list(self.tokens.previous_key_ids))
            # Not retried until the files change again: one error a change.
            self._tokens_stamp = stamp
        return self.tokens

    def reload(self) -> ChannelSecurity:
        """
        Read the CA directory again (after C{txmesh ca rotate} or
        C{finish-rotation}) and issue the pilot a new serving certificate.
        The token keys are read again too.

        @raise txmesh.pilot.ca.CAError: the directory (or a token key file)
            is unusable now; keep using this one.
        """
        try:
            return load_channel_security(self.ca.directory, self.ca.trust_domain, self.clock, self.server_names,
                                         self.workload_ttl, self.reviewer, create=False)
        except TokenKeyError as e:
            # The pilot's CA poll handles CAError only; anything else would
            # stop the poll for good.
            raise CAError(e.reason, e.path) from None

    def ca_signature(self) -> object:
        """
        @return: what changes when the CA directory's certificates change.
        """
        stamp = []
        for name in sorted(os.listdir(self.ca.directory)):
            if name.endswith(".pem"):
                st = os.stat(os.path.join(self.ca.directory, name))
                stamp.append((name, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    @property
    def root_pem(self) -> bytes:
        """
        @return: the mesh trust bundle (the root, and during a root
            rotation the previous roots too).
        """
        return self.ca.trust_bundle_pem

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    def authenticate(self, hello: Hello, peer_identity: str | None) -> Admission | Deferred[Admission]:
        """
        Decide on a proxy's hello.

        @param peer_identity: the SPIFFE ID of the client certificate the
            proxy presented (already verified against the mesh root by
            TLS), or C{None}.
        @return: the proxy's identity, or why it is refused; a Deferred of
            that when the credential is a service-account token the API
            server has to review (it never fails with a refusal: a token
            the API server rejects, or an API server out of reach, is an
            L{Admission} with a C{refusal}).
        """
        namespace = hello.node.namespace
        if peer_identity is not None:
            try:
                trust_domain, cert_namespace, _ = parse_spiffe_id(peer_identity)
            except ValueError as e:
                return Admission(refusal=f"client certificate: {e}")
            if trust_domain != self.ca.trust_domain:
                return Admission(refusal=f"client certificate {peer_identity} is not of trust domain "
                                         f"{self.ca.trust_domain!r}")
            if cert_namespace != namespace:
                return Admission(refusal=f"client certificate {peer_identity} is for namespace "
                                         f"{cert_namespace!r}, but the proxy says it is in {namespace!r}")
            return Admission(identity=peer_identity)
        if not hello.credential:
            also = ", a Kubernetes service-account token" if self.reviewer is not None else ""
            return Admission(refusal=f"no credential: the proxy needs a join token (txmesh token create){also} "
                                     "or a workload certificate")
        is_join_token = hello.credential.startswith(TOKEN_PREFIX + ".")
        if not is_join_token and self.reviewer is not None:
            return self._review(hello.credential, namespace)
        now = self.clock.seconds()
        try:
            claims = self._current_tokens().verify(hello.credential, now)
        except InvalidCredential as e:
            if not is_join_token and hello.credential.count(".") == 2:
                return Admission(refusal="invalid credential: not a join token but a JWT (a Kubernetes "
                                         "service-account token?), which this pilot accepts only with "
                                         "kubernetes_auth in its mesh.yaml")
            return Admission(refusal=f"invalid credential: {e}")
        if claims.namespace != namespace:
            return Admission(refusal=f"the credential is for namespace {claims.namespace!r}, but the proxy "
                                     f"says it is in {namespace!r}")
        if not self.used_tokens.use(claims, now):
            return Admission(refusal=f"join token {claims.token_id} was used already; a join token is good "
                                     "once (the proxy then authenticates with its workload certificate)")
        return Admission(identity=spiffe_id(self.ca.trust_domain, claims.namespace, claims.service_account))

    def _review(self, token: str, namespace: str) -> Deferred[Admission]:
        """
        Have the API server review a service-account token; its namespace
        must be the one the proxy's node names.
        """

        def reviewed(account: ServiceAccount) -> Admission:
            if account.namespace != namespace:
                return Admission(refusal=f"the service-account token is for namespace {account.namespace!r}, "
                                         f"but the proxy says it is in {namespace!r}")
            try:
                return Admission(identity=spiffe_id(self.ca.trust_domain, account.namespace, account.name))
            except ValueError as e:
                return Admission(refusal=f"service account {account.namespace}/{account.name}: {e}")

        def refused(failure: Failure) -> Admission:
            failure.trap(TokenReviewError)
            return Admission(refusal=failure.value.reason)

        assert self.reviewer is not None
        return self.reviewer.review(token).addCallbacks(reviewed, refused)

    def sign(self, csr_pem: bytes, identity: str) -> tuple[bytes, bytes]:
        """
        Sign a proxy's CSR for C{identity}, the one its channel proved.

        @return: the chain (leaf first) and the trust bundle, PEM.
        @raise CertificateRefused: the CSR does not parse or verify, asks
            for another identity, or has a key other than ECDSA P-256.
        """
        try:
            asked = requested_identity(csr_pem)
        except ValueError as e:
            raise CertificateRefused(str(e)) from None
        if asked != identity:
            raise CertificateRefused(f"the CSR asks for {asked}, but this proxy's credential grants {identity}")
        try:
            chain = self.ca.sign_csr(csr_pem, identity, self._now(), self.workload_ttl)
        except CAError as e:
            raise CertificateRefused(e.reason) from None
        return chain, self.ca.trust_bundle_pem


def _split_names(names: Iterable[str]) -> tuple[list[str], list[str]]:
    dns_names, ips = [], []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns_names.append(name)
    return sorted(set(dns_names)), sorted(set(ips))


def _host_name() -> list[str]:
    """
    @return: this host's name if it is a valid DNS name (a name such as
        C{my_box} would make the certificate invalid), else nothing.
    """
    name = socket.gethostname().lower()
    labels = name.split(".")
    try:
        for label in labels:
            check_dns_label("host name", label)
    except ValueError:
        return []
    return [name]


def load_channel_security(
    ca_dir: str,
    trust_domain: str,
    clock: IReactorTime,
    server_names: Iterable[str] = (),
    workload_ttl: timedelta = DEFAULT_WORKLOAD_TTL,
    reviewer: TokenReviewer | None = None,
    create: bool = True,
) -> ChannelSecurity:
    """
    Load (or create) the CA in C{ca_dir} and issue the pilot a serving
    certificate for its names.

    @param server_names: extra DNS names and IP addresses the pilot is
        reached by (the defaults and the host name are always in).
    @param workload_ttl: the lifetime of the workload certificates it signs.
    @param create: make a CA when the directory holds none (at start; not
        when re-reading it during a rotation).
    @param reviewer: checks Kubernetes service-account tokens, or C{None}
        (join tokens only).
    @raise txmesh.pilot.ca.CAError: the CA directory is unusable.
    """
    now = datetime.fromtimestamp(clock.seconds(), timezone.utc)
    ca = CertificateAuthority.load_or_create(ca_dir, trust_domain, now, create)
    dns_names, ips = _split_names([*DEFAULT_SERVER_NAMES, *_host_name(), *server_names])
    issued = ca.issue_server_certificate(dns_names, ips, now, SERVER_CERT_TTL)
    options = server_tls_options(issued, ca.trust_bundle_pem, require_client_certificate=False)
    return ChannelSecurity(options, token_authority(ca_dir), clock, ca,
                           UsedTokens(os.path.join(ca_dir, USED_TOKENS_FILE)), workload_ttl, tuple(server_names),
                           reviewer)
