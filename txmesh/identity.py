"""
Workload identities as certificates carry them: one SPIFFE ID
(C{spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>}) as the only
URI subject alternative name.  Pure functions over C{cryptography} objects,
shared by the pilot (checking what a CSR asks for) and the proxy (checking
who a peer is).
"""

from __future__ import annotations

from typing import Any

from cryptography import x509

SPIFFE_SCHEME = "spiffe://"


def uri_names(extensions: x509.Extensions) -> list[str]:
    """
    @return: the URI subject alternative names in C{extensions}.
    """
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_ids(extensions: x509.Extensions) -> list[str]:
    """
    @return: the SPIFFE IDs among the URI names of C{extensions}.
    """
    return [name for name in uri_names(extensions) if name.startswith(SPIFFE_SCHEME)]


def certificate_identity(certificate: Any) -> str | None:
    """
    @param certificate: a C{cryptography} certificate, or a pyOpenSSL
        C{X509} (as C{getPeerCertificate()} gives).
    @return: its SPIFFE ID, or C{None} if it carries none or more than one.
    """
    if hasattr(certificate, "to_cryptography"):
        certificate = certificate.to_cryptography()
    ids = spiffe_ids(certificate.extensions)
    return ids[0] if len(ids) == 1 else None


def requested_identity(csr_pem: bytes) -> str:
    """
    @return: the one SPIFFE ID a certificate signing request asks for.
    @raise ValueError: the CSR does not parse, or asks for no SPIFFE ID or
        for several.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM certificate signing request ({e})") from None
    ids = spiffe_ids(csr.extensions)
    if len(ids) != 1:
        raise ValueError(f"the CSR must ask for exactly one SPIFFE ID (a URI SAN), it asks for {len(ids)}")
    return ids[0]


def trust_domain_of(spiffe_id: str) -> str:
    """
    @return: the trust domain of C{spiffe_id} (C{cluster.local} in
        C{spiffe://cluster.local/ns/a/sa/b}).
    """
    return spiffe_id[len(SPIFFE_SCHEME):].split("/", 1)[0] if spiffe_id.startswith(SPIFFE_SCHEME) else ""
