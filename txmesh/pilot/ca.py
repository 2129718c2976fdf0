"""
The pilot's certificate authority: a directory of PEM files, the mesh root
(trust bundle), certificates for the pilot's own channel TLS, and workload
certificates signed from CSRs (see C{docs/security.md}).

Nothing here reads a clock: every operation that depends on the time takes
C{now} from the caller, so tests and the pilot's reactor agree on it.

Directory layout (one of two):

  - generated (default): C{root-key.pem} (ECDSA P-256, mode 0600) and
    C{root-cert.pem} (self-signed, 10 years), created on first use;
  - operator-provided, as Istio's plug-in CA C{cacerts}: C{ca-key.pem} and
    C{ca-cert.pem} (a root or an intermediate), optional C{cert-chain.pem}
    (the certificates above C{ca-cert.pem}, up to the root) and optional
    C{root-cert.pem} (the root, when C{ca-cert.pem} is an intermediate and
    C{cert-chain.pem} does not end with it).  When C{ca-key.pem} or
    C{ca-cert.pem} exists nothing is generated.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger

from txmesh.pilot.private_files import write_private
from txmesh.proxy.tls import TLSConfigError, client_options, server_options

ROOT_KEY_FILE = "root-key.pem"
ROOT_CERT_FILE = "root-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CA_CERT_FILE = "ca-cert.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
PREVIOUS_ROOTS_FILE = "previous-roots.pem"

ROOT_VALIDITY = timedelta(days=3650)
"""
How long a generated root is valid.
"""

CLOCK_SKEW = timedelta(minutes=5)
"""
Issued certificates start this long before C{now}, so that a peer whose
clock is a little behind the pilot's accepts them at once.
"""

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}\Z")
_SPIFFE_ID = re.compile(r"spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)\Z")
_ROOT_CN_PREFIX = "txmesh root CA "


class CAError(Exception):
    """
    The CA directory, a CA operation's input, or a CSR is not usable.

    @ivar reason: what is wrong, for a person.
    @ivar path: the file concerned, or C{None} when the error is not about a
        file.
    """

    def __init__(self, reason: str, path: str | None = None):
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


def check_dns_label(field: str, value: object) -> None:
    """
    Check that C{value} is an RFC 1123 DNS label as Kubernetes uses for
    namespaces: 1 to 63 lowercase letters, digits and C{-}, starting and
    ending with a letter or digit.

    @param field: the name of the value, for the error message.
    @raise ValueError: naming C{field} and what is wrong.
    """
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be a string, got {type(value).__name__}")
    if not _DNS_LABEL.match(value):
        raise ValueError(f"{field}: {value!r} is not a DNS-1123 label (1-63 characters of a-z, 0-9 and '-', "
                         "starting and ending with a letter or digit)")


def check_trust_domain(value: object) -> None:
    """
    Check a SPIFFE trust domain: 1 to 255 of lowercase letters, digits,
    C{.}, C{-} and C{_}.

    @raise ValueError: saying what is wrong.
    """
    if not isinstance(value, str) or not _TRUST_DOMAIN.match(value):
        raise ValueError(f"trust_domain: {value!r} is not a SPIFFE trust domain "
                         "(1-255 characters of a-z, 0-9, '.', '-' and '_')")


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """
    @return: the workload identity
        C{spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>}.
    @raise ValueError: if a part is not valid (namespace and service
        account are DNS-1123 labels), naming the part.
    """
    check_trust_domain(trust_domain)
    check_dns_label("namespace", namespace)
    check_dns_label("service_account", service_account)
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_spiffe_id(value: str) -> tuple[str, str, str]:
    """
    @return: C{(trust_domain, namespace, service_account)} of a workload
        identity made by L{spiffe_id}.
    @raise ValueError: if C{value} is not such an identity.
    """
    match = _SPIFFE_ID.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a workload identity "
                         "(spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")
    trust_domain, namespace, service_account = match.groups()
    spiffe_id(trust_domain, namespace, service_account)  # checks each part, naming the wrong one
    return trust_domain, namespace, service_account


@attrs.frozen
class IssuedCertificate:
    """
    A new private key and the certificate the CA issued for it.

    @ivar private_key_pem: the leaf's private key (PKCS#8, unencrypted).
    @ivar certificate_pem: the leaf certificate alone.
    @ivar chain_pem: the CA certificates between the leaf and the root,
        issuer first; empty when the root signs leaves directly.  The root
        itself is not included: peers have it in their trust bundle.
    @ivar expires: the leaf's C{notAfter} (UTC).
    """

    private_key_pem: bytes
    certificate_pem: bytes
    chain_pem: bytes
    expires: datetime

    @property
    def full_chain_pem(self) -> bytes:
        """
        The leaf followed by L{chain_pem}: what a TLS server presents.
        """
        return self.certificate_pem + self.chain_pem


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _signing_hash(key: Any) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise CAError("now must be a timezone-aware datetime (UTC), got a naive one")
    return now.astimezone(timezone.utc)


def _read(directory: str, name: str) -> bytes:
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CAError(f"cannot read ({e.strerror})", path) from None


def _load_key(directory: str, name: str) -> Any:
    path = os.path.join(directory, name)
    data = _read(directory, name)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CAError("the key is encrypted; give an unencrypted key", path) from None
    except ValueError as e:
        raise CAError(f"not a PEM private key ({e})", path) from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                            ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        raise CAError(f"unsupported key type {type(key).__name__} (use ECDSA, RSA or Ed25519)", path)
    return key


def _load_certs(directory: str, name: str) -> list[x509.Certificate]:
    path = os.path.join(directory, name)
    try:
        certs = x509.load_pem_x509_certificates(_read(directory, name))
    except ValueError as e:
        raise CAError(f"not a PEM certificate ({e})", path) from None
    if not certs:
        raise CAError("no PEM certificate found", path)
    return certs


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_ca_certificate(cert: x509.Certificate, path: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CAError("not a CA certificate (no basicConstraints extension)", path) from None
    if not constraints.ca:
        raise CAError("not a CA certificate (basicConstraints CA:false)", path)
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CAError("the certificate may not sign certificates (keyUsage lacks keyCertSign)", path)


def _write_public(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_identifiers(builder: x509.CertificateBuilder, subject_key: Any, issuer_cert: x509.Certificate | None,
                     issuer_key: Any) -> x509.CertificateBuilder:
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
    if issuer_cert is not None:
        try:
            ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    else:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    return builder.add_extension(aki, critical=False)


@attrs.frozen
class CertificateAuthority:
    """
    A certificate authority backed by a directory; make one with
    L{load_or_create}.

    @ivar directory: where the CA's files are.
    @ivar trust_domain: the SPIFFE trust domain of the identities it signs.
    @ivar certificate: the certificate that signs leaves (the root when the
        CA generated its own).
    @ivar chain: the certificates between L{certificate} and L{root},
        L{certificate}'s issuer first (empty when L{certificate} is the
        root or is directly under it).
    @ivar root: the self-signed root every peer trusts.
    @ivar generated: C{True} when the root was generated by txmesh,
        C{False} when the operator provided C{ca-cert.pem}.
    """

    _log = Logger()

    directory: str
    trust_domain: str
    _key: Any = attrs.field(repr=False)
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    root: x509.Certificate
    generated: bool
    _files: dict[x509.Certificate, str] = attrs.field(factory=dict, repr=False, eq=False)
    """
    The file each certificate was read from, for error messages.
    """
    previous_roots: list[x509.Certificate] = attrs.field(factory=list)
    """
    Roots still trusted during a root rotation (L{rotate_root}), from
    C{previous-roots.pem}; they sign nothing.
    """

    @classmethod
    def load_or_create(cls, directory: str, trust_domain: str, now: datetime,
                       create: bool = True) -> CertificateAuthority:
        """
        Load the CA in C{directory}, or create a new root there if it holds
        no CA yet (creating the directory too, mode 0700).

        @param directory: the CA directory (see the module docstring).
        @param trust_domain: the SPIFFE trust domain, e.g. C{cluster.local}.
        @param now: the current time (timezone-aware), used for a new
            root's validity and to refuse an expired CA.
        @param create: make a new root when the directory holds none; a
            pilot re-reading its CA passes C{False}, so it never replaces a
            root that is being rotated.
        @raise CAError: naming the file and what is wrong with it: an
            unreadable or unparseable file, a key that does not match its
            certificate, half of a key/certificate pair missing, a chain
            that does not link up to a root, a root made for another trust
            domain, or an expired CA certificate.
        @raise ValueError: if C{trust_domain} is not a trust domain.
        """
        check_trust_domain(trust_domain)
        now = _utc(now)
        if not os.path.isdir(directory):
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as e:
                raise CAError(f"cannot create the CA directory ({e.strerror})", directory) from None

        def exists(name: str) -> bool:
            return os.path.exists(os.path.join(directory, name))

        if exists(CA_KEY_FILE) or exists(CA_CERT_FILE):
            ca = cls._load_plugged(directory, trust_domain)
        elif exists(CERT_CHAIN_FILE):
            raise CAError(f"present without {CA_CERT_FILE} and {CA_KEY_FILE}; give all three or remove it",
                          os.path.join(directory, CERT_CHAIN_FILE))
        elif exists(ROOT_KEY_FILE) or exists(ROOT_CERT_FILE):
            ca = cls._load_generated(directory, trust_domain)
        elif create:
            ca = cls._create(directory, trust_domain, now)
        else:
            raise CAError("holds no CA (root-key.pem and root-cert.pem, or ca-key.pem and ca-cert.pem)", directory)
        ca._check_valid_at(now)
        if exists(PREVIOUS_ROOTS_FILE):
            previous = _load_certs(directory, PREVIOUS_ROOTS_FILE)
            for cert in previous:
                if not _is_self_signed(cert):
                    raise CAError(f"holds {cert.subject.rfc4514_string()!r}, which is not a self-signed root",
                                  os.path.join(directory, PREVIOUS_ROOTS_FILE))
            ca = attrs.evolve(ca, previous_roots=[c for c in previous if c != ca.root and c.not_valid_after_utc > now])
        return ca

    @classmethod
    def rotate_root(cls, directory: str, trust_domain: str, now: datetime) -> CertificateAuthority:
        """
        Replace a generated root with a new one, keeping the old root
        trusted (in C{previous-roots.pem}) for an overlap window: new
        certificates are signed by the new root while peers holding the old
        root's certificates are still accepted.  The window should outlast
        the workload certificate lifetime, so that every proxy has renewed;
        then L{finish_rotation} drops the old roots.

        @return: the CA with the new root.
        @raise CAError: the directory holds an operator-provided CA (rotate
            it by replacing its files) or no CA.
        """
        old = cls.load_or_create(directory, trust_domain, now)
        if not old.generated:
            raise CAError("the CA was provided by the operator; rotate it by replacing its files",
                          os.path.join(directory, CA_CERT_FILE))
        kept = [old.root, *old.previous_roots]
        # A running pilot re-reads this directory when it changes: every file
        # is replaced by a rename, and the old root is trusted (previous
        # roots) before the new one signs, so a reader never finds no root.
        try:
            _write_public(os.path.join(directory, PREVIOUS_ROOTS_FILE), b"".join(_pem(c) for c in kept))
        except OSError as e:
            raise CAError(f"cannot rotate ({e.strerror})", e.filename or directory) from None
        new = cls._create(directory, trust_domain, now)
        new = attrs.evolve(new, previous_roots=kept)
        cls._log.info("rotated the mesh root in {directory}; {n} previous root(s) trusted until "
                      "finish-rotation", directory=directory, n=len(kept))
        return new

    @staticmethod
    def finish_rotation(directory: str) -> int:
        """
        End a root rotation's overlap: stop trusting the previous roots.

        @return: how many roots were dropped.
        """
        path = os.path.join(directory, PREVIOUS_ROOTS_FILE)
        if not os.path.exists(path):
            return 0
        count = len(_load_certs(directory, PREVIOUS_ROOTS_FILE))
        os.remove(path)
        return count

    @property
    def trust_bundle_pem(self) -> bytes:
        """
        What peers trust: the root, then any previous roots still in their
        overlap window, PEM.
        """
        return b"".join(_pem(c) for c in [self.root, *self.previous_roots])

    @classmethod
    def _create(cls, directory: str, trust_domain: str, now: datetime) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "txmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{_ROOT_CN_PREFIX}{trust_domain}"),
        ])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
        )
        builder = _key_identifiers(builder, key.public_key(), None, key)
        cert = builder.sign(key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # The key first: a certificate without its key is refused on load,
        # never silently replaced.
        try:
            write_private(os.path.join(directory, ROOT_KEY_FILE), key_pem)
            _write_public(os.path.join(directory, ROOT_CERT_FILE), _pem(cert))
        except OSError as e:
            raise CAError(f"cannot write the new root ({e.strerror})", e.filename or directory) from None
        cls._log.info("created a new mesh root CA in {directory} for trust domain {trust_domain}",
                      directory=directory, trust_domain=trust_domain)
        return cls(directory, trust_domain, key, cert, [], cert, True,
                   {cert: os.path.join(directory, ROOT_CERT_FILE)})

    @classmethod
    def _load_generated(cls, directory: str, trust_domain: str) -> CertificateAuthority:
        key_path = os.path.join(directory, ROOT_KEY_FILE)
        cert_path = os.path.join(directory, ROOT_CERT_FILE)
        for path, other in ((key_path, cert_path), (cert_path, key_path)):
            if not os.path.exists(path):
                raise CAError(f"missing, but {os.path.basename(other)} exists; restore it, or remove both to "
                              "generate a new root (every workload certificate will then have to be reissued)",
                              path)
        key = _load_key(directory, ROOT_KEY_FILE)
        certs = _load_certs(directory, ROOT_CERT_FILE)
        cert = certs[0]
        if len(certs) > 1:
            raise CAError(f"holds {len(certs)} certificates; expected the root alone", cert_path)
        cls._check_key_mode(key_path)
        if _public_der(cert.public_key()) != _public_der(key.public_key()):
            raise CAError(f"does not match {ROOT_CERT_FILE} (its public key differs)", key_path)
        if not _is_self_signed(cert):
            raise CAError("not a self-signed root certificate", cert_path)
        _check_ca_certificate(cert, cert_path)
        cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cn and isinstance(cn[0], str) and cn[0].startswith(_ROOT_CN_PREFIX):
            made_for = cn[0][len(_ROOT_CN_PREFIX):]
            if made_for != trust_domain:
                raise CAError(f"the root was made for trust domain {made_for!r}, not {trust_domain!r}", cert_path)
        return cls(directory, trust_domain, key, cert, [], cert, True,
                   {cert: os.path.join(directory, ROOT_CERT_FILE)})

    @classmethod
    def _load_plugged(cls, directory: str, trust_domain: str) -> CertificateAuthority:
        key_path = os.path.join(directory, CA_KEY_FILE)
        cert_path = os.path.join(directory, CA_CERT_FILE)
        for path, other in ((key_path, cert_path), (cert_path, key_path)):
            if not os.path.exists(path):
                raise CAError(f"missing, but {os.path.basename(other)} exists; an operator-provided CA needs both",
                              path)
        key = _load_key(directory, CA_KEY_FILE)
        certs = _load_certs(directory, CA_CERT_FILE)
        cert = certs[0]
        cls._check_key_mode(key_path)
        if _public_der(cert.public_key()) != _public_der(key.public_key()):
            raise CAError(f"does not match {CA_CERT_FILE} (its public key differs)", key_path)
        _check_ca_certificate(cert, cert_path)

        # Above ca-cert.pem: the rest of ca-cert.pem, then cert-chain.pem
        # (which, as Istio makes it, may repeat ca-cert.pem first).
        above = [(c, cert_path) for c in certs[1:]]
        chain_path = os.path.join(directory, CERT_CHAIN_FILE)
        if os.path.exists(chain_path):
            chain_certs = _load_certs(directory, CERT_CHAIN_FILE)
            if chain_certs[0] == cert:
                chain_certs = chain_certs[1:]
            above += [(c, chain_path) for c in chain_certs]
        root_path = os.path.join(directory, ROOT_CERT_FILE)
        if _is_self_signed(cert):
            root, root_source = cert, cert_path
            above = []
        elif above and _is_self_signed(above[-1][0]):
            root, root_source = above.pop()
        elif os.path.exists(root_path):
            roots = _load_certs(directory, ROOT_CERT_FILE)
            root, root_source = roots[0], root_path
            if len(roots) > 1:
                raise CAError(f"holds {len(roots)} certificates; expected the root alone", root_path)
            if not _is_self_signed(root):
                raise CAError("not a self-signed root certificate", root_path)
        else:
            raise CAError(f"is an intermediate, but no root was given: end {CERT_CHAIN_FILE} with the root, or "
                          f"put it in {ROOT_CERT_FILE}", cert_path)
        links = [(cert, cert_path), *above, (root, root_source)]
        for (child, _), (parent, parent_source) in zip(links, links[1:], strict=False):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                # Name the file of the certificate that should have signed.
                raise CAError(f"the chain is broken: {child.subject.rfc4514_string()!r} is not signed by "
                              f"{parent.subject.rfc4514_string()!r}", parent_source) from None
        for c, source in links[1:]:
            _check_ca_certificate(c, source)
        return cls(directory, trust_domain, key, cert, [c for c, _ in above], root, False,
                   {c: source for c, source in links})

    @classmethod
    def _check_key_mode(cls, path: str) -> None:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            cls._log.warn("the CA key {path} is readable by others (mode {mode}); chmod 600 it",
                          path=path, mode=oct(mode))

    def _check_valid_at(self, now: datetime) -> None:
        for cert in [self.certificate, *self.chain, self.root]:
            if cert.not_valid_after_utc <= now:
                raise CAError(f"the certificate {cert.subject.rfc4514_string()!r} expired at "
                              f"{cert.not_valid_after_utc.isoformat()}", self._files.get(cert, self.directory))

    @property
    def root_pem(self) -> bytes:
        """
        The trust bundle: the root certificate, PEM.
        """
        return _pem(self.root)

    @property
    def chain_pem(self) -> bytes:
        """
        The CA certificates a leaf's holder presents after the leaf: the
        signing certificate and L{chain}, or nothing when the root signs
        leaves itself.
        """
        if self.certificate == self.root:
            return b""
        return b"".join(_pem(c) for c in [self.certificate, *self.chain])

    def _not_after(self, now: datetime, ttl: timedelta) -> datetime:
        if ttl <= timedelta(0):
            raise CAError(f"ttl must be positive, got {ttl}")
        # A leaf cannot outlive the certificates above it.
        limit = min(c.not_valid_after_utc for c in [self.certificate, *self.chain, self.root])
        if limit <= now:
            raise CAError(f"the CA certificate expired at {limit.isoformat()}")
        return min(now + ttl, limit)

    def _leaf(self, public_key: Any, subject: x509.Name, sans: list[x509.GeneralName],
              usages: list[x509.ObjectIdentifier], now: datetime, ttl: timedelta) -> x509.Certificate:
        now = _utc(now)
        not_after = self._not_after(now, ttl)
        not_before = max(now - CLOCK_SKEW, self.certificate.not_valid_before_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            # RFC 5280 4.2.1.6: with an empty subject the SAN is critical.
            .add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
        )
        builder = _key_identifiers(builder, public_key, self.certificate, self._key)
        return builder.sign(self._key, _signing_hash(self._key))

    def issue_server_certificate(self, dns_names: list[str], ip_addresses: list[str], now: datetime,
                                 ttl: timedelta) -> IssuedCertificate:
        """
        Make a new ECDSA P-256 key and a server certificate for it: the
        pilot's own certificate for its channel's TLS.

        The certificate has the subject C{O=txmesh, CN=<first name>}, the
        given names as DNS and IP subject alternative names (which is what
        clients check), and the C{serverAuth} extended key usage.

        @param dns_names: host names clients connect to.
        @param ip_addresses: IP addresses clients connect to (text).
        @param now: the current time (timezone-aware).
        @param ttl: how long the certificate is valid; shortened to the
            CA's own expiry if that comes first.
        @raise CAError: if no name is given, a name is not valid, C{ttl}
            is not positive, or the CA has expired.
        """
        if not dns_names and not ip_addresses:
            raise CAError("a server certificate needs at least one DNS name or IP address")
        sans: list[x509.GeneralName] = []
        for name in dns_names:
            labels = name.split(".") if isinstance(name, str) else []
            if not labels or len(name) > 253 or not all(_DNS_LABEL.match(label.lower()) for label in labels):
                raise CAError(f"dns_names: {name!r} is not a DNS name")
            sans.append(x509.DNSName(name.lower()))
        for address in ip_addresses:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(address)))
            except ValueError:
                raise CAError(f"ip_addresses: {address!r} is not an IP address") from None
        first = (list(dns_names) + list(ip_addresses))[0].lower()
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "txmesh")]
        if len(first) <= 64:
            attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, first))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(key.public_key(), x509.Name(attributes), sans, [ExtendedKeyUsageOID.SERVER_AUTH],
                          now, ttl)
        return IssuedCertificate(
            private_key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()),
            certificate_pem=_pem(cert),
            chain_pem=self.chain_pem,
            expires=cert.not_valid_after_utc,
        )

    def sign_csr(self, csr_pem: bytes, spiffe_id: str, now: datetime, ttl: timedelta) -> bytes:
        """
        Sign a workload's certificate signing request.

        The certificate's only name is C{spiffe_id}, as a URI subject
        alternative name (critical; the subject is empty); the subject and
        names the CSR asks for are ignored, since the caller has already
        decided the identity from the workload's credential.  Extended key
        usages: C{clientAuth} and C{serverAuth}.

        @param csr_pem: a PEM PKCS#10 request with an ECDSA P-256 key.
        @param spiffe_id: the workload identity, in this CA's trust domain
            (see L{spiffe_id <txmesh.pilot.ca.spiffe_id>}).
        @param now: the current time (timezone-aware).
        @param ttl: the certificate's lifetime; shortened to the CA's own
            expiry if that comes first.
        @return: the certificate followed by L{chain_pem}, PEM, leaf first.
        @raise CAError: if the CSR does not parse, its signature does not
            verify, its key is not ECDSA P-256, C{spiffe_id} is not an
            identity of this trust domain, or C{ttl} is not positive.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, TypeError) as e:
            raise CAError(f"not a PEM certificate signing request ({e})") from None
        try:
            valid = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, TypeError) as e:
            raise CAError(f"the CSR's key cannot be read ({e})") from None
        if not valid:
            raise CAError("the CSR's signature does not verify (it was not signed by the key it carries)")
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            size = getattr(public_key, "key_size", None)
            kind = type(public_key).__name__.replace("PublicKey", "").lstrip("_")
            raise CAError(f"the CSR's key must be ECDSA P-256, got {kind}{f' {size}' if size else ''}")
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise CAError(f"the CSR's key must be ECDSA P-256, got ECDSA {public_key.curve.name}")
        try:
            trust_domain, _, _ = parse_spiffe_id(spiffe_id)
        except ValueError as e:
            raise CAError(f"spiffe_id: {e}") from None
        if trust_domain != self.trust_domain:
            raise CAError(f"spiffe_id: {spiffe_id!r} is not in this CA's trust domain {self.trust_domain!r}")
        cert = self._leaf(public_key, x509.Name([]), [x509.UniformResourceIdentifier(spiffe_id)],
                          [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH], now, ttl)
        return _pem(cert) + self.chain_pem


def server_tls_options(issued: IssuedCertificate, trust_roots_pem: bytes | None = None,
                       require_client_certificate: bool = True) -> CertificateOptions:
    """
    TLS server options for the pilot's channel, via
    L{txmesh.proxy.tls.server_options}: TLS 1.2 at least, no ALPN.

    Use them with L{twisted.internet.ssl.optionsForClientTLS}'s server-side
    counterparts: C{TLSMemoryBIOFactory(options, False, factory)} (or
    L{txmesh.proxy.tls.TLSListenerFactory}) around a listener from any
    endpoint string, or C{reactor.listenSSL}.

    @param issued: the pilot's certificate, from
        L{CertificateAuthority.issue_server_certificate}.
    @param trust_roots_pem: when given, clients must present a certificate
        chaining to one of these roots (mutual TLS, for when proxies hold
        workload certificates); C{None} for server-authenticated TLS only.
    @param require_client_certificate: with C{trust_roots_pem}, whether a
        client must present a certificate; if not, one that is presented
        must still chain to the roots.
    @raise CAError: if the certificate and key do not make a TLS context.
    """
    try:
        return server_options(issued.full_chain_pem, issued.private_key_pem, alpn=(), min_version="1.2",
                              client_ca_pem=trust_roots_pem,
                              require_client_certificate=require_client_certificate)
    except TLSConfigError as e:
        raise CAError(f"cannot make TLS server options: {e}") from None


def client_tls_options(hostname: str, trust_roots_pem: bytes) -> Any:
    """
    TLS client options for a proxy connecting to the pilot, via
    L{txmesh.proxy.tls.client_options}: the pilot's certificate must chain
    to C{trust_roots_pem} (the system's roots are not used) and name
    C{hostname}; TLS 1.2 at least (Twisted's minimum).

    @param hostname: the DNS name or IP address the proxy dials.
    @param trust_roots_pem: the mesh trust bundle (L{CertificateAuthority.root_pem}).
    @return: an C{IOpenSSLClientConnectionCreator} for
        C{wrapClientTLS}, C{connectSSL} or C{TLSMemoryBIOFactory}.
    @raise CAError: if C{trust_roots_pem} is empty or does not parse.
    """
    if not trust_roots_pem:
        raise CAError("trust_roots_pem is empty; the channel trusts only the mesh root, never the system's")
    try:
        return client_options(hostname, alpn=(), ca_certificate_pem=trust_roots_pem)
    except TLSConfigError as e:
        raise CAError(f"cannot make TLS client options: {e}") from None
