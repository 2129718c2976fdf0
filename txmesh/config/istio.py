"""
Istio networking documents translated into txmesh's own model, pure: plain
values in, plain values out, no files and no reactor.

Supported: C{networking.istio.io/v1}, C{v1beta1} and C{v1alpha3}
C{VirtualService} (HTTP routes), C{DestinationRule} and C{ServiceEntry}.
Every problem is a L{ConfigError} naming the file, the document (counting
from 1), the field path (C{spec.http[0].route[1].weight}) and the reason;
fields that are valid Istio but that txmesh does not implement become
L{IstioWarning}s naming the field, so nothing is dropped silently.

The shape of the result follows Istio's sidecar (C{mesh}) view:

    - one L{ClusterConfig} per (FQDN host, port), named as Istio names its
      Envoy clusters: C{outbound|9080||reviews.default.svc.cluster.local};
      DestinationRule subsets stay inside it as L{SubsetConfig}s;
    - one L{VirtualHost} per VirtualService, whose domains are every name
      Istio accepts for its hosts (C{reviews},
      C{reviews.default}, C{reviews.default.svc}, the FQDN, each also with
      C{:port}); each C{match} block of an HTTP route becomes its own
      L{Route}, in order, so first-match-wins is kept;
    - one default L{VirtualHost} per (host, port) of a known service that no
      VirtualService routes, forwarding everything to its cluster (as Istio
      does for services without a VirtualService).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from txmesh.config.errors import ConfigError
from txmesh.config.model import (
    CircuitBreakerConfig,
    ClusterConfig,
    DirectResponse,
    Endpoint,
    FaultPolicy,
    HashPolicy,
    HeaderMatch,
    HeaderOps,
    MirrorPolicy,
    OutlierDetectionConfig,
    Redirect,
    RetryPolicy,
    Route,
    RouteMatch,
    SubsetConfig,
    UpstreamTLS,
    VirtualHost,
    WeightedDestination,
)
from txmesh.config.values import boolean as _bool
from txmesh.config.values import header_value as _header_value
from txmesh.config.values import int_in as _int_in
from txmesh.config.values import kind_of as _kind
from txmesh.config.values import labels as _labels
from txmesh.config.values import one_of as _one_of
from txmesh.config.values import percent as _percent
from txmesh.config.values import regex as _regex
from txmesh.config.values import string as _string
from txmesh.config.values import text as _text
from txmesh.config.values import utf8 as _utf8
from txmesh.proxy.lb import is_prime as _is_prime

__all__ = [
    "API_VERSIONS",
    "DEFAULT_PORT",
    "KINDS",
    "TLS_MODE_LABEL",
    "IstioConfig",
    "IstioWarning",
    "L4Route",
    "cluster_name",
    "expected_identities",
    "resolve_host",
    "spiffe_id_of",
    "translate",
]

T = TypeVar("T")

API_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
KINDS = ("ServiceEntry", "DestinationRule", "VirtualService")
# Valid networking.istio.io kinds that a sidecar's routing does not use here:
# the document is ignored with a warning rather than refused.
_IGNORED_KINDS = ("Sidecar", "WorkloadEntry", "WorkloadGroup", "EnvoyFilter", "ProxyConfig")
DEFAULT_PORT = 80
MESH = "mesh"
"""
The gateway name that stands for every sidecar in a VirtualService's
C{gateways} (the default when it names none).
"""
GATEWAY = "Gateway"
TLS_MODE_LABEL = "security.istio.io/tlsMode"
"""
The endpoint label that says a sidecar with a workload certificate stands
before it (value C{istio}): auto mutual TLS sends C{ISTIO_MUTUAL} there.
"""

_IGNORED = "not supported by txmesh; ignored"
_BROADER = "not supported by txmesh; ignored, so this match takes more requests than it would in Istio"

_HOST = re.compile(r"\*|(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

_STANDARD_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
_SIMPLE_LB = {"ROUND_ROBIN": "round_robin", "LEAST_REQUEST": "least_request", "LEAST_CONN": "least_request",
              "RANDOM": "random"}
_RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
                       "retriable-status-codes", "cancelled", "deadline-exceeded", "internal",
                       "resource-exhausted", "unavailable"})
_RETRY_ON_UNSUPPORTED = frozenset({"envoy-ratelimited", "retriable-headers", "http3-post-connect-failure",
                                   "reset-before-request"})
_GRPC_STATUS = {name: code for code, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}
_POLICY_FIELDS = {
    "lb_policy": "loadBalancer",
    "hash_policy": "loadBalancer.consistentHash",
    "locality_failover": "loadBalancer.localityLbSetting",
    "circuit_breaker": "connectionPool",
    "connect_timeout": "connectionPool.tcp.connectTimeout",
    "idle_timeout": "connectionPool.http.idleTimeout",
    "outlier_detection": "outlierDetection",
}


@attrs.frozen
class IstioWarning:
    """
    A valid Istio field or document that txmesh does not (fully) apply.

    @ivar source: the file the document came from.
    @ivar document: the document's number in its file, counting from 1.
    @ivar field: the field path inside the document, e.g.
        C{spec.trafficPolicy.tls}; empty for the whole document.
    @ivar message: what txmesh does instead.
    """

    source: str | None
    document: int
    field: str
    message: str

    def __str__(self) -> str:
        parts = [p for p in (self.source, f"document {self.document}", self.field) if p]
        return ": ".join([*parts, self.message])


@attrs.frozen
class L4Route:
    """
    A VirtualService's C{tls} or C{tcp} route on a gateway port.

    @ivar namespace: the VirtualService's namespace (a Gateway server's
        hosts say which namespaces may route through it).
    @ivar sni_hosts: a C{tls} route's C{sniHosts}; empty for a C{tcp} route.
    @ivar cluster: where connections go.
    """

    namespace: str
    sni_hosts: tuple[str, ...]
    cluster: str


@attrs.frozen
class IstioConfig:
    """
    The result of L{translate}.

    @ivar virtual_hosts: for an HTTP listener, after its own.
    @ivar clusters: every cluster the virtual hosts (and L4 routes) name.
    @ivar warnings: unsupported fields and skipped documents, in document order.
    @ivar tls_routes: on a gateway port, the C{tls} routes (by SNI) bound to it.
    @ivar tcp_routes: on a gateway port, the C{tcp} routes bound to it.
    """

    virtual_hosts: tuple[VirtualHost, ...] = ()
    clusters: tuple[ClusterConfig, ...] = ()
    warnings: tuple[IstioWarning, ...] = ()
    tls_routes: tuple[L4Route, ...] = ()
    tcp_routes: tuple[L4Route, ...] = ()


def cluster_name(host: str, port: int) -> str:
    """
    @return: Istio's name for the outbound cluster of C{host} and C{port}.
    """
    return f"outbound|{port}||{host}"


def resolve_host(host: str, namespace: str, domain_suffix: str = "svc.cluster.local") -> str:
    """
    Resolve a host as Istio does: a short name (no dot) is a service in
    C{namespace}; names with a dot and wildcards are kept as written.

    @return: e.g. C{reviews.default.svc.cluster.local} for C{reviews}.
    """
    if host == "*" or "." in host:
        return host
    return f"{host}.{namespace}.{domain_suffix}"


def translate(
    documents: Iterable[tuple[str | None, int, Any]],
    namespace: str = "default",
    domain_suffix: str = "svc.cluster.local",
    registry: Mapping[str, Sequence[Endpoint]] | None = None,
    partial: bool = False,
    mtls: bool = False,
    accepts_mtls: Callable[[str], bool] | None = None,
    gateways: Collection[str] | None = None,
    gateway_port: int | None = None,
    registry_ports: Mapping[str, Sequence[tuple[str, int, str]]] | None = None,
    trust_domain: str = "cluster.local",
) -> IstioConfig:
    """
    Translate Istio documents into txmesh clusters and virtual hosts.

    @param documents: C{(source file, document number, parsed document)};
        C{None} documents (empty YAML documents) are skipped.
    @param namespace: the namespace of documents without
        C{metadata.namespace}, and the proxy's own (short names such as
        C{reviews} are domains only for services in it).
    @param domain_suffix: the DNS suffix of in-mesh services.
    @param registry: endpoints of services by FQDN, from service discovery,
        for hosts no ServiceEntry gives endpoints to (ports as given).
    @param partial: skip an invalid document with a warning instead of
        refusing everything.
    @param mtls: the proxies have workload certificates (their pilot has a
        CA): DestinationRule C{tls.mode: ISTIO_MUTUAL} is applied, and a
        cluster with no DestinationRule C{tls} whose endpoints all carry
        L{TLS_MODE_LABEL}C{: istio} gets C{ISTIO_MUTUAL} (Istio's auto mutual
        TLS).  Without it C{ISTIO_MUTUAL} is a warning and stays plaintext.
    @param accepts_mtls: for auto mutual TLS, whether a host's workloads
        accept mutual TLS at all (Istio looks at the namespace's and the
        mesh's PeerAuthentication: C{DISABLE} keeps it plaintext); C{None}
        for yes.
    @param gateways: translate for a gateway proxy: the C{namespace/name}
        of the Gateways it serves on C{gateway_port}.  Only the
        VirtualServices (and matches) bound to one of them apply, a match's
        C{port} must be C{gateway_port}, hosts are also accepted with that
        port, and hosts no VirtualService routes get no default route.
        C{None} (the default) translates for a sidecar: what is bound to
        C{mesh}.
    @param gateway_port: the gateway port being translated for.
    @param registry_ports: the ports of services from service discovery
        by FQDN, as C{(name, number, protocol)}: each becomes a service as
        a ServiceEntry would (its clusters, default routes, and HTTP/2 for
        C{HTTP2}/C{GRPC} ports) unless a ServiceEntry defines the host.
    @param trust_domain: the mesh's trust domain: an endpoint's
        C{<namespace>/<service account>} (L{Endpoint.service_account}) is
        the SPIFFE ID C{spiffe://<trust_domain>/ns/<namespace>/sa/<account>}.
        An C{ISTIO_MUTUAL} cluster whose DestinationRule names no
        C{subjectAltNames} accepts the SPIFFE IDs of its service (see
        L{expected_identities}), as Istio's pilot puts the destination's
        service accounts in the cluster's SAN match.
    @raise ConfigError: on the first invalid document (unless C{partial}).
    """
    return _Translation(namespace, domain_suffix, registry or {}, partial, mtls,
                        accepts_mtls, gateways, gateway_port, registry_ports or {}, trust_domain).run(documents)


def spiffe_id_of(service_account: str, trust_domain: str) -> str:
    """
    @param service_account: an L{Endpoint.service_account}:
        C{<namespace>/<account>} or a whole SPIFFE ID.
    @return: its SPIFFE ID.
    """
    if service_account.startswith("spiffe://"):
        return service_account
    namespace, _, account = service_account.partition("/")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"


def expected_identities(endpoints: Sequence[Endpoint], declared: Sequence[str], trust_domain: str) -> tuple[str, ...]:
    """
    The SPIFFE IDs an C{ISTIO_MUTUAL} connection to a service accepts, as
    Istio's pilot finds them: the service's declared identities (a
    ServiceEntry's C{subjectAltNames}) and the service accounts of its
    endpoints.

    @param endpoints: the cluster's endpoints.
    @param declared: SPIFFE IDs the service says its workloads have.
    @return: the sorted IDs; empty (any peer of the trust domain) when
        nothing is declared and some endpoint's account is unknown, since
        a list without that endpoint's identity would refuse it.
    """
    known = {spiffe_id_of(ep.service_account, trust_domain) for ep in endpoints if ep.service_account}
    if not declared and (not endpoints or any(not ep.service_account for ep in endpoints)):
        return ()
    return tuple(sorted(known.union(declared)))


# --- reading values ---------------------------------------------------------


_port = _int_in(1, 65535)
_count = _int_in(0, 2**31 - 1)


def _duration(value: Any) -> float:
    """
    A protobuf/Go duration as Istio writes them: C{"10s"}, C{"250ms"},
    C{"1m30s"}, C{"1.5h"}.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like '250ms', '10s' or '1m30s', got {_kind(value)}")
    text = value.strip()
    if text == "0":
        return 0.0
    seconds, pos = 0.0, 0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"expected a duration like '250ms', '10s' or '1m30s', got {value!r}")
    return seconds


def _header_name(value: Any) -> bytes:
    name = _string(value)
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"not a valid HTTP header name: {value!r}")
    return name.lower().encode("ascii")


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {_kind(value)}")
    return [_string(v) for v in value]


def _host(value: Any) -> str:
    host = _string(value)
    if _HOST.fullmatch(host) is None:
        raise ValueError(f"not a valid host name (a lower-case DNS name, optionally starting with '*.'): {value!r}")
    return host


def _account(value: Any) -> str:
    name = _string(value)
    if _DNS_LABEL.fullmatch(name) is None:
        raise ValueError(f"a service account name is a DNS label (a-z, 0-9, '-', at most 63), got {value!r}")
    return name


def _is_wildcard(host: str) -> bool:
    return host.startswith("*")


def _wildcard_matches(pattern: str, host: str) -> bool:
    return pattern == "*" or (host.endswith(pattern[1:]) and len(host) > len(pattern) - 1)


def _format_labels(labels: Iterable[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in labels) + "}"


class _Doc:
    """
    One document being translated: where it is, for messages, and the
    warnings it has produced so far.
    """

    def __init__(self, source: str | None, number: int, namespace: str):
        self.source = source
        self.number = number
        self.namespace = namespace
        self.name = ""
        self.warnings: list[IstioWarning] = []

    def error(self, field: str, reason: str) -> ConfigError:
        return ConfigError(self.source, field, reason, document=self.number)

    def warn(self, field: str, message: str) -> None:
        self.warnings.append(IstioWarning(self.source, self.number, field, message))

    def skip(self, error: ConfigError) -> None:
        # Warnings about parts of a document that is not used are noise.
        self.warnings = [IstioWarning(self.source, self.number, error.field, f"document skipped: {error.reason}")]


class _Obj:
    """
    A mapping in a document, with its field path; unknown keys are errors,
    known but unsupported ones warnings.
    """

    def __init__(self, doc: _Doc, path: str, value: Any, fields: Iterable[str],
                 ignored: Mapping[str, str] | Iterable[str] = ()):
        if not isinstance(value, Mapping):
            raise doc.error(path, f"expected a mapping, got {_kind(value)}")
        self.doc = doc
        self.path = path
        self.value = value
        ignored = dict(ignored) if isinstance(ignored, Mapping) else dict.fromkeys(ignored, _IGNORED)
        known = set(fields) | set(ignored)
        for key in value:
            if key not in known:
                raise doc.error(self.field(str(key)), f"unknown field (known: {', '.join(sorted(known))})")
        for key in value:
            if key in ignored and value[key] is not None:
                doc.warn(self.field(key), ignored[key])

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.value.get(key) is not None

    def get(self, key: str, convert: Callable[[Any], T], default: Any = None, required: bool = False) -> T:
        value = self.value.get(key)
        if value is None:
            if required:
                raise self.doc.error(self.field(key), "is required")
            return default
        try:
            return convert(value)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise self.doc.error(self.field(key), str(e)) from None

    def obj(self, key: str, fields: Iterable[str], ignored: Mapping[str, str] | Iterable[str] = (),
            required: bool = False) -> _Obj | None:
        if not self.has(key):
            if required:
                raise self.doc.error(self.field(key), "is required")
            return None
        return _Obj(self.doc, self.field(key), self.value[key], fields, ignored)

    def list(self, key: str, required: bool = False) -> list[tuple[str, Any]]:
        value = self.value.get(key)
        if value is None:
            if required:
                raise self.doc.error(self.field(key), "is required")
            return []
        if not isinstance(value, list):
            raise self.doc.error(self.field(key), f"expected a list, got {_kind(value)}")
        return [(f"{self.field(key)}[{i}]", v) for i, v in enumerate(value)]

    def mapping(self, key: str) -> list[tuple[str, str, Any]]:
        value = self.value.get(key)
        if value is None:
            return []
        if not isinstance(value, Mapping):
            raise self.doc.error(self.field(key), f"expected a mapping, got {_kind(value)}")
        out = []
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise self.doc.error(self.field(key), f"keys must be non-empty strings, got {k!r}")
            out.append((f"{self.field(key)}.{k}", k, v))
        return out

    def convert(self, field: str, value: Any, convert: Callable[[Any], T]) -> T:
        try:
            return convert(value)
        except (ValueError, TypeError) as e:
            raise self.doc.error(field, str(e)) from None


# --- parsed documents (before cross-document resolution) --------------------


@attrs.define
class _Port:
    number: int
    name: str
    protocol: str | None
    target_port: int | None


@attrs.define
class _WorkloadEntry:
    address: str
    ports: dict[str, int]
    labels: tuple[tuple[str, str], ...]
    weight: int
    locality: str
    service_account: str = ""


@attrs.define
class _ServiceEntry:
    doc: _Doc
    hosts: list[tuple[str, str]]
    ports: list[_Port]
    resolution: str
    endpoints: list[_WorkloadEntry]
    subject_alt_names: tuple[str, ...] = ()


@attrs.define
class _DestinationRule:
    doc: _Doc
    host: str
    host_field: str
    policy: dict[str, Any]
    subsets: list[tuple[str, SubsetConfig]]


@attrs.define
class _Dest:
    field: str  # the route destination (for its weight) or the mirror
    dest_field: str  # the Destination itself: host, subset, port
    host: str
    port: int | None
    subset: str | None
    weight: int = 100
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


@attrs.define
class _Match:
    field: str
    name: str | None
    match: RouteMatch


@attrs.define
class _HTTPRoute:
    field: str
    name: str | None
    matches: list[_Match]
    destinations: list[_Dest]
    settings: dict[str, Any]
    rewrite_uri: bytes | None
    rewrite_field: str
    mirror: _Dest | None
    mirror_percent: float


@attrs.define
class _VirtualService:
    doc: _Doc
    hosts: list[tuple[str, str]]
    routes: list[_HTTPRoute]
    l4: list[tuple[str, tuple[str, ...], _Dest]] = attrs.field(factory=list)


@attrs.define
class _Service:
    doc: _Doc
    ports: list[_Port]
    endpoints: dict[int, tuple[Endpoint, ...]]
    subject_alt_names: tuple[str, ...] = ()


@attrs.define
class _Rule:
    doc: _Doc
    host: str
    policy: dict[str, Any]
    subsets: list[SubsetConfig]
    used: bool = False


class _Translation:
    def __init__(self, namespace: str, domain_suffix: str, registry: Mapping[str, Sequence[Endpoint]],
                 partial: bool, mtls: bool = False, accepts_mtls: Callable[[str], bool] | None = None,
                 gateways: Collection[str] | None = None, gateway_port: int | None = None,
                 registry_ports: Mapping[str, Sequence[tuple[str, int, str]]] | None = None,
                 trust_domain: str = "cluster.local"):
        self.namespace = namespace
        self.trust_domain = trust_domain
        self.registry_ports = registry_ports or {}
        self.bound = frozenset([MESH] if gateways is None else gateways)
        self.gateway_port = gateway_port if gateways is not None else None
        self.mtls = mtls
        self.accepts_mtls = accepts_mtls
        self.domain_suffix = domain_suffix
        self.registry = registry
        self.partial = partial
        self.services: dict[str, _Service] = {}
        self.rules: dict[str, _Rule] = {}
        # (host, port) -> the document and field that first needed the cluster.
        self.cluster_refs: dict[tuple[str, int], tuple[_Doc, str]] = {}
        self.domains: dict[str, str] = {}
        self.routed_hosts: set[str] = set()

    def attempt(self, doc: _Doc, step: Callable[[], T]) -> T | None:
        try:
            return step()
        except ConfigError as e:
            if not self.partial:
                raise
            doc.skip(e)
            return None

    def run(self, documents: Iterable[tuple[str | None, int, Any]]) -> IstioConfig:
        docs: list[_Doc] = []
        parsed: list[Any] = []
        for source, number, body in documents:
            if body is None:
                continue
            doc = _Doc(source, number, self.namespace)
            docs.append(doc)
            item = self.attempt(doc, lambda doc=doc, body=body: self.document(doc, body))
            if item is not None:
                parsed.append(item)
        parsed = self.latest(parsed)
        for item in parsed:
            if isinstance(item, _ServiceEntry):
                self.attempt(item.doc, lambda item=item: self.add_service(item))
        self.add_registry_services()
        for item in parsed:
            if isinstance(item, _DestinationRule):
                self.attempt(item.doc, lambda item=item: self.add_rule(item))
        virtual_hosts = []
        l4: list[tuple[str, L4Route]] = []
        for item in parsed:
            if isinstance(item, _VirtualService):
                vh = self.attempt(item.doc, lambda item=item: self.add_virtual_service(item))
                if vh is not None:
                    virtual_hosts.append(vh)
                if item.l4:
                    l4.extend(self.attempt(item.doc, lambda item=item: self.add_l4_routes(item)) or [])
        clusters = self.clusters()
        if self.gateway_port is None:
            # A sidecar reaches every known service; a gateway only what
            # its VirtualServices route.
            virtual_hosts.extend(self.default_virtual_hosts(clusters))
        warnings = tuple(w for doc in docs for w in doc.warnings)
        return IstioConfig(tuple(virtual_hosts), tuple(clusters), warnings,
                           tuple(r for kind, r in l4 if kind == "tls"), tuple(r for kind, r in l4 if kind == "tcp"))

    def latest(self, parsed: list[Any]) -> list[Any]:
        """
        Of resources with the same kind, namespace and name keep the last,
        as C{kubectl apply} of the files in order would.
        """
        def key(item: Any) -> tuple[type, str, str]:
            return type(item), item.doc.namespace, item.doc.name

        last = {key(item): item for item in parsed}
        for item in parsed:
            winner = last[key(item)]
            if winner is not item:
                item.doc.warn("metadata.name", f"replaced by {item.doc.namespace}/{item.doc.name} in "
                                               f"{winner.doc.source}, document {winner.doc.number} "
                                               f"(the later document wins, as with kubectl apply)")
        return [item for item in parsed if last[key(item)] is item]

    # --- documents ----------------------------------------------------------

    def document(self, doc: _Doc, body: Any) -> Any:
        if not isinstance(body, Mapping):
            raise doc.error("", f"expected a mapping (an Istio resource), got {_kind(body)}")
        api_version = body.get("apiVersion")
        if str(api_version).startswith("security.istio.io/"):
            # AuthorizationPolicy, PeerAuthentication, RequestAuthentication:
            # read by txmesh.policy.istio_security, not routing.
            return None
        if api_version not in API_VERSIONS:
            raise doc.error("apiVersion", f"unsupported apiVersion {api_version!r} "
                                          f"(supported: {', '.join(API_VERSIONS)})")
        kind = body.get("kind")
        if kind == GATEWAY:
            # Read by txmesh.config.gateway: which proxies serve which ports.
            return None
        if kind in _IGNORED_KINDS:
            doc.warn("kind", f"{kind} is not supported by txmesh; document ignored")
            return None
        if kind not in KINDS:
            raise doc.error("kind", f"unsupported kind {kind!r} (supported: {', '.join(KINDS)})")
        top = _Obj(doc, "", body, ("apiVersion", "kind", "metadata", "spec", "status"))
        meta = top.get("metadata", lambda v: v, required=True)
        if not isinstance(meta, Mapping):
            raise doc.error("metadata", f"expected a mapping, got {_kind(meta)}")
        # Other metadata (labels, annotations, uid, ...) carries no routing.
        doc.name = top.convert("metadata.name", meta.get("name"), _string)
        if meta.get("namespace") is not None:
            doc.namespace = top.convert("metadata.namespace", meta["namespace"], _string)
        spec_value = top.get("spec", lambda v: v, required=True)
        if kind == "ServiceEntry":
            return self.service_entry(doc, spec_value)
        if kind == "DestinationRule":
            return self.destination_rule(doc, spec_value)
        return self.virtual_service(doc, spec_value)

    def binds(self, doc: _Doc, gateways: list[str] | None) -> bool:
        """
        @param gateways: a VirtualService's (or a match's) C{gateways}, as
            written: C{mesh}, C{name} (in the document's namespace) or
            C{namespace/name}; C{None} for C{mesh} alone.
        @return: whether they include what this translation is for.
        """
        if gateways is None:
            return MESH in self.bound
        return any((g if g == MESH or "/" in g else f"{doc.namespace}/{g}") in self.bound for g in gateways)

    def host(self, doc: _Doc, field: str, value: Any) -> str:
        try:
            return resolve_host(_host(value), doc.namespace, self.domain_suffix)
        except ValueError as e:
            raise doc.error(field, str(e)) from None

    # --- ServiceEntry -------------------------------------------------------

    def service_entry(self, doc: _Doc, value: Any) -> _ServiceEntry:
        spec = _Obj(doc, "spec", value, ("hosts", "ports", "location", "resolution", "endpoints",
                                         "subjectAltNames"), {
            "addresses": "virtual IPs are not supported by txmesh; ignored (route by host name)",
            "workloadSelector": "selecting workloads is not supported by txmesh; ignored (list endpoints)",
            "exportTo": "visibility is not supported by txmesh; the entry is visible to this proxy",
        })
        subject_alt_names = []
        for f, name in spec.list("subjectAltNames"):
            name = spec.convert(f, name, _string)
            if name.startswith("spiffe://"):
                subject_alt_names.append(name)
            else:
                doc.warn(f, "txmesh uses subjectAltNames only as the SPIFFE IDs an ISTIO_MUTUAL upstream may "
                            "have (spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/ACCOUNT); ignored")
        hosts = [(f, self.host(doc, f, v)) for f, v in spec.list("hosts", required=True)]
        if not hosts:
            raise doc.error("spec.hosts", "a ServiceEntry needs at least one host")
        spec.get("location", _one_of(("MESH_EXTERNAL", "MESH_INTERNAL")))
        resolution = spec.get("resolution", _one_of(("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")), "NONE")
        ports = []
        for f, v in spec.list("ports", required=True):
            p = _Obj(doc, f, v, ("number", "protocol", "name", "targetPort"))
            port = _Port(p.get("number", _port, required=True), p.get("name", _string, required=True),
                         p.get("protocol", _string), p.get("targetPort", _port))
            for other in ports:
                if other.number == port.number:
                    raise doc.error(p.field("number"), f"duplicate port {port.number}")
                if other.name == port.name:
                    raise doc.error(p.field("name"), f"duplicate port name {port.name!r}")
            protocol = (port.protocol or "").upper()
            if protocol in ("HTTP2", "GRPC", "GRPC-WEB"):
                pass  # the cluster for this port speaks h2c (see clusters())
            elif protocol not in ("", "HTTP", "TCP"):
                doc.warn(p.field("protocol"), f"{port.protocol}: not supported by txmesh; traffic is opaque TCP")
            ports.append(port)
        if not ports:
            raise doc.error("spec.ports", "a ServiceEntry needs at least one port")
        endpoints = []
        for f, v in spec.list("endpoints"):
            e = _Obj(doc, f, v, ("address", "ports", "labels", "weight", "locality", "serviceAccount"), {
                "network": "multi-network routing is not supported by txmesh; ignored",
            })
            address = e.get("address", _string, required=True)
            if address.startswith("unix://"):
                doc.warn(e.field("address"), "unix domain socket endpoints are not supported by txmesh; skipped")
                continue
            if resolution == "STATIC":
                try:
                    ipaddress.ip_address(address)
                except ValueError:
                    raise doc.error(e.field("address"), f"resolution STATIC needs an IP address, got {address!r}"
                                    ) from None
            endpoint_ports = {}
            for pf, name, number in e.mapping("ports"):
                endpoint_ports[name] = e.convert(pf, number, _port)
                if all(p.name != name for p in ports):
                    raise doc.error(pf, f"no port named {name!r} in spec.ports "
                                        f"(names: {', '.join(p.name for p in ports)})")
            endpoints.append(_WorkloadEntry(
                address, endpoint_ports, e.get("labels", _labels, ()),
                e.get("weight", _count, 0) or 1, e.get("locality", _text, ""),
                # As a WorkloadEntry's: an account in the entry's namespace.
                f"{doc.namespace}/{account}" if (account := e.get("serviceAccount", _account)) else ""))
        if resolution == "NONE" and endpoints:
            raise doc.error("spec.endpoints", "endpoints need resolution STATIC or DNS")
        if resolution == "NONE":
            doc.warn("spec.resolution", "NONE (pass through to the original destination) is not supported by "
                                        "txmesh; the hosts have no endpoints unless service discovery has some")
        if resolution.startswith("DNS") and not endpoints:
            for f, host in hosts:
                if _is_wildcard(host):
                    raise doc.error(f, "a wildcard host with resolution DNS needs endpoints")
        return _ServiceEntry(doc, hosts, ports, resolution, endpoints, tuple(subject_alt_names))

    def add_service(self, se: _ServiceEntry) -> None:
        for field, host in se.hosts:
            if host in self.services:
                other = self.services[host].doc
                se.doc.warn(field, f"{host} is already defined by ServiceEntry {other.name!r} "
                                   f"({other.source}, document {other.number}); ignored here")
                continue
            by_port = {}
            for port in se.ports:
                if se.endpoints:
                    eps = tuple(Endpoint(we.address, we.ports.get(port.name) or port.target_port or port.number,
                                         we.labels, we.weight, we.locality, we.service_account)
                                for we in se.endpoints)
                elif se.resolution.startswith("DNS"):
                    eps = (Endpoint(host, port.target_port or port.number),)
                else:
                    eps = ()
                by_port[port.number] = eps
            self.services[host] = _Service(se.doc, se.ports, by_port, se.subject_alt_names)
            for port in se.ports:
                self.cluster_refs.setdefault((host, port.number), (se.doc, field))

    def add_registry_services(self) -> None:
        """
        Make the services of service discovery known as ServiceEntries
        would make them: with their ports (and so their protocols) and
        their endpoints.
        """
        for host, ports in sorted(self.registry_ports.items()):
            if host in self.services or not ports:
                continue
            doc = _Doc("<service registry>", 0, self.namespace)
            endpoints = tuple(self.registry.get(host, ()))
            service_ports = [_Port(number, name, protocol, None) for name, number, protocol in ports]
            self.services[host] = _Service(doc, service_ports, {p.number: endpoints for p in service_ports})
            for port in service_ports:
                self.cluster_refs.setdefault((host, port.number), (doc, "ports"))

    def endpoints(self, host: str, port: int | None = None) -> tuple[Endpoint, ...]:
        service = self.services.get(host)
        if service is not None:
            if port is None:
                eps = tuple(ep for group in service.endpoints.values() for ep in group)
            else:
                eps = service.endpoints.get(port, ())
            if eps:
                return eps
        return tuple(self.registry.get(host, ()))

    # --- DestinationRule ----------------------------------------------------

    def destination_rule(self, doc: _Doc, value: Any) -> _DestinationRule:
        spec = _Obj(doc, "spec", value, ("host", "trafficPolicy", "subsets"), {
            "exportTo": "visibility is not supported by txmesh; the rule applies to this proxy",
            "workloadSelector": "selecting workloads is not supported by txmesh; the rule applies to this proxy",
        })
        host = self.host(doc, "spec.host", spec.get("host", _string, required=True))
        policy: dict[str, Any] = {}
        tp = spec.obj("trafficPolicy", *_TRAFFIC_POLICY)
        if tp is not None:
            policy = self.traffic_policy(tp)
        subsets: list[tuple[str, SubsetConfig]] = []
        subset_tls: list[tuple[str, Any]] = []
        for f, v in spec.list("subsets"):
            s = _Obj(doc, f, v, ("name", "labels", "trafficPolicy"))
            name = s.get("name", _string, required=True)
            if any(other.name == name for _, other in subsets):
                raise doc.error(s.field("name"), f"duplicate subset name {name!r}")
            labels = s.get("labels", _labels, ())
            lb_policy = None
            stp = s.obj("trafficPolicy", *_TRAFFIC_POLICY)
            if stp is not None:
                own = self.traffic_policy(stp)
                if "tls" in own:
                    subset_tls.append((f"{stp.path}.tls", own.pop("tls")))
                if own.get("lb_policy") not in (None, "consistent_hash"):
                    lb_policy = own.pop("lb_policy")
                for key, v2 in own.items():
                    if policy.get(key, _UNSET) != v2:
                        doc.warn(f"{stp.path}.{_POLICY_FIELDS[key]}",
                                 "differs from the rule's trafficPolicy; txmesh applies per-subset only "
                                 "loadBalancer.simple and uses the rule's trafficPolicy for the rest")
            subsets.append((f, SubsetConfig(name, labels, lb_policy)))
        self.subset_tls(doc, policy, subset_tls, len(subsets))
        return _DestinationRule(doc, host, "spec.host", policy, subsets)

    def subset_tls(self, doc: _Doc, policy: dict[str, Any], subset_tls: list[tuple[str, Any]],
                   count: int) -> None:
        """
        TLS is per cluster in txmesh, not per subset.  Subsets that all set
        the same C{tls} under a rule without one give it to the whole
        cluster (routes to no subset included); any other subset C{tls} is
        a warning.
        """
        if not subset_tls:
            return
        values = [v for _, v in subset_tls]
        if "tls" not in policy and len(subset_tls) == count and all(v == values[0] for v in values):
            policy["tls"] = values[0]
            return
        for field, value in subset_tls:
            if policy.get("tls", _UNSET) != value:
                doc.warn(field, "TLS is set per cluster in txmesh, not per subset: the rule's trafficPolicy.tls "
                                "(or auto mutual TLS) applies to every subset; ignored")

    def traffic_policy(self, tp: _Obj) -> dict[str, Any]:
        doc = tp.doc
        out: dict[str, Any] = {}
        lb = tp.obj("loadBalancer", ("simple", "consistentHash", "localityLbSetting"), {
            "warmupDurationSecs": "slow start is not supported by txmesh; ignored",
            "warmup": "slow start is not supported by txmesh; ignored",
        })
        if lb is not None:
            if lb.has("simple") and lb.has("consistentHash"):
                raise doc.error(lb.field("consistentHash"), "set only one of simple, consistentHash")
            simple = lb.get("simple", _one_of(("UNSPECIFIED", "PASSTHROUGH", *_SIMPLE_LB)))
            if simple == "PASSTHROUGH":
                doc.warn(lb.field("simple"), "PASSTHROUGH (to the original destination) is not supported by "
                                             "txmesh; round robin over the endpoints instead")
            elif simple in _SIMPLE_LB:
                out["lb_policy"] = _SIMPLE_LB[simple]
            ch = lb.obj("consistentHash", ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName",
                                           "ringHash", "maglev", "minimumRingSize"))
            if ch is not None:
                out["lb_policy"] = "consistent_hash"
                out["hash_policy"] = self.consistent_hash(ch)
            locality = lb.obj("localityLbSetting", ("enabled",), {
                "distribute": "weighted locality distribution is not supported by txmesh; "
                              "the proxy's own locality is preferred, failing over to any other",
                "failover": "explicit failover regions are not supported by txmesh; "
                            "the proxy's own locality is preferred, failing over to any other",
                "failoverPriority": "failover priority labels are not supported by txmesh; "
                                    "the proxy's own locality is preferred, failing over to any other",
            })
            if locality is not None:
                out["locality_failover"] = locality.get("enabled", _bool, True)
        pool = tp.obj("connectionPool", ("tcp", "http"))
        if pool is not None:
            limits: dict[str, int] = {}
            tcp = pool.obj("tcp", ("maxConnections", "connectTimeout"), {
                "tcpKeepalive": _IGNORED,
                "maxConnectionDuration": _IGNORED,
                "idleTimeout": "not supported by txmesh for upstream TCP; use connectionPool.http.idleTimeout "
                               "or the listener's idle_timeout",
            })
            if tcp is not None:
                if tcp.has("maxConnections"):
                    limits["max_connections"] = tcp.get("maxConnections", _count)
                if tcp.has("connectTimeout"):
                    out["connect_timeout"] = tcp.get("connectTimeout", _duration)
            http = pool.obj("http", ("http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection",
                                     "idleTimeout", "maxRetries", "h2UpgradePolicy"), {
                "useClientProtocol": "txmesh does not follow each client's protocol upstream; it talks HTTP/1.1, "
                                     "or HTTP/2 with h2UpgradePolicy: UPGRADE",
                "maxConcurrentStreams": "txmesh opens as many streams as the upstream's SETTINGS allow; ignored",
            })
            if http is not None:
                policy = http.get("h2UpgradePolicy", _one_of(("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")))
                if policy == "UPGRADE":
                    # Envoy's UPGRADE means HTTP/2 to the upstream: h2c
                    # with prior knowledge here (h2 via ALPN under TLS).
                    out["http2"] = True
                for key, attr in (("http1MaxPendingRequests", "max_pending_requests"),
                                  ("http2MaxRequests", "max_requests"),
                                  ("maxRequestsPerConnection", "max_requests_per_connection"),
                                  ("maxRetries", "max_retries")):
                    if http.has(key):
                        limits[attr] = http.get(key, _count)
                if http.has("idleTimeout"):
                    out["idle_timeout"] = http.get("idleTimeout", _duration)
            if limits:
                out["circuit_breaker"] = CircuitBreakerConfig(**limits)
        od = tp.obj("outlierDetection", ("consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
                                         "baseEjectionTime", "maxEjectionPercent"), {
            "consecutiveErrors": "deprecated and not supported by txmesh; use consecutive5xxErrors or "
                                 "consecutiveGatewayErrors",
            "splitExternalLocalOriginErrors": _IGNORED,
            "consecutiveLocalOriginFailures": _IGNORED,
            "minHealthPercent": "not supported by txmesh; ejection is bounded by maxEjectionPercent only",
        })
        if od is not None:
            d = OutlierDetectionConfig()
            out["outlier_detection"] = OutlierDetectionConfig(
                consecutive_5xx=od.get("consecutive5xxErrors", _count, d.consecutive_5xx),
                consecutive_gateway_errors=od.get("consecutiveGatewayErrors", _count, d.consecutive_gateway_errors),
                interval=od.get("interval", _duration, d.interval),
                base_ejection_time=od.get("baseEjectionTime", _duration, d.base_ejection_time),
                max_ejection_percent=od.get("maxEjectionPercent", _int_in(0, 100), d.max_ejection_percent),
            )
        tls = tp.obj("tls", ("mode", "caCertificates", "sni", "subjectAltNames", "clientCertificate", "privateKey"), {
            "credentialName": "Kubernetes secrets are not read by txmesh; use caCertificates",
            "insecureSkipVerify": "txmesh always verifies upstream certificates; ignored",
            "caCrl": _IGNORED,
        })
        if tls is not None:
            self.upstream_tls(tls, out)
        return out

    def upstream_tls(self, tls: _Obj, out: dict[str, Any]) -> None:
        """
        Read a C{trafficPolicy.tls} into C{out["tls"]}: an L{UpstreamTLS},
        or C{None} for an explicit C{DISABLE} when auto mutual TLS is on
        (so the cluster stays plaintext whatever its endpoints' labels).
        """
        doc = tls.doc
        mode = tls.get("mode", _one_of(("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")), "DISABLE")
        names = tls.get("subjectAltNames", _strings) or []
        if mode == "ISTIO_MUTUAL" and self.mtls:
            for key in ("caCertificates", "sni"):
                if tls.has(key):
                    doc.warn(tls.field(key), "ISTIO_MUTUAL uses the mesh trust bundle and SPIFFE IDs; ignored")
            for i, name in enumerate(names):
                if not name.startswith("spiffe://"):
                    raise doc.error(f"{tls.field('subjectAltNames')}[{i}]",
                                    f"ISTIO_MUTUAL peers are checked by SPIFFE ID; expected "
                                    f"spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/ACCOUNT, got {name!r}")
            out["tls"] = UpstreamTLS(mode="ISTIO_MUTUAL", subject_alt_names=tuple(names))
            return
        if mode == "ISTIO_MUTUAL":
            doc.warn(tls.field("mode"), "ISTIO_MUTUAL needs the mesh CA: proxies have workload certificates "
                                        "only from a pilot with a CA; connections stay plaintext")
        elif mode == "MUTUAL":
            # The files are read by the loader (relative to the proxy config).
            for key in ("clientCertificate", "privateKey"):
                if not tls.has(key):
                    raise doc.error(tls.field(key), "MUTUAL needs clientCertificate and privateKey")
            out["tls"] = UpstreamTLS(tls.get("caCertificates", _string), b"", tls.get("sni", _string), "MUTUAL",
                                     client_certificate=tls.get("clientCertificate", _string),
                                     private_key=tls.get("privateKey", _string))
        elif mode == "SIMPLE":
            # The CA file is read by the loader (relative to the proxy
            # config): translation stays free of I/O.
            out["tls"] = UpstreamTLS(tls.get("caCertificates", _string), b"", tls.get("sni", _string))
        elif self.mtls:
            out["tls"] = None
        if mode != "MUTUAL":
            for key in ("clientCertificate", "privateKey"):
                if tls.has(key):
                    doc.warn(tls.field(key), "used only with mode MUTUAL; ignored")
        if names and mode != "ISTIO_MUTUAL":
            doc.warn(tls.field("subjectAltNames"), f"used only with ISTIO_MUTUAL (txmesh checks a {mode} "
                                                   "upstream's certificate against the sni or host name); ignored")

    def consistent_hash(self, ch: _Obj) -> HashPolicy:
        doc = ch.doc
        keys = [k for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName") if ch.has(k)]
        if len(keys) != 1:
            reason = "set one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName"
            raise doc.error(ch.field(keys[1]) if keys else ch.path, reason + (f" (got {', '.join(keys)})"
                                                                              if keys else ""))
        header = cookie = query = None
        source_ip = False
        if ch.has("httpHeaderName"):
            header = ch.get("httpHeaderName", _header_name)
        elif ch.has("httpCookie"):
            c = ch.obj("httpCookie", ("name",), {
                "path": "txmesh hashes on an existing cookie and does not set one; ignored",
                "ttl": "txmesh hashes on an existing cookie and does not set one; ignored",
                "attributes": "txmesh hashes on an existing cookie and does not set one; ignored",
            })
            assert c is not None
            cookie = c.get("name", _utf8, required=True)
        elif ch.has("useSourceIp"):
            source_ip = ch.get("useSourceIp", _bool)
            if not source_ip:
                raise doc.error(ch.field("useSourceIp"), "false selects nothing to hash on; set it to true or "
                                                         "use another key")
        else:
            query = ch.get("httpQueryParameterName", _utf8)
        if sum(ch.has(k) for k in ("ringHash", "maglev", "minimumRingSize")) > 1:
            raise doc.error(ch.field("maglev" if ch.has("maglev") else "minimumRingSize"),
                            "set only one of ringHash, maglev, minimumRingSize")
        algorithm, size = "ring_hash", HashPolicy().table_size
        if ch.has("minimumRingSize"):
            size = ch.get("minimumRingSize", _int_in(1, 8388608))
        ring = ch.obj("ringHash", ("minimumRingSize",))
        if ring is not None:
            size = ring.get("minimumRingSize", _int_in(1, 8388608), size)
        maglev = ch.obj("maglev", ("tableSize",))
        if maglev is not None:
            algorithm = "maglev"
            size = maglev.get("tableSize", _int_in(1, 5000011), 65537)
            if not _is_prime(size):
                raise doc.error(maglev.field("tableSize"), f"must be a prime number, got {size}")
        return HashPolicy(header=header, cookie=cookie, query_param=query, source_ip=source_ip,
                          algorithm=algorithm, table_size=size)

    def add_rule(self, dr: _DestinationRule) -> None:
        doc = dr.doc
        if not _is_wildcard(dr.host):
            endpoints = self.endpoints(dr.host)
            if endpoints:
                for field, subset in dr.subsets:
                    if subset.labels and not any(all(ep.label(k) == v for k, v in subset.labels) for ep in endpoints):
                        known = sorted({_format_labels(ep.labels) for ep in endpoints})
                        raise doc.error(f"{field}.labels",
                                        f"no endpoint of {dr.host} has labels {_format_labels(subset.labels)} "
                                        f"(endpoint labels: {', '.join(known)})")
        rule = self.rules.get(dr.host)
        if rule is None:
            self.rules[dr.host] = _Rule(doc, dr.host, dr.policy, [s for _, s in dr.subsets])
            return
        where = f"DestinationRule {rule.doc.name!r} ({rule.doc.source}, document {rule.doc.number})"
        if dr.policy:
            doc.warn("spec.trafficPolicy", f"{dr.host} already has a trafficPolicy from {where}; ignored here")
        for field, subset in dr.subsets:
            if any(s.name == subset.name for s in rule.subsets):
                doc.warn(field, f"subset {subset.name!r} of {dr.host} is already defined by {where}; ignored here")
            else:
                rule.subsets.append(subset)

    def rule_for(self, host: str) -> _Rule | None:
        rule = self.rules.get(host)
        if rule is not None:
            return rule
        wildcards = [r for h, r in self.rules.items() if _is_wildcard(h) and _wildcard_matches(h, host)]
        return max(wildcards, key=lambda r: len(r.host), default=None)

    # --- VirtualService -----------------------------------------------------

    def virtual_service(self, doc: _Doc, value: Any) -> _VirtualService | None:
        ignored = {"exportTo": "visibility is not supported by txmesh; the routes apply to this proxy"}
        fields = ["hosts", "gateways", "http"]
        if self.gateway_port is not None:
            fields += ["tls", "tcp"]
        elif isinstance(value, Mapping) and any(value.get(k) is not None for k in ("tls", "tcp")):
            gateways = value.get("gateways")
            if gateways is None or MESH in gateways:
                ignored.update(tls="TLS routes are served by gateways only in txmesh; ignored here",
                               tcp="TCP routes are served by gateways only in txmesh (a sidecar uses a tcp "
                                   "listener); ignored here")
            else:
                fields += ["tls", "tcp"]
        spec = _Obj(doc, "spec", value, fields, ignored)
        hosts = [(f, self.host(doc, f, v)) for f, v in spec.list("hosts", required=True)]
        if not hosts:
            raise doc.error("spec.hosts", "a VirtualService needs at least one host")
        gateways = spec.get("gateways", _strings)
        routes = []
        for f, v in spec.list("http"):
            route = self.http_route(doc, f, v, gateways)
            if route is not None:
                routes.append(route)
        l4 = []
        if self.gateway_port is not None:
            for kind in ("tls", "tcp"):
                for f, v in spec.list(kind):
                    route = self.l4_route(doc, kind, f, v, gateways)
                    if route is not None:
                        l4.append(route)
        return _VirtualService(doc, hosts, routes, l4)

    def l4_route(self, doc: _Doc, kind: str, field: str, value: Any,
                 gateways: list[str] | None) -> tuple[str, tuple[str, ...], _Dest] | None:
        """
        Read a C{tls} or C{tcp} route for this gateway port.

        @return: C{(kind, sni hosts, destination)}, or C{None} if none of
            its matches is for this gateway and port.
        """
        o = _Obj(doc, field, value, ("match", "route"))
        sni: list[str] = []
        matched = False
        match_fields = ("sniHosts", "port", "gateways") if kind == "tls" else ("port", "gateways")
        for f, v in o.list("match", required=kind == "tls"):
            m = _Obj(doc, f, v, match_fields, ("destinationSubnets", "sourceLabels", "sourceNamespace"))
            own = m.get("gateways", _strings)
            port = m.get("port", _port)
            hosts = [h.lower() for h in m.get("sniHosts", _strings, [])] if kind == "tls" else []
            if kind == "tls" and not hosts:
                raise doc.error(m.field("sniHosts"), "a tls match needs sniHosts")
            if self.binds(doc, own if own is not None else gateways) and port in (None, self.gateway_port):
                matched = True
                sni.extend(hosts)
        if kind == "tls" and not o.list("match"):
            raise doc.error(o.field("match"), "a tls route needs a match with sniHosts")
        if not o.list("match"):
            matched = self.binds(doc, gateways)
        destinations = [self.route_destination(doc, f, v) for f, v in o.list("route", required=True)]
        if not destinations:
            raise doc.error(o.field("route"), "needs a destination")
        if len(destinations) > 1:
            doc.warn(o.field("route"), f"weighted {kind} routes are not supported by txmesh; the first "
                                       f"destination takes every connection")
        if destinations[0].subset is not None:
            doc.warn(f"{destinations[0].field}.subset", f"subsets of {kind} routes are not supported by txmesh; "
                                                        f"every endpoint of the host is used")
        if not matched:
            return None
        return kind, tuple(dict.fromkeys(sni)), destinations[0]

    def http_route(self, doc: _Doc, field: str, value: Any, gateways: list[str] | None) -> _HTTPRoute | None:
        o = _Obj(doc, field, value, (
            "name", "match", "route", "redirect", "directResponse", "rewrite", "timeout", "retries", "fault",
            "mirror", "mirrors", "mirrorPercentage", "mirrorPercent", "headers"), {
            "delegate": "delegate VirtualServices are not supported by txmesh; ignored",
            "corsPolicy": "not supported by txmesh here; ignored (use a cors filter)",
        })
        name = o.get("name", _string)
        raw_matches = o.list("match")
        matches = []
        for f, v in raw_matches:
            m = self.match(doc, f, v, gateways)
            if m is not None:
                matches.append(m)
        kinds = [k for k in ("route", "redirect", "directResponse") if o.has(k)]
        if len(kinds) > 1:
            raise doc.error(o.field(kinds[1]), f"set only one of route, redirect, directResponse "
                                               f"(got {', '.join(kinds)})")
        if not kinds:
            if o.has("delegate"):
                return None
            raise doc.error(o.field("route"), "is required: an HTTP route needs route, redirect or directResponse")
        if o.has("rewrite") and o.has("redirect"):
            raise doc.error(o.field("rewrite"), "rewrite and redirect cannot be set together")
        settings: dict[str, Any] = {"timeout": o.get("timeout", _duration, 0.0)}
        destinations = [self.route_destination(doc, f, v) for f, v in o.list("route")]
        if o.has("route"):
            if not destinations:
                raise doc.error(o.field("route"), "needs at least one destination")
            if len(destinations) == 1:
                destinations[0].weight = 100
            else:
                total = sum(d.weight for d in destinations)
                if total != 100:
                    raise doc.error(f"{destinations[-1].field}.weight",
                                    f"the weights of the route's destinations sum to {total}; they must sum to 100")
            settings["retry"] = self.retries(o)
        elif o.has("retries"):
            self.retries(o)
            doc.warn(o.field("retries"), f"no effect on a {kinds[0]} route")
        settings["fault"] = self.fault(o)
        if o.has("redirect"):
            settings["redirect"] = self.redirect(o)
        if o.has("directResponse"):
            settings["direct_response"] = self.direct_response(o)
        rewrite_uri = None
        rw = o.obj("rewrite", ("uri", "authority"), {
            "uriRegexRewrite": "regex rewrites are not supported by txmesh; ignored"})
        if rw is not None:
            rewrite_uri = rw.get("uri", lambda v: _text(v).encode("utf-8"))
            if rw.has("authority"):
                settings["host_rewrite"] = rw.get("authority", _utf8)
        request, response = self.header_operations(o.obj("headers", ("request", "response")))
        settings["request_headers"] = request
        settings["response_headers"] = response
        mirror, mirror_percent = self.mirror(o)
        if mirror is not None and not o.has("route"):
            doc.warn(o.field("mirror" if o.has("mirror") else "mirrors"), f"no effect on a {kinds[0]} route")
            mirror = None
        if raw_matches and not matches:
            return None
        if not raw_matches and not self.binds(doc, gateways):
            return None
        return _HTTPRoute(field, name, matches, destinations, settings, rewrite_uri, o.field("rewrite.uri"),
                          mirror, mirror_percent)

    def match(self, doc: _Doc, field: str, value: Any, gateways: list[str] | None) -> _Match | None:
        o = _Obj(doc, field, value, ("name", "uri", "method", "headers", "port", "sourceLabels", "gateways",
                                     "queryParams", "ignoreUriCase", "withoutHeaders"), {
            "scheme": _BROADER,
            "authority": _BROADER,
            "sourceNamespace": _BROADER,
            "statPrefix": "per-route stats prefixes are not supported by txmesh; ignored",
        })
        own_gateways = o.get("gateways", _strings)
        # A match's own gateways replace the VirtualService's.
        if not self.binds(doc, own_gateways if own_gateways is not None else gateways):
            return None
        kw: dict[str, Any] = {}
        ignore_case = o.get("ignoreUriCase", _bool, False)
        uri = self.string_match(doc, o.field("uri"), o.value["uri"]) if o.has("uri") else None
        if uri is not None and uri[0] != "present":
            kind, text = uri
            kw["prefix"] = None
            if ignore_case:
                pattern = {"exact": re.escape(text), "prefix": re.escape(text) + ".*", "regex": text}[kind]
                kw["regex"] = o.convert(o.field(f"uri.{kind}"), "(?i)" + pattern, _regex)
            elif kind == "exact":
                kw["path"] = text.encode("utf-8")
            elif kind == "prefix":
                kw["prefix"] = text.encode("utf-8")
            else:
                kw["regex"] = o.convert(o.field("uri.regex"), text, _regex)
        method = self.string_match(doc, o.field("method"), o.value["method"]) if o.has("method") else None
        if method is not None and method[0] != "present":
            kind, text = method
            if kind == "exact":
                kw["methods"] = (o.convert(o.field("method.exact"), text, _header_name).upper(),)
            else:
                if kind == "prefix":
                    methods = tuple(m for m in _STANDARD_METHODS if m.startswith(text.encode("utf-8")))
                else:
                    pattern = o.convert(o.field("method.regex"), text, _regex)
                    methods = tuple(m for m in _STANDARD_METHODS if pattern.fullmatch(m))
                if not methods:
                    doc.warn(o.field(f"method.{kind}"), "matches no standard HTTP method; match skipped")
                    return None
                doc.warn(o.field(f"method.{kind}"), f"txmesh matches methods exactly: "
                                                    f"{', '.join(m.decode() for m in methods)}")
                kw["methods"] = methods
        kw["headers"] = tuple(self.header_matches(o, "headers", invert=False)) + \
            tuple(self.header_matches(o, "withoutHeaders", invert=True))
        kw["query_params"] = tuple(self.header_matches(o, "queryParams", invert=False, query=True))
        kw["port"] = o.get("port", _port)
        if self.gateway_port is not None:
            # On a gateway the port is the listener's: this one or none.
            if kw["port"] not in (None, self.gateway_port):
                return None
            kw["port"] = None
        kw["source_labels"] = o.get("sourceLabels", _labels, ())
        return _Match(field, o.get("name", _string), RouteMatch(**kw))

    def string_match(self, doc: _Doc, field: str, value: Any) -> tuple[str, str]:
        """
        @return: C{(kind, text)} of an Istio C{StringMatch}: C{exact},
            C{prefix} or C{regex}, or C{("present", "")} for an empty one.
        """
        if value is None or value == {}:
            return ("present", "")
        s = _Obj(doc, field, value, ("exact", "prefix", "regex"))
        kinds = [k for k in ("exact", "prefix", "regex") if k in s.value]
        if len(kinds) > 1:
            raise doc.error(s.field(kinds[1]), f"set only one of exact, prefix, regex (got {', '.join(kinds)})")
        return kinds[0], s.get(kinds[0], _text, "")

    def header_matches(self, o: _Obj, key: str, invert: bool, query: bool = False) -> list[HeaderMatch]:
        out = []
        for f, name, value in o.mapping(key):
            hname = name.encode("utf-8") if query else o.convert(f, name, _header_name)
            kind, text = self.string_match(o.doc, f, value)
            if kind == "present":
                out.append(HeaderMatch(hname, present=True, invert=invert))
            elif kind == "regex":
                out.append(HeaderMatch(hname, regex=o.convert(f"{f}.regex", text, _regex), invert=invert))
            else:
                value = o.convert(f"{f}.{kind}", text, _header_value)
                out.append(HeaderMatch(hname, invert=invert, **{kind: value}))
        return out

    def destination(self, doc: _Doc, field: str, value: Any) -> _Dest:
        o = _Obj(doc, field, value, ("host", "subset", "port"))
        host = self.host(doc, o.field("host"), o.get("host", _string, required=True))
        if _is_wildcard(host):
            raise doc.error(o.field("host"), f"a destination must name one service, not a wildcard: {host!r}")
        port = None
        p = o.obj("port", ("number",))
        if p is not None:
            port = p.get("number", _port, required=True)
        return _Dest(field, field, host, port, o.get("subset", _string))

    def route_destination(self, doc: _Doc, field: str, value: Any) -> _Dest:
        o = _Obj(doc, field, value, ("destination", "weight", "headers"))
        if not o.has("destination"):
            raise doc.error(o.field("destination"), "is required")
        d = self.destination(doc, o.field("destination"), o.value["destination"])
        d.field = field
        d.weight = o.get("weight", _int_in(0, 100), 0)
        d.request, d.response = self.header_operations(o.obj("headers", ("request", "response")))
        return d

    def header_operations(self, o: _Obj | None) -> tuple[HeaderOps, HeaderOps]:
        if o is None:
            return HeaderOps(), HeaderOps()
        out = []
        for key in ("request", "response"):
            ops = o.obj(key, ("set", "add", "remove"))
            if ops is None:
                out.append(HeaderOps())
                continue
            pairs = {}
            for action in ("set", "add"):
                pairs[action] = tuple((ops.convert(f, name, _header_name), ops.convert(f, v, _header_value))
                                      for f, name, v in ops.mapping(action))
            remove = tuple(ops.convert(f, v, _header_name) for f, v in ops.list("remove"))
            out.append(HeaderOps(set=pairs["set"], add=pairs["add"], remove=remove))
        return out[0], out[1]

    def retries(self, o: _Obj) -> RetryPolicy | None:
        r = o.obj("retries", ("attempts", "perTryTimeout", "retryOn"), {
            "retryRemoteLocalities": _IGNORED,
            "retryIgnorePreviousHosts": _IGNORED,
            "backoff": "txmesh uses its own jittered backoff (25ms to 250ms); ignored",
        })
        if r is None:
            # Istio retries by default: 2 attempts on connect failures,
            # refused streams and gRPC unavailable/cancelled.
            return RetryPolicy()
        attempts = r.get("attempts", _int_in(0, 1000), 0)
        if attempts == 0:
            return None
        retry_on = RetryPolicy().retry_on
        if r.has("retryOn"):
            conditions = set()
            for token in r.get("retryOn", _string).split(","):
                token = token.strip()
                if token in _RETRY_ON or (token.isdigit() and 100 <= int(token) <= 599):
                    conditions.add(token)
                elif token in _RETRY_ON_UNSUPPORTED:
                    o.doc.warn(r.field("retryOn"), f"{token!r} is not supported by txmesh; ignored")
                else:
                    raise o.doc.error(r.field("retryOn"), f"unknown retry condition {token!r} "
                                                          f"(known: {', '.join(sorted(_RETRY_ON))})")
            retry_on = frozenset(conditions)
        return RetryPolicy(attempts=attempts, per_try_timeout=r.get("perTryTimeout", _duration, 0.0),
                           retry_on=retry_on)

    def fault(self, o: _Obj) -> FaultPolicy | None:
        f = o.obj("fault", ("delay", "abort"))
        if f is None:
            return None
        kw: dict[str, Any] = {}
        delay = f.obj("delay", ("fixedDelay", "percentage", "percent"), {"exponentialDelay": _IGNORED})
        if delay is not None and not delay.has("fixedDelay") and not delay.has("exponentialDelay"):
            raise o.doc.error(delay.field("fixedDelay"), "is required")
        if delay is not None and delay.has("fixedDelay"):
            kw["delay"] = delay.get("fixedDelay", _duration)
            kw["delay_percent"] = self.percentage(delay)
        abort = f.obj("abort", ("httpStatus", "grpcStatus", "percentage", "percent"), {"http2Error": _IGNORED})
        if abort is not None:
            if not any(abort.has(k) for k in ("httpStatus", "grpcStatus", "http2Error")):
                raise o.doc.error(abort.field("httpStatus"), "is required (or grpcStatus)")
            if abort.has("httpStatus") and abort.has("grpcStatus"):
                raise o.doc.error(abort.field("grpcStatus"), "set only one of httpStatus, grpcStatus")
            if abort.has("httpStatus"):
                kw["abort_status"] = abort.get("httpStatus", _int_in(200, 599))
            elif abort.has("grpcStatus"):
                kw["abort_grpc_status"] = abort.get("grpcStatus", _grpc_status)
            if "abort_status" in kw or "abort_grpc_status" in kw:
                kw["abort_percent"] = self.percentage(abort)
        if not kw:
            o.doc.warn(f.path, "neither a fixed delay nor an HTTP or gRPC abort: no fault is injected")
            return None
        return FaultPolicy(**kw)

    def percentage(self, o: _Obj) -> float:
        if o.has("percentage") and o.has("percent"):
            raise o.doc.error(o.field("percent"), "set only one of percentage, percent")
        p = o.obj("percentage", ("value",))
        if p is not None:
            return p.get("value", _percent, 0.0)
        # Istio: with no percentage, every request is affected.
        return o.get("percent", _int_in(0, 100), 100.0) * 1.0

    def mirror(self, o: _Obj) -> tuple[_Dest | None, float]:
        if o.has("mirror") and o.has("mirrors"):
            raise o.doc.error(o.field("mirrors"), "set only one of mirror, mirrors")
        if o.has("mirrorPercentage") and o.has("mirrorPercent"):
            raise o.doc.error(o.field("mirrorPercent"), "set only one of mirrorPercentage, mirrorPercent")
        percent = 100.0
        mp = o.obj("mirrorPercentage", ("value",))
        if mp is not None:
            percent = mp.get("value", _percent, 0.0)
        elif o.has("mirrorPercent"):
            percent = float(o.get("mirrorPercent", _int_in(0, 100)))
        if o.has("mirror"):
            return self.destination(o.doc, o.field("mirror"), o.value["mirror"]), percent
        mirrors = o.list("mirrors")
        if not mirrors:
            if o.has("mirrorPercentage") or o.has("mirrorPercent"):
                o.doc.warn(o.field("mirrorPercentage" if mp else "mirrorPercent"), "no mirror is set; ignored")
            return None, 0.0
        first = None
        for i, (f, v) in enumerate(mirrors):
            m = _Obj(o.doc, f, v, ("destination", "percentage"))
            if not m.has("destination"):
                raise o.doc.error(m.field("destination"), "is required")
            d = self.destination(o.doc, m.field("destination"), m.value["destination"])
            if i == 0:
                first = d
                pm = m.obj("percentage", ("value",))
                if pm is not None:
                    percent = pm.get("value", _percent, 0.0)
            else:
                o.doc.warn(f, "txmesh mirrors to one destination; only mirrors[0] is used")
        return first, percent

    def redirect(self, o: _Obj) -> Redirect:
        r = o.obj("redirect", ("uri", "authority", "port", "scheme", "redirectCode"), {
            "derivePort": "not supported by txmesh; the port is kept unless 'port' is set"})
        assert r is not None
        return Redirect(uri=r.get("uri", _utf8), authority=r.get("authority", _utf8), scheme=r.get("scheme", _utf8),
                        port=r.get("port", _port), code=r.get("redirectCode", _int_in(300, 399), 301))

    def direct_response(self, o: _Obj) -> DirectResponse:
        d = o.obj("directResponse", ("status", "body"))
        assert d is not None
        status = d.get("status", _int_in(200, 599), required=True)
        body = b""
        b = d.obj("body", ("string", "bytes"))
        if b is not None:
            if b.has("string") and b.has("bytes"):
                raise o.doc.error(b.field("bytes"), "set only one of string, bytes")
            if b.has("string"):
                body = b.get("string", _text).encode("utf-8")
            elif b.has("bytes"):
                body = b.get("bytes", _base64)
        return DirectResponse(status, body)

    def add_l4_routes(self, vs: _VirtualService) -> list[tuple[str, L4Route]]:
        """
        @return: C{(kind, route)} for each of C{vs}'s C{tls}/C{tcp} routes
            on this gateway port, their clusters now referenced.
        """
        doc = vs.doc
        refs: dict[tuple[str, int], str] = {}
        out = []
        for kind, sni, dest in vs.l4:
            key = self.resolve(doc, attrs.evolve(dest, subset=None), refs)
            out.append((kind, L4Route(doc.namespace, sni, cluster_name(*key))))
        for ref, field in refs.items():
            self.cluster_refs.setdefault(ref, (doc, field))
        return out

    def add_virtual_service(self, vs: _VirtualService) -> VirtualHost | None:
        doc = vs.doc
        if not vs.routes:
            # Bound only to gateways (warned), or routing nothing over HTTP.
            return None
        vs_key = f"{doc.namespace}/{doc.name}"
        if self.gateway_port is not None:
            vs_key = f"{vs_key}:{self.gateway_port}"
        refs: dict[tuple[str, int], str] = {}
        routes: list[Route] = []
        for hr in vs.routes:
            keys = [self.resolve(doc, d, refs) for d in hr.destinations]
            destinations = tuple(WeightedDestination(cluster_name(*key), d.weight, d.subset, d.request, d.response)
                                 for key, d in zip(keys, hr.destinations, strict=True))
            settings = dict(hr.settings)
            if len(destinations) == 1:
                settings["cluster"] = destinations[0].cluster
                rule = self.rule_for(keys[0][0])
                if rule is not None and rule.policy.get("hash_policy") is not None:
                    settings["hash_policy"] = rule.policy["hash_policy"]
            if hr.mirror is not None:
                key = self.resolve(doc, hr.mirror, refs)
                settings["mirror"] = MirrorPolicy(cluster_name(*key), hr.mirror.subset, hr.mirror_percent)
            base = hr.name or f"{doc.namespace}/{doc.name}/{hr.field.removeprefix('spec.')}"
            matches = hr.matches or [_Match(hr.field, None, RouteMatch())]
            for j, m in enumerate(matches):
                if m.name:
                    name = f"{m.name}.{base}"
                elif len(matches) > 1:
                    name = f"{base}.match[{j}]"
                else:
                    name = base
                prefix_rewrite = None
                if hr.rewrite_uri is not None:
                    if m.match.prefix is not None:
                        prefix_rewrite = hr.rewrite_uri
                    else:
                        doc.warn(hr.rewrite_field, f"txmesh rewrites only a uri prefix match; not applied to "
                                                   f"{m.field}")
                routes.append(Route(name=name, match=m.match, destinations=destinations,
                                    prefix_rewrite=prefix_rewrite, **settings))
        # Commit: nothing above raised, so the document is good.
        for ref, field in refs.items():
            self.cluster_refs.setdefault(ref, (doc, field))
        domains: list[str] = []
        for field, host in vs.hosts:
            if self.gateway_port is not None:
                ports = [self.gateway_port]
            else:
                ports = self.ports_of(host) or sorted({p for h, p in refs if h == host})
            taken = []
            for domain in self.host_domains(host, ports):
                owner = self.domains.get(domain)
                if owner is None:
                    self.domains[domain] = vs_key
                    domains.append(domain)
                elif owner != vs_key:
                    taken.append(domain)
                elif domain not in domains:
                    domains.append(domain)
            if taken:
                doc.warn(field, f"already routed by VirtualService {self.domains[taken[0]]!r}; "
                                f"the first one wins for {', '.join(taken)}")
            self.routed_hosts.add(host)
        if not domains or not routes:
            return None
        return VirtualHost(vs_key, tuple(domains), tuple(routes))

    def ports_of(self, host: str) -> list[int]:
        service = self.services.get(host)
        return [p.number for p in service.ports] if service is not None else []

    def resolve(self, doc: _Doc, d: _Dest, refs: dict[tuple[str, int], str]) -> tuple[str, int]:
        """
        Check a destination against the services and rules, and pick its port.

        @return: the C{(host, port)} of its cluster.
        """
        port = d.port
        ports = self.ports_of(d.host)
        if port is None:
            if len(ports) > 1:
                doc.warn(f"{d.dest_field}.port", f"{d.host} has several ports ({', '.join(map(str, ports))}); "
                                                 f"none given, using {ports[0]}")
            port = ports[0] if ports else DEFAULT_PORT
        elif ports and port not in ports:
            raise doc.error(f"{d.dest_field}.port.number",
                            f"{d.host} has no port {port} (ports: {', '.join(map(str, ports))})")
        if d.subset is not None:
            rule = self.rule_for(d.host)
            if rule is None:
                raise doc.error(f"{d.dest_field}.subset", f"subset {d.subset!r} is not defined: "
                                                          f"no DestinationRule for {d.host}")
            names = [s.name for s in rule.subsets]
            if d.subset not in names:
                raise doc.error(f"{d.dest_field}.subset",
                                f"subset {d.subset!r} is not defined by DestinationRule {rule.doc.name!r} "
                                f"for {d.host} (subsets: {', '.join(names) or 'none'})")
        refs.setdefault((d.host, port), d.field)
        return d.host, port

    def host_domains(self, host: str, ports: Iterable[int]) -> list[str]:
        """
        @return: every name Istio accepts for C{host} in a C{Host} header,
            each also with every port.
        """
        if _is_wildcard(host):
            return [host]
        names = [host]
        tail = "." + self.domain_suffix
        if host.endswith(tail) and host[: -len(tail)].count(".") == 1:
            stem = host[: -len(tail)]
            name, _, namespace = stem.partition(".")
            if self.domain_suffix.startswith("svc."):
                names.append(f"{stem}.svc")
            names.append(stem)
            if namespace == self.namespace:
                names.append(name)
        return names + [f"{n}:{p}" for n in names for p in ports]

    # --- results --------------------------------------------------------------

    def clusters(self) -> list[ClusterConfig]:
        out = []
        warned: set[str] = set()
        for (host, port), (doc, field) in self.cluster_refs.items():
            endpoints = self.endpoints(host, port)
            if not endpoints and host not in warned:
                warned.add(host)
                doc.warn(field, f"{host} has no endpoints (none from a ServiceEntry or service discovery); "
                                f"requests to it fail until it has some")
            rule = self.rule_for(host)
            kwargs: dict[str, Any] = {}
            subsets: tuple[SubsetConfig, ...] = ()
            if rule is not None:
                rule.used = True
                kwargs = rule.policy
                subsets = tuple(rule.subsets)
            if (self.mtls and "tls" not in kwargs and endpoints
                    and all(ep.label(TLS_MODE_LABEL) == "istio" for ep in endpoints)
                    and (self.accepts_mtls is None or self.accepts_mtls(host))):
                # Auto mutual TLS: every endpoint has a sidecar with a
                # workload certificate.
                kwargs = dict(kwargs, tls=UpstreamTLS(mode="ISTIO_MUTUAL"))
            service = self.services.get(host)
            tls = kwargs.get("tls")
            if tls is not None and tls.mode == "ISTIO_MUTUAL" and not tls.subject_alt_names:
                # As Istio's pilot: the destination's service accounts are the
                # identities its servers may have (the DestinationRule's
                # subjectAltNames, when given, win).
                declared = service.subject_alt_names if service is not None else ()
                names = expected_identities(endpoints, declared, self.trust_domain)
                if names:
                    kwargs = dict(kwargs, tls=attrs.evolve(tls, subject_alt_names=names))
            if service is not None and "http2" not in kwargs and any(
                    p.number == port and (p.protocol or "").upper() in ("HTTP2", "GRPC", "GRPC-WEB")
                    for p in service.ports):
                # As in Istio: a port declared HTTP2 or GRPC is spoken to in h2.
                kwargs = dict(kwargs, http2=True)
            out.append(ClusterConfig(cluster_name(host, port), endpoints, subsets=subsets, **kwargs))
        for rule in self.rules.values():
            if not rule.used:
                rule.doc.warn("spec.host", f"{rule.host} matches no service known here (no ServiceEntry and no "
                                           f"route destination); the rule is unused")
        return out

    def default_virtual_hosts(self, clusters: list[ClusterConfig]) -> list[VirtualHost]:
        out = []
        first_port: dict[str, int] = {}
        for (host, port) in self.cluster_refs:
            first_port.setdefault(host, port)
        by_name = {c.name: c for c in clusters}
        for (host, port) in self.cluster_refs:
            if host in self.routed_hosts:
                continue
            names = self.host_domains(host, ())
            domains = (names if first_port[host] == port else []) + [f"{n}:{port}" for n in names]
            domains = [d for d in domains if d not in self.domains]
            if not domains:
                continue
            for d in domains:
                self.domains[d] = f"{host}:{port}"
            cluster = by_name[cluster_name(host, port)]
            route = Route(name="default", match=RouteMatch(), cluster=cluster.name,
                          destinations=(WeightedDestination(cluster.name),), timeout=0.0, retry=RetryPolicy(),
                          hash_policy=cluster.hash_policy)
            out.append(VirtualHost(f"{host}:{port}", tuple(domains), (route,)))
        return out


_UNSET = object()
_TRAFFIC_POLICY: tuple[tuple[str, ...], dict[str, str]] = (
    ("loadBalancer", "connectionPool", "outlierDetection", "tls"),
    {
        "portLevelSettings": "per-port policies are not supported by txmesh; the rule's trafficPolicy applies "
                             "to every port",
        "tunnel": _IGNORED,
        "proxyProtocol": _IGNORED,
        "retryBudget": _IGNORED,
    },
)


def _grpc_status(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 16:
        return value
    if isinstance(value, str) and value.upper() in _GRPC_STATUS:
        return _GRPC_STATUS[value.upper()]
    raise ValueError(f"expected a gRPC status name such as 'UNAVAILABLE', got {value!r}")


def _base64(value: Any) -> bytes:
    try:
        return base64.b64decode(_text(value), validate=True)
    except binascii.Error as e:
        raise ValueError(f"not valid base64: {e}") from None


