"""
The proxy's workload identity: its private key (made here, never sent
anywhere), the certificate the pilot signed for it, and the mesh trust
bundle; renewed at half-life with a new key.

The pilot client asks for certificates (L{WorkloadIdentity.new_request},
L{WorkloadIdentity.install}); listeners and clusters that speak mutual TLS
subscribe and rebuild their TLS options when the certificate changes, so new
connections use the new one while open connections keep theirs.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.logger import Logger

from txmesh.identity import certificate_identity

log = Logger()

KEY_FILE = "key.pem"
CHAIN_FILE = "cert-chain.pem"
ROOTS_FILE = "root-cert.pem"


class IdentityError(Exception):
    """
    A certificate the proxy cannot use; C{str()} says why.
    """


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def token_service_account(token: str) -> str | None:
    """
    @return: the service account a join token names (its C{sa} claim), read
        without checking the signature (the pilot checks it), or C{None}.
    """
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    sa = payload.get("sa") if isinstance(payload, dict) else None
    return sa if isinstance(sa, str) and sa else None


class WorkloadIdentity:
    """
    One proxy's identity material.

    @ivar spiffe_id: the identity asked for.
    @ivar chain_pem: the certificate chain (leaf first), or C{None} before
        the first is installed.
    @ivar roots_pem: the mesh trust bundle, or C{None}.
    @ivar not_before: the leaf's start, POSIX seconds.
    @ivar not_after: the leaf's end, POSIX seconds.
    """

    def __init__(self, spiffe_id: str, directory: str | None = None):
        """
        @param spiffe_id: C{spiffe://<trust domain>/ns/<ns>/sa/<sa>}.
        @param directory: where to keep the key and certificate across
            restarts (mode 0700/0600), or C{None} to keep them in memory.
        """
        self.spiffe_id = spiffe_id
        self._directory = directory
        self._key: Any = None
        self._pending_key: Any = None
        self.chain_pem: bytes | None = None
        self.roots_pem: bytes | None = None
        self.not_before = 0.0
        self.not_after = 0.0
        self._taken_at = 0.0
        self._subscribers: list[Callable[[WorkloadIdentity], object]] = []

    # --- asking for and taking certificates -----------------------------------

    def new_request(self) -> bytes:
        """
        Make a new key and a CSR for it naming L{spiffe_id}; the key is used
        once L{install} gets its certificate.

        @return: the CSR, PEM.
        """
        self._pending_key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(self.spiffe_id)]), critical=True
            )
            .sign(self._pending_key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.PEM)

    def install(self, chain_pem: bytes, roots_pem: bytes, now: float) -> None:
        """
        Take the certificate signed for the last request.

        @param now: the current time (POSIX seconds); renewal is due half-way
            from now to the certificate's end.

        @raise IdentityError: it is not for the pending key or not for
            L{spiffe_id}, or the PEM does not parse; the current
            certificate stays.
        """
        if self._pending_key is None:
            raise IdentityError("a certificate arrived, but no request is pending")
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
            x509.load_pem_x509_certificates(roots_pem)
        except ValueError as e:
            raise IdentityError(f"the certificate does not parse ({e})") from None
        leaf = chain[0]
        if _public_der(leaf.public_key()) != _public_der(self._pending_key.public_key()):
            raise IdentityError("the certificate is not for the key this proxy asked with")
        identity = certificate_identity(leaf)
        if identity != self.spiffe_id:
            raise IdentityError(f"the certificate names {identity}, not {self.spiffe_id}")
        self._key, self._pending_key = self._pending_key, None
        self._set(chain_pem, roots_pem, leaf, now)
        self._save()

    def update_roots(self, roots_pem: bytes) -> None:
        """
        Take a new trust bundle (a root rotation) without a new certificate.

        @raise IdentityError: the PEM does not parse.
        """
        try:
            x509.load_pem_x509_certificates(roots_pem)
        except ValueError as e:
            raise IdentityError(f"the trust bundle does not parse ({e})") from None
        if roots_pem != self.roots_pem:
            self.roots_pem = roots_pem
            self._save()
            self._notify()

    def material(self) -> dict[str, str] | None:
        """
        @return: the key, certificate chain and trust bundle (PEM text), for
            L{adopt} in the worker processes of the same proxy; C{None}
            before a certificate is installed.
        """
        if self._key is None or self.chain_pem is None or self.roots_pem is None:
            return None
        return {"key": self.key_pem.decode("ascii"), "chain": self.chain_pem.decode("ascii"),
                "roots": self.roots_pem.decode("ascii")}

    def adopt(self, material: dict[str, str], now: float) -> None:
        """
        Take the key and certificate another process of this proxy got from
        the pilot (see L{material}): a worker of C{--concurrency} has no
        channel of its own.

        @raise IdentityError: the material does not parse, the key and
            certificate do not match, or the certificate is not for
            L{spiffe_id}; the current certificate stays.
        """
        try:
            key = serialization.load_pem_private_key(material["key"].encode("ascii"), None)
            chain_pem = material["chain"].encode("ascii")
            roots_pem = material["roots"].encode("ascii")
            leaf = x509.load_pem_x509_certificates(chain_pem)[0]
            x509.load_pem_x509_certificates(roots_pem)
        except (KeyError, AttributeError, UnicodeEncodeError, ValueError, TypeError) as e:
            raise IdentityError(f"the identity material does not parse ({e})") from None
        if _public_der(leaf.public_key()) != _public_der(key.public_key()):
            raise IdentityError("the certificate is not for the key given with it")
        identity = certificate_identity(leaf)
        if identity != self.spiffe_id:
            raise IdentityError(f"the certificate names {identity}, not {self.spiffe_id}")
        if chain_pem == self.chain_pem and roots_pem == self.roots_pem:
            return
        self._key = key
        self._set(chain_pem, roots_pem, leaf, now)

    def _set(self, chain_pem: bytes, roots_pem: bytes, leaf: x509.Certificate, now: float) -> None:
        self.chain_pem = chain_pem
        self.roots_pem = roots_pem
        self.not_before = leaf.not_valid_before_utc.timestamp()
        self.not_after = leaf.not_valid_after_utc.timestamp()
        self._taken_at = now
        self._notify()

    # --- state -----------------------------------------------------------------

    @property
    def key_pem(self) -> bytes | None:
        """
        @return: the private key of the installed certificate, PEM (for
            building TLS contexts in this process only).
        """
        if self._key is None:
            return None
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def valid_at(self, now: float) -> bool:
        """
        @return: whether a certificate is installed and valid at C{now}.
        """
        return self.chain_pem is not None and self.not_before <= now < self.not_after

    def renew_at(self) -> float:
        """
        @return: when to ask for the next certificate: half-way through the
            installed one's life (counted from when it was taken: the CA
            back-dates certificates a little for clock skew).
        """
        start = max(self.not_before, self._taken_at)
        return start + (self.not_after - start) / 2

    def subscribe(self, callback: Callable[[WorkloadIdentity], object]) -> None:
        """
        Call C{callback(self)} whenever the certificate or the trust bundle
        changes.
        """
        self._subscribers.append(callback)

    def _notify(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback(self)
            except Exception:
                log.failure("workload identity subscriber failed")

    # --- keeping it across restarts ----------------------------------------------

    def load(self, now: float) -> bool:
        """
        Take the key and certificate kept in the directory, if they are
        still valid at C{now} and for L{spiffe_id}.

        @return: whether they were taken.
        """
        if self._directory is None:
            return False
        try:
            with open(os.path.join(self._directory, KEY_FILE), "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
            with open(os.path.join(self._directory, CHAIN_FILE), "rb") as f:
                chain_pem = f.read()
            with open(os.path.join(self._directory, ROOTS_FILE), "rb") as f:
                roots_pem = f.read()
            leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        except (OSError, ValueError, TypeError):
            return False
        if _public_der(leaf.public_key()) != _public_der(key.public_key()):
            return False
        if certificate_identity(leaf) != self.spiffe_id:
            return False
        if not leaf.not_valid_before_utc.timestamp() <= now < leaf.not_valid_after_utc.timestamp():
            return False
        self._key = key
        self._set(chain_pem, roots_pem, leaf, now)
        return True

    def _save(self) -> None:
        if self._directory is None or self._key is None or self.chain_pem is None or self.roots_pem is None:
            return
        os.makedirs(self._directory, mode=0o700, exist_ok=True)
        for name, data, mode in ((KEY_FILE, self.key_pem, 0o600), (CHAIN_FILE, self.chain_pem, 0o644),
                                 (ROOTS_FILE, self.roots_pem, 0o644)):
            path = os.path.join(self._directory, name)
            temp = path + ".tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temp, path)
