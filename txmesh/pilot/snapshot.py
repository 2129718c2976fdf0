"""
Per-proxy snapshots: mesh config and registry endpoints in, the resources
one proxy needs out (pure and versioned; no I/O, no reactor).

A snapshot's resources are fragments of txmesh's own proxy config, in the
shapes the YAML loader accepts, so a proxy rebuilds a whole document::

    {"node": ..., "admin": ..., "listeners": [...], "clusters": [...]}

and loads it with L{txmesh.config.loader.ConfigLoader.load_document}.  The
model values are written back to that form by L{to_native}.

With L{MeshConfig.mtls} (the pilot has a CA, so proxies have workload
certificates) a snapshot also carries the mesh's zero-trust config: the
inbound listener's C{mtls} mode from PeerAuthentication, C{jwt} and
C{authz} filters from RequestAuthentication and AuthorizationPolicy, and
C{tls: {mode: ISTIO_MUTUAL}} on outbound clusters from DestinationRule
C{tls} or auto mutual TLS (see L{txmesh.config.istio.translate}).

Known limit of the written form: the loader has no way to say "a single
destination with its own header operations" together with C{cluster}, so
such a route is written as a one-entry C{weighted_clusters}; it routes the
same, but the loaded route's C{cluster} is C{None}.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import attrs

from txmesh.config.durations import parse_duration
from txmesh.config.errors import ConfigError
from txmesh.config.gateway import parse_gateways
from txmesh.config.istio import IstioConfig, IstioWarning, translate
from txmesh.config.model import (
    DISABLED,
    CircuitBreakerConfig,
    ClusterConfig,
    DirectResponse,
    Endpoint,
    FaultPolicy,
    HashPolicy,
    HeaderMatch,
    HeaderOps,
    HealthCheckConfig,
    MirrorPolicy,
    NodeConfig,
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
from txmesh.pilot.credentials import Credential
from txmesh.policy.authorization import Policy
from txmesh.policy.istio_security import KIND as AUTHORIZATION_POLICY
from txmesh.policy.istio_security import (
    PEER_AUTHENTICATION,
    REQUEST_AUTHENTICATION,
    PeerAuthentication,
    RequestAuthentication,
    jwt_rules_for,
    mtls_mode,
    parse_authorization_policies,
    parse_peer_authentications,
    parse_request_authentications,
    policies_for,
)
from txmesh.policy.istio_security import to_native as policy_to_native

INTERCEPTION_LABEL = "txmesh.io/interception"
"""
Node label: C{REDIRECT} when iptables sends the workload's traffic to the
proxy (C{txmesh-proxy --capture}): its outbound listener is a capture
listener.
"""
REDIRECT = "REDIRECT"
APP_PROTOCOL_LABEL = "txmesh.io/app-protocol"
"""
Node label: what the app beside the proxy speaks (C{http}, C{http2},
C{grpc}); with C{http2} or C{grpc} the inbound cluster speaks HTTP/2.
"""

LISTENERS = "listeners"
CLUSTERS = "clusters"
RESOURCE_TYPES = (LISTENERS, CLUSTERS)


@attrs.frozen
class Node:
    """
    A proxy as it announces itself to the pilot.

    @ivar id: unique id of the proxy.
    @ivar workload: the workload it stands beside (names its inbound cluster).
    @ivar namespace: its namespace; short service names resolve in it.
    @ivar labels: the workload's labels, sorted pairs.
    @ivar locality: C{region/zone/subzone}, or empty.
    @ivar inbound_port: the port of its inbound listener (node metadata
        C{inbound_port}); C{None} for a proxy with no inbound side.
    @ivar app_port: the port its app listens on beside it (node metadata
        C{app_port}).
    @ivar outbound_address: endpoint string of its outbound listener, when
        it is not the mesh's (several proxies on one host).
    """

    id: str
    workload: str = "unknown"
    namespace: str = "default"
    app: str = "unknown"
    version: str = "unknown"
    labels: tuple[tuple[str, str], ...] = ()
    locality: str = ""
    inbound_port: int | None = None
    app_port: int | None = None
    outbound_address: str | None = None


@attrs.frozen
class Telemetry:
    """
    What the pilot asks every proxy to report (C{mesh.yaml} C{telemetry}).

    @ivar metrics: Istio's standard metrics (the C{metrics} filter), as
        C{reporter=source} on outbound listeners and C{destination} on
        inbound ones.
    @ivar access_log: the C{access_log} filter's config, or C{None} for no
        access log.
    @ivar tracing: the C{tracing} filter's config (collector, sampling...),
        or C{None}; its C{kind} is set per listener.
    """

    metrics: bool = True
    access_log: Mapping[str, Any] | None = attrs.field(default=None, eq=False)
    tracing: Mapping[str, Any] | None = attrs.field(default=None, eq=False)

    def filters(self, inbound: bool) -> list[dict[str, Any]]:
        """
        @return: the telemetry filters of an inbound (server, destination
            reporter) or outbound (client, source reporter) listener, in
            chain order: tracing first (so the rest see the trace), then
            metrics and the access log.
        """
        out: list[dict[str, Any]] = []
        if self.tracing is not None:
            out.append({"name": "tracing", "config": {**self.tracing, "kind": "server" if inbound else "client"}})
        if self.metrics:
            out.append({"name": "metrics", "config": {"reporter": "destination" if inbound else "source"}})
        if self.access_log is not None:
            out.append({"name": "access_log", "config": dict(self.access_log)})
        return out


@attrs.frozen
class MeshConfig:
    """
    Everything snapshots are built from.

    @ivar documents: Istio documents as C{(source, number, parsed document)}.
    @ivar registry: endpoints by service FQDN, from discovery, for hosts no
        ServiceEntry gives endpoints to.
    @ivar trust_domain: the mesh's SPIFFE trust domain (not used yet).
    @ivar default_namespace: the namespace of a node that names none.
    @ivar domain_suffix: the DNS suffix of in-mesh services.
    @ivar outbound_address: endpoint string of every proxy's outbound listener.
    @ivar inbound_address: endpoint string template of the inbound listener,
        with C{{port}} standing for the node's C{inbound_port}.
    @ivar app_host: where the app beside the proxy listens.
    @ivar admin_address: endpoint string of the proxy's admin, or C{None}.
    @ivar mtls: proxies have workload certificates (the pilot has a CA):
        snapshots carry mutual TLS and the C{security.istio.io} policies.
        Without it (an C{--insecure} pilot) those documents are checked but
        not applied, with a warning.
    @ivar root_namespace: Istio's root namespace: security policies in it
        apply to the whole mesh.
    @ivar audit_log: where the pushed C{authz} and C{jwt} filters write
        their audit records (a path on the proxy's host, C{-} for its
        standard output), or C{None} for none.
    @ivar outbound_traffic_policy: what a transparently captured sidecar
        does with traffic to hosts it has no route for: C{ALLOW_ANY} (pass
        it to its original destination) or C{REGISTRY_ONLY} (refuse it), as
        Istio's C{meshConfig.outboundTrafficPolicy.mode}.
    @ivar registry_ports: the ports of the services in C{registry}, as
        C{(name, number, protocol)}.
    @ivar credentials: operator certificates for gateways, by name (see
        L{txmesh.pilot.credentials}).
    @ivar telemetry: the metrics, access log and tracing filters every
        pushed listener gets.
    """

    documents: tuple[tuple[str | None, int, Any], ...] = attrs.field(converter=tuple, default=())
    registry: Mapping[str, Sequence[Endpoint]] = attrs.field(factory=dict, eq=False)
    trust_domain: str = "cluster.local"
    default_namespace: str = "default"
    domain_suffix: str = "svc.cluster.local"
    outbound_address: str = "tcp:15001:interface=127.0.0.1"
    inbound_address: str = "tcp:{port}:interface=0.0.0.0"
    app_host: str = "127.0.0.1"
    admin_address: str | None = "tcp:15000:interface=127.0.0.1"
    mtls: bool = False
    root_namespace: str = "istio-system"
    audit_log: str | None = None
    telemetry: Telemetry = attrs.field(factory=lambda: Telemetry())
    credentials: Mapping[str, Credential] = attrs.field(factory=dict, eq=False)
    registry_ports: Mapping[str, Sequence[tuple[str, int, str]]] = attrs.field(factory=dict, eq=False)
    outbound_traffic_policy: str = "ALLOW_ANY"


@attrs.frozen
class Snapshot:
    """
    The resources of one proxy at one version.

    @ivar resources: JSON-serialisable config fragments by type
        (C{listeners}, C{clusters}).
    @ivar version: hash of the whole snapshot (node and admin included).
    @ivar per_type_versions: hash of each resource type's list.
    @ivar node: the document's C{node} section.
    @ivar admin_address: the proxy's admin endpoint, or C{None}.
    @ivar warnings: what the Istio translation could not (fully) apply.
    """

    resources: dict[str, list[dict[str, Any]]]
    version: str
    per_type_versions: dict[str, str]
    node: dict[str, Any]
    admin_address: str | None = None
    warnings: tuple[str, ...] = ()

    def document(self) -> dict[str, Any]:
        """
        @return: a complete proxy config document for
            L{ConfigLoader.load_document
            <txmesh.config.loader.ConfigLoader.load_document>}.
        """
        doc: dict[str, Any] = {"node": self.node}
        if self.admin_address is not None:
            doc["admin"] = {"address": self.admin_address}
        doc.update({t: self.resources[t] for t in RESOURCE_TYPES})
        return doc


def content_hash(value: Any) -> str:
    """
    @return: a stable hash of a JSON-serialisable value (key order does not
        matter).
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def inbound_cluster_name(node: Node) -> str:
    """
    @return: the name of the cluster of the app beside C{node}.
    """
    return f"inbound|{node.app_port}||{node.workload}"


@attrs.frozen
class NamespaceView:
    """
    What every proxy of one namespace shares: the translated routes and the
    clusters they name, in written form, with their hashes.  Built once per
    namespace per config, so a config change costs one translation per
    namespace rather than one per proxy, and the proxies' snapshots share
    these lists.

    @ivar virtual_hosts: the outbound listener's virtual hosts.
    @ivar clusters: the clusters the routes name.
    @ivar warnings: what the Istio translation could not (fully) apply.
    @ivar authorization_policies: the AuthorizationPolicies of this
        namespace and of the root namespace, each with its native form;
        L{build_snapshot} picks a node's by its labels.
    @ivar peer_authentications: likewise, the PeerAuthentications.
    @ivar request_authentications: likewise, the RequestAuthentications.
    """

    virtual_hosts: tuple[dict[str, Any], ...]
    clusters: tuple[dict[str, Any], ...]
    warnings: tuple[str, ...]
    virtual_hosts_hash: str
    clusters_hash: str
    authorization_policies: tuple[tuple[Policy, dict[str, Any]], ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()


def check_documents(mesh: MeshConfig, namespace: str | None = None) -> list[str]:
    """
    Check the mesh's documents as snapshots will use them, without needing
    a proxy: the Istio translation (with L{MeshConfig.mtls}), the Gateways
    and the C{security.istio.io} documents, for C{namespace} (default: the mesh's
    default namespace).  Unlike L{namespace_view}, routed hosts without
    endpoints are warnings, not errors.

    @return: the warnings.
    @raise ConfigError: if a document is invalid.
    """
    namespace = namespace or mesh.default_namespace
    every_peer = parse_peer_authentications(mesh.documents, namespace)
    istio = translate_mesh(mesh, namespace, every_peer)
    parse_authorization_policies(mesh.documents, namespace)
    parse_request_authentications(mesh.documents, namespace)
    parse_gateways(mesh.documents, namespace)
    warnings = [str(w) for w in istio.warnings]
    if not mesh.mtls:
        warnings.extend(_unapplied_security(mesh.documents))
    return warnings


def translate_mesh(mesh: MeshConfig, namespace: str, peer_authentications: Sequence[PeerAuthentication],
                   **options: Any) -> IstioConfig:
    """
    L{translate} the mesh's documents with its registry, mutual TLS and
    auto mutual TLS settings, as seen from C{namespace}.  An
    C{ISTIO_MUTUAL} cluster accepts the SPIFFE IDs (in the mesh's trust
    domain) of its service's accounts when service discovery or a
    ServiceEntry knows them all, and any peer of the trust domain
    otherwise.

    @param options: more of L{translate}'s options (a gateway's).
    """
    return translate(mesh.documents, namespace, mesh.domain_suffix, registry=mesh.registry,
                     registry_ports=mesh.registry_ports, mtls=mesh.mtls,
                     accepts_mtls=auto_mtls_check(mesh, peer_authentications),
                     trust_domain=mesh.trust_domain, **options)


def auto_mtls_check(mesh: MeshConfig, peer_authentications: Sequence[PeerAuthentication]) -> Callable[[str], bool]:
    """
    @return: for L{translate}'s C{accepts_mtls}: whether a host's workloads
        take mutual TLS, by their namespace's or the mesh's
        PeerAuthentication.
    """

    def accepts_mtls(host: str) -> bool:
        # As Istio's auto mutual TLS: the destination's namespace-wide or
        # mesh-wide PeerAuthentication, not a workload's.
        return mtls_mode(peer_authentications, host_namespace(host, mesh.domain_suffix) or "", {},
                         root_namespace=mesh.root_namespace) != "DISABLE"

    return accepts_mtls


def namespace_view(mesh: MeshConfig, namespace: str) -> NamespaceView:
    """
    Translate the mesh's documents as seen from C{namespace}.

    @raise ConfigError: if the Istio documents (C{security.istio.io} ones
        included) are invalid, or a cluster a route needs has no endpoints
        (the proxy's loader refuses it).
    """
    # Parsed whatever mesh.mtls says, so a bad document is refused either way.
    every_peer = parse_peer_authentications(mesh.documents, namespace)
    istio = translate_mesh(mesh, namespace, every_peer)
    scope = (namespace, mesh.root_namespace)
    policies = [p for p in parse_authorization_policies(mesh.documents, namespace) if p.namespace in scope]
    peer = [p for p in every_peer if p.namespace in scope]
    request = [r for r in parse_request_authentications(mesh.documents, namespace) if r.namespace in scope]
    warnings = [str(w) for w in istio.warnings]
    if not mesh.mtls:
        warnings.extend(_unapplied_security(mesh.documents))
    needed: set[str] = set()
    for vh in istio.virtual_hosts:
        for route in vh.routes:
            needed.update(clusters_of(route))
    clusters = []
    for cluster in istio.clusters:
        if cluster.name not in needed:
            continue
        if not cluster.endpoints:
            raise ConfigError(
                None,
                f"clusters: {cluster.name}",
                "has no endpoints (none from a ServiceEntry or service discovery); a proxy "
                "cannot load a cluster without endpoints",
            )
        clusters.append(to_native(cluster))
    virtual_hosts = tuple(to_native(vh) for vh in istio.virtual_hosts)
    return NamespaceView(
        virtual_hosts,
        tuple(clusters),
        tuple(warnings),
        content_hash(virtual_hosts),
        content_hash(clusters),
        tuple((p, policy_to_native(p)) for p in policies),
        tuple(peer),
        tuple(request),
    )


_SECURITY_KINDS = (AUTHORIZATION_POLICY, PEER_AUTHENTICATION, REQUEST_AUTHENTICATION)


def _unapplied_security(documents: Sequence[tuple[str | None, int, Any]]) -> list[str]:
    out = []
    for source, number, body in documents:
        if (isinstance(body, Mapping) and body.get("kind") in _SECURITY_KINDS
                and str(body.get("apiVersion", "")).startswith("security.istio.io/")):
            out.append(str(IstioWarning(source, number, "kind", f"{body['kind']} is not applied: the pilot has no "
                                                                "CA (--insecure), so proxies have no workload "
                                                                "identity")))
    return out


def host_namespace(host: str, domain_suffix: str) -> str | None:
    """
    @return: the namespace of an in-mesh service's FQDN
        (C{reviews.shop.svc.cluster.local} is in C{shop}), or C{None} for
        other hosts.
    """
    suffix = "." + domain_suffix
    if not host.endswith(suffix):
        return None
    parts = host[: -len(suffix)].split(".")
    return parts[1] if len(parts) == 2 else None


def workload_labels(node: Node) -> dict[str, str]:
    """
    @return: the labels of the workload beside C{node}, which policy
        selectors match: its C{labels}, plus C{app} and C{version} when
        known (they are labels in Kubernetes), as the proxy's own
        C{source_labels} matching sees them.
    """
    labels = dict(node.labels)
    for key, value in (("app", node.app), ("version", node.version)):
        if value != "unknown":
            labels.setdefault(key, value)
    return labels


def _inbound_security(mesh: MeshConfig, view: NamespaceView, node: Node, namespace: str) -> dict[str, Any]:
    """
    The inbound listener's C{mtls} and C{http_filters} for C{node}: its
    PeerAuthentication mode on its app port, then a C{jwt} filter for its
    RequestAuthentications before an C{authz} filter for its
    AuthorizationPolicies (authorization sees the verified token).
    """
    labels = workload_labels(node)
    root = mesh.root_namespace
    out: dict[str, Any] = {}
    mode = mtls_mode(view.peer_authentications, namespace, labels, node.app_port, root)
    if mode != "DISABLE":
        out["mtls"] = mode
    filters: list[dict[str, Any]] = []
    audit = {"audit": {"path": mesh.audit_log}} if mesh.audit_log else {}
    rules = jwt_rules_for(view.request_authentications, namespace, labels, root)
    if rules:
        filters.append({"name": "jwt", "config": {"rules": rules, **audit}})
    applied = {id(p) for p in policies_for([p for p, _ in view.authorization_policies], namespace, labels, root)}
    policies = [native for p, native in view.authorization_policies if id(p) in applied]
    if policies:
        filters.append({"name": "authz", "config": {"policies": policies, **audit}})
    if filters:
        out["http_filters"] = filters
    return out


def build_snapshot(mesh: MeshConfig, node: Node, view: NamespaceView | None = None) -> Snapshot:
    """
    Build the resources C{node} needs: an outbound listener with the
    translated routes, the clusters those routes name, and (when the node
    has C{inbound_port} and C{app_port}) an inbound listener to its app.

    Each type's version is a hash of its content, computed from the
    shared view's hashes and the node's own additions, so pilots building
    the same config give the same versions (a proxy can resume on another
    replica).

    @param view: the node's namespace view, when the caller shares one
        between proxies (see L{namespace_view}); built here otherwise.
    @raise ConfigError: see L{namespace_view}.
    """
    namespace = node.namespace or mesh.default_namespace
    if view is None:
        view = namespace_view(mesh, namespace)
    listeners: list[dict[str, Any]] = []
    outbound_address = None
    outbound_filters = mesh.telemetry.filters(inbound=False)
    labels = dict(node.labels)
    captured = labels.get(INTERCEPTION_LABEL) == REDIRECT
    capture = {"mode": mesh.outbound_traffic_policy} if captured else None
    if view.virtual_hosts or captured:
        outbound_address = node.outbound_address or mesh.outbound_address
        outbound: dict[str, Any] = {"name": "outbound", "address": outbound_address,
                                    "virtual_hosts": list(view.virtual_hosts)}
        if capture is not None:
            # iptables sends the app's connections here: each is routed by
            # its original destination and first bytes.
            outbound["capture"] = capture
        if outbound_filters:
            outbound["http_filters"] = outbound_filters
        listeners.append(outbound)
    clusters = list(view.clusters)
    inbound_listener = inbound_cluster = None
    if node.inbound_port is not None and node.app_port is not None:
        name = inbound_cluster_name(node)
        inbound_cluster = {"name": name, "endpoints": [{"address": mesh.app_host, "port": node.app_port}]}
        if labels.get(APP_PROTOCOL_LABEL) in ("http2", "grpc"):
            inbound_cluster["http2"] = True
        inbound_listener = {
            "name": "inbound",
            "address": mesh.inbound_address.format(port=node.inbound_port),
            "routes": [{"name": "inbound", "cluster": name, "timeout": "0s"}],
        }
        if mesh.mtls:
            inbound_listener.update(_inbound_security(mesh, view, node, namespace))
        telemetry = mesh.telemetry.filters(inbound=True)
        if telemetry:
            inbound_listener["http_filters"] = telemetry + inbound_listener.get("http_filters", [])
        clusters.append(inbound_cluster)
        listeners.append(inbound_listener)
    resources = {LISTENERS: listeners, CLUSTERS: clusters}
    native_node = to_native(
        NodeConfig(node.id, node.workload, namespace, node.app, node.version, node.labels, node.locality)
    )
    per_type = {
        LISTENERS: content_hash(
            {"virtual_hosts": view.virtual_hosts_hash if view.virtual_hosts else None,
             "outbound_address": outbound_address, "outbound_filters": outbound_filters, "capture": capture,
             "inbound": inbound_listener}
        ),
        CLUSTERS: content_hash({"shared": view.clusters_hash, "inbound": inbound_cluster}),
    }
    version = content_hash({"node": native_node, "admin": mesh.admin_address, "types": per_type})
    return Snapshot(resources, version, per_type, native_node, mesh.admin_address, view.warnings)


def clusters_of(route: Route) -> set[str]:
    """
    @return: the names of the clusters C{route} sends to (mirror included).
    """
    names = {d.cluster for d in route.destinations}
    if route.cluster is not None:
        names.add(route.cluster)
    if route.mirror is not None:
        names.add(route.mirror.cluster)
    return names


# --- model values back to native config ---------------------------------------


def duration(seconds: float) -> str:
    """
    @return: C{seconds} as C{"<n>ms"} or C{"<n>s"}, read back by
        L{parse_duration} as exactly the same float.
    """
    ms = seconds * 1000
    if ms == int(ms):
        text = f"{int(ms)}ms"
        if parse_duration(text) == seconds:
            return text
    # repr is the shortest exact form; Decimal spells it without exponent.
    return f"{format(Decimal(repr(float(seconds))), 'f')}s"


def _latin1(value: bytes) -> str:
    return value.decode("latin-1")


def _utf8(value: bytes) -> str:
    return value.decode("utf-8")


def _pairs(pairs: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    return {_latin1(k): _utf8(v) for k, v in pairs}


def _header_ops(ops: HeaderOps) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ops.set:
        out["set"] = _pairs(ops.set)
    if ops.add:
        out["add"] = _pairs(ops.add)
    if ops.remove:
        out["remove"] = [_latin1(n) for n in ops.remove]
    return out


def _header_match(m: HeaderMatch) -> dict[str, Any]:
    out: dict[str, Any] = {"name": _latin1(m.name)}
    if m.exact is not None:
        out["exact"] = _latin1(m.exact)
    if m.prefix is not None:
        out["prefix"] = _latin1(m.prefix)
    if m.regex is not None:
        out["regex"] = _utf8(m.regex.pattern)
    if m.present is not None:
        out["present"] = m.present
    if m.invert:
        out["invert"] = True
    return out


def _match(m: RouteMatch) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.path is not None:
        out["path"] = _latin1(m.path)
    elif m.regex is not None:
        out["regex"] = _utf8(m.regex.pattern)
    elif m.prefix is not None:
        out["prefix"] = _latin1(m.prefix)
    if m.headers:
        out["headers"] = [_header_match(h) for h in m.headers]
    if m.methods:
        out["methods"] = [_latin1(x) for x in m.methods]
    if m.query_params:
        out["query_params"] = [_header_match(q) for q in m.query_params]
    if m.port is not None:
        out["port"] = m.port
    if m.source_labels:
        out["source_labels"] = dict(m.source_labels)
    return out


def _hash_policy(h: HashPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if h.header is not None:
        out["header"] = _latin1(h.header)
    if h.cookie is not None:
        out["cookie"] = _latin1(h.cookie)
    if h.query_param is not None:
        out["query_param"] = _latin1(h.query_param)
    if h.source_ip:
        out["source_ip"] = True
    out["algorithm"] = h.algorithm
    out["table_size"] = h.table_size
    return out


def _retry(r: RetryPolicy) -> dict[str, Any]:
    return {
        "attempts": r.attempts,
        "per_try_timeout": duration(r.per_try_timeout),
        "retry_on": sorted(r.retry_on),
        "backoff_base": duration(r.backoff_base),
        "backoff_max": duration(r.backoff_max),
        "max_buffered_body": r.max_buffered_body,
    }


def _fault(f: FaultPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.delay:
        out["delay"] = duration(f.delay)
    if f.delay_percent:
        out["delay_percent"] = f.delay_percent
    if f.abort_status:
        out["abort_status"] = f.abort_status
    if f.abort_grpc_status is not None:
        out["abort_grpc_status"] = f.abort_grpc_status
    if f.abort_percent:
        out["abort_percent"] = f.abort_percent
    return out


def _mirror(m: MirrorPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"cluster": m.cluster, "percent": m.percent}
    if m.subset is not None:
        out["subset"] = m.subset
    return out


def _redirect(r: Redirect) -> dict[str, Any]:
    out: dict[str, Any] = {"code": r.code}
    for key in ("uri", "authority", "scheme"):
        value = getattr(r, key)
        if value is not None:
            out[key] = _latin1(value)
    if r.port is not None:
        out["port"] = r.port
    return out


def _destination(d: WeightedDestination) -> dict[str, Any]:
    out: dict[str, Any] = {"cluster": d.cluster, "weight": d.weight}
    if d.subset is not None:
        out["subset"] = d.subset
    for key in ("request_headers", "response_headers"):
        ops = _header_ops(getattr(d, key))
        if ops:
            out[key] = ops
    return out


def _is_plain(d: WeightedDestination, cluster: str) -> bool:
    return (
        d.cluster == cluster
        and d.weight == 100
        and d.request_headers == HeaderOps()
        and d.response_headers == HeaderOps()
    )


def _route(r: Route) -> dict[str, Any]:
    out: dict[str, Any] = {"name": r.name, "match": _match(r.match)}
    dests = r.destinations
    if r.cluster is not None and (not dests or (len(dests) == 1 and _is_plain(dests[0], r.cluster))):
        out["cluster"] = r.cluster
        if dests and dests[0].subset is not None:
            out["subset"] = dests[0].subset
    elif dests:
        out["weighted_clusters"] = [_destination(d) for d in dests]
    if r.direct_response is not None:
        out["direct_response"] = {"status": r.direct_response.status, "body": _utf8(r.direct_response.body)}
    if r.redirect is not None:
        out["redirect"] = _redirect(r.redirect)
    out["timeout"] = duration(r.timeout)
    if r.prefix_rewrite is not None:
        out["prefix_rewrite"] = _latin1(r.prefix_rewrite)
    if r.host_rewrite is not None:
        out["host_rewrite"] = _latin1(r.host_rewrite)
    if r.request_headers_to_add:
        out["request_headers_to_add"] = _pairs(r.request_headers_to_add)
    if r.response_headers_to_add:
        out["response_headers_to_add"] = _pairs(r.response_headers_to_add)
    if r.filter_overrides:
        filters = {}
        for name, config in r.filter_overrides:
            if config is not DISABLED:
                # A parsed filter config has no general way back to YAML.
                raise ValueError(f"route {r.name!r}: the config of filter {name!r} cannot be written back")
            filters[name] = None
        out["filters"] = filters
    if r.retry is not None:
        out["retry"] = _retry(r.retry)
    if r.fault is not None:
        out["fault"] = _fault(r.fault)
    if r.mirror is not None:
        out["mirror"] = _mirror(r.mirror)
    for key in ("request_headers", "response_headers"):
        ops = _header_ops(getattr(r, key))
        if ops:
            out[key] = ops
    if r.hash_policy is not None:
        out["hash_policy"] = _hash_policy(r.hash_policy)
    return out


def _endpoint(e: Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {"address": e.host, "port": e.port, "weight": e.weight}
    if e.labels:
        out["labels"] = dict(e.labels)
    if e.locality:
        out["locality"] = e.locality
    return out


def _subset(s: SubsetConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": s.name, "labels": dict(s.labels)}
    if s.lb_policy is not None:
        out["lb_policy"] = s.lb_policy
    return out


def _circuit_breaker(c: CircuitBreakerConfig) -> dict[str, Any]:
    return attrs.asdict(c)


def _outlier(o: OutlierDetectionConfig) -> dict[str, Any]:
    return {
        "consecutive_5xx": o.consecutive_5xx,
        "consecutive_gateway_errors": o.consecutive_gateway_errors,
        "interval": duration(o.interval),
        "base_ejection_time": duration(o.base_ejection_time),
        "max_ejection_percent": o.max_ejection_percent,
    }


def _health_check(h: HealthCheckConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": h.kind,
        "path": _latin1(h.path),
        "interval": duration(h.interval),
        "timeout": duration(h.timeout),
        "healthy_threshold": h.healthy_threshold,
        "unhealthy_threshold": h.unhealthy_threshold,
    }
    if h.grpc_service:
        out["grpc_service"] = h.grpc_service
    return out


def _tls(t: UpstreamTLS) -> dict[str, Any]:
    if t.mode == "ISTIO_MUTUAL":
        out: dict[str, Any] = {"mode": t.mode}
        if t.subject_alt_names:
            out["subject_alt_names"] = list(t.subject_alt_names)
        return out
    # Only the CA's path travels: the proxy reads (and checks) the file.
    out = {}
    if t.ca_certificate is not None:
        out["ca_certificate"] = t.ca_certificate
    if t.sni is not None:
        out["sni"] = t.sni
    if t.mode == "MUTUAL":
        out.update(mode="MUTUAL", client_certificate=t.client_certificate, private_key=t.private_key)
    return out


def _cluster(c: ClusterConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": c.name,
        "endpoints": [_endpoint(e) for e in c.endpoints],
        "connect_timeout": duration(c.connect_timeout),
        "lb_policy": c.lb_policy,
        "max_idle_per_endpoint": c.max_idle_per_endpoint,
        "idle_timeout": duration(c.idle_timeout),
        "circuit_breaker": _circuit_breaker(c.circuit_breaker),
        "locality_failover": c.locality_failover,
        "http2": c.http2,
    }
    if c.hash_policy is not None:
        out["hash_policy"] = _hash_policy(c.hash_policy)
    if c.subsets:
        out["subsets"] = [_subset(s) for s in c.subsets]
    if c.outlier_detection is not None:
        out["outlier_detection"] = _outlier(c.outlier_detection)
    if c.health_check is not None:
        out["health_check"] = _health_check(c.health_check)
    if c.tls is not None:
        out["tls"] = _tls(c.tls)
    return out


def _node(n: NodeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": n.id,
        "workload": n.workload,
        "namespace": n.namespace,
        "app": n.app,
        "version": n.version,
    }
    if n.labels:
        out["labels"] = dict(n.labels)
    if n.locality:
        out["locality"] = n.locality
    return out


_WRITERS: dict[type, Any] = {
    VirtualHost: lambda vh: {"name": vh.name, "domains": list(vh.domains), "routes": [_route(r) for r in vh.routes]},
    Route: _route,
    RouteMatch: _match,
    HeaderMatch: _header_match,
    HeaderOps: _header_ops,
    WeightedDestination: _destination,
    RetryPolicy: _retry,
    FaultPolicy: _fault,
    MirrorPolicy: _mirror,
    Redirect: _redirect,
    DirectResponse: lambda d: {"status": d.status, "body": _utf8(d.body)},
    HashPolicy: _hash_policy,
    ClusterConfig: _cluster,
    Endpoint: _endpoint,
    SubsetConfig: _subset,
    CircuitBreakerConfig: _circuit_breaker,
    OutlierDetectionConfig: _outlier,
    HealthCheckConfig: _health_check,
    UpstreamTLS: _tls,
    NodeConfig: _node,
}


def to_native(value: Any) -> dict[str, Any]:
    """
    Write a config model value back in the form the YAML loader reads
    (durations as C{"<n>s"}/C{"<n>ms"}, bytes as strings, label pairs as
    mappings).

    @param value: a L{VirtualHost}, L{Route}, L{ClusterConfig}, L{NodeConfig}
        or any of their parts.
    @return: a JSON-serialisable mapping.
    @raise TypeError: for a value of another type.
    @raise ValueError: for a route with a filter config (other than
        L{DISABLED}), which has no general way back to YAML.
    """
    writer = _WRITERS.get(type(value))
    if writer is None:
        raise TypeError(f"no native form for {type(value).__name__}")
    return writer(value)
