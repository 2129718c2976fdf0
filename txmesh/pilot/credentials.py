"""
Operator credentials for gateways: the certificates a Gateway's
C{tls.credentialName} names, kept by the pilot and pushed to the gateway
proxies that serve it (as Istio's SDS does with Kubernetes secrets).

Layout, one directory per credential, with the file names of a Kubernetes
C{kubernetes.io/tls} secret::

    CONFIG_DIR/credentials/NAME/tls.crt   certificate chain, leaf first
    CONFIG_DIR/credentials/NAME/tls.key   its private key
    CONFIG_DIR/credentials/NAME/ca.crt    client CA, for MUTUAL (optional)

As in Istio, the client CA of credential C{NAME} may also be the
C{ca.crt} of a credential called C{NAME-cacert}.
"""

from __future__ import annotations

import os

import attrs

from txmesh.config.errors import ConfigError
from txmesh.proxy.tls import TLSConfigError, server_options

__all__ = ["Credential", "credentials_signature", "load_credentials"]

CERTIFICATE = "tls.crt"
PRIVATE_KEY = "tls.key"
CA_CERTIFICATE = "ca.crt"


@attrs.frozen
class Credential:
    """
    One credential's PEM data.

    @ivar ca_pem: the client CA, or empty.
    """

    name: str
    certificate_pem: bytes = attrs.field(repr=False)
    private_key_pem: bytes = attrs.field(repr=False)
    ca_pem: bytes = attrs.field(default=b"", repr=False)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None


def load_credentials(directory: str) -> dict[str, Credential]:
    """
    Read and check every credential under C{directory} (missing: none).

    @raise ConfigError: a credential is unreadable, lacks a file, or its
        key is not its certificate's, naming the file.
    """
    out: dict[str, Credential] = {}
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return out
    except OSError as e:
        raise ConfigError(directory, "", f"cannot list: {e.strerror}") from None
    for name in names:
        base = os.path.join(directory, name)
        if not os.path.isdir(base):
            continue
        certificate = _read(os.path.join(base, CERTIFICATE))
        key = _read(os.path.join(base, PRIVATE_KEY))
        ca = _read(os.path.join(base, CA_CERTIFICATE)) or b""
        if certificate is None and key is None and ca:
            out[name] = Credential(name, b"", b"", ca)  # a NAME-cacert: a CA alone
            continue
        for part, value in ((CERTIFICATE, certificate), (PRIVATE_KEY, key)):
            if value is None:
                raise ConfigError(os.path.join(base, part), "", "missing: a credential needs tls.crt and tls.key")
        assert certificate is not None and key is not None
        try:
            server_options(certificate, key, client_ca_pem=ca or None)
        except TLSConfigError as e:
            file = {"certificate": CERTIFICATE, "private_key": PRIVATE_KEY, "client_ca": CA_CERTIFICATE}[e.part]
            raise ConfigError(os.path.join(base, file), "", e.reason) from None
        out[name] = Credential(name, certificate, key, ca)
    return out


def credentials_signature(directory: str) -> object:
    """
    @return: a value that changes when a credential file changes, for the
        pilot's config watch.
    """
    stamp = []
    try:
        for name in sorted(os.listdir(directory)):
            base = os.path.join(directory, name)
            if os.path.isdir(base):
                for file in sorted(os.listdir(base)):
                    st = os.stat(os.path.join(base, file))
                    stamp.append((name, file, st.st_mtime_ns, st.st_size))
    except FileNotFoundError:
        return ()
    except OSError as e:
        return ("error", str(e))
    return tuple(stamp)
