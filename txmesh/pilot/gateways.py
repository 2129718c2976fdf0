"""
Snapshots of gateway proxies (C{txmesh-proxy --router}): one listener per
port of the Gateways whose selector matches the proxy's labels, routing
what the VirtualServices bound to those Gateways say, terminating TLS with
the operator's certificates (chosen by SNI when several servers share a
port).  Egress gateways are the same thing pointed outwards: a
VirtualService sends the sidecars' requests for an external host to the
gateway, and the gateway's routes send them out (with TLS origination by
a DestinationRule C{tls.mode: SIMPLE}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from txmesh.config.errors import ConfigError
from txmesh.config.gateway import PROXY_TYPE_LABEL, ROUTER, Gateway, GatewayServer, gateways_for, parse_gateways
from txmesh.config.model import NodeConfig, Redirect, Route, RouteMatch, VirtualHost
from txmesh.pilot.snapshot import (
    CLUSTERS,
    LISTENERS,
    MeshConfig,
    Node,
    Snapshot,
    clusters_of,
    content_hash,
    to_native,
    translate_mesh,
    workload_labels,
)
from txmesh.policy.istio_security import parse_peer_authentications

__all__ = ["GatewayView", "build_gateway_snapshot", "gateway_view", "is_router"]


def is_router(node: Node) -> bool:
    """
    @return: whether C{node} is a gateway proxy (label
        L{PROXY_TYPE_LABEL}C{: router}).
    """
    return dict(node.labels).get(PROXY_TYPE_LABEL) == ROUTER


@attrs.frozen
class GatewayView:
    """
    What every gateway proxy serving the same Gateways shares.

    @ivar gateways: the C{namespace/name} of those Gateways.
    @ivar listeners: one listener per port, in written form.
    @ivar clusters: the clusters their routes name.
    @ivar warnings: what the translation could not (fully) apply.
    """

    gateways: tuple[str, ...]
    listeners: tuple[dict[str, Any], ...]
    clusters: tuple[dict[str, Any], ...]
    warnings: tuple[str, ...]


def selected_gateways(mesh: MeshConfig, node: Node, parsed: Sequence[Gateway] | None = None) -> list[Gateway]:
    """
    @param parsed: the mesh's Gateways as read for the node's namespace,
        when the caller shares them between gateway proxies; read here
        otherwise.
    @return: the Gateways C{node} serves, by its labels.
    @raise ConfigError: a Gateway document is invalid.
    """
    if parsed is None:
        parsed = parse_gateways(mesh.documents, node.namespace or mesh.default_namespace)
    return gateways_for(parsed, workload_labels(node))


def gateway_view(mesh: MeshConfig, namespace: str, gateways: Sequence[Gateway]) -> GatewayView:
    """
    Build the listeners and clusters of a proxy serving C{gateways}.

    @param namespace: the gateway proxy's namespace (short hosts resolve
        in it).
    @raise ConfigError: a document is invalid, a credential is missing, or
        a routed cluster has no endpoints.
    """
    by_port: dict[int, list[tuple[Gateway, GatewayServer]]] = {}
    for gateway in gateways:
        for server in gateway.servers:
            by_port.setdefault(server.port, []).append((gateway, server))
    peer = parse_peer_authentications(mesh.documents, namespace)
    listeners: list[dict[str, Any]] = []
    clusters: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for port in sorted(by_port):
        servers = by_port[port]
        kinds = {server.kind for _, server in servers}
        if len(kinds) > 1:
            first, *_ = servers
            raise ConfigError(first[0].source, f"{first[1].field}.port",
                              f"port {port} is served as {' and '.join(sorted(kinds))} by the Gateways of "
                              f"one proxy ({', '.join(sorted({g.key for g, _ in servers}))}); one port has "
                              f"one kind", document=first[0].document)
        keys = sorted({gateway.key for gateway, _ in servers})
        istio = translate_mesh(mesh, namespace, peer, gateways=keys, gateway_port=port)
        warnings.extend(str(w) for w in istio.warnings)
        by_name = {c.name: c for c in istio.clusters}
        kind = kinds.pop()
        if kind in ("passthrough", "tcp"):
            listener, used = _l4_listener(mesh, port, kind, [s for _, s in servers], istio)
            for name in used:
                clusters.setdefault(name, _routable(by_name[name]))
            listeners.append(listener)
            continue
        redirects = [_https_redirect(gateway, server, by_port) for gateway, server in servers if server.https_redirect]
        routed = [vh for vh in (_admitted(vh, [s for _, s in servers]) for vh in istio.virtual_hosts)
                  if vh is not None]
        needed: set[str] = set()
        for vh in routed:
            for route in vh.routes:
                needed.update(clusters_of(route))
        for name in sorted(needed):
            clusters.setdefault(name, _routable(by_name[name]))
        listener: dict[str, Any] = {
            "name": f"gateway-{port}",
            "address": mesh.inbound_address.format(port=port),
            "virtual_hosts": [to_native(vh) for vh in redirects + routed],
        }
        if not listener["virtual_hosts"]:
            # Nothing is routed here yet: every request gets 404 NR, as from
            # an Istio gateway whose hosts no VirtualService claims.
            listener["virtual_hosts"] = [{"name": "none", "domains": ["*"], "routes": [
                {"name": "no-route", "direct_response": {"status": 404, "body": "no route\n"}}]}]
        filters = mesh.telemetry.filters(inbound=False)
        if filters:
            listener["http_filters"] = filters
        tls = _listener_tls(mesh, [s for _, s in servers if s.tls is not None], port)
        if tls is not None:
            listener["tls"] = tls
        listeners.append(listener)
    return GatewayView(tuple(g.key for g in gateways), tuple(listeners), tuple(clusters.values()), tuple(warnings))


def _routable(cluster: Any) -> dict[str, Any]:
    if not cluster.endpoints:
        raise ConfigError(None, f"clusters: {cluster.name}", "has no endpoints (none from a ServiceEntry or "
                                                             "service discovery); a gateway cannot route to it")
    return to_native(cluster)


def _l4_listener(mesh: MeshConfig, port: int, kind: str, servers: Sequence[GatewayServer],
                 istio: Any) -> tuple[dict[str, Any], list[str]]:
    """
    A C{tcp} listener for a TLS C{PASSTHROUGH} port (routed by SNI to the
    VirtualServices' C{tls} routes) or a C{TCP} port (to the first C{tcp}
    route bound to it).  A connection no route takes is closed.

    @return: the listener and the names of the clusters it uses.
    """
    listener: dict[str, Any] = {"name": f"gateway-{port}", "protocol": "tcp",
                                "address": mesh.inbound_address.format(port=port)}
    if mesh.telemetry.access_log is not None:
        listener["access_log"] = dict(mesh.telemetry.access_log)
    used: list[str] = []
    if kind == "tcp":
        routes = [r for r in istio.tcp_routes
                  if any(ns in ("*", r.namespace) for s in servers for ns, _ in s.hosts)]
        if routes:
            listener["cluster"] = routes[0].cluster
            used.append(routes[0].cluster)
        else:
            listener["sni_routes"] = []
        return listener, used
    sni_routes = []
    for route in istio.tls_routes:
        names = [name for name in route.sni_hosts if any(s.admits(route.namespace, name) for s in servers)]
        if names:
            sni_routes.append({"server_names": names, "cluster": route.cluster})
            used.append(route.cluster)
    listener["sni_routes"] = sni_routes
    return listener, used


def _domain_host(domain: str) -> str:
    if domain.startswith("["):
        return domain.partition("]")[0] + "]"
    return domain.rsplit(":", 1)[0] if domain.count(":") == 1 else domain


def _admitted(vh: VirtualHost, servers: Sequence[GatewayServer]) -> VirtualHost | None:
    """
    @return: C{vh} with only the domains the port's servers take from its
        VirtualService, or C{None} if none.
    """
    # Names are "namespace/name:port": the VirtualService's namespace decides
    # which servers' hosts (NAMESPACE/HOST) it may use.
    namespace = vh.name.partition("/")[0]
    domains = tuple(d for d in vh.domains if any(s.admits(namespace, _domain_host(d)) for s in servers))
    if not domains:
        return None
    return attrs.evolve(vh, domains=domains)


def _https_redirect(gateway: Gateway, server: GatewayServer, by_port: dict[int, list[Any]]) -> VirtualHost:
    target = 443
    for port, servers in sorted(by_port.items()):
        if any(g is gateway and s.tls is not None for g, s in servers):
            target = port
            break
    redirect = Redirect(scheme=b"https", port=target, code=301)
    domains = [*server.host_patterns, *(f"{h}:{server.port}" for h in server.host_patterns if h != "*")]
    route = Route(name="https-redirect", match=RouteMatch(), redirect=redirect)
    return VirtualHost(f"{gateway.key}/https-redirect:{server.port}", tuple(domains), (route,))


def _listener_tls(mesh: MeshConfig, servers: Sequence[GatewayServer], port: int) -> dict[str, Any] | None:
    """
    The C{tls} section of a gateway listener: the first server's
    certificate by default, every server's by its hosts (SNI).
    """
    if not servers:
        return None
    entries = [_certificate(mesh, server) for server in servers]
    default = dict(next((e for e, s in zip(entries, servers, strict=True) if "*" in s.host_patterns),
                        entries[0]))
    default["min_version"] = min(s.tls.min_version for s in servers if s.tls is not None)
    if len(servers) > 1:
        default["sni"] = [dict(e, server_names=list(s.host_patterns)) for e, s in zip(entries, servers, strict=True)]
    return default


def _certificate(mesh: MeshConfig, server: GatewayServer) -> dict[str, Any]:
    tls = server.tls
    assert tls is not None
    if tls.credential_name is None:
        # Istio's file-mounted form: the files are on the gateway's host.
        out: dict[str, Any] = {"certificate": tls.server_certificate, "private_key": tls.private_key}
        if tls.mode == "MUTUAL" and tls.ca_certificates:
            out["client_ca"] = tls.ca_certificates
        return out
    credential = mesh.credentials.get(tls.credential_name)
    if credential is None or not credential.certificate_pem:
        raise ConfigError(None, f"{server.field}.tls.credentialName",
                          f"no credential {tls.credential_name!r} (put tls.crt and tls.key in the pilot's "
                          f"credentials/{tls.credential_name}/)")
    out = {"certificate_pem": credential.certificate_pem.decode("ascii"),
           "private_key_pem": credential.private_key_pem.decode("ascii")}
    if tls.mode == "MUTUAL":
        ca = credential.ca_pem
        if not ca:
            other = mesh.credentials.get(f"{tls.credential_name}-cacert")
            ca = other.ca_pem if other is not None else b""
        if not ca:
            raise ConfigError(None, f"{server.field}.tls.mode",
                              f"MUTUAL needs a client CA: ca.crt in credentials/{tls.credential_name}/ or "
                              f"credentials/{tls.credential_name}-cacert/")
        out["client_ca_pem"] = ca.decode("ascii")
    return out


def build_gateway_snapshot(mesh: MeshConfig, node: Node, view: GatewayView) -> Snapshot:
    """
    Build a gateway proxy's snapshot from its shared view.
    """
    namespace = node.namespace or mesh.default_namespace
    resources = {LISTENERS: list(view.listeners), CLUSTERS: list(view.clusters)}
    native_node = to_native(
        NodeConfig(node.id, node.workload, namespace, node.app, node.version, node.labels, node.locality)
    )
    per_type = {LISTENERS: content_hash(resources[LISTENERS]), CLUSTERS: content_hash(resources[CLUSTERS])}
    version = content_hash({"node": native_node, "admin": mesh.admin_address, "types": per_type})
    return Snapshot(resources, version, per_type, native_node, mesh.admin_address, view.warnings)
