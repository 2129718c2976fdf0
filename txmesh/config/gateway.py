"""
Istio C{Gateway} resources: which proxies (by their labels) serve which
ports, for which hosts, with which TLS.

A Gateway says only what the edge of the mesh listens for; the
VirtualServices bound to it (their C{gateways} field) say where requests
go, and L{txmesh.config.istio.translate} turns those into routes for one
gateway port.  This module is the pure part: reading the documents and
choosing the Gateways of a proxy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from txmesh.config.errors import ConfigError
from txmesh.config.section import Section
from txmesh.config.values import boolean as _bool
from txmesh.config.values import int_in
from txmesh.config.values import labels as _labels
from txmesh.config.values import string as _string
from txmesh.proxy.tls import server_name_matches

__all__ = [
    "GATEWAY_API_VERSIONS",
    "HTTP_PROTOCOLS",
    "PROXY_TYPE_LABEL",
    "ROUTER",
    "Gateway",
    "GatewayServer",
    "ServerTLS",
    "gateways_for",
    "parse_gateways",
]

GATEWAY_API_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")

PROXY_TYPE_LABEL = "txmesh.io/proxy-type"
"""
The node label that makes a proxy a gateway (value L{ROUTER}, Istio's name
for a gateway proxy), set by C{txmesh-proxy --router}.
"""
ROUTER = "router"

HTTP_PROTOCOLS = ("HTTP", "HTTP2", "GRPC")
"""
Server protocols carried by a plaintext HTTP listener.
"""
_PROTOCOLS = (*HTTP_PROTOCOLS, "HTTPS", "TLS", "TCP")
_TLS_MODES = ("SIMPLE", "MUTUAL", "PASSTHROUGH", "ISTIO_MUTUAL", "AUTO_PASSTHROUGH", "OPTIONAL_MUTUAL")
_SUPPORTED_TLS_MODES = ("SIMPLE", "MUTUAL")
_port = int_in(1, 65535)
_MIN_VERSIONS = {"TLS_AUTO": "1.2", "TLSV1_2": "1.2", "TLSV1_3": "1.3"}


@attrs.frozen
class ServerTLS:
    """
    How a gateway server terminates TLS.

    @ivar mode: C{SIMPLE} (server certificate) or C{MUTUAL} (clients must
        present a certificate that chains to the CA too).
    @ivar credential_name: the name of the operator's credential in the
        pilot's C{credentials/} directory, or C{None}.
    @ivar server_certificate: path of the certificate on the gateway's host
        (Istio's file-mounted form), or C{None}.
    @ivar private_key: path of its key on the gateway's host, or C{None}.
    @ivar ca_certificates: path of the client CA on the gateway's host, or
        C{None}.
    @ivar min_version: C{"1.2"} or C{"1.3"}.
    """

    mode: str
    credential_name: str | None = None
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    min_version: str = "1.2"


@attrs.frozen
class GatewayServer:
    """
    One entry of a Gateway's C{servers}.

    @ivar port: the port the gateway listens on.
    @ivar protocol: C{HTTP}, C{HTTP2}, C{GRPC}, C{HTTPS}, C{TLS} or C{TCP}.
    @ivar hosts: C{(namespace, host pattern)} pairs: the VirtualServices of
        C{namespace} (C{*} for any) may route C{host} here.
    @ivar tls: TLS termination (C{HTTPS}), or C{None}; see L{passthrough}.
    @ivar https_redirect: an C{HTTP} server that answers every request with
        a redirect to C{https}.
    @ivar field: where it was written, e.g. C{spec.servers[1]}.
    """

    port: int
    protocol: str
    hosts: tuple[tuple[str, str], ...]
    tls: ServerTLS | None = None
    https_redirect: bool = False
    field: str = ""
    passthrough: bool = False

    @property
    def kind(self) -> str:
        """
        @return: what the port's listener does: C{http} (plaintext HTTP),
            C{https} (TLS terminated, then HTTP), C{passthrough} (TLS routed
            by SNI, not terminated) or C{tcp}.
        """
        if self.passthrough:
            return "passthrough"
        if self.protocol == "TCP":
            return "tcp"
        return "https" if self.tls is not None else "http"

    @property
    def host_patterns(self) -> tuple[str, ...]:
        """
        @return: the host patterns, without their namespaces.
        """
        return tuple(dict.fromkeys(host for _, host in self.hosts))

    def admits(self, namespace: str, host: str) -> bool:
        """
        @return: whether a VirtualService in C{namespace} may route C{host}
            (a domain, without port) through this server.
        """
        return any(ns in ("*", namespace) and server_name_matches(pattern, host) for ns, pattern in self.hosts)


@attrs.frozen
class Gateway:
    """
    A parsed C{Gateway}.

    @ivar selector: labels a proxy must carry to serve it.
    @ivar source: the file it came from.
    @ivar document: its number in that file.
    """

    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...]
    servers: tuple[GatewayServer, ...]
    source: str | None = None
    document: int | None = None

    @property
    def key(self) -> str:
        """
        @return: C{namespace/name}, as VirtualServices name it.
        """
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: Mapping[str, str]) -> bool:
        """
        @return: whether a proxy with C{labels} serves this Gateway.
        """
        return all(labels.get(k) == v for k, v in self.selector)


def _is_gateway(body: Any) -> bool:
    return (isinstance(body, Mapping) and body.get("kind") == "Gateway"
            and str(body.get("apiVersion", "")).startswith("networking.istio.io/"))


def _host(namespace: str, value: Any) -> tuple[str, str]:
    text = _string(value)
    ns, slash, host = text.rpartition("/")
    if not slash:
        ns = "*"
    elif ns == ".":
        ns = namespace
    elif not ns:
        raise ValueError(f"{text!r}: write NAMESPACE/HOST, ./HOST, */HOST or HOST")
    if not host:
        raise ValueError(f"{text!r}: no host after the namespace")
    return ns, host.lower()


def _tls(s: Section, protocol: str) -> tuple[ServerTLS | None, bool, bool]:
    redirect = s.get("httpsRedirect", _bool, False)
    mode = s.get("mode", _upper_one_of(_TLS_MODES), "SIMPLE" if protocol in ("HTTPS", "TLS") else None)
    for unsupported in ("subjectAltNames", "verifyCertificateSpki", "verifyCertificateHash", "cipherSuites",
                        "maxProtocolVersion", "credentialNames", "tlsCertificates"):
        if s.value.get(unsupported) is not None:
            raise s.error("not supported by txmesh", s.field(unsupported))
    min_version = s.get("minProtocolVersion", _upper_one_of(tuple(_MIN_VERSIONS)), "TLS_AUTO")
    tls = None
    passthrough = protocol in ("HTTPS", "TLS") and mode == "PASSTHROUGH"
    if protocol == "TLS" and not passthrough:
        raise s.error(f"a TLS server is routed by SNI without terminating: mode PASSTHROUGH (txmesh does not "
                      f"terminate TLS for TCP routes; got {mode})", s.field("mode"))
    if passthrough:
        for key in ("credentialName", "serverCertificate", "privateKey", "caCertificates"):
            if s.value.get(key) is not None:
                raise s.error("PASSTHROUGH does not terminate TLS: no certificate", s.field(key))
    elif protocol == "HTTPS":
        if mode not in _SUPPORTED_TLS_MODES:
            raise s.error(f"{mode} is not supported by txmesh on a gateway (supported: "
                          f"{', '.join(_SUPPORTED_TLS_MODES)})", s.field("mode"))
        credential = s.get("credentialName", _string)
        certificate = s.get("serverCertificate", _string)
        key = s.get("privateKey", _string)
        ca = s.get("caCertificates", _string)
        if credential is not None and (certificate or key):
            raise s.error("give credentialName or serverCertificate and privateKey, not both",
                          s.field("credentialName"))
        if credential is None and not (certificate and key):
            raise s.error("an HTTPS server needs credentialName, or serverCertificate and privateKey",
                          s.field("credentialName"))
        if mode == "MUTUAL" and credential is None and ca is None:
            raise s.error("MUTUAL needs caCertificates (or a credentialName with ca.crt)", s.field("caCertificates"))
        tls = ServerTLS(mode, credential, certificate, key, ca, _MIN_VERSIONS[min_version])
    else:
        s.get("credentialName", _string)
        s.get("serverCertificate", _string)
        s.get("privateKey", _string)
        s.get("caCertificates", _string)
    s.done()
    return tls, redirect, passthrough


def _upper_one_of(choices: tuple[str, ...]) -> Any:
    def convert(value: Any) -> str:
        text = str(value).upper()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return convert


def _server(namespace: str, field: str, value: Any, source: str | None) -> GatewayServer:
    s = Section(source, field, value)
    port = s.sub("port")
    if port is None:
        raise s.error("is required", s.field("port"))
    number = port.get("number", _port, required=True)
    protocol = port.get("protocol", _upper_one_of(_PROTOCOLS), required=True)
    port.get("name", _string)
    if port.value.get("targetPort") is not None:
        port.get("targetPort", _port)
    port.done()
    hosts = []
    for f, v in s.items("hosts", required=True):
        try:
            hosts.append(_host(namespace, v))
        except (ValueError, TypeError) as e:
            raise s.error(str(e), f) from None
    if not hosts:
        raise s.error("list at least one host", s.field("hosts"))
    tls_section = s.sub("tls")
    tls, redirect, passthrough = (None, False, False) if tls_section is None else _tls(tls_section, protocol)
    if protocol in ("HTTPS", "TLS") and tls is None and not passthrough:
        raise s.error(f"an {protocol} server needs tls (mode and credentialName, or mode PASSTHROUGH)",
                      s.field("tls"))
    s.get("name", _string)
    if s.value.get("bind") is not None:
        raise s.error("not supported by txmesh (gateways listen on all of their addresses)", s.field("bind"))
    s.done()
    return GatewayServer(number, protocol, tuple(hosts), tls, redirect, field, passthrough)


def parse_gateway(body: Any, source: str | None = None, document: int | None = None,
                  namespace: str = "default") -> Gateway:
    """
    Read one C{Gateway} document.

    @raise ConfigError: naming the file, the document, the field and why.
    """
    try:
        top = Section(source, "", body)
        version = top.get("apiVersion", _string, required=True)
        if version not in GATEWAY_API_VERSIONS:
            raise top.error(f"unsupported apiVersion {version!r} (supported: {', '.join(GATEWAY_API_VERSIONS)})",
                            "apiVersion")
        top.get("kind", _string)
        top.get("status", lambda v: v)
        meta = top.sub("metadata")
        if meta is None:
            raise top.error("is required", "metadata")
        name = meta.get("name", _string, required=True)
        namespace = meta.get("namespace", _string, namespace)
        spec = top.sub("spec")
        if spec is None:
            raise top.error("is required", "spec")
        top.done()
        selector = tuple(sorted(spec.get("selector", _labels, ())))
        servers = tuple(_server(namespace, f, v, source) for f, v in spec.items("servers", required=True))
        if not servers:
            raise spec.error("list at least one server", spec.field("servers"))
        spec.done()
        by_port: dict[int, GatewayServer] = {}
        for server in servers:
            other = by_port.setdefault(server.port, server)
            if other.kind != server.kind:
                raise spec.error(f"port {server.port} is served as {other.kind} by {other.field}, and this "
                                 f"server is {server.kind}; one port has one kind (http, https, TLS "
                                 f"passthrough or tcp)", server.field + ".port")
    except ConfigError as e:
        if e.document is None:
            e = ConfigError(e.source, e.field, e.reason, document=document)
        raise e from None
    return Gateway(name, namespace, selector, servers, source, document)


def parse_gateways(documents: Iterable[tuple[str | None, int, Any]], namespace: str = "default") -> list[Gateway]:
    """
    Read the C{Gateway} documents among C{documents}; the later document
    with a namespace and name replaces the earlier one, as
    C{kubectl apply} would.

    @param namespace: the namespace of documents that name none.
    @raise ConfigError: on the first invalid Gateway.
    """
    found: dict[tuple[str, str], Gateway] = {}
    for source, number, body in documents:
        if _is_gateway(body):
            gateway = parse_gateway(body, source, number, namespace)
            found[(gateway.namespace, gateway.name)] = gateway
    return list(found.values())


def gateways_for(gateways: Iterable[Gateway], labels: Mapping[str, str]) -> list[Gateway]:
    """
    @return: the Gateways a gateway proxy with C{labels} serves.  A Gateway
        with an empty selector selects every gateway proxy.
    """
    return [g for g in gateways if g.selects(labels)]
