"""
Tests for L{txmesh.pilot.snapshot}: per-proxy snapshots built from Istio
documents and registry endpoints, and the model written back to native
config.
"""

from __future__ import annotations

import copy
import json
import os
import re

import attrs
import yaml
from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import ConfigError
from txmesh.config.istio import cluster_name, translate
from txmesh.config.loader import ConfigLoader
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
from txmesh.filters.registry import FilterRegistry
from txmesh.pilot.snapshot import (
    MeshConfig,
    Node,
    Telemetry,
    build_snapshot,
    check_documents,
    duration,
    namespace_view,
    to_native,
)

BOOKINFO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "bookinfo")


def bookinfo_documents() -> list:
    documents = []
    for name in ("services.yaml", "destination-rules.yaml", "virtual-services.yaml"):
        path = os.path.join(BOOKINFO, name)
        with open(path) as f:
            documents += [(path, i, d) for i, d in enumerate(yaml.safe_load_all(f), start=1)]
    return documents


def loader() -> ConfigLoader:
    return ConfigLoader(FilterRegistry.from_plugins())


def canonical_route(route: Route) -> Route:
    """
    A route as the router sees it: a single plain destination on the
    route's own cluster is the same as no destinations; a route with
    destinations is routed by them alone.
    """
    if route.cluster is not None and route.destinations == (WeightedDestination(route.cluster),):
        return attrs.evolve(route, destinations=())
    if route.destinations:
        return attrs.evolve(route, cluster=None)
    return route


def canonical(vhosts) -> list[VirtualHost]:
    return [attrs.evolve(vh, routes=tuple(canonical_route(r) for r in vh.routes)) for vh in vhosts]


def productpage() -> Node:
    return Node("productpage-v1-sidecar", workload="productpage-v1", app="productpage", version="v1",
                inbound_port=15006, app_port=9080)


class SnapshotTests(SynchronousTestCase):
    """
    L{build_snapshot} builds each proxy's resources, versioned by content.
    """

    def setUp(self) -> None:
        self.documents = bookinfo_documents()
        self.mesh = MeshConfig(self.documents)

    def test_stable_version(self) -> None:
        """
        The same inputs give the same version, also from separately built
        (deep-copied) inputs.
        """
        a = build_snapshot(self.mesh, productpage())
        b = build_snapshot(MeshConfig(copy.deepcopy(self.documents)), productpage())
        self.assertEqual(a.version, b.version)
        self.assertEqual(a.per_type_versions, b.per_type_versions)
        self.assertEqual(a.resources, b.resources)

    def test_json_serialisable(self) -> None:
        """
        The whole document survives JSON unchanged.
        """
        doc = build_snapshot(self.mesh, productpage()).document()
        self.assertEqual(json.loads(json.dumps(doc)), doc)

    def test_route_change(self) -> None:
        """
        A changed route changes the version and the listeners' version,
        not the clusters'.
        """
        before = build_snapshot(self.mesh, productpage())
        documents = copy.deepcopy(self.documents)
        changed = False
        for _, _, doc in documents:
            if doc and doc.get("kind") == "VirtualService":
                for http in doc["spec"].get("http", []):
                    http["timeout"] = "7s"
                    changed = True
        self.assertTrue(changed)
        after = build_snapshot(MeshConfig(documents), productpage())
        self.assertNotEqual(before.version, after.version)
        self.assertNotEqual(before.per_type_versions["listeners"], after.per_type_versions["listeners"])
        self.assertEqual(before.per_type_versions["clusters"], after.per_type_versions["clusters"])

    def test_endpoint_change(self) -> None:
        """
        A changed endpoint changes the clusters' version only.
        """
        before = build_snapshot(self.mesh, productpage())
        documents = copy.deepcopy(self.documents)
        for _, _, doc in documents:
            if doc and doc.get("kind") == "ServiceEntry" and doc["metadata"]["name"] == "details":
                doc["spec"]["endpoints"][0]["ports"]["http"] = 29081
        after = build_snapshot(MeshConfig(documents), productpage())
        self.assertNotEqual(before.version, after.version)
        self.assertEqual(before.per_type_versions["listeners"], after.per_type_versions["listeners"])
        self.assertNotEqual(before.per_type_versions["clusters"], after.per_type_versions["clusters"])

    def test_node_change(self) -> None:
        """
        Another node with the same resources has another version.
        """
        a = build_snapshot(self.mesh, productpage())
        b = build_snapshot(self.mesh, attrs.evolve(productpage(), id="other"))
        self.assertEqual(a.per_type_versions, b.per_type_versions)
        self.assertNotEqual(a.version, b.version)

    def test_only_needed_clusters(self) -> None:
        """
        Only clusters the routes name, and the node's inbound cluster.
        """
        documents = self.documents + [("extra.yaml", 1, {
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "unrelated", "namespace": "default"},
            "spec": {"hosts": ["x.example.com"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]},
        })]
        full = translate(documents, "default")
        snapshot = build_snapshot(MeshConfig(documents), productpage())
        names = [c["name"] for c in snapshot.resources["clusters"]]
        routed = {d.cluster for vh in full.virtual_hosts for r in vh.routes for d in r.destinations}
        self.assertEqual(set(names), routed | {"inbound|9080||productpage-v1"})
        self.assertEqual(len(names), len(set(names)))


    def test_unrouted_cluster_left_out(self) -> None:
        """
        A service whose Host is routed elsewhere by a VirtualService gets
        a cluster from the translation but none in the snapshot.
        """
        documents = [("se.yaml", 1, {
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "a", "namespace": "default"},
            "spec": {"hosts": ["a.example.com"], "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                     "resolution": "STATIC", "endpoints": [{"address": "10.0.0.1"}]},
        }), ("vs.yaml", 1, {
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "a", "namespace": "default"},
            "spec": {"hosts": ["a.example.com"], "http": [{"route": [{"destination": {
                "host": "b.example.com", "port": {"number": 8080}}}]}]},
        })]
        registry = {"b.example.com": [Endpoint("10.0.0.2", 8080)]}
        translated = [c.name for c in translate(documents, "default", registry=registry).clusters]
        self.assertIn("outbound|80||a.example.com", translated)
        snapshot = build_snapshot(MeshConfig(documents, registry=registry), Node("n"))
        self.assertEqual([c["name"] for c in snapshot.resources["clusters"]], ["outbound|8080||b.example.com"])
        loader().load_document(snapshot.document())

    def test_inbound(self) -> None:
        """
        The inbound listener routes to the app beside the proxy.
        """
        snapshot = build_snapshot(MeshConfig(self.documents, app_host="127.0.0.2",
                                             inbound_address="tcp:{port}:interface=127.0.0.1"), productpage())
        inbound = [listener for listener in snapshot.resources["listeners"] if listener["name"] == "inbound"]
        self.assertEqual(inbound, [{"name": "inbound", "address": "tcp:15006:interface=127.0.0.1",
                                    "routes": [{"name": "inbound", "cluster": "inbound|9080||productpage-v1",
                                                "timeout": "0s"}],
                                    "http_filters": [{"name": "metrics", "config": {"reporter": "destination"}}]}])
        config = loader().load_document(snapshot.document())
        app = config.cluster("inbound|9080||productpage-v1")
        self.assertEqual(app.endpoints, (Endpoint("127.0.0.2", 9080),))

    def test_telemetry_filters(self) -> None:
        """
        Every pushed listener reports: tracing first, then Istio's metrics
        (source on the way out, destination on the way in) and the access
        log; the proxy's loader takes them.
        """
        telemetry = Telemetry(access_log={"format": "json"}, tracing={"sampling": 100})
        snapshot = build_snapshot(MeshConfig(self.documents, telemetry=telemetry), productpage())
        filters = {x["name"]: x.get("http_filters") for x in snapshot.resources["listeners"]}
        self.assertEqual(filters["outbound"], [
            {"name": "tracing", "config": {"sampling": 100, "kind": "client"}},
            {"name": "metrics", "config": {"reporter": "source"}},
            {"name": "access_log", "config": {"format": "json"}},
        ])
        self.assertEqual([f["name"] for f in filters["inbound"]], ["tracing", "metrics", "access_log"])
        self.assertEqual(filters["inbound"][0]["config"]["kind"], "server")
        loader().load_document(snapshot.document())
        quiet = build_snapshot(MeshConfig(self.documents, telemetry=Telemetry(metrics=False)), productpage())
        self.assertNotEqual(quiet.per_type_versions["listeners"], snapshot.per_type_versions["listeners"])
        self.assertFalse([x for x in quiet.resources["listeners"] if x.get("http_filters")])

    def test_no_inbound(self) -> None:
        """
        A node without ports has only the outbound side.
        """
        snapshot = build_snapshot(self.mesh, Node("n"))
        self.assertEqual([x["name"] for x in snapshot.resources["listeners"]], ["outbound"])
        self.assertFalse([c for c in snapshot.resources["clusters"] if c["name"].startswith("inbound|")])

    def test_bookinfo_round_trip(self) -> None:
        """
        The snapshot document loads into the same virtual hosts and clusters
        as translating the documents directly.
        """
        snapshot = build_snapshot(self.mesh, productpage())
        config = loader().load_document(snapshot.document(), "pilot")
        direct = translate(self.documents, "default")
        outbound = [x for x in config.listeners if x.name == "outbound"][0]
        self.assertEqual(outbound.address, "tcp:15001:interface=127.0.0.1")
        self.assertEqual(canonical(outbound.virtual_hosts), canonical(direct.virtual_hosts))
        by_name = {c.name: c for c in config.clusters}
        for cluster in direct.clusters:
            self.assertEqual(by_name[cluster.name], cluster)
        self.assertEqual(config.node, NodeConfig("productpage-v1-sidecar", "productpage-v1", "default",
                                                 "productpage", "v1"))
        self.assertEqual(config.admin_address, "tcp:15000:interface=127.0.0.1")

    def test_istio_traffic_round_trip(self) -> None:
        """
        Istio documents using the traffic fields (matches of every kind,
        weights, subsets, retries, faults, mirrors, rewrites, redirects,
        direct responses, header operations, consistent hashing, connection
        pools, outlier detection, gRPC ports) load back from the snapshot
        as translated.
        """
        documents = [d for d in self.documents if d[2] and d[2].get("kind") != "VirtualService"
                     and not (d[2].get("kind") == "DestinationRule" and d[2]["metadata"]["name"] == "ratings")]
        documents.append(("rich.yaml", 1, {
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "ratings"},
            "spec": {"host": "ratings", "trafficPolicy": {
                "loadBalancer": {"consistentHash": {"httpHeaderName": "X-User", "maglev": {"tableSize": 131}},
                                 "localityLbSetting": {"enabled": True}},
                "connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "30ms"},
                                   "http": {"http1MaxPendingRequests": 5, "http2MaxRequests": 100,
                                            "maxRequestsPerConnection": 2, "idleTimeout": "1h"}},
                "outlierDetection": {"consecutiveGatewayErrors": 2, "interval": "1.5s",
                                     "baseEjectionTime": "250ms", "maxEjectionPercent": 100}},
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
        }))
        documents.append(("rich.yaml", 2, {
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews"},
            "spec": {"hosts": ["reviews"], "http": [
                {"name": "jason",
                 "match": [{"headers": {"end-user": {"exact": "jason"}, "x-p": {"prefix": "a"},
                                        "x-r": {"regex": "[0-9]+"}, "x-any": {}},
                            "withoutHeaders": {"x-env": {"exact": "prod"}},
                            "queryParams": {"v": {"exact": "2"}, "debug": {}},
                            "method": {"exact": "GET"}, "port": 9080,
                            "sourceLabels": {"app": "productpage"}},
                           {"uri": {"exact": "/exact"}}, {"uri": {"regex": "/u/[0-9]+"}}],
                 "route": [{"destination": {"host": "reviews", "subset": "v2"},
                            "headers": {"request": {"set": {"x-version": "v2"}}}}],
                 "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,connect-failure,reset"},
                 "timeout": "1.5s",
                 "fault": {"delay": {"fixedDelay": "100ms", "percentage": {"value": 50}},
                           "abort": {"httpStatus": 500, "percentage": {"value": 25}}},
                 "headers": {"request": {"set": {"X-A": "1"}, "add": {"x-b": 2}, "remove": ["x-c"]},
                             "response": {"set": {"x-served-by": "txmesh"}, "remove": ["server"]}}},
                {"match": [{"uri": {"prefix": "/old/"}}], "rewrite": {"uri": "/new/", "authority": "r.internal"},
                 "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                 "mirror": {"host": "ratings", "subset": "v1"}, "mirrorPercentage": {"value": 12.5},
                 "fault": {"abort": {"grpcStatus": "UNAVAILABLE"}}},
                {"match": [{"uri": {"prefix": "/moved"}}],
                 "redirect": {"uri": "/here", "authority": "example.com", "redirectCode": 308}},
                {"match": [{"uri": {"prefix": "/teapot"}}],
                 "directResponse": {"status": 418, "body": {"string": "t\u00e9"}}},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 75},
                           {"destination": {"host": "ratings"}, "weight": 25}]},
            ]},
        }))
        direct = translate(documents, "default")
        self.assertEqual(direct.warnings, ())
        snapshot = build_snapshot(MeshConfig(documents), productpage())
        config = loader().load_document(json.loads(json.dumps(snapshot.document())))
        outbound = [x for x in config.listeners if x.name == "outbound"][0]
        self.assertEqual(canonical(outbound.virtual_hosts), canonical(direct.virtual_hosts))
        by_name = {c.name: c for c in config.clusters}
        self.assertEqual([by_name[c.name] for c in direct.clusters], list(direct.clusters))
        routes = [r for vh in direct.virtual_hosts for r in vh.routes]
        for kind in ("fault", "mirror", "redirect", "direct_response", "retry", "hash_policy"):
            self.assertTrue(any(getattr(r, kind) is not None for r in routes), kind)
        ratings = by_name["outbound|9080||ratings.default.svc.cluster.local"]
        self.assertEqual((ratings.lb_policy, ratings.locality_failover), ("consistent_hash", True))

    def test_registry_endpoints(self) -> None:
        """
        A host with no ServiceEntry takes its endpoints from the registry.
        """
        documents = [("vs.yaml", 1, {
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"hosts": ["cart"], "http": [{"route": [{"destination": {"host": "cart",
                                                                              "port": {"number": 8080}}}]}]},
        })]
        eps = [Endpoint("10.1.0.1", 8080, (("version", "v1"),), 2, "eu/a"), Endpoint("10.1.0.2", 8080)]
        snapshot = build_snapshot(MeshConfig(documents, registry={"cart.shop.svc.cluster.local": eps}),
                                  Node("n", namespace="shop"))
        config = loader().load_document(snapshot.document())
        self.assertEqual(config.cluster(cluster_name("cart.shop.svc.cluster.local", 8080)).endpoints, tuple(eps))
        self.assertIn("cart", config.listeners[0].virtual_hosts[0].domains)

    def test_no_endpoints(self) -> None:
        """
        A needed cluster with no endpoints is a L{ConfigError} naming it.
        """
        documents = [("vs.yaml", 1, {
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "r"}, "spec": {"hosts": ["cart"], "http": [{"route": [{"destination": {
                "host": "cart"}}]}]},
        })]
        with self.assertRaises(ConfigError) as cm:
            build_snapshot(MeshConfig(documents), Node("n"))
        self.assertIn("cart.default.svc.cluster.local", cm.exception.field)
        self.assertIn("no endpoints", cm.exception.reason)

    def test_bad_document(self) -> None:
        """
        An invalid Istio document raises the translation's L{ConfigError},
        with the file, document number and field.
        """
        documents = self.documents + [("bad.yaml", 3, {
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "bad"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews",
                                                                                 "subset": "v9"}}]}]},
        })]
        with self.assertRaises(ConfigError) as cm:
            build_snapshot(MeshConfig(documents), productpage())
        self.assertEqual((cm.exception.source, cm.exception.document), ("bad.yaml", 3))
        self.assertIn("subset", cm.exception.field)
        self.assertIn("v9", cm.exception.reason)


EVERY_CLUSTER = ClusterConfig(
    "every",
    (Endpoint("10.0.0.1", 80, (("version", "v1"),), 3, "eu/a/1"), Endpoint("10.0.0.2", 81, (("version", "v2"),))),
    connect_timeout=0.25,
    lb_policy="consistent_hash",
    max_idle_per_endpoint=7,
    idle_timeout=90.0,
    hash_policy=HashPolicy(cookie=b"session", algorithm="maglev", table_size=131),
    subsets=(SubsetConfig("v1", (("version", "v1"),), "random"), SubsetConfig("v2", (("version", "v2"),))),
    circuit_breaker=CircuitBreakerConfig(1, 2, 3, 4, 5),
    outlier_detection=OutlierDetectionConfig(3, 2, 0.5, 12.5, 40),
    health_check=HealthCheckConfig("grpc", b"/hc", 2.0, 0.1, 2, 4, "svc"),
    locality_failover=True,
    http2=True,
)
OTHER_CLUSTER = ClusterConfig("other", (Endpoint("10.0.0.3", 8080),))
OPS = HeaderOps(set=((b"x-set", b"1"),), add=((b"x-add", b"caf\xc3\xa9"),), remove=(b"x-gone",))
EVERY_ROUTES = (
    Route(
        name="full",
        match=RouteMatch(
            prefix=b"/api",
            headers=(HeaderMatch(b"x-exact", exact=b"a"), HeaderMatch(b"x-prefix", prefix=b"b", invert=True),
                     HeaderMatch(b"x-regex", regex=re.compile(b"^c+$")), HeaderMatch(b"x-present", present=True),
                     HeaderMatch(b"x-absent", present=False)),
            methods=(b"GET", b"POST"),
            query_params=(HeaderMatch(b"Q", exact=b"1"),),
            port=9080,
            source_labels=(("app", "productpage"), ("version", "v1")),
        ),
        destinations=(WeightedDestination("every", 70, "v1", request_headers=OPS),
                      WeightedDestination("other", 30, response_headers=OPS)),
        timeout=2.5,
        prefix_rewrite=b"/v2",
        host_rewrite=b"api.internal",
        request_headers_to_add=((b"x-req", b"r"),),
        response_headers_to_add=((b"x-resp", b"s"),),
        filter_overrides=(("fault", DISABLED),),
        retry=RetryPolicy(4, 0.3, frozenset({"5xx", "reset", "429"}), 0.01, 1.5, 1024),
        fault=FaultPolicy(delay=0.2, delay_percent=12.5, abort_status=503, abort_percent=1.5),
        mirror=MirrorPolicy("every", "v2", 25.0),
        request_headers=OPS,
        response_headers=HeaderOps(remove=(b"server",)),
        hash_policy=HashPolicy(header=b"x-user"),
    ),
    Route("path", RouteMatch(prefix=None, path=b"/exact"), cluster="every", timeout=0.0,
          destinations=(WeightedDestination("every", 100, "v2"),),
          fault=FaultPolicy(abort_grpc_status=14, abort_percent=100.0), hash_policy=HashPolicy(source_ip=True)),
    Route("regex", RouteMatch(prefix=None, regex=re.compile(b"^/r/[0-9]+$")), cluster="other",
          hash_policy=HashPolicy(query_param=b"u", algorithm="ring_hash", table_size=64)),
    Route("direct", RouteMatch(prefix=b"/teapot"), direct_response=DirectResponse(418, "t\u00e9".encode())),
    Route("redirect", RouteMatch(), redirect=Redirect(b"/new", b"example.com", b"https", 8443, 308)),
    Route("plain-redirect", RouteMatch(), redirect=Redirect(uri=b"/x")),
)


class ToNativeTests(SynchronousTestCase):
    """
    L{to_native} writes model values back in the loader's form.
    """

    def test_every_field_round_trip(self) -> None:
        """
        A virtual host and clusters using every traffic field load back
        equal.
        """
        vhost = VirtualHost("every", ("every.example.com", "every:80"), EVERY_ROUTES)
        doc = {
            "listeners": [{"name": "out", "address": "tcp:0", "virtual_hosts": [to_native(vhost)]}],
            "clusters": [to_native(EVERY_CLUSTER), to_native(OTHER_CLUSTER)],
            "node": to_native(NodeConfig("id", "w", "ns", "a", "v", (("k", "x"),), "eu/a")),
        }
        doc = json.loads(json.dumps(doc))
        config = loader().load_document(doc)
        self.assertEqual(config.listeners[0].virtual_hosts, (vhost,))
        self.assertEqual(config.clusters, (EVERY_CLUSTER, OTHER_CLUSTER))
        self.assertEqual(config.node, NodeConfig("id", "w", "ns", "a", "v", (("k", "x"),), "eu/a"))

    def test_tls(self) -> None:
        """
        Upstream TLS travels as the CA's path and the SNI, never the PEM.
        """
        cluster = attrs.evolve(OTHER_CLUSTER, tls=UpstreamTLS("ca.pem", b"PEM", "api.example.com"))
        self.assertEqual(to_native(cluster)["tls"], {"ca_certificate": "ca.pem", "sni": "api.example.com"})
        self.assertEqual(to_native(UpstreamTLS()), {})

    def test_durations(self) -> None:
        """
        Durations are written as ms or s and read back exactly.
        """
        from txmesh.config.durations import parse_duration
        self.assertEqual(duration(15.0), "15000ms")
        self.assertEqual(duration(0.0), "0ms")
        for seconds in (0.025, 1e-05, 1.0 / 3, 123456.789, 0.1 + 0.2, 2.5e-07):
            text = duration(seconds)
            self.assertRegex(text, r"^\d+(\.\d+)?(ms|s)$")
            self.assertEqual(parse_duration(text), seconds)

    def test_filter_config_refused(self) -> None:
        """
        A route with a parsed filter config cannot be written back.
        """
        route = Route("r", RouteMatch(), cluster="c", filter_overrides=(("cors", object()),))
        self.assertRaises(ValueError, to_native, route)

    def test_unknown_type(self) -> None:
        """
        Values with no native form are refused.
        """
        self.assertRaises(TypeError, to_native, object())


# --- zero trust: mutual TLS and policies from the pilot --------------------------

SECURITY = "security.istio.io/v1"
TLS_LABEL = {"security.istio.io/tlsMode": "istio"}


def sec(kind: str, name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": SECURITY, "kind": kind, "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def peer(name: str, namespace: str, mode: str | None, selector: dict | None = None, ports: dict | None = None) -> dict:
    spec: dict = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in ports.items()}
    return sec("PeerAuthentication", name, namespace, spec)


def authz(name: str, namespace: str, selector: dict | None = None, action: str = "ALLOW") -> dict:
    spec: dict = {"action": action, "rules": [{"to": [{"operation": {"paths": [f"/{name}"]}}]}]}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    return sec("AuthorizationPolicy", name, namespace, spec)


def request_auth(name: str, namespace: str, selector: dict | None = None) -> dict:
    spec: dict = {"jwtRules": [{"issuer": f"https://{name}.example.com",
                                "jwksUri": f"https://{name}.example.com/jwks.json"}]}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    return sec("RequestAuthentication", name, namespace, spec)


def shop_services(labels: tuple[dict, dict] = (TLS_LABEL, TLS_LABEL), tls: dict | None = None,
                  namespace: str = "shop") -> list:
    """
    A cart service in C{namespace} with two endpoints (labels as given),
    a DestinationRule (with C{tls} if given), and a route to it.
    """
    entry = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"name": "cart", "namespace": namespace},
             "spec": {"hosts": [f"cart.{namespace}.svc.cluster.local"],
                      "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                      "resolution": "STATIC",
                      "endpoints": [{"address": f"10.1.0.{i}", "labels": dict(lab, version=f"v{i}")}
                                    for i, lab in enumerate(labels, start=1)]}}
    rule: dict = {"host": f"cart.{namespace}.svc.cluster.local"}
    if tls is not None:
        rule["trafficPolicy"] = {"tls": tls}
    return [entry, {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                    "metadata": {"name": "cart", "namespace": namespace}, "spec": rule}]


def web(**kw) -> Node:
    return Node("web-1", workload="web-v1", namespace="shop", app="web", version="v1",
                labels=(("tier", "front"),), inbound_port=15006, app_port=8080, **kw)


def zero_trust(documents: list, node: Node | None = None, mtls: bool = True, **mesh):
    """
    Build C{node}'s snapshot from C{documents}, load its document with the
    proxy's loader, and return both.
    """
    docs = [("mesh.yaml", i, d) for i, d in enumerate(documents, start=1)]
    # Without telemetry filters, so the security filters are what is compared.
    snapshot = build_snapshot(MeshConfig(docs, mtls=mtls, **{"telemetry": Telemetry(metrics=False), **mesh}),
                              node or web())
    config = loader().load_document(json.loads(json.dumps(snapshot.document())), "pilot")
    return snapshot, config


def inbound_of(snapshot) -> dict:
    [inbound] = [x for x in snapshot.resources["listeners"] if x["name"] == "inbound"]
    return inbound


CART = cluster_name("cart.shop.svc.cluster.local", 8080)

# name: (PeerAuthentications, the inbound listener's mtls (None: left out))
PEER_CASES: dict[str, tuple[list, str | None]] = {
    "default": ([], "PERMISSIVE"),
    "mesh_strict": ([peer("default", "istio-system", "STRICT")], "STRICT"),
    "namespace_over_mesh": ([peer("default", "istio-system", "STRICT"), peer("default", "shop", "DISABLE")], None),
    "namespace_unset": ([peer("default", "istio-system", "STRICT"), peer("default", "shop", "UNSET")], "STRICT"),
    "workload_over_namespace": ([peer("default", "shop", "DISABLE"), peer("web", "shop", "STRICT", {"app": "web"})],
                                "STRICT"),
    "workload_by_label": ([peer("front", "shop", "STRICT", {"tier": "front"})], "STRICT"),
    "workload_other": ([peer("db", "shop", "DISABLE", {"app": "db"})], "PERMISSIVE"),
    "other_namespace": ([peer("default", "other", "STRICT")], "PERMISSIVE"),
    "port_level_app_port": ([peer("web", "shop", "STRICT", {"app": "web"}, {8080: "DISABLE"})], None),
    "port_level_other_port": ([peer("web", "shop", "STRICT", {"app": "web"}, {15006: "DISABLE"})], "STRICT"),
    "port_level_inherits": ([peer("default", "istio-system", "STRICT"),
                             peer("web", "shop", "UNSET", {"app": "web"}, {8080: "PERMISSIVE"})], "PERMISSIVE"),
}

# name: (labels of the two endpoints, DestinationRule tls, PeerAuthentications, the cluster's tls, warnings)
CLUSTER_TLS_CASES: dict[str, tuple[tuple, dict | None, list, dict | None, list[str]]] = {
    "istio_mutual": (({}, {}), {"mode": "ISTIO_MUTUAL"}, [], {"mode": "ISTIO_MUTUAL"}, []),
    "istio_mutual_sans": (({}, {}), {"mode": "ISTIO_MUTUAL",
                                     "subjectAltNames": ["spiffe://cluster.local/ns/shop/sa/cart"]}, [],
                          {"mode": "ISTIO_MUTUAL", "subject_alt_names": ["spiffe://cluster.local/ns/shop/sa/cart"]},
                          []),
    "disable": ((TLS_LABEL, TLS_LABEL), {"mode": "DISABLE"}, [], None, []),
    "simple": ((TLS_LABEL, TLS_LABEL), {"mode": "SIMPLE", "sni": "cart.example.com"}, [],
               {"sni": "cart.example.com"}, []),
    "auto": ((TLS_LABEL, TLS_LABEL), None, [], {"mode": "ISTIO_MUTUAL"}, []),
    "auto_partly_labeled": ((TLS_LABEL, {}), None, [], None, []),
    "auto_unlabeled": (({}, {}), None, [], None, []),
    "auto_destination_namespace_disabled": ((TLS_LABEL, TLS_LABEL), None, [peer("default", "shop", "DISABLE")],
                                            None, []),
    "auto_mesh_disabled": ((TLS_LABEL, TLS_LABEL), None, [peer("default", "istio-system", "DISABLE")], None, []),
    "auto_workload_disable_not_seen": ((TLS_LABEL, TLS_LABEL), None,
                                       [peer("cart", "shop", "DISABLE", {"app": "cart"})], {"mode": "ISTIO_MUTUAL"},
                                       []),
}


class ZeroTrustTests(SynchronousTestCase):
    """
    With L{MeshConfig.mtls} the snapshot carries mutual TLS and the
    security.istio.io policies, in shapes the proxy's loader takes.
    """

    def test_peer_authentication(self) -> None:
        for name, (documents, expected) in PEER_CASES.items():
            snapshot, config = zero_trust(documents)
            self.assertEqual(inbound_of(snapshot).get("mtls"), expected, name)
            [inbound] = [x for x in config.listeners if x.name == "inbound"]
            self.assertEqual(inbound.mtls, expected, name)
            self.assertNotIn("http_filters", inbound_of(snapshot), name)

    def test_cluster_tls(self) -> None:
        for name, (labels, tls, peers, expected, warnings) in CLUSTER_TLS_CASES.items():
            snapshot, config = zero_trust(shop_services(labels, tls) + peers)
            [cart] = [c for c in snapshot.resources["clusters"] if c["name"] == CART]
            self.assertEqual(cart.get("tls"), expected, name)
            loaded = config.cluster(CART).tls
            if expected is None:
                self.assertIsNone(loaded, name)
            else:
                self.assertEqual(loaded.mode, expected.get("mode", "SIMPLE"), name)
                self.assertEqual(list(loaded.subject_alt_names), expected.get("subject_alt_names", []), name)
            self.assertEqual(len(snapshot.warnings), len(warnings), (name, snapshot.warnings))
            for text, got in zip(warnings, snapshot.warnings, strict=True):
                self.assertIn(text, got, name)

    def test_cluster_sans_from_registry_accounts(self) -> None:
        """
        The service accounts service discovery knows for a destination's
        endpoints become the SPIFFE IDs (in the mesh's trust domain) its
        ISTIO_MUTUAL cluster accepts, as Istio's pilot puts them in the
        cluster's SAN match; the proxy's loader takes them, and the
        endpoints are written without their accounts.
        """
        host = "cart.shop.svc.cluster.local"
        eps = (Endpoint("10.1.0.1", 8080, tuple(TLS_LABEL.items()), service_account="shop/cart"),
               Endpoint("10.1.0.2", 8080, tuple(TLS_LABEL.items()), service_account="shop/cart-canary"))
        expected = ["spiffe://example.org/ns/shop/sa/cart", "spiffe://example.org/ns/shop/sa/cart-canary"]
        for tls in (None, {"mode": "ISTIO_MUTUAL"}):
            rule = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                    "metadata": {"name": "cart", "namespace": "shop"},
                    "spec": {"host": host, **({"trafficPolicy": {"tls": tls}} if tls else {})}}
            snapshot, config = zero_trust([rule], registry={host: eps},
                                          registry_ports={host: (("http", 8080, "HTTP"),)},
                                          trust_domain="example.org")
            [cart] = [c for c in snapshot.resources["clusters"] if c["name"] == CART]
            self.assertEqual(cart["tls"], {"mode": "ISTIO_MUTUAL", "subject_alt_names": expected}, tls)
            self.assertEqual(list(config.cluster(CART).tls.subject_alt_names), expected)
            self.assertNotIn("service_account", json.dumps(cart))

    def test_cluster_sans_from_service_entry(self) -> None:
        """
        A ServiceEntry's endpoint serviceAccounts (in its namespace) and its
        subjectAltNames are the accepted identities; with one endpoint's
        account unknown and none declared, any peer of the trust domain
        is (no SANs).
        """
        documents = shop_services()
        documents[0]["spec"]["endpoints"][0]["serviceAccount"] = "cart"
        documents[0]["spec"]["endpoints"][1]["serviceAccount"] = "cart"
        snapshot, _ = zero_trust(documents)
        [cart] = [c for c in snapshot.resources["clusters"] if c["name"] == CART]
        self.assertEqual(cart["tls"]["subject_alt_names"], ["spiffe://cluster.local/ns/shop/sa/cart"])

        del documents[0]["spec"]["endpoints"][1]["serviceAccount"]
        snapshot, _ = zero_trust(documents)
        [cart] = [c for c in snapshot.resources["clusters"] if c["name"] == CART]
        self.assertEqual(cart["tls"], {"mode": "ISTIO_MUTUAL"})

        documents[0]["spec"]["subjectAltNames"] = ["spiffe://cluster.local/ns/shop/sa/cart-v2"]
        snapshot, _ = zero_trust(documents)
        [cart] = [c for c in snapshot.resources["clusters"] if c["name"] == CART]
        self.assertEqual(cart["tls"]["subject_alt_names"],
                         ["spiffe://cluster.local/ns/shop/sa/cart", "spiffe://cluster.local/ns/shop/sa/cart-v2"])

    def test_authorization_policies(self) -> None:
        """
        The policies that apply to the node (mesh-wide, its namespace's,
        selected by its labels, app and version included) go to an authz
        filter on its inbound listener, in their native form.
        """
        documents = [authz("mesh", "istio-system"), authz("mesh-db", "istio-system", {"app": "db"}),
                     authz("ns", "shop", action="DENY"), authz("web", "shop", {"app": "web", "version": "v1"}),
                     authz("front", "shop", {"tier": "front"}), authz("web-v2", "shop", {"version": "v2"}),
                     authz("other", "other")]
        snapshot, config = zero_trust(documents)
        [f] = inbound_of(snapshot)["http_filters"]
        self.assertEqual(f["name"], "authz")
        self.assertEqual([(p["namespace"], p["name"]) for p in f["config"]["policies"]],
                         [("istio-system", "mesh"), ("shop", "ns"), ("shop", "web"), ("shop", "front")])
        self.assertEqual(f["config"]["policies"][2]["selector"], {"app": "web", "version": "v1"})
        self.assertNotIn("audit", f["config"])
        [inbound] = [x for x in config.listeners if x.name == "inbound"]
        self.assertEqual([x.name for x in inbound.http_filters], ["authz", "router"])
        self.assertEqual([p.key for p in inbound.http_filters[0].config.policies],
                         ["istio-system/mesh", "shop/ns", "shop/web", "shop/front"])
        self.assertIsNone(inbound.http_filters[0].config.audit)
        # None applies: no filter.
        snapshot, _ = zero_trust([authz("db", "shop", {"app": "db"})])
        self.assertNotIn("http_filters", inbound_of(snapshot))

    def test_audit_log_setting_reaches_the_filters(self) -> None:
        path = self.mktemp()
        snapshot, config = zero_trust([authz("ns", "shop", action="DENY")], audit_log=path)
        [f] = inbound_of(snapshot)["http_filters"]
        self.assertEqual(f["config"]["audit"], {"path": path})
        [inbound] = [x for x in config.listeners if x.name == "inbound"]
        self.assertIsNotNone(inbound.http_filters[0].config.audit)

    def test_request_authentication(self) -> None:
        """
        The RequestAuthentications that apply give a jwt filter before the
        authz filter.
        """
        documents = [request_auth("mesh", "istio-system"), request_auth("web", "shop", {"app": "web"}),
                     request_auth("db", "shop", {"app": "db"}), authz("web", "shop")]
        snapshot, config = zero_trust(documents)
        jwt, policies = inbound_of(snapshot)["http_filters"]
        self.assertEqual(jwt, {"name": "jwt", "config": {"rules": [
            {"issuer": "https://mesh.example.com", "jwks_uri": "https://mesh.example.com/jwks.json"},
            {"issuer": "https://web.example.com", "jwks_uri": "https://web.example.com/jwks.json"}]}})
        self.assertEqual(policies["name"], "authz")
        [inbound] = [x for x in config.listeners if x.name == "inbound"]
        self.assertEqual([x.name for x in inbound.http_filters], ["jwt", "authz", "router"])
        self.assertEqual([r.rule.issuer for r in inbound.http_filters[0].config.rules],
                         ["https://mesh.example.com", "https://web.example.com"])
        snapshot, _ = zero_trust([request_auth("db", "shop", {"app": "db"})])
        self.assertNotIn("http_filters", inbound_of(snapshot))

    def test_without_ca_nothing_changes(self) -> None:
        """
        Without mtls (an --insecure pilot) the security documents are not
        applied, with a warning each, and the snapshot is what it was
        without them.
        """
        security = [peer("default", "istio-system", "STRICT"), authz("web", "shop"), request_auth("web", "shop")]
        plain, _ = zero_trust(shop_services(), mtls=False)
        snapshot, config = zero_trust(shop_services(tls={"mode": "ISTIO_MUTUAL"}) + security, mtls=False)
        self.assertEqual(snapshot.resources, plain.resources)
        self.assertEqual(snapshot.per_type_versions, plain.per_type_versions)
        self.assertNotIn("mtls", inbound_of(snapshot))
        self.assertIsNone(config.cluster(CART).tls)
        self.assertEqual(len(snapshot.warnings), 4)
        self.assertIn("needs the mesh CA", snapshot.warnings[0])
        for kind, warning in zip(("PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication"),
                                 snapshot.warnings[1:], strict=True):
            self.assertIn(f"{kind} is not applied: the pilot has no CA", warning)

    def test_versions(self) -> None:
        """
        Each input changes the version of the type it is in: policies the
        listeners', cluster TLS the clusters'.
        """
        base, _ = zero_trust(shop_services())
        changes = {
            "peer": (shop_services() + [peer("default", "shop", "STRICT")], "listeners"),
            "authz": (shop_services() + [authz("web", "shop")], "listeners"),
            "jwt": (shop_services() + [request_auth("web", "shop")], "listeners"),
            "dr_tls": (shop_services(tls={"mode": "DISABLE"}), "clusters"),
            "labels": (shop_services(labels=(TLS_LABEL, {})), "clusters"),
        }
        for name, (documents, changed) in changes.items():
            snapshot, _ = zero_trust(documents)
            self.assertNotEqual(snapshot.version, base.version, name)
            for kind in ("listeners", "clusters"):
                same = snapshot.per_type_versions[kind] == base.per_type_versions[kind]
                self.assertEqual(same, kind != changed, (name, kind))
        insecure, _ = zero_trust(shop_services(), mtls=False)
        self.assertNotEqual(insecure.per_type_versions, base.per_type_versions)

    def test_shared_view(self) -> None:
        """
        One namespace view serves proxies with other labels: the selection
        is per node.
        """
        docs = [("mesh.yaml", i, d) for i, d in enumerate(
            shop_services() + [authz("web", "shop", {"app": "web"}), peer("db", "shop", "STRICT", {"app": "db"})],
            start=1)]
        mesh = MeshConfig(docs, mtls=True, telemetry=Telemetry(metrics=False))
        view = namespace_view(mesh, "shop")
        db = Node("db-1", workload="db-v1", namespace="shop", app="db", inbound_port=15006, app_port=5432)
        a = build_snapshot(mesh, web(), view)
        b = build_snapshot(mesh, db, view)
        self.assertEqual((inbound_of(a)["mtls"], inbound_of(b)["mtls"]), ("PERMISSIVE", "STRICT"))
        self.assertIn("http_filters", inbound_of(a))
        self.assertNotIn("http_filters", inbound_of(b))
        self.assertEqual(a.resources["clusters"][0], b.resources["clusters"][0])
        self.assertIs(a.resources["listeners"][0]["virtual_hosts"][0], b.resources["listeners"][0]["virtual_hosts"][0])
        self.assertEqual(build_snapshot(mesh, web()), a)

    def test_errors(self) -> None:
        """
        A bad security document, or a bad ISTIO_MUTUAL setting, is a
        L{ConfigError} naming the file, the document and the field, with
        or without a CA.
        """
        cases = {
            "peer": ([peer("default", "shop", "SOMETIMES")], 3, "spec.mtls.mode"),
            "port_without_selector": ([peer("default", "shop", "STRICT", ports={8080: "DISABLE"})], 3,
                                      "spec.portLevelMtls"),
            "request_auth": ([sec("RequestAuthentication", "r", "shop", {"jwtRules": [{"issuer": "i"}]})], 3,
                             "spec.jwtRules[0]"),
            "authz": ([sec("AuthorizationPolicy", "a", "shop", {"action": "CUSTOM"})], 3, "spec.action"),
        }
        for name, (extra, document, field) in cases.items():
            for mtls in (True, False):
                with self.assertRaises(ConfigError) as cm:
                    zero_trust(shop_services() + extra, mtls=mtls)
                self.assertEqual((cm.exception.source, cm.exception.document, cm.exception.field),
                                 ("mesh.yaml", document, field), name)
        with self.assertRaises(ConfigError) as cm:
            zero_trust(shop_services(tls={"mode": "ISTIO_MUTUAL", "subjectAltNames": ["cart"]}))
        self.assertEqual((cm.exception.document, cm.exception.field), (2, "spec.trafficPolicy.tls.subjectAltNames[0]"))

    def test_to_native_istio_mutual(self) -> None:
        """
        ISTIO_MUTUAL travels as its mode and SPIFFE IDs.
        """
        tls = UpstreamTLS(mode="ISTIO_MUTUAL", subject_alt_names=("spiffe://cluster.local/ns/a/sa/b",))
        self.assertEqual(to_native(tls), {"mode": "ISTIO_MUTUAL",
                                          "subject_alt_names": ["spiffe://cluster.local/ns/a/sa/b"]})
        self.assertEqual(to_native(UpstreamTLS(mode="ISTIO_MUTUAL")), {"mode": "ISTIO_MUTUAL"})
        cluster = attrs.evolve(OTHER_CLUSTER, tls=tls)
        self.assertEqual(loader().load_document({"clusters": [to_native(cluster)], "listeners": [
            {"name": "l", "address": "tcp:0", "routes": [{"name": "r", "cluster": "other"}]}]}).clusters, (cluster,))

    def test_check_documents(self) -> None:
        """
        L{check_documents} checks every document as snapshots use them,
        with no proxy, and returns the warnings.
        """
        def mesh(documents: list, mtls: bool) -> MeshConfig:
            return MeshConfig([("mesh.yaml", i, d) for i, d in enumerate(documents, start=1)], mtls=mtls,
                              default_namespace="shop")

        documents = shop_services(tls={"mode": "ISTIO_MUTUAL"}) + [authz("web", "shop")]
        self.assertEqual(check_documents(mesh(documents, True)), [])
        warnings = check_documents(mesh(documents, False))
        self.assertEqual(len(warnings), 2)
        self.assertIn("needs the mesh CA", warnings[0])
        self.assertIn("AuthorizationPolicy is not applied", warnings[1])
        for bad in (peer("default", "shop", "SOMETIMES"), sec("AuthorizationPolicy", "a", "shop", {"x": 1}),
                    sec("RequestAuthentication", "r", "shop", {"jwtRules": [{"issuer": "i"}]})):
            with self.assertRaises(ConfigError) as cm:
                check_documents(mesh(shop_services() + [bad], True))
            self.assertEqual(cm.exception.document, 3)


class SidecarShapeTests(SynchronousTestCase):
    """
    What a node's labels and the registry change in its snapshot: a
    captured sidecar's outbound listener, an HTTP/2 app, services known
    only from discovery.
    """

    def test_captured_sidecar_gets_a_capture_listener(self) -> None:
        mesh = MeshConfig((), outbound_traffic_policy="REGISTRY_ONLY")
        node = Node("n", labels=(("txmesh.io/interception", "REDIRECT"),))
        [outbound] = build_snapshot(mesh, node).resources["listeners"]
        self.assertEqual(outbound["capture"], {"mode": "REGISTRY_ONLY"})
        loader().load_document(build_snapshot(mesh, node).document(), "<pilot>")
        # Without the label: no listener at all when nothing is routed.
        self.assertEqual(build_snapshot(mesh, Node("n")).resources["listeners"], [])

    def test_http2_app(self) -> None:
        node = attrs.evolve(productpage(), labels=(("txmesh.io/app-protocol", "grpc"),))
        snapshot = build_snapshot(MeshConfig(bookinfo_documents()), node)
        [inbound] = [c for c in snapshot.resources["clusters"] if c["name"].startswith("inbound|")]
        self.assertTrue(inbound["http2"])
        plain = build_snapshot(MeshConfig(bookinfo_documents()), productpage())
        [inbound] = [c for c in plain.resources["clusters"] if c["name"].startswith("inbound|")]
        self.assertNotIn("http2", inbound)

    def test_registry_services_keep_ports_and_protocols(self) -> None:
        host = "ratings.default.svc.cluster.local"
        mesh = MeshConfig((), registry={host: (Endpoint("10.0.0.9", 50051),)},
                          registry_ports={host: (("grpc", 80, "GRPC"),)})
        snapshot = build_snapshot(mesh, Node("n"))
        [cluster] = snapshot.resources["clusters"]
        self.assertEqual((cluster["name"], cluster.get("http2")), (cluster_name(host, 80), True))
        [outbound] = snapshot.resources["listeners"]
        self.assertIn("ratings", [d for vh in outbound["virtual_hosts"] for d in vh["domains"]])
