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
from txmesh.pilot.snapshot import MeshConfig, Node, build_snapshot, duration, to_native

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
                                                "timeout": "0s"}]}])
        config = loader().load_document(snapshot.document())
        app = config.cluster("inbound|9080||productpage-v1")
        self.assertEqual(app.endpoints, (Endpoint("127.0.0.2", 9080),))

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
