"""
How the pilot protects its channel: TLS with a certificate from the mesh CA
(L{txmesh.pilot.ca}), and a join token (L{txmesh.pilot.tokens}) in every
proxy's L{Hello}, bound to the proxy's namespace.

    CONFIG_DIR/ca/root-cert.pem   the mesh root: what proxies trust (pilot.ca_file)
    CONFIG_DIR/ca/root-key.pem    its key (0600), or ca-key.pem/ca-cert.pem from the operator
    CONFIG_DIR/ca/token.key       the key join tokens are signed with (0600)
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from txmesh.pilot.ca import CertificateAuthority, check_dns_label, server_tls_options
from txmesh.pilot.messages import Hello
from txmesh.pilot.tokens import InvalidCredential, TokenAuthority, load_or_create_key

TOKEN_KEY_FILE = "token.key"
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
    return TokenAuthority(load_or_create_key(os.path.join(ca_dir, TOKEN_KEY_FILE)))


@attrs.frozen
class ChannelSecurity:
    """
    The pilot end of a secure channel.

    @ivar server_options: TLS server options with the pilot's certificate.
    @ivar tokens: checks the proxies' join tokens.
    @ivar clock: the time tokens are checked at.
    @ivar root_pem: the mesh root, for operators and proxies to trust.
    """

    server_options: Any
    tokens: TokenAuthority
    clock: IReactorTime
    root_pem: bytes

    def authenticate(self, hello: Hello) -> str | None:
        """
        @return: why the proxy saying C{hello} is refused, or C{None} to
            admit it.
        """
        if not hello.credential:
            return "no credential: the proxy needs a join token (txmesh token create)"
        try:
            claims = self.tokens.verify(hello.credential, self.clock.seconds())
        except InvalidCredential as e:
            return f"invalid credential: {e}"
        if claims.namespace != hello.node.namespace:
            return (f"the credential is for namespace {claims.namespace!r}, but the proxy says it is in "
                    f"{hello.node.namespace!r}")
        return None


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
    ca_dir: str, trust_domain: str, clock: IReactorTime, server_names: Iterable[str] = ()
) -> ChannelSecurity:
    """
    Load (or create) the CA in C{ca_dir} and issue the pilot a serving
    certificate for its names.

    @param server_names: extra DNS names and IP addresses the pilot is
        reached by (the defaults and the host name are always in).
    @raise txmesh.pilot.ca.CAError: the CA directory is unusable.
    """
    now = datetime.fromtimestamp(clock.seconds(), timezone.utc)
    ca = CertificateAuthority.load_or_create(ca_dir, trust_domain, now)
    dns_names, ips = _split_names([*DEFAULT_SERVER_NAMES, *_host_name(), *server_names])
    issued = ca.issue_server_certificate(dns_names, ips, now, SERVER_CERT_TTL)
    return ChannelSecurity(server_tls_options(issued), token_authority(ca_dir), clock, ca.root_pem)
