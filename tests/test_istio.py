"""
Tests for L{txmesh.config.istio}: every supported Istio field becomes the
right txmesh model value, every invalid document is refused with its file,
document, field path and reason, every unsupported field is a warning; and
the loader's C{istio:} section and the Bookinfo example.
"""

from __future__ import annotations

import copy
import io
import os
import re
import textwrap
from collections.abc import Callable
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from txmesh.cli import validate
from txmesh.config.errors import ConfigError
from txmesh.config.istio import (
    API_VERSIONS,
    IstioConfig,
    IstioWarning,
    cluster_name,
    resolve_host,
    translate,
)
from txmesh.config.loader import ConfigLoader
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
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory

BOOKINFO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "bookinfo")
API = "networking.istio.io/v1"
FILE = "istio.yaml"
REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
RATINGS_80 = "outbound|80||ratings.default.svc.cluster.local"
V1 = Endpoint("10.0.0.1", 9080, (("version", "v1"),))
V2 = Endpoint("10.0.0.2", 9080, (("version", "v2"),))


def resource(kind: str, spec: Any, name: str = "reviews", **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name, **metadata}, "spec": spec}


def service_entry(**spec: Any) -> dict[str, Any]:
    base = {
        "hosts": ["reviews"],
        "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
        "resolution": "STATIC",
        "endpoints": [{"address": "10.0.0.1", "labels": {"version": "v1"}},
                      {"address": "10.0.0.2", "labels": {"version": "v2"}}],
    }
    base.update(spec)
    return resource("ServiceEntry", base)


def destination_rule(**spec: Any) -> dict[str, Any]:
    base = {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                           {"name": "v2", "labels": {"version": "v2"}}]}
    base.update(spec)
    return resource("DestinationRule", base)


def virtual_service(*http: dict[str, Any], hosts: tuple[str, ...] = ("reviews",), name: str = "reviews",
                    **spec: Any) -> dict[str, Any]:
    return resource("VirtualService", {"hosts": list(hosts), "http": list(http), **spec}, name=name)


TO_REVIEWS = [{"destination": {"host": "reviews"}}]


def run(*documents: Any, **kw: Any) -> IstioConfig:
    """
    Translate C{documents}, numbered from 1, all from L{FILE}.
    """
    return translate([(FILE, i, d) for i, d in enumerate(documents, start=1)], **kw)


def with_base(*documents: Any, **kw: Any) -> IstioConfig:
    """
    Translate C{documents} after a reviews ServiceEntry (documents 1) and
    DestinationRule (document 2).
    """
    return run(service_entry(), destination_rule(), *documents, **kw)


def routes_of(config: IstioConfig, name: str = "default/reviews") -> tuple[Route, ...]:
    [vh] = [vh for vh in config.virtual_hosts if vh.name == name]
    return vh.routes


def one_route(http: dict[str, Any], **kw: Any) -> Route:
    [route] = routes_of(with_base(virtual_service(http), **kw))
    return route


def cluster(config: IstioConfig, name: str = REVIEWS) -> ClusterConfig:
    [c] = [c for c in config.clusters if c.name == name]
    return c


def warnings_text(config: IstioConfig) -> list[str]:
    return [str(w) for w in config.warnings]


class NamesTests(SynchronousTestCase):
    """
    Host resolution and cluster names.
    """

    def test_resolve_host(self):
        for host, expected in (
            ("reviews", "reviews.shop.svc.cluster.local"),
            ("reviews.shop.svc.cluster.local", "reviews.shop.svc.cluster.local"),
            # Istio: a name with a dot is taken as written.
            ("reviews.other", "reviews.other"),
            ("api.example.com", "api.example.com"),
            ("*.example.com", "*.example.com"),
            ("*", "*"),
        ):
            self.assertEqual(resolve_host(host, "shop"), expected, host)

    def test_resolve_host_domain_suffix(self):
        self.assertEqual(resolve_host("reviews", "shop", "svc.mesh.internal"), "reviews.shop.svc.mesh.internal")

    def test_cluster_name(self):
        self.assertEqual(cluster_name("reviews.default.svc.cluster.local", 9080), REVIEWS)

    def test_api_versions(self):
        self.assertEqual(API_VERSIONS, ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                                        "networking.istio.io/v1alpha3"))

    def test_every_api_version_accepted(self):
        for version in API_VERSIONS:
            docs = [dict(d, apiVersion=version) for d in (service_entry(), destination_rule(),
                                                         virtual_service({"route": TO_REVIEWS}))]
            config = run(*docs)
            self.assertEqual([c.name for c in config.clusters], [REVIEWS], version)
            self.assertEqual(config.warnings, (), version)

    def test_short_names_everywhere(self):
        """
        Short names in every kind resolve in the document's namespace
        (C{metadata.namespace}, else the default one).
        """
        config = run(
            dict(service_entry(), metadata={"name": "reviews", "namespace": "shop"}),
            dict(destination_rule(), metadata={"name": "reviews", "namespace": "shop"}),
            dict(virtual_service({"route": [{"destination": {"host": "reviews", "subset": "v2"}}]}),
                 metadata={"name": "reviews", "namespace": "shop"}),
            namespace="shop",
        )
        [c] = config.clusters
        self.assertEqual(c.name, "outbound|9080||reviews.shop.svc.cluster.local")
        self.assertEqual([s.name for s in c.subsets], ["v1", "v2"])
        [vh] = config.virtual_hosts
        self.assertEqual(vh.name, "shop/reviews")
        self.assertEqual(vh.routes[0].destinations[0].cluster, c.name)

    def test_fqdn_and_short_name_are_one_service(self):
        config = with_base(virtual_service({"route": [
            {"destination": {"host": "reviews.default.svc.cluster.local", "subset": "v1"}}]}))
        self.assertEqual([c.name for c in config.clusters], [REVIEWS])

    def test_domains_in_mesh(self):
        [vh] = with_base(virtual_service({"route": TO_REVIEWS})).virtual_hosts
        self.assertEqual(vh.domains, (
            "reviews.default.svc.cluster.local", "reviews.default.svc", "reviews.default", "reviews",
            "reviews.default.svc.cluster.local:9080", "reviews.default.svc:9080", "reviews.default:9080",
            "reviews:9080",
        ))

    def test_domains_other_namespace_have_no_bare_short_name(self):
        """
        C{reviews} alone names a service of the proxy's own namespace only.
        """
        doc = virtual_service({"route": [{"destination": {"host": "reviews.shop.svc.cluster.local",
                                                          "port": {"number": 9080}}}]},
                              hosts=("reviews.shop.svc.cluster.local",))
        [vh] = run(doc, registry={"reviews.shop.svc.cluster.local": [V1]}).virtual_hosts
        self.assertEqual(vh.domains, (
            "reviews.shop.svc.cluster.local", "reviews.shop.svc", "reviews.shop",
            "reviews.shop.svc.cluster.local:9080", "reviews.shop.svc:9080", "reviews.shop:9080",
        ))

    def test_domains_external_and_wildcard(self):
        config = run(
            resource("ServiceEntry", {"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "tls"}],
                                      "resolution": "DNS"}, name="api"),
            virtual_service({"route": [{"destination": {"host": "api.example.com"}}]},
                            hosts=("api.example.com", "*.example.org"), name="api"),
        )
        [vh] = config.virtual_hosts
        self.assertEqual(vh.domains, ("api.example.com", "api.example.com:443", "*.example.org"))
        self.assertEqual(cluster(config, "outbound|443||api.example.com").endpoints,
                         (Endpoint("api.example.com", 443),))


class MatchTests(SynchronousTestCase):
    """
    Every C{HTTPMatchRequest} field that txmesh supports, as a table.
    """

    TABLE: list[tuple[dict[str, Any], RouteMatch]] = [
        ({}, RouteMatch()),
        ({"uri": {"exact": "/a"}}, RouteMatch(prefix=None, path=b"/a")),
        ({"uri": {"prefix": "/api/"}}, RouteMatch(prefix=b"/api/")),
        ({"uri": {"regex": "/u/[0-9]+"}}, RouteMatch(prefix=None, regex=re.compile(b"/u/[0-9]+"))),
        ({"uri": {}}, RouteMatch()),
        ({"uri": {"exact": "/a.b"}, "ignoreUriCase": True},
         RouteMatch(prefix=None, regex=re.compile(rb"(?i)/a\.b"))),
        ({"uri": {"prefix": "/api"}, "ignoreUriCase": True},
         RouteMatch(prefix=None, regex=re.compile(b"(?i)/api.*"))),
        ({"uri": {"regex": "/x+"}, "ignoreUriCase": True}, RouteMatch(prefix=None, regex=re.compile(b"(?i)/x+"))),
        ({"headers": {"End-User": {"exact": "jason"}, "x-p": {"prefix": "a"}, "x-r": {"regex": "[0-9]+"},
                      "x-any": {}}},
         RouteMatch(headers=(HeaderMatch(b"end-user", exact=b"jason"), HeaderMatch(b"x-p", prefix=b"a"),
                             HeaderMatch(b"x-r", regex=re.compile(b"[0-9]+")), HeaderMatch(b"x-any", present=True)))),
        ({"withoutHeaders": {"x-env": {"exact": "prod"}, "x-debug": {}}},
         RouteMatch(headers=(HeaderMatch(b"x-env", exact=b"prod", invert=True),
                             HeaderMatch(b"x-debug", present=True, invert=True)))),
        ({"headers": {"a": {"exact": "1"}}, "withoutHeaders": {"b": {"exact": "2"}}},
         RouteMatch(headers=(HeaderMatch(b"a", exact=b"1"), HeaderMatch(b"b", exact=b"2", invert=True)))),
        ({"queryParams": {"v": {"exact": "2"}, "id": {"regex": "[0-9]+"}, "debug": {}, "p": {"prefix": "x"}}},
         RouteMatch(query_params=(HeaderMatch(b"v", exact=b"2"), HeaderMatch(b"id", regex=re.compile(b"[0-9]+")),
                                  HeaderMatch(b"debug", present=True), HeaderMatch(b"p", prefix=b"x")))),
        ({"method": {"exact": "get"}}, RouteMatch(methods=(b"GET",))),
        ({"port": 9080}, RouteMatch(port=9080)),
        ({"sourceLabels": {"app": "productpage", "version": "v1"}},
         RouteMatch(source_labels=(("app", "productpage"), ("version", "v1")))),
        ({"gateways": ["mesh", "my-gateway"], "name": "n"}, RouteMatch()),
        ({"uri": {"prefix": "/r"}, "headers": {"end-user": {"exact": "jason"}}, "method": {"exact": "POST"},
          "port": 9080},
         RouteMatch(prefix=b"/r", headers=(HeaderMatch(b"end-user", exact=b"jason"),), methods=(b"POST",),
                    port=9080)),
    ]

    def test_table(self):
        for match, expected in self.TABLE:
            http = {"route": TO_REVIEWS, **({"match": [match]} if match else {})}
            config = with_base(virtual_service(http))
            [route] = routes_of(config)
            self.assertEqual(route.match, expected, match)
            self.assertEqual(config.warnings, (), match)

    def test_each_match_block_is_a_route_in_order(self):
        """
        Match blocks are ORed: each becomes its own route, in order, with
        the same destinations, so the first matching one still wins.
        """
        routes = routes_of(with_base(virtual_service(
            {"name": "ab", "match": [{"headers": {"end-user": {"exact": "jason"}}},
                                     {"name": "beta", "uri": {"prefix": "/beta"}}],
             "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
            {"match": [{"uri": {"prefix": "/a"}}, {"uri": {"prefix": "/b"}}], "route": TO_REVIEWS},
            {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
        )))
        self.assertEqual([r.name for r in routes], [
            "ab.match[0]", "beta.ab", "default/reviews/http[1].match[0]", "default/reviews/http[1].match[1]",
            "default/reviews/http[2]"])
        self.assertEqual([r.match for r in routes], [
            RouteMatch(headers=(HeaderMatch(b"end-user", exact=b"jason"),)), RouteMatch(prefix=b"/beta"),
            RouteMatch(prefix=b"/a"), RouteMatch(prefix=b"/b"), RouteMatch()])
        self.assertEqual(routes[0].destinations, routes[1].destinations)
        self.assertEqual([r.destinations[0].subset for r in routes], ["v2", "v2", None, None, "v1"])

    def test_method_regex_becomes_standard_methods(self):
        config = with_base(virtual_service({"match": [{"method": {"regex": "GET|HEAD"}}], "route": TO_REVIEWS}))
        self.assertEqual(routes_of(config)[0].match.methods, (b"GET", b"HEAD"))
        self.assertEqual(warnings_text(config), [
            f"{FILE}: document 3: spec.http[0].match[0].method.regex: txmesh matches methods exactly: GET, HEAD"])

    def test_method_prefix_matching_nothing_skips_the_match(self):
        config = with_base(virtual_service(
            {"match": [{"method": {"prefix": "BREW"}}, {"uri": {"prefix": "/tea"}}], "route": TO_REVIEWS}))
        self.assertEqual([r.match for r in routes_of(config)], [RouteMatch(prefix=b"/tea")])
        self.assertIn("matches no standard HTTP method; match skipped", warnings_text(config)[0])


class RouteTests(SynchronousTestCase):
    """
    Every C{HTTPRoute} field that txmesh supports, as a table of
    (route fields, expected L{Route} attributes).
    """

    TABLE: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({}, dict(name="default/reviews/http[0]", cluster=REVIEWS, destinations=(WeightedDestination(REVIEWS),),
                  timeout=0.0, retry=RetryPolicy(), fault=None, mirror=None, redirect=None, direct_response=None,
                  prefix_rewrite=None, host_rewrite=None, request_headers=HeaderOps(),
                  response_headers=HeaderOps(), hash_policy=None)),
        ({"name": "main"}, dict(name="main")),
        ({"timeout": "1.5s"}, dict(timeout=1.5)),
        ({"timeout": "1m30s"}, dict(timeout=90.0)),
        ({"timeout": "250ms"}, dict(timeout=0.25)),
        ({"retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx, connect-failure,reset"}},
         dict(retry=RetryPolicy(attempts=3, per_try_timeout=2.0,
                                retry_on=frozenset({"5xx", "connect-failure", "reset"})))),
        ({"retries": {"attempts": 5}}, dict(retry=RetryPolicy(attempts=5))),
        ({"retries": {"attempts": 2, "retryOn": "gateway-error,retriable-4xx,refused-stream,cancelled,"
                                                "deadline-exceeded,internal,resource-exhausted,unavailable,"
                                                "retriable-status-codes"}},
         dict(retry=RetryPolicy(retry_on=frozenset({
             "gateway-error", "retriable-4xx", "refused-stream", "cancelled", "deadline-exceeded", "internal",
             "resource-exhausted", "unavailable", "retriable-status-codes"})))),
        ({"retries": {"attempts": 0}}, dict(retry=None)),
        ({"fault": {"delay": {"fixedDelay": "5s", "percentage": {"value": 10}}}},
         dict(fault=FaultPolicy(delay=5.0, delay_percent=10.0))),
        ({"fault": {"delay": {"fixedDelay": "7s"}}}, dict(fault=FaultPolicy(delay=7.0, delay_percent=100.0))),
        ({"fault": {"delay": {"fixedDelay": "1s", "percent": 20}}},
         dict(fault=FaultPolicy(delay=1.0, delay_percent=20.0))),
        ({"fault": {"abort": {"httpStatus": 503, "percentage": {"value": 0.5}}}},
         dict(fault=FaultPolicy(abort_status=503, abort_percent=0.5))),
        ({"fault": {"abort": {"grpcStatus": "UNAVAILABLE"}}},
         dict(fault=FaultPolicy(abort_grpc_status=14, abort_percent=100.0))),
        ({"fault": {"delay": {"fixedDelay": "100ms", "percentage": {"value": 50}},
                    "abort": {"httpStatus": 500, "percentage": {"value": 25}}}},
         dict(fault=FaultPolicy(delay=0.1, delay_percent=50.0, abort_status=500, abort_percent=25.0))),
        ({"mirror": {"host": "reviews", "subset": "v2"}},
         dict(mirror=MirrorPolicy(REVIEWS, "v2", 100.0))),
        ({"mirror": {"host": "reviews"}, "mirrorPercentage": {"value": 12.5}},
         dict(mirror=MirrorPolicy(REVIEWS, None, 12.5))),
        ({"mirror": {"host": "reviews"}, "mirrorPercent": 30}, dict(mirror=MirrorPolicy(REVIEWS, None, 30.0))),
        ({"mirrors": [{"destination": {"host": "reviews", "subset": "v1"}, "percentage": {"value": 5}}]},
         dict(mirror=MirrorPolicy(REVIEWS, "v1", 5.0))),
        ({"rewrite": {"authority": "reviews.internal"}}, dict(host_rewrite=b"reviews.internal")),
        ({"match": [{"uri": {"prefix": "/old/"}}], "rewrite": {"uri": "/new/"}},
         dict(prefix_rewrite=b"/new/", match=RouteMatch(prefix=b"/old/"))),
        ({"rewrite": {"uri": "/v2"}}, dict(prefix_rewrite=b"/v2", match=RouteMatch())),
        ({"headers": {"request": {"set": {"X-A": "1"}, "add": {"x-b": 2}, "remove": ["x-c"]},
                      "response": {"set": {"x-served-by": "txmesh"}, "remove": ["server"]}}},
         dict(request_headers=HeaderOps(set=((b"x-a", b"1"),), add=((b"x-b", b"2"),), remove=(b"x-c",)),
              response_headers=HeaderOps(set=((b"x-served-by", b"txmesh"),), remove=(b"server",)))),
        ({"route": [{"destination": {"host": "reviews", "subset": "v1", "port": {"number": 9080}},
                     "headers": {"request": {"set": {"x-version": "v1"}}, "response": {"add": {"x-r": "1"}}}}]},
         dict(cluster=REVIEWS, destinations=(
             WeightedDestination(REVIEWS, 100, "v1", request_headers=HeaderOps(set=((b"x-version", b"v1"),)),
                                 response_headers=HeaderOps(add=((b"x-r", b"1"),))),))),
        ({"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                    {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10}]},
         dict(cluster=None, destinations=(WeightedDestination(REVIEWS, 90, "v1"),
                                          WeightedDestination(REVIEWS, 10, "v2")))),
        ({"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 100},
                    {"destination": {"host": "reviews", "subset": "v2"}}]},
         dict(destinations=(WeightedDestination(REVIEWS, 100, "v1"), WeightedDestination(REVIEWS, 0, "v2")))),
        ({"route": [{"destination": {"host": "reviews"}, "weight": 40}]},
         dict(destinations=(WeightedDestination(REVIEWS, 100),))),
        ({"route": None, "redirect": {"uri": "/new", "authority": "x.example", "scheme": "https", "port": 8443,
                                      "redirectCode": 302}},
         dict(cluster=None, destinations=(), retry=None,
              redirect=Redirect(uri=b"/new", authority=b"x.example", scheme=b"https", port=8443, code=302))),
        ({"route": None, "redirect": {"uri": "/new"}}, dict(redirect=Redirect(uri=b"/new"))),
        ({"route": None, "directResponse": {"status": 503, "body": {"string": "down"}}},
         dict(cluster=None, destinations=(), retry=None, direct_response=DirectResponse(503, b"down"))),
        ({"route": None, "directResponse": {"status": 200, "body": {"bytes": "aGk="}}},
         dict(direct_response=DirectResponse(200, b"hi"))),
        ({"route": None, "directResponse": {"status": 204}}, dict(direct_response=DirectResponse(204))),
        ({"route": None, "directResponse": {"status": 418},
          "fault": {"delay": {"fixedDelay": "1s"}}},
         dict(direct_response=DirectResponse(418), fault=FaultPolicy(delay=1.0, delay_percent=100.0))),
    ]

    def test_table(self):
        for fields, expected in self.TABLE:
            http = {"route": TO_REVIEWS, **fields}
            http = {k: v for k, v in http.items() if v is not None}
            config = with_base(virtual_service(http))
            [route] = routes_of(config)
            self.assertEqual({k: getattr(route, k) for k in expected}, expected, fields)
            self.assertEqual(config.warnings, (), fields)

    def test_mirror_to_other_service_makes_its_cluster(self):
        config = with_base(virtual_service({"route": TO_REVIEWS, "mirror": {"host": "ratings"}}))
        self.assertEqual(routes_of(config)[0].mirror, MirrorPolicy(RATINGS_80, None, 100.0))
        self.assertEqual([c.name for c in config.clusters], [REVIEWS, RATINGS_80])
        self.assertEqual(warnings_text(config), [
            f"{FILE}: document 3: spec.http[0].mirror: ratings.default.svc.cluster.local has no endpoints (none "
            f"from a ServiceEntry or service discovery); requests to it fail until it has some"])

    def test_route_hash_policy_from_destination_rule(self):
        """
        A single-destination route carries its cluster's consistent-hash
        policy, as Istio puts it on the route.
        """
        rule = destination_rule(trafficPolicy={"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}})
        config = run(service_entry(), rule, virtual_service({"route": TO_REVIEWS}, {
            "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                      {"destination": {"host": "reviews", "subset": "v2"}, "weight": 50}]}))
        first, split = routes_of(config)
        self.assertEqual(first.hash_policy, HashPolicy(header=b"x-user"))
        self.assertIsNone(split.hash_policy)

    def test_several_services_and_ports(self):
        entry = service_entry(ports=[{"number": 9080, "name": "http"}, {"number": 9443, "name": "admin",
                                                                        "targetPort": 19443}])
        config = run(entry, virtual_service({"route": [
            {"destination": {"host": "reviews", "port": {"number": 9443}}, "weight": 50},
            {"destination": {"host": "ratings", "port": {"number": 8080}}, "weight": 50}]}),
            registry={"ratings.default.svc.cluster.local": [Endpoint("10.0.1.1", 18080)]})
        [route] = routes_of(config)
        self.assertEqual([d.cluster for d in route.destinations], [
            "outbound|9443||reviews.default.svc.cluster.local", "outbound|8080||ratings.default.svc.cluster.local"])
        self.assertEqual(cluster(config, "outbound|9443||reviews.default.svc.cluster.local").endpoints, (
            Endpoint("10.0.0.1", 19443, (("version", "v1"),)), Endpoint("10.0.0.2", 19443, (("version", "v2"),))))
        self.assertEqual(cluster(config, "outbound|8080||ratings.default.svc.cluster.local").endpoints,
                         (Endpoint("10.0.1.1", 18080),))


class DestinationRuleTests(SynchronousTestCase):
    """
    C{trafficPolicy} and C{subsets}, as a table of (trafficPolicy,
    expected L{ClusterConfig} attributes).
    """

    TABLE: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({}, dict(lb_policy="round_robin", hash_policy=None, circuit_breaker=CircuitBreakerConfig(),
                  outlier_detection=None, locality_failover=False, connect_timeout=5.0, idle_timeout=60.0)),
        ({"loadBalancer": {"simple": "ROUND_ROBIN"}}, dict(lb_policy="round_robin")),
        ({"loadBalancer": {"simple": "LEAST_REQUEST"}}, dict(lb_policy="least_request")),
        ({"loadBalancer": {"simple": "LEAST_CONN"}}, dict(lb_policy="least_request")),
        ({"loadBalancer": {"simple": "RANDOM"}}, dict(lb_policy="random")),
        ({"loadBalancer": {"simple": "UNSPECIFIED"}}, dict(lb_policy="round_robin")),
        ({"loadBalancer": {"consistentHash": {"httpHeaderName": "X-User"}}},
         dict(lb_policy="consistent_hash", hash_policy=HashPolicy(header=b"x-user"))),
        ({"loadBalancer": {"consistentHash": {"httpCookie": {"name": "session"}}}},
         dict(hash_policy=HashPolicy(cookie=b"session"))),
        ({"loadBalancer": {"consistentHash": {"useSourceIp": True}}}, dict(hash_policy=HashPolicy(source_ip=True))),
        ({"loadBalancer": {"consistentHash": {"httpQueryParameterName": "user"}}},
         dict(hash_policy=HashPolicy(query_param=b"user"))),
        ({"loadBalancer": {"consistentHash": {"useSourceIp": True, "ringHash": {"minimumRingSize": 4096}}}},
         dict(hash_policy=HashPolicy(source_ip=True, table_size=4096))),
        ({"loadBalancer": {"consistentHash": {"useSourceIp": True, "minimumRingSize": 2048}}},
         dict(hash_policy=HashPolicy(source_ip=True, table_size=2048))),
        ({"loadBalancer": {"consistentHash": {"useSourceIp": True, "maglev": {"tableSize": 131}}}},
         dict(hash_policy=HashPolicy(source_ip=True, algorithm="maglev", table_size=131))),
        ({"loadBalancer": {"consistentHash": {"useSourceIp": True, "maglev": {}}}},
         dict(hash_policy=HashPolicy(source_ip=True, algorithm="maglev", table_size=65537))),
        ({"loadBalancer": {"localityLbSetting": {"enabled": True}}}, dict(locality_failover=True)),
        ({"loadBalancer": {"localityLbSetting": {}}}, dict(locality_failover=True)),
        ({"loadBalancer": {"localityLbSetting": {"enabled": False}}}, dict(locality_failover=False)),
        ({"connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "30ms"},
                             "http": {"http1MaxPendingRequests": 10, "http2MaxRequests": 1000,
                                      "maxRequestsPerConnection": 1, "idleTimeout": "1h"}}},
         dict(circuit_breaker=CircuitBreakerConfig(max_connections=100, max_pending_requests=10, max_requests=1000,
                                                   max_requests_per_connection=1),
              connect_timeout=0.03, idle_timeout=3600.0)),
        ({"connectionPool": {"http": {"http2MaxRequests": 5}}},
         dict(circuit_breaker=CircuitBreakerConfig(max_requests=5), connect_timeout=5.0)),
        ({"connectionPool": {"tcp": {"connectTimeout": "2s"}}},
         dict(circuit_breaker=CircuitBreakerConfig(), connect_timeout=2.0)),
        ({"outlierDetection": {"consecutive5xxErrors": 7, "consecutiveGatewayErrors": 3, "interval": "5m",
                               "baseEjectionTime": "15m", "maxEjectionPercent": 100}},
         dict(outlier_detection=OutlierDetectionConfig(consecutive_5xx=7, consecutive_gateway_errors=3,
                                                       interval=300.0, base_ejection_time=900.0,
                                                       max_ejection_percent=100))),
        ({"outlierDetection": {}}, dict(outlier_detection=OutlierDetectionConfig())),
        ({"outlierDetection": {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 5}},
         dict(outlier_detection=OutlierDetectionConfig(consecutive_5xx=0, consecutive_gateway_errors=5))),
    ]

    def test_table(self):
        for policy, expected in self.TABLE:
            config = run(service_entry(), destination_rule(trafficPolicy=policy))
            c = cluster(config)
            self.assertEqual({k: getattr(c, k) for k in expected}, expected, policy)
            self.assertEqual(config.warnings, (), policy)

    def test_subsets_stay_in_the_cluster(self):
        config = run(service_entry(), destination_rule(subsets=[
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "all"},
            {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
        ]))
        self.assertEqual(cluster(config), ClusterConfig(REVIEWS, (V1, V2), subsets=(
            SubsetConfig("v1", (("version", "v1"),)), SubsetConfig("all", ()),
            SubsetConfig("v2", (("version", "v2"),), lb_policy="random"))))
        self.assertEqual(config.warnings, ())

    def test_subset_policy_same_as_rule_is_quiet(self):
        policy = {"outlierDetection": {"consecutive5xxErrors": 2}}
        config = run(service_entry(), destination_rule(trafficPolicy=policy, subsets=[
            {"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": policy}]))
        self.assertEqual(config.warnings, ())

    def test_wildcard_rule(self):
        config = run(service_entry(), resource("DestinationRule", {
            "host": "*.default.svc.cluster.local", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
            name="all"))
        self.assertEqual(cluster(config).lb_policy, "random")

    def test_exact_rule_beats_wildcard(self):
        config = run(
            service_entry(),
            resource("DestinationRule", {"host": "*.cluster.local",
                                         "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}, name="all"),
            destination_rule(trafficPolicy={"loadBalancer": {"simple": "LEAST_REQUEST"}}),
        )
        self.assertEqual(cluster(config).lb_policy, "least_request")

    def test_rules_for_one_host_merge_subsets(self):
        config = run(
            service_entry(),
            destination_rule(subsets=[{"name": "v1", "labels": {"version": "v1"}}],
                             trafficPolicy={"loadBalancer": {"simple": "RANDOM"}}),
            dict(destination_rule(subsets=[{"name": "v2", "labels": {"version": "v2"}},
                                           {"name": "v1", "labels": {"version": "v2"}}],
                                  trafficPolicy={"loadBalancer": {"simple": "LEAST_REQUEST"}}),
                 metadata={"name": "reviews-more"}),
        )
        c = cluster(config)
        self.assertEqual(c.lb_policy, "random")
        self.assertEqual([(s.name, s.labels) for s in c.subsets],
                         [("v1", (("version", "v1"),)), ("v2", (("version", "v2"),))])
        self.assertEqual([(w.document, w.field) for w in config.warnings],
                         [(3, "spec.trafficPolicy"), (3, "spec.subsets[1]")])


class ServiceEntryTests(SynchronousTestCase):
    """
    C{ServiceEntry} hosts, ports, resolution and endpoints.
    """

    def test_static_endpoints(self):
        config = run(service_entry(
            ports=[{"number": 9080, "name": "http", "targetPort": 8080}, {"number": 9090, "name": "metrics"}],
            endpoints=[{"address": "10.0.0.1", "ports": {"http": 19080}, "labels": {"version": "v1"},
                        "weight": 3, "locality": "eu-west/zone-a"},
                       {"address": "fd00::2"}],
            location="MESH_INTERNAL"))
        self.assertEqual(config.clusters, (
            ClusterConfig(REVIEWS, (Endpoint("10.0.0.1", 19080, (("version", "v1"),), 3, "eu-west/zone-a"),
                                    Endpoint("fd00::2", 8080))),
            ClusterConfig("outbound|9090||reviews.default.svc.cluster.local", (
                Endpoint("10.0.0.1", 9090, (("version", "v1"),), 3, "eu-west/zone-a"), Endpoint("fd00::2", 9090))),
        ))

    def test_dns(self):
        config = run(
            resource("ServiceEntry", {"hosts": ["api.example.com", "cdn.example.com"],
                                      "ports": [{"number": 443, "name": "https", "protocol": "TCP"}],
                                      "resolution": "DNS", "location": "MESH_EXTERNAL"}, name="ext"),
            resource("ServiceEntry", {"hosts": ["db.example.com"],
                                      "ports": [{"number": 5432, "name": "pg", "protocol": "TCP"}],
                                      "resolution": "DNS_ROUND_ROBIN",
                                      "endpoints": [{"address": "db1.example.com"},
                                                    {"address": "db2.example.com", "ports": {"pg": 6432}}]},
                     name="db"),
        )
        self.assertEqual([(c.name, c.endpoints) for c in config.clusters], [
            ("outbound|443||api.example.com", (Endpoint("api.example.com", 443),)),
            ("outbound|443||cdn.example.com", (Endpoint("cdn.example.com", 443),)),
            ("outbound|5432||db.example.com", (Endpoint("db1.example.com", 5432), Endpoint("db2.example.com", 6432))),
        ])
        self.assertEqual(config.warnings, ())

    def test_default_virtual_hosts_for_unrouted_services(self):
        """
        A service with no VirtualService still gets routes, per port, as
        Istio gives it: every request to it goes to its cluster.
        """
        config = run(service_entry(ports=[{"number": 9080, "name": "http"}, {"number": 9081, "name": "grpc"}]))
        second = "outbound|9081||reviews.default.svc.cluster.local"
        self.assertEqual(config.virtual_hosts, (
            VirtualHost("reviews.default.svc.cluster.local:9080", (
                "reviews.default.svc.cluster.local", "reviews.default.svc", "reviews.default", "reviews",
                "reviews.default.svc.cluster.local:9080", "reviews.default.svc:9080", "reviews.default:9080",
                "reviews:9080"),
                (Route("default", RouteMatch(), cluster=REVIEWS, destinations=(WeightedDestination(REVIEWS),),
                       timeout=0.0, retry=RetryPolicy()),)),
            VirtualHost("reviews.default.svc.cluster.local:9081", (
                "reviews.default.svc.cluster.local:9081", "reviews.default.svc:9081", "reviews.default:9081",
                "reviews:9081"),
                (Route("default", RouteMatch(), cluster=second, destinations=(WeightedDestination(second),),
                       timeout=0.0, retry=RetryPolicy()),)),
        ))

    def test_routed_services_have_no_default_virtual_host(self):
        config = with_base(virtual_service({"route": TO_REVIEWS}))
        self.assertEqual([vh.name for vh in config.virtual_hosts], ["default/reviews"])

    def test_registry_endpoints(self):
        """
        Services with no ServiceEntry take their endpoints from the
        registry (service discovery).
        """
        config = run(destination_rule(), virtual_service({"route": [
            {"destination": {"host": "reviews", "subset": "v1", "port": {"number": 9080}}}]}),
            registry={"reviews.default.svc.cluster.local": [V1, V2]})
        self.assertEqual(cluster(config).endpoints, (V1, V2))
        self.assertEqual(config.warnings, ())

    def test_registry_labels_checked_against_subsets(self):
        with self.assertRaises(ConfigError) as cm:
            run(destination_rule(subsets=[{"name": "v3", "labels": {"version": "v3"}}]),
                registry={"reviews.default.svc.cluster.local": [V1]})
        self.assertEqual((cm.exception.document, cm.exception.field), (1, "spec.subsets[0].labels"))

    def test_service_without_endpoints_is_a_warning(self):
        config = run(destination_rule(), virtual_service({"route": [
            {"destination": {"host": "reviews", "subset": "v1"}}]}))
        self.assertEqual(cluster(config, "outbound|80||reviews.default.svc.cluster.local").endpoints, ())
        self.assertEqual(warnings_text(config), [
            f"{FILE}: document 2: spec.http[0].route[0]: reviews.default.svc.cluster.local has no endpoints (none "
            f"from a ServiceEntry or service discovery); requests to it fail until it has some"])


def _case(documents: list[Any], document: int, field: str, reason: str, base: bool = True):
    return (documents, document, field, reason, base)


def _vs(*http: Any, **kw: Any) -> list[Any]:
    return [virtual_service(*http, **kw)]


def _replace(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    target = doc
    for p in parents:
        target = target[int(p)] if isinstance(target, list) else target[p]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


_DELETE = object()
_TWO = [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
        {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20}]

# name: (documents after the reviews ServiceEntry and DestinationRule (documents 1 and 2), the document number,
#        field, reason, whether to prepend the two base documents)
INVALID: dict[str, tuple[list[Any], int, str, str, bool]] = {
    "not_a_mapping": _case([["a", "list"]], 3, "", "expected a mapping (an Istio resource), got a list"),
    "api_version": _case([dict(virtual_service(), apiVersion="networking.istio.io/v2")], 3, "apiVersion",
                         "unsupported apiVersion 'networking.istio.io/v2' (supported: networking.istio.io/v1, "
                         "networking.istio.io/v1beta1, networking.istio.io/v1alpha3)"),
    "api_version_missing": _case([{"kind": "VirtualService"}], 3, "apiVersion", "unsupported apiVersion None"),
    "kind": _case([dict(virtual_service(), kind="Route")], 3, "kind",
                  "unsupported kind 'Route' (supported: ServiceEntry, DestinationRule, VirtualService)"),
    "other_api_group": _case([{"apiVersion": "apps/v1", "kind": "Deployment"}], 3, "apiVersion",
                             "unsupported apiVersion 'apps/v1'"),
    "top_level_field": _case([dict(virtual_service(), extra=1)], 3, "extra", "unknown field"),
    "metadata_missing": _case([_replace(virtual_service(), "metadata", _DELETE)], 3, "metadata", "is required"),
    "metadata_name": _case([_replace(virtual_service(), "metadata.name", 5)], 3, "metadata.name",
                           "expected a non-empty string, got a number"),
    "metadata_namespace": _case([_replace(virtual_service(), "metadata.namespace", "")], 3, "metadata.namespace",
                                "expected a non-empty string"),
    "spec_missing": _case([_replace(virtual_service(), "spec", _DELETE)], 3, "spec", "is required"),
    "spec_not_mapping": _case([_replace(virtual_service(), "spec", ["x"])], 3, "spec", "expected a mapping"),
    "vs_unknown_field": _case(_vs({"route": TO_REVIEWS, "rout": []}), 3, "spec.http[0].rout", "unknown field"),
    "vs_hosts_type": _case([_replace(virtual_service(), "spec.hosts", "reviews")], 3, "spec.hosts",
                           "expected a list, got a string"),
    "vs_hosts_missing": _case([_replace(virtual_service(), "spec.hosts", _DELETE)], 3, "spec.hosts", "is required"),
    "vs_hosts_empty": _case([_replace(virtual_service(), "spec.hosts", [])], 3, "spec.hosts",
                            "a VirtualService needs at least one host"),
    "vs_host_invalid": _case(_vs({"route": TO_REVIEWS}, hosts=("Reviews_v1",)), 3, "spec.hosts[0]",
                             "not a valid host name"),
    "http_not_list": _case([_replace(virtual_service(), "spec.http", {"route": []})], 3, "spec.http",
                           "expected a list, got a mapping"),
    "http_route_not_mapping": _case(_vs("route"), 3, "spec.http[0]", "expected a mapping, got a string"),
    "weights_sum": _case(_vs({"route": _TWO}), 3, "spec.http[0].route[1].weight",
                         "the weights of the route's destinations sum to 110; they must sum to 100"),
    "weights_missing": _case(_vs({"route": [{"destination": {"host": "reviews"}},
                                            {"destination": {"host": "reviews"}}]}),
                             3, "spec.http[0].route[1].weight", "sum to 0"),
    "weight_type": _case(_vs({"route": [{"destination": {"host": "reviews"}, "weight": "90"}]}), 3,
                         "spec.http[0].route[0].weight", "expected an integer, got a string"),
    "weight_range": _case(_vs({"route": [{"destination": {"host": "reviews"}, "weight": 101}]}), 3,
                          "spec.http[0].route[0].weight", "must be between 0 and 100, got 101"),
    "route_empty": _case(_vs({"route": []}), 3, "spec.http[0].route", "needs at least one destination"),
    "route_no_destination": _case(_vs({"route": [{"weight": 100}]}), 3, "spec.http[0].route[0].destination",
                                  "is required"),
    "destination_host_missing": _case(_vs({"route": [{"destination": {"subset": "v1"}}]}), 3,
                                      "spec.http[0].route[0].destination.host", "is required"),
    "destination_wildcard": _case(_vs({"route": [{"destination": {"host": "*.example.com"}}]}), 3,
                                  "spec.http[0].route[0].destination.host",
                                  "a destination must name one service, not a wildcard"),
    "destination_port_type": _case(_vs({"route": [{"destination": {"host": "reviews", "port": 9080}}]}), 3,
                                   "spec.http[0].route[0].destination.port", "expected a mapping, got a number"),
    "destination_port_unknown": _case(_vs({"route": [{"destination": {"host": "reviews",
                                                                      "port": {"number": 9999}}}]}),
                                      3, "spec.http[0].route[0].destination.port.number",
                                      "reviews.default.svc.cluster.local has no port 9999 (ports: 9080)"),
    "subset_undefined": _case(_vs({"route": [{"destination": {"host": "reviews", "subset": "v9"}}]}), 3,
                              "spec.http[0].route[0].destination.subset",
                              "subset 'v9' is not defined by DestinationRule 'reviews' for "
                              "reviews.default.svc.cluster.local (subsets: v1, v2)"),
    "subset_no_rule": _case(_vs({"route": [{"destination": {"host": "ratings", "subset": "v1"}}]}), 3,
                            "spec.http[0].route[0].destination.subset",
                            "subset 'v1' is not defined: no DestinationRule for ratings.default.svc.cluster.local"),
    "mirror_subset_undefined": _case(_vs({"route": TO_REVIEWS, "mirror": {"host": "reviews", "subset": "v3"}}),
                                     3, "spec.http[0].mirror.subset", "subset 'v3' is not defined"),
    "mirrors_subset_undefined": _case(_vs({"route": TO_REVIEWS, "mirrors": [
        {"destination": {"host": "reviews", "subset": "v3"}}]}), 3, "spec.http[0].mirrors[0].destination.subset",
        "subset 'v3' is not defined"),
    "subset_labels_match_nothing": _case([service_entry(), destination_rule(subsets=[
        {"name": "v1", "labels": {"version": "v1"}}, {"name": "v9", "labels": {"version": "v9"}}])], 2,
        "spec.subsets[1].labels", "no endpoint of reviews.default.svc.cluster.local has labels {version: v9} "
        "(endpoint labels: {version: v1}, {version: v2})", base=False),
    "uri_regex": _case(_vs({"match": [{"uri": {"regex": "(unclosed"}}], "route": TO_REVIEWS}), 3,
                       "spec.http[0].match[0].uri.regex", "invalid regular expression '(unclosed'"),
    "uri_regex_ignore_case": _case(_vs({"match": [{"uri": {"regex": "["}, "ignoreUriCase": True}],
                                        "route": TO_REVIEWS}), 3, "spec.http[0].match[0].uri.regex",
                                   "invalid regular expression"),
    "header_regex": _case(_vs({"match": [{"headers": {"x-a": {"regex": "*"}}}], "route": TO_REVIEWS}), 3,
                          "spec.http[0].match[0].headers.x-a.regex", "invalid regular expression"),
    "query_regex": _case(_vs({"match": [{"queryParams": {"q": {"regex": "a)"}}}], "route": TO_REVIEWS}), 3,
                         "spec.http[0].match[0].queryParams.q.regex", "invalid regular expression"),
    "method_regex": _case(_vs({"match": [{"method": {"regex": "(GET"}}], "route": TO_REVIEWS}), 3,
                          "spec.http[0].match[0].method.regex", "invalid regular expression '(GET'"),
    "string_match_two_kinds": _case(_vs({"match": [{"uri": {"exact": "/a", "prefix": "/a"}}], "route": TO_REVIEWS}),
                                    3, "spec.http[0].match[0].uri.prefix",
                                    "set only one of exact, prefix, regex (got exact, prefix)"),
    "string_match_unknown": _case(_vs({"match": [{"headers": {"a": {"suffix": "x"}}}], "route": TO_REVIEWS}), 3,
                                  "spec.http[0].match[0].headers.a.suffix", "unknown field"),
    "string_match_type": _case(_vs({"match": [{"uri": "/a"}], "route": TO_REVIEWS}), 3,
                               "spec.http[0].match[0].uri", "expected a mapping, got a string"),
    "header_name": _case(_vs({"match": [{"headers": {"bad name": {"exact": "x"}}}], "route": TO_REVIEWS}), 3,
                         "spec.http[0].match[0].headers.bad name", "not a valid HTTP header name"),
    "match_not_list": _case(_vs({"match": {"uri": {"prefix": "/"}}, "route": TO_REVIEWS}), 3,
                            "spec.http[0].match", "expected a list, got a mapping"),
    "match_port": _case(_vs({"match": [{"port": 0}], "route": TO_REVIEWS}), 3, "spec.http[0].match[0].port",
                        "must be between 1 and 65535, got 0"),
    "match_source_labels": _case(_vs({"match": [{"sourceLabels": {"version": 1}}], "route": TO_REVIEWS}), 3,
                                 "spec.http[0].match[0].sourceLabels",
                                 "label 'version': values must be strings (quote them), got a number"),
    "ignore_uri_case_type": _case(_vs({"match": [{"ignoreUriCase": "yes"}], "route": TO_REVIEWS}), 3,
                                  "spec.http[0].match[0].ignoreUriCase", "expected true or false"),
    "no_action": _case(_vs({"match": [{"uri": {"prefix": "/"}}]}), 3, "spec.http[0].route",
                       "is required: an HTTP route needs route, redirect or directResponse"),
    "route_and_redirect": _case(_vs({"route": TO_REVIEWS, "redirect": {"uri": "/x"}}), 3, "spec.http[0].redirect",
                                "set only one of route, redirect, directResponse (got route, redirect)"),
    "rewrite_and_redirect": _case(_vs({"redirect": {"uri": "/x"}, "rewrite": {"uri": "/y"}}), 3,
                                  "spec.http[0].rewrite", "rewrite and redirect cannot be set together"),
    "redirect_code": _case(_vs({"redirect": {"uri": "/x", "redirectCode": 200}}), 3,
                           "spec.http[0].redirect.redirectCode", "must be between 300 and 399"),
    "direct_response_status": _case(_vs({"directResponse": {"body": {"string": "x"}}}), 3,
                                    "spec.http[0].directResponse.status", "is required"),
    "direct_response_body_both": _case(_vs({"directResponse": {"status": 200, "body": {"string": "a",
                                                                                       "bytes": "YQ=="}}}), 3,
                                       "spec.http[0].directResponse.body.bytes", "set only one of string, bytes"),
    "direct_response_base64": _case(_vs({"directResponse": {"status": 200, "body": {"bytes": "!!"}}}), 3,
                                    "spec.http[0].directResponse.body.bytes", "not valid base64"),
    "timeout": _case(_vs({"route": TO_REVIEWS, "timeout": "soon"}), 3, "spec.http[0].timeout",
                     "expected a duration like '250ms', '10s' or '1m30s', got 'soon'"),
    "timeout_number": _case(_vs({"route": TO_REVIEWS, "timeout": 5}), 3, "spec.http[0].timeout",
                            "expected a duration like '250ms', '10s' or '1m30s', got a number"),
    "timeout_negative": _case(_vs({"route": TO_REVIEWS, "timeout": "-1s"}), 3, "spec.http[0].timeout",
                              "expected a duration"),
    "retry_on": _case(_vs({"route": TO_REVIEWS, "retries": {"attempts": 2, "retryOn": "5xx,sometimes"}}), 3,
                      "spec.http[0].retries.retryOn", "unknown retry condition 'sometimes'"),
    "retry_attempts": _case(_vs({"route": TO_REVIEWS, "retries": {"attempts": -1}}), 3,
                            "spec.http[0].retries.attempts", "must be between 0 and 1000"),
    "per_try_timeout": _case(_vs({"route": TO_REVIEWS, "retries": {"attempts": 1, "perTryTimeout": "2"}}), 3,
                             "spec.http[0].retries.perTryTimeout", "expected a duration"),
    "fault_percentage": _case(_vs({"route": TO_REVIEWS, "fault": {"delay": {"fixedDelay": "1s",
                                                                            "percentage": {"value": 101}}}}), 3,
                              "spec.http[0].fault.delay.percentage.value", "must be between 0 and 100, got 101"),
    "fault_delay_required": _case(_vs({"route": TO_REVIEWS, "fault": {"delay": {"percentage": {"value": 1}}}}), 3,
                                  "spec.http[0].fault.delay.fixedDelay", "is required"),
    "fault_abort_required": _case(_vs({"route": TO_REVIEWS, "fault": {"abort": {"percentage": {"value": 1}}}}), 3,
                                  "spec.http[0].fault.abort.httpStatus", "is required (or grpcStatus)"),
    "fault_http_status": _case(_vs({"route": TO_REVIEWS, "fault": {"abort": {"httpStatus": 700}}}), 3,
                               "spec.http[0].fault.abort.httpStatus", "must be between 200 and 599, got 700"),
    "fault_grpc_status": _case(_vs({"route": TO_REVIEWS, "fault": {"abort": {"grpcStatus": "BROKEN"}}}), 3,
                               "spec.http[0].fault.abort.grpcStatus", "expected a gRPC status name"),
    "fault_two_percentages": _case(_vs({"route": TO_REVIEWS, "fault": {"delay": {
        "fixedDelay": "1s", "percent": 5, "percentage": {"value": 5}}}}), 3, "spec.http[0].fault.delay.percent",
        "set only one of percentage, percent"),
    "mirror_and_mirrors": _case(_vs({"route": TO_REVIEWS, "mirror": {"host": "reviews"},
                                     "mirrors": [{"destination": {"host": "reviews"}}]}), 3,
                                "spec.http[0].mirrors", "set only one of mirror, mirrors"),
    "mirror_percentage": _case(_vs({"route": TO_REVIEWS, "mirror": {"host": "reviews"},
                                    "mirrorPercentage": {"value": "all"}}), 3,
                               "spec.http[0].mirrorPercentage.value", "expected a number, got a string"),
    "header_ops_name": _case(_vs({"route": TO_REVIEWS, "headers": {"request": {"set": {"bad name": "x"}}}}), 3,
                             "spec.http[0].headers.request.set.bad name", "not a valid HTTP header name"),
    "header_ops_value": _case(_vs({"route": TO_REVIEWS, "headers": {"response": {"add": {"x": "a\r\nb: c"}}}}), 3,
                              "spec.http[0].headers.response.add.x", "control characters are not allowed"),
    "header_ops_remove": _case(_vs({"route": TO_REVIEWS, "headers": {"request": {"remove": "x-a"}}}), 3,
                               "spec.http[0].headers.request.remove", "expected a list"),
    "header_ops_unknown": _case(_vs({"route": TO_REVIEWS, "headers": {"request": {"append": {}}}}), 3,
                                "spec.http[0].headers.request.append", "unknown field"),
    "gateways_type": _case([_replace(virtual_service({"route": TO_REVIEWS}), "spec.gateways", "mesh")], 3,
                           "spec.gateways", "expected a list of strings"),
    "dr_host_missing": _case([resource("DestinationRule", {"subsets": []})], 1, "spec.host", "is required",
                             base=False),
    "dr_unknown_field": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {"simpel": "RANDOM"}})], 2,
                              "spec.trafficPolicy.loadBalancer.simpel", "unknown field", base=False),
    "lb_simple": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {"simple": "FASTEST"}})], 2,
                       "spec.trafficPolicy.loadBalancer.simple", "must be one of UNSPECIFIED, PASSTHROUGH, "
                       "ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM, got 'FASTEST'", base=False),
    "lb_simple_and_hash": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {
        "simple": "RANDOM", "consistentHash": {"useSourceIp": True}}})], 2,
        "spec.trafficPolicy.loadBalancer.consistentHash", "set only one of simple, consistentHash", base=False),
    "hash_two_keys": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {"consistentHash": {
        "httpHeaderName": "x", "useSourceIp": True}}})], 2,
        "spec.trafficPolicy.loadBalancer.consistentHash.useSourceIp",
        "set one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName (got httpHeaderName, "
        "useSourceIp)", base=False),
    "hash_no_key": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {"consistentHash": {
        "ringHash": {"minimumRingSize": 8}}}})], 2, "spec.trafficPolicy.loadBalancer.consistentHash",
        "set one of httpHeaderName", base=False),
    "hash_source_ip_false": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {"consistentHash": {
        "useSourceIp": False}}})], 2, "spec.trafficPolicy.loadBalancer.consistentHash.useSourceIp",
        "false selects nothing to hash on", base=False),
    "hash_cookie_name": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {"consistentHash": {
        "httpCookie": {"ttl": "0s"}}}})], 2, "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
        "is required", base=False),
    "maglev_prime": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {"consistentHash": {
        "useSourceIp": True, "maglev": {"tableSize": 1000}}}})], 2,
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize", "must be a prime number, got 1000",
        base=False),
    "ring_and_maglev": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {"consistentHash": {
        "useSourceIp": True, "maglev": {}, "ringHash": {}}}})], 2,
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev", "set only one of ringHash, maglev", base=False),
    "max_connections": _case([service_entry(), destination_rule(trafficPolicy={"connectionPool": {"tcp": {"maxConnections": -1}}})],
                             2, "spec.trafficPolicy.connectionPool.tcp.maxConnections", "must be between 0",
                             base=False),
    "connect_timeout": _case([service_entry(), destination_rule(trafficPolicy={"connectionPool": {"tcp": {"connectTimeout": "1d"}}})],
                             2, "spec.trafficPolicy.connectionPool.tcp.connectTimeout", "expected a duration",
                             base=False),
    "outlier_percent": _case([service_entry(), destination_rule(trafficPolicy={"outlierDetection": {"maxEjectionPercent": 150}})], 2,
                             "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "must be between 0 and 100",
                             base=False),
    "outlier_interval": _case([service_entry(), destination_rule(trafficPolicy={"outlierDetection": {"interval": 10}})], 2,
                              "spec.trafficPolicy.outlierDetection.interval", "expected a duration", base=False),
    "locality_enabled": _case([service_entry(), destination_rule(trafficPolicy={"loadBalancer": {"localityLbSetting": {
        "enabled": "yes"}}})], 2, "spec.trafficPolicy.loadBalancer.localityLbSetting.enabled",
        "expected true or false", base=False),
    "subset_name": _case([service_entry(), destination_rule(subsets=[{"labels": {"version": "v1"}}])], 2, "spec.subsets[0].name",
                         "is required", base=False),
    "subset_duplicate": _case([service_entry(), destination_rule(subsets=[{"name": "v1"}, {"name": "v1"}])], 2,
                              "spec.subsets[1].name", "duplicate subset name 'v1'", base=False),
    "subset_labels": _case([service_entry(), destination_rule(subsets=[{"name": "v1", "labels": ["version=v1"]}])], 2,
                           "spec.subsets[0].labels", "expected a mapping of label name to value", base=False),
    "subset_policy": _case([service_entry(), destination_rule(subsets=[{"name": "v1", "trafficPolicy": {"loadBalancer": {
        "simple": "SLOW"}}}])], 2, "spec.subsets[0].trafficPolicy.loadBalancer.simple", "must be one of",
        base=False),
    "se_hosts": _case([_replace(service_entry(), "spec.hosts", _DELETE)], 1, "spec.hosts", "is required",
                      base=False),
    "se_ports_missing": _case([_replace(service_entry(), "spec.ports", _DELETE)], 1, "spec.ports", "is required",
                              base=False),
    "se_ports_empty": _case([service_entry(ports=[])], 1, "spec.ports", "a ServiceEntry needs at least one port",
                            base=False),
    "se_port_number": _case([service_entry(ports=[{"number": 70000, "name": "http"}])], 1,
                            "spec.ports[0].number", "must be between 1 and 65535", base=False),
    "se_port_name": _case([service_entry(ports=[{"number": 80}])], 1, "spec.ports[0].name", "is required",
                          base=False),
    "se_port_duplicate": _case([service_entry(ports=[{"number": 80, "name": "a"}, {"number": 80, "name": "b"}])], 1,
                               "spec.ports[1].number", "duplicate port 80", base=False),
    "se_port_name_duplicate": _case([service_entry(ports=[{"number": 80, "name": "a"},
                                                          {"number": 81, "name": "a"}])], 1,
                                    "spec.ports[1].name", "duplicate port name 'a'", base=False),
    "se_resolution": _case([service_entry(resolution="MAGIC")], 1, "spec.resolution",
                           "must be one of NONE, STATIC, DNS, DNS_ROUND_ROBIN, got 'MAGIC'", base=False),
    "se_location": _case([service_entry(location="ELSEWHERE")], 1, "spec.location",
                         "must be one of MESH_EXTERNAL, MESH_INTERNAL", base=False),
    "se_static_address": _case([service_entry(endpoints=[{"address": "reviews-1.local"}])], 1,
                               "spec.endpoints[0].address",
                               "resolution STATIC needs an IP address, got 'reviews-1.local'", base=False),
    "se_endpoint_port_name": _case([service_entry(endpoints=[{"address": "10.0.0.1", "ports": {"grpc": 9}}])], 1,
                                   "spec.endpoints[0].ports.grpc", "no port named 'grpc' in spec.ports (names: http)",
                                   base=False),
    "se_endpoint_port_number": _case([service_entry(endpoints=[{"address": "10.0.0.1", "ports": {"http": "x"}}])], 1,
                                     "spec.endpoints[0].ports.http", "expected an integer", base=False),
    "se_endpoint_weight": _case([service_entry(endpoints=[{"address": "10.0.0.1", "weight": -2}])], 1,
                                "spec.endpoints[0].weight", "must be between 0", base=False),
    "se_none_with_endpoints": _case([service_entry(resolution="NONE")], 1, "spec.endpoints",
                                    "endpoints need resolution STATIC or DNS", base=False),
    "se_dns_wildcard": _case([service_entry(hosts=["*.example.com"], resolution="DNS", endpoints=[])], 1,
                             "spec.hosts[0]", "a wildcard host with resolution DNS needs endpoints", base=False),
}


def _make_invalid_test(documents: list[Any], number: int, field: str, reason: str,
                       base: bool) -> Callable[[InvalidTests], None]:
    def test(self: InvalidTests) -> None:
        self.assertInvalid(documents, number, field, reason, base)
    return test


class InvalidTests(SynchronousTestCase):
    """
    Every invalid document is refused with its file, document number,
    field path and reason.
    """

    def assertInvalid(self, documents: list[Any], number: int, field: str, reason: str, base: bool) -> ConfigError:
        run_ = with_base if base else run
        with self.assertRaises(ConfigError) as cm:
            run_(*documents)
        e = cm.exception
        self.assertEqual((e.source, e.document, e.field), (FILE, number, field))
        self.assertIn(reason, e.reason)
        prefix = f"{FILE}: document {number}: " + (f"{field}: " if field else "")
        self.assertTrue(str(e).startswith(prefix), str(e))
        self.assertIn(reason, str(e))
        return e

    def test_unknown_field_lists_known(self):
        e = self.assertInvalid(_vs({"route": TO_REVIEWS, "rout": []}), 3, "spec.http[0].rout", "unknown field", True)
        for known in ("route", "match", "retries", "fault", "mirror", "headers", "corsPolicy"):
            self.assertIn(known, e.reason)

    def test_partial_skips_each_invalid_case(self):
        """
        With C{partial}, every invalid document is skipped with a warning
        naming file, document, field and reason.
        """
        for name, (documents, number, field, reason, base) in INVALID.items():
            config = (with_base if base else run)(*documents, partial=True)
            [skipped] = [w for w in config.warnings if w.document == number and w.message.startswith("document")]
            self.assertEqual((skipped.source, skipped.field), (FILE, field), name)
            self.assertIn(reason, skipped.message, name)


for _name, _case_ in INVALID.items():
    setattr(InvalidTests, f"test_{_name}", _make_invalid_test(*_case_))
del _name, _case_


# (documents after the two base documents, (document, field, message fragment) of the expected warnings)
WARNINGS: dict[str, tuple[list[Any], list[tuple[int, str, str]]]] = {
    "vs_export_to": (_vs({"route": TO_REVIEWS}, exportTo=["."]), [(3, "spec.exportTo", "visibility")]),
    "vs_tcp": (_vs({"route": TO_REVIEWS}, tcp=[{"route": []}]), [(3, "spec.tcp", "TCP routes are served by gateways only")]),
    "vs_tls": (_vs({"route": TO_REVIEWS}, tls=[{"route": []}]), [(3, "spec.tls", "TLS routes are served by gateways only")]),
    "cors": (_vs({"route": TO_REVIEWS, "corsPolicy": {"allowOrigins": [{"exact": "x"}]}}),
             [(3, "spec.http[0].corsPolicy", "not supported")]),
    "delegate": (_vs({"delegate": {"name": "other"}}, {"route": TO_REVIEWS}),
                 [(3, "spec.http[0].delegate", "delegate VirtualServices are not supported")]),
    "authority": (_vs({"match": [{"authority": {"exact": "a"}}], "route": TO_REVIEWS}),
                  [(3, "spec.http[0].match[0].authority", "takes more requests than it would in Istio")]),
    "scheme": (_vs({"match": [{"scheme": {"exact": "https"}}], "route": TO_REVIEWS}),
               [(3, "spec.http[0].match[0].scheme", "takes more requests")]),
    "source_namespace": (_vs({"match": [{"sourceNamespace": "shop"}], "route": TO_REVIEWS}),
                         [(3, "spec.http[0].match[0].sourceNamespace", "takes more requests")]),
    "stat_prefix": (_vs({"match": [{"statPrefix": "x"}], "route": TO_REVIEWS}),
                    [(3, "spec.http[0].match[0].statPrefix", "stats prefixes")]),
    "rewrite_exact": (_vs({"match": [{"uri": {"exact": "/a"}}, {"uri": {"prefix": "/b"}}], "rewrite": {"uri": "/c"},
                           "route": TO_REVIEWS}),
                      [(3, "spec.http[0].rewrite.uri", "rewrites only a uri prefix match; not applied to "
                                                       "spec.http[0].match[0]")]),
    "rewrite_regex": (_vs({"rewrite": {"uriRegexRewrite": {"match": "a", "rewrite": "b"}}, "route": TO_REVIEWS}),
                      [(3, "spec.http[0].rewrite.uriRegexRewrite", "regex rewrites are not supported")]),
    "retry_unsupported": (_vs({"route": TO_REVIEWS, "retries": {"attempts": 2, "retryOn": "envoy-ratelimited",
                                                                "retryRemoteLocalities": True}}),
                          [(3, "spec.http[0].retries.retryRemoteLocalities", "not supported"),
                           (3, "spec.http[0].retries.retryOn", "'envoy-ratelimited' is not supported")]),
    "retries_on_redirect": (_vs({"redirect": {"uri": "/x"}, "retries": {"attempts": 2}}),
                            [(3, "spec.http[0].retries", "no effect on a redirect route")]),
    "mirror_on_direct_response": (_vs({"directResponse": {"status": 200}, "mirror": {"host": "reviews"}}),
                                  [(3, "spec.http[0].mirror", "no effect on a directResponse route")]),
    "mirrors_several": (_vs({"route": TO_REVIEWS, "mirrors": [{"destination": {"host": "reviews"}},
                                                              {"destination": {"host": "reviews"}}]}),
                        [(3, "spec.http[0].mirrors[1]", "only mirrors[0] is used")]),
    "mirror_percentage_alone": (_vs({"route": TO_REVIEWS, "mirrorPercentage": {"value": 5}}),
                                [(3, "spec.http[0].mirrorPercentage", "no mirror is set")]),
    "fault_http2_error": (_vs({"route": TO_REVIEWS, "fault": {"abort": {"http2Error": "REFUSED_STREAM"}}}),
                          [(3, "spec.http[0].fault.abort.http2Error", "not supported"),
                           (3, "spec.http[0].fault", "no fault is injected")]),
    "fault_exponential": (_vs({"route": TO_REVIEWS, "fault": {"delay": {"exponentialDelay": "1s"}}}),
                          [(3, "spec.http[0].fault.delay.exponentialDelay", "not supported"),
                           (3, "spec.http[0].fault", "no fault is injected")]),
    "redirect_derive_port": (_vs({"redirect": {"uri": "/x", "derivePort": "FROM_REQUEST_PORT"}}),
                             [(3, "spec.http[0].redirect.derivePort", "not supported")]),
    "ignored_kind": ([{"apiVersion": API, "kind": "Sidecar", "metadata": {"name": "sc"}, "spec": {}}],
                     [(3, "kind", "Sidecar is not supported by txmesh; document ignored")]),
    "passthrough": ([], [(2, "spec.trafficPolicy.loadBalancer.simple", "PASSTHROUGH")]),
    "dr_tls": ([], [(2, "spec.trafficPolicy.tls.mode", "needs the mesh CA")]),
    "dr_port_level": ([], [(2, "spec.trafficPolicy.portLevelSettings", "per-port policies")]),
    "locality_details": ([], [(2, "spec.trafficPolicy.loadBalancer.localityLbSetting.failover",
                               "explicit failover regions")]),
    "pool_unsupported": ([], [(2, "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive", "not supported")]),
    "outlier_unsupported": ([], [(2, "spec.trafficPolicy.outlierDetection.minHealthPercent", "maxEjectionPercent"),
                                 (2, "spec.trafficPolicy.outlierDetection.consecutiveErrors", "deprecated")]),
    "warmup": ([], [(2, "spec.trafficPolicy.loadBalancer.warmupDurationSecs", "slow start")]),
    "cookie_ttl": ([], [(2, "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl", "does not set one")]),
    "subset_policy_differs": ([], [(2, "spec.subsets[0].trafficPolicy.outlierDetection",
                                    "differs from the rule's trafficPolicy")]),
    "dr_unused": ([resource("DestinationRule", {"host": "ratings"}, name="ratings")],
                  [(3, "spec.host", "ratings.default.svc.cluster.local matches no service known here")]),
    "domain_taken": (_vs({"route": TO_REVIEWS}) + _vs({"route": TO_REVIEWS}, name="reviews-too"),
                     [(4, "spec.hosts[0]", "already routed by VirtualService 'default/reviews'; the first one wins")]),
    "replaced": (_vs({"route": TO_REVIEWS}) + _vs({"route": TO_REVIEWS}),
                 [(3, "metadata.name", f"replaced by default/reviews in {FILE}, document 4 (the later document "
                                       f"wins, as with kubectl apply)")]),
    "se_duplicate_host": ([dict(service_entry(), metadata={"name": "reviews-again"})],
                          [(3, "spec.hosts[0]", "reviews.default.svc.cluster.local is already defined by ServiceEntry "
                                                f"'reviews' ({FILE}, document 1); ignored here")]),
    "se_addresses": ([resource("ServiceEntry", {"hosts": ["api.example.com"], "addresses": ["240.0.0.1"],
                                                "ports": [{"number": 80, "name": "http"}], "resolution": "DNS"},
                               name="api")],
                     [(3, "spec.addresses", "virtual IPs are not supported")]),
    "se_resolution_none": ([resource("ServiceEntry", {"hosts": ["api.example.com"],
                                                      "ports": [{"number": 80, "name": "http"}]}, name="api")],
                           [(3, "spec.resolution", "NONE (pass through to the original destination)"),
                            (3, "spec.hosts[0]", "api.example.com has no endpoints")]),
    "se_protocol": ([resource("ServiceEntry", {"hosts": ["api.example.com"], "resolution": "DNS",
                                               "ports": [{"number": 80, "name": "grpc", "protocol": "GRPC"},
                                                         {"number": 443, "name": "tls", "protocol": "TLS"}]},
                              name="api")],
                    [(3, "spec.ports[1].protocol", "TLS: not supported by txmesh; traffic is opaque TCP")]),
    "se_endpoint_network": ([resource("ServiceEntry", {"hosts": ["api.example.com"], "resolution": "DNS",
                                                       "ports": [{"number": 80, "name": "http"}],
                                                       "endpoints": [{"address": "a.example.com", "network": "n1",
                                                                      "serviceAccount": "sa"}]}, name="api")],
                            [(3, "spec.endpoints[0].network", "multi-network")]),
    "several_ports": ([], [(3, "spec.http[0].route[0].destination.port",
                            "has several ports (9080, 9090); none given, using 9080")]),
}

_DR_WARNINGS = {
    "passthrough": {"loadBalancer": {"simple": "PASSTHROUGH"}},
    "dr_tls": {"tls": {"mode": "ISTIO_MUTUAL"}},
    "dr_port_level": {"portLevelSettings": [{"port": {"number": 80}}]},
    "locality_details": {"loadBalancer": {"localityLbSetting": {"enabled": True,
                                                                "failover": [{"from": "a", "to": "b"}]}}},
    "pool_unsupported": {"connectionPool": {"http": {"maxRetries": 3}, "tcp": {"tcpKeepalive": {"time": "1s"}}}},
    "outlier_unsupported": {"outlierDetection": {"minHealthPercent": 50, "consecutiveErrors": 3}},
    "warmup": {"loadBalancer": {"warmupDurationSecs": "10s"}},
    "cookie_ttl": {"loadBalancer": {"consistentHash": {"httpCookie": {"name": "s", "ttl": "10s"}}}},
}


class WarningTests(SynchronousTestCase):
    """
    Valid fields that txmesh does not apply are warnings naming the field.
    """

    def translate_case(self, name: str) -> IstioConfig:
        documents, _ = WARNINGS[name]
        if name in _DR_WARNINGS:
            return run(service_entry(), destination_rule(trafficPolicy=_DR_WARNINGS[name]), *documents)
        if name == "subset_policy_differs":
            return run(service_entry(), destination_rule(subsets=[{"name": "v1", "labels": {"version": "v1"},
                                                                   "trafficPolicy": {"outlierDetection": {}}}]))
        if name == "several_ports":
            return run(service_entry(ports=[{"number": 9080, "name": "http"}, {"number": 9090, "name": "admin"}]),
                       destination_rule(), virtual_service({"route": TO_REVIEWS}))
        return with_base(*documents)

    def test_table(self):
        for name, (_, expected) in WARNINGS.items():
            config = self.translate_case(name)
            got = [(w.document, w.field, w.message) for w in config.warnings]
            self.assertEqual(len(got), len(expected), (name, got))
            for (document, field, message), (gd, gf, gm) in zip(expected, got, strict=True):
                self.assertEqual((gd, gf), (document, field), (name, got))
                self.assertIn(message, gm, name)
            for w in config.warnings:
                self.assertEqual(w.source, FILE)

    def test_ignored_route_keeps_others(self):
        config = with_base(virtual_service({"delegate": {"name": "other"}}, {"route": TO_REVIEWS}))
        self.assertEqual([r.name for r in routes_of(config)], ["default/reviews/http[1]"])

    def test_gateway_only_virtual_service_is_skipped(self):
        config = with_base(virtual_service({"route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                                           gateways=["ingress"]))
        self.assertEqual([vh.name for vh in config.virtual_hosts], ["reviews.default.svc.cluster.local:9080"])
        # Bound to a gateway: served by gateway proxies, silently not here.
        self.assertEqual(warnings_text(config), [])

    def test_gateways_with_mesh_apply(self):
        config = with_base(virtual_service({"route": TO_REVIEWS}, gateways=["ingress", "mesh"]))
        self.assertEqual(len(routes_of(config)), 1)
        self.assertEqual(config.warnings, ())

    def test_match_gateways_override_virtual_service(self):
        config = with_base(virtual_service(
            {"match": [{"gateways": ["mesh"], "uri": {"prefix": "/m"}}, {"uri": {"prefix": "/g"}}],
             "route": TO_REVIEWS}, gateways=["ingress"]))
        self.assertEqual([r.match for r in routes_of(config)], [RouteMatch(prefix=b"/m")])

    def test_domain_taken_first_wins(self):
        config = with_base(virtual_service({"route": TO_REVIEWS}),
                           virtual_service({"route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                                           hosts=("reviews", "reviews-alias.example.com"), name="reviews-too"))
        first, second = config.virtual_hosts
        self.assertEqual(second.domains, ("reviews-alias.example.com",))
        self.assertIn("reviews:9080", first.domains)

    def test_warning_str(self):
        self.assertEqual(str(IstioWarning("a.yaml", 2, "spec.tls", "ignored")), "a.yaml: document 2: spec.tls: ignored")
        self.assertEqual(str(IstioWarning(None, 1, "", "skipped")), "document 1: skipped")


class DocumentTests(SynchronousTestCase):
    """
    Multi-document input: numbering, files, empty documents, partial loads.
    """

    def test_multi_document_yaml(self):
        text = textwrap.dedent("""\
            ---
            apiVersion: networking.istio.io/v1beta1
            kind: ServiceEntry
            metadata: {name: reviews}
            spec:
              hosts: [reviews]
              ports: [{number: 9080, name: http}]
              resolution: STATIC
              endpoints: [{address: 10.0.0.1, labels: {version: v1}}]
            ---
            ---
            apiVersion: networking.istio.io/v1alpha3
            kind: VirtualService
            metadata: {name: reviews}
            spec:
              hosts: [reviews]
              http:
              - route:
                - destination: {host: reviews, subset: v1}
            """)
        documents = [("a.yaml", i, d) for i, d in enumerate(yaml.safe_load_all(text), start=1)]
        self.assertEqual([d is None for _, _, d in documents], [False, True, False])
        with self.assertRaises(ConfigError) as cm:
            translate(documents)
        self.assertEqual(str(cm.exception),
                         "a.yaml: document 3: spec.http[0].route[0].destination.subset: subset 'v1' is not defined: "
                         "no DestinationRule for reviews.default.svc.cluster.local")

    def test_documents_from_several_files(self):
        with self.assertRaises(ConfigError) as cm:
            translate([("se.yaml", 1, service_entry()), ("dr.yaml", 1, destination_rule()),
                       ("vs.yaml", 1, virtual_service({"route": TO_REVIEWS})),
                       ("vs.yaml", 2, virtual_service({"route": _TWO}, name="b"))])
        self.assertEqual((cm.exception.source, cm.exception.document), ("vs.yaml", 2))

    def test_resources_across_files_combine(self):
        config = translate([("vs.yaml", 1, virtual_service({"route": [
            {"destination": {"host": "reviews", "subset": "v2"}}]})),
            ("se.yaml", 1, service_entry()), ("dr.yaml", 1, destination_rule())])
        self.assertEqual(routes_of(config)[0].destinations, (WeightedDestination(REVIEWS, subset="v2"),))

    def test_partial_skips_invalid_documents(self):
        config = run(
            service_entry(),
            destination_rule(subsets=[{"name": "v1", "labels": {"version": "v1"}},
                                      {"name": "v9", "labels": {"version": "v9"}}], exportTo=["."]),
            virtual_service({"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}),
            virtual_service({"route": _TWO}, name="split", hosts=("reviews-split",)),
            partial=True,
        )
        self.assertEqual(warnings_text(config), [
            f"{FILE}: document 2: spec.subsets[1].labels: document skipped: no endpoint of "
            f"reviews.default.svc.cluster.local has labels {{version: v9}} (endpoint labels: {{version: v1}}, "
            f"{{version: v2}})",
            f"{FILE}: document 3: spec.http[0].route[0].destination.subset: document skipped: subset 'v1' is not "
            f"defined: no DestinationRule for reviews.default.svc.cluster.local",
            f"{FILE}: document 4: spec.http[0].route[1].weight: document skipped: the weights of the route's "
            f"destinations sum to 110; they must sum to 100",
        ])
        # The ServiceEntry still loads, with its default route.
        self.assertEqual([c.name for c in config.clusters], [REVIEWS])
        self.assertEqual(cluster(config).subsets, ())
        self.assertEqual([vh.name for vh in config.virtual_hosts], ["reviews.default.svc.cluster.local:9080"])

    def test_not_partial_refuses_everything(self):
        with self.assertRaises(ConfigError):
            run(service_entry(), virtual_service({"route": _TWO}))

    def test_empty(self):
        self.assertEqual(translate([]), IstioConfig())
        self.assertEqual(translate([(FILE, 1, None)]), IstioConfig())


class ConfigErrorTests(SynchronousTestCase):
    """
    L{ConfigError}'s optional document number.
    """

    def test_without_document_unchanged(self):
        e = ConfigError("a.yaml", "x.y", "bad")
        self.assertEqual((str(e), e.document), ("a.yaml: x.y: bad", None))

    def test_with_document(self):
        e = ConfigError("a.yaml", "spec.host", "bad", document=3)
        self.assertEqual(str(e), "a.yaml: document 3: spec.host: bad")
        self.assertEqual(e.args, ("a.yaml: document 3: spec.host: bad",))


def _write(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text))
    return path


ISTIO_FILE = """\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: reviews}
    spec:
      hosts: [reviews]
      ports: [{number: 9080, name: http}]
      resolution: STATIC
      endpoints:
        - {address: 127.0.0.1, ports: {http: 19082}, labels: {version: v1}}
        - {address: 127.0.0.1, ports: {http: 19083}, labels: {version: v2}}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews}
    spec:
      host: reviews
      exportTo: ["."]
      subsets:
        - {name: v1, labels: {version: v1}}
        - {name: v2, labels: {version: v2}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews}
    spec:
      hosts: [reviews]
      http:
        - route:
            - {destination: {host: reviews, subset: v1}, weight: 90}
            - {destination: {host: reviews, subset: v2}, weight: 10}
    """

PROXY = """\
    istio:
      files: [istio/reviews.yaml]
    clusters: [{name: local, endpoints: ["127.0.0.1:8080"]}]
    listeners:
      - name: outbound
        address: "tcp:0"
        istio_routes: true
        virtual_hosts: [{name: local, domains: [local], routes: [{cluster: local}]}]
      - name: inbound
        address: "tcp:1"
        routes: [{cluster: local}]
      - name: direct
        address: "tcp:2"
        routes: [{cluster: "outbound|9080||reviews.default.svc.cluster.local"}]
    """


class LoaderTests(SynchronousTestCase):
    """
    The proxy config's C{istio:} section and listeners' C{istio_routes}.
    """

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(os.path.join(self.dir, "istio"))
        self.istio = _write(self.dir, "istio/reviews.yaml", ISTIO_FILE)
        self.loader = ConfigLoader(FilterRegistry(http=[RouterFactory()]))

    def load(self, text: str):
        return self.loader.load_file(_write(self.dir, "proxy.yaml", text))

    def assertInvalid(self, text: str, source: str, field: str, reason: str, document: int | None = None):
        with self.assertRaises(ConfigError) as cm:
            self.load(text)
        e = cm.exception
        self.assertEqual((e.source, e.field, e.document), (source, field, document))
        self.assertIn(reason, e.reason)
        return e

    def test_loads(self):
        config = self.load(PROXY)
        self.assertEqual([c.name for c in config.clusters], ["local", REVIEWS])
        self.assertEqual(config.clusters[1].subsets[1], SubsetConfig("v2", (("version", "v2"),)))
        outbound, inbound, direct = config.listeners
        self.assertEqual([vh.name for vh in outbound.virtual_hosts], ["local", "default/reviews"])
        self.assertEqual([vh.name for vh in inbound.virtual_hosts], ["default"])
        [route] = outbound.virtual_hosts[1].routes
        self.assertEqual(route.destinations, (WeightedDestination(REVIEWS, 90, "v1"),
                                              WeightedDestination(REVIEWS, 10, "v2")))
        self.assertEqual(direct.virtual_hosts[0].routes[0].cluster, REVIEWS)
        self.assertEqual(config.warnings, (
            f"{self.istio}: document 2: spec.exportTo: visibility is not supported by txmesh; "
            f"the rule applies to this proxy",))

    def test_istio_routes_alone(self):
        config = self.load("""\
            istio: {files: [istio/reviews.yaml], namespace: default, partial: false}
            listeners: [{name: outbound, address: "tcp:0", istio_routes: true}]
            """)
        self.assertEqual([vh.name for vh in config.listeners[0].virtual_hosts], ["default/reviews"])

    def test_namespace_and_domain_suffix(self):
        config = self.load("""\
            istio: {files: [istio/reviews.yaml], namespace: shop, domain_suffix: svc.mesh}
            listeners: [{name: outbound, address: "tcp:0", istio_routes: true}]
            """)
        self.assertEqual([c.name for c in config.clusters], ["outbound|9080||reviews.shop.svc.mesh"])

    def test_absolute_path(self):
        config = self.load(f"""\
            istio: {{files: ["{os.path.abspath(self.istio)}"]}}
            listeners: [{{name: outbound, address: "tcp:0", istio_routes: true}}]
            """)
        self.assertEqual(len(config.clusters), 1)

    def test_no_istio_section_no_warnings(self):
        config = self.load("""\
            clusters: [{name: local, endpoints: ["127.0.0.1:8080"]}]
            listeners: [{name: l, address: "tcp:0", routes: [{cluster: local}]}]
            """)
        self.assertEqual(config.warnings, ())

    def test_istio_routes_needs_istio(self):
        self.assertInvalid("""\
            clusters: [{name: local, endpoints: ["127.0.0.1:8080"]}]
            listeners: [{name: l, address: "tcp:0", routes: [{cluster: local}], istio_routes: true}]
            """, os.path.join(self.dir, "proxy.yaml"), "listeners[0].istio_routes",
            "needs a top-level 'istio' section")

    def test_istio_routes_type(self):
        self.assertInvalid("""\
            istio: {files: [istio/reviews.yaml]}
            listeners: [{name: l, address: "tcp:0", istio_routes: "yes"}]
            """, os.path.join(self.dir, "proxy.yaml"), "listeners[0].istio_routes", "expected true or false")

    def test_istio_routes_not_on_tcp(self):
        self.assertInvalid("""\
            istio: {files: [istio/reviews.yaml]}
            listeners:
              - {name: l, address: "tcp:0", protocol: tcp, cluster: "outbound|9080||reviews.default.svc.cluster.local",
                 istio_routes: true}
            """, os.path.join(self.dir, "proxy.yaml"), "listeners[0].istio_routes", "unknown field")

    def test_cluster_name_clash(self):
        self.assertInvalid("""\
            istio: {files: [istio/reviews.yaml]}
            clusters: [{name: "outbound|9080||reviews.default.svc.cluster.local", endpoints: ["127.0.0.1:1"]}]
            listeners: [{name: l, address: "tcp:0", istio_routes: true}]
            """, os.path.join(self.dir, "proxy.yaml"), "clusters[0].name",
            "cluster name 'outbound|9080||reviews.default.svc.cluster.local' is also the name of a cluster "
            "translated from the istio files")

    def test_missing_file(self):
        self.assertInvalid("""\
            istio: {files: [istio/reviews.yaml, istio/nope.yaml]}
            listeners: [{name: l, address: "tcp:0", istio_routes: true}]
            """, os.path.join(self.dir, "proxy.yaml"), "istio.files[1]",
            f"cannot read {os.path.join(self.dir, 'istio/nope.yaml')}: No such file or directory")

    def test_section_fields(self):
        proxy = os.path.join(self.dir, "proxy.yaml")
        for section, field, reason in (
            ("{}", "istio.files", "is required"),
            ("{files: []}", "istio.files", "list at least one file"),
            ("{files: [3]}", "istio.files[0]", "expected a non-empty string"),
            ("{files: [istio/reviews.yaml], partial: 1}", "istio.partial", "expected true or false"),
            ("{files: [istio/reviews.yaml], namespace: ''}", "istio.namespace", "expected a non-empty string"),
            ("{files: [istio/reviews.yaml], namespaces: [a]}", "istio.namespaces", "unknown field"),
            ("[istio/reviews.yaml]", "istio", "expected a mapping"),
        ):
            self.assertInvalid(f"istio: {section}\nlisteners: [{{name: l, address: 'tcp:0', istio_routes: true}}]\n",
                               proxy, field, reason)

    def test_invalid_istio_document(self):
        _write(self.dir, "istio/reviews.yaml", ISTIO_FILE.replace("weight: 10", "weight: 20"))
        e = self.assertInvalid(PROXY, self.istio, "spec.http[0].route[1].weight", "sum to 110", document=3)
        self.assertEqual(str(e), f"{self.istio}: document 3: spec.http[0].route[1].weight: the weights of the "
                                 f"route's destinations sum to 110; they must sum to 100")

    def test_invalid_istio_document_partial(self):
        _write(self.dir, "istio/reviews.yaml", ISTIO_FILE.replace("weight: 10", "weight: 20"))
        config = self.load(PROXY.replace("files: [istio/reviews.yaml]",
                                         "files: [istio/reviews.yaml]\n      partial: true"))
        self.assertEqual([c.name for c in config.clusters], ["local", REVIEWS])
        self.assertEqual([vh.name for vh in config.listeners[0].virtual_hosts],
                         ["local", "reviews.default.svc.cluster.local:9080"])
        self.assertIn(f"{self.istio}: document 3: spec.http[0].route[1].weight: document skipped: the weights",
                      config.warnings[-1])

    def test_yaml_error(self):
        _write(self.dir, "istio/reviews.yaml", textwrap.dedent(ISTIO_FILE) + "---\nkind: [unclosed\n")
        e = self.assertInvalid(PROXY, self.istio, "", "not valid YAML: line", document=4)
        self.assertTrue(str(e).startswith(f"{self.istio}: document 4: not valid YAML: line"), str(e))

    def test_yaml_error_partial_keeps_earlier_documents(self):
        _write(self.dir, "istio/reviews.yaml", textwrap.dedent(ISTIO_FILE) + "---\nkind: [unclosed\n")
        config = self.load(PROXY.replace("files: [istio/reviews.yaml]",
                                         "files: [istio/reviews.yaml]\n      partial: true"))
        self.assertEqual([vh.name for vh in config.listeners[0].virtual_hosts], ["local", "default/reviews"])
        self.assertIn(f"{self.istio}: document 4: not valid YAML: line", config.warnings[0])
        self.assertIn("this and later documents of the file are skipped", config.warnings[0])

    def test_reload_keeps_the_last_good_config(self):
        """
        An invalid Istio file refuses the whole config, as any invalid
        config does: a reloading service keeps its last good one.
        """
        good = self.load(PROXY)
        _write(self.dir, "istio/reviews.yaml", ISTIO_FILE.replace("subset: v2", "subset: v3"))
        with self.assertRaises(ConfigError):
            self.load(PROXY)
        self.assertEqual(len(good.clusters), 2)


class BookinfoTests(SynchronousTestCase):
    """
    The Bookinfo example in C{examples/bookinfo} loads and routes as its
    comments say.
    """

    def setUp(self):
        self.loader = ConfigLoader(FilterRegistry.from_plugins())

    def load(self, name: str = "proxy.yaml"):
        return self.loader.load_file(os.path.join(BOOKINFO, name))

    def routes(self, config, service: str) -> dict[str, Route]:
        [outbound] = [lst for lst in config.listeners if lst.name == "outbound"]
        [vh] = [vh for vh in outbound.virtual_hosts if vh.name == f"default/{service}"]
        return {r.name: r for r in vh.routes}

    def test_validate(self):
        out, err = io.StringIO(), io.StringIO()
        paths = [os.path.join(BOOKINFO, "proxy.yaml"), os.path.join(BOOKINFO, "proxy-v3-rollout.yaml")]
        self.assertEqual(validate(paths, out, err), 0, err.getvalue())
        self.assertIn("2 listener(s), 5 cluster(s)", out.getvalue())

    def test_no_warnings(self):
        self.assertEqual(self.load().warnings, ())

    def test_clusters(self):
        config = self.load()
        self.assertEqual([c.name for c in config.clusters], [
            "inbound|9080||productpage",
            "outbound|9080||productpage.default.svc.cluster.local",
            "outbound|9080||details.default.svc.cluster.local",
            REVIEWS,
            "outbound|9080||ratings.default.svc.cluster.local",
        ])
        reviews = config.cluster(REVIEWS)
        self.assertEqual([(e.host, e.port, e.label("version")) for e in reviews.endpoints],
                         [("127.0.0.1", 19082, "v1"), ("127.0.0.1", 19083, "v2"), ("127.0.0.1", 19084, "v3")])
        self.assertEqual([s.name for s in reviews.subsets], ["v1", "v2", "v3"])
        self.assertEqual(reviews.lb_policy, "least_request")
        self.assertEqual(reviews.circuit_breaker, CircuitBreakerConfig(max_connections=100, max_pending_requests=32,
                                                                       max_requests_per_connection=100))
        self.assertEqual(reviews.outlier_detection.max_ejection_percent, 50)
        ratings = config.cluster("outbound|9080||ratings.default.svc.cluster.local")
        self.assertEqual(ratings.outlier_detection.consecutive_gateway_errors, 3)
        ports = sorted(e.port for c in config.clusters for e in c.endpoints)
        self.assertTrue(all(19080 <= p <= 19099 for p in ports), ports)

    def test_reviews_ab_and_canary(self):
        routes = self.routes(self.load(), "reviews")
        self.assertEqual(list(routes), ["jason-sees-v2", "canary"])
        jason = routes["jason-sees-v2"]
        self.assertEqual(jason.match.headers, (HeaderMatch(b"end-user", exact=b"jason"),))
        self.assertEqual(jason.destinations, (WeightedDestination(REVIEWS, 100, "v2"),))
        self.assertEqual([(d.subset, d.weight) for d in routes["canary"].destinations], [("v1", 90), ("v2", 10)])

    def test_ratings_fault_and_retries(self):
        routes = self.routes(self.load(), "ratings")
        self.assertEqual(routes["jason-delayed"].fault, FaultPolicy(delay=2.0, delay_percent=100.0))
        self.assertEqual(routes["retried"].retry, RetryPolicy(
            attempts=3, per_try_timeout=2.0, retry_on=frozenset({"5xx", "connect-failure", "reset"})))
        self.assertEqual(routes["retried"].timeout, 10.0)

    def test_v3_rollout(self):
        config = self.load("proxy-v3-rollout.yaml")
        routes = self.routes(config, "reviews")
        self.assertEqual(list(routes), ["jason-sees-v2", "v3-rollout"])
        self.assertEqual([(d.subset, d.weight) for d in routes["v3-rollout"].destinations], [("v1", 75), ("v3", 25)])
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("virtual-services.yaml: document 3: metadata.name: replaced by default/reviews",
                      config.warnings[0])

    def test_every_file_is_istio(self):
        """
        Every YAML document in the example, except the proxy configs, is a
        valid Istio resource of a supported kind.
        """
        for name in sorted(os.listdir(BOOKINFO)):
            if not name.endswith(".yaml") or name.startswith("proxy"):
                continue
            with open(os.path.join(BOOKINFO, name), encoding="utf-8") as f:
                documents = list(yaml.safe_load_all(f))
            for d in documents:
                self.assertIn(d["apiVersion"], API_VERSIONS, name)
                self.assertIn(d["kind"], ("ServiceEntry", "DestinationRule", "VirtualService"), name)

    def test_domains(self):
        config = self.load()
        [outbound] = [lst for lst in config.listeners if lst.name == "outbound"]
        domains = {d: vh.name for vh in outbound.virtual_hosts for d in vh.domains}
        for host in ("reviews", "reviews:9080", "reviews.default", "reviews.default.svc.cluster.local:9080"):
            self.assertEqual(domains[host], "default/reviews")
        self.assertEqual(domains["productpage"], "default/productpage")



class RetryStatusCodeTests(SynchronousTestCase):
    def test_numeric_retry_on(self):
        """
        Numeric codes in C{retryOn} are retriable status codes, as in Istio.
        """
        from txmesh.config.istio import translate

        doc = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "r"},
               "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}],
                                                        "retries": {"attempts": 2, "retryOn": "5xx,503,409"}}]}}
        config = translate([("vs.yaml", 1, doc)])
        route = [r for vh in config.virtual_hosts for r in vh.routes][0]
        self.assertEqual(route.retry.retry_on, frozenset({"5xx", "503", "409"}))


class GrpcPortTests(SynchronousTestCase):
    def test_grpc_port_speaks_h2(self):
        """
        A ServiceEntry port declared GRPC or HTTP2 gets an h2 cluster, as in
        Istio; an HTTP port does not.
        """
        from txmesh.config.istio import translate

        se = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "api"},
              "spec": {"hosts": ["api.example.com"], "resolution": "STATIC",
                       "ports": [{"number": 9000, "name": "grpc", "protocol": "GRPC"},
                                 {"number": 80, "name": "http", "protocol": "HTTP"}],
                       "endpoints": [{"address": "127.0.0.1"}]}}
        config = translate([("se.yaml", 1, se)])
        by_name = {c.name: c for c in config.clusters}
        self.assertTrue(by_name["outbound|9000||api.example.com"].http2)
        self.assertFalse(by_name["outbound|80||api.example.com"].http2)


MESH_LABEL = {"security.istio.io/tlsMode": "istio"}
MESH_PAIRS = tuple(MESH_LABEL.items())


def labeled_entry(*labeled: bool) -> dict[str, Any]:
    """
    A reviews ServiceEntry whose endpoints carry the sidecar label or not.
    """
    return service_entry(endpoints=[
        {"address": f"10.0.0.{i}", "labels": {"version": f"v{i}", **(MESH_LABEL if on else {})}}
        for i, on in enumerate(labeled, start=1)])


def tls_rule(tls: dict[str, Any] | None, subsets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"subsets": subsets if subsets is not None else []}
    if tls is not None:
        spec["trafficPolicy"] = {"tls": tls}
    return destination_rule(**spec)


SPIFFE = "spiffe://cluster.local/ns/default/sa/reviews"
ISTIO_MUTUAL = UpstreamTLS(mode="ISTIO_MUTUAL")

# name: (DestinationRule tls, endpoints labeled, mtls, expected cluster tls, expected warnings (field, text))
UPSTREAM_TLS_CASES: dict[str, tuple[Any, tuple[bool, ...], bool, Any, list[tuple[str, str]]]] = {
    "istio_mutual": ({"mode": "ISTIO_MUTUAL"}, (False, False), True, ISTIO_MUTUAL, []),
    "istio_mutual_sans": ({"mode": "ISTIO_MUTUAL", "subjectAltNames": [SPIFFE]}, (False,), True,
                          UpstreamTLS(mode="ISTIO_MUTUAL", subject_alt_names=(SPIFFE,)), []),
    "istio_mutual_sni_ignored": ({"mode": "ISTIO_MUTUAL", "sni": "x"}, (False,), True, ISTIO_MUTUAL,
                                 [("spec.trafficPolicy.tls.sni", "mesh trust bundle")]),
    "istio_mutual_without_ca": ({"mode": "ISTIO_MUTUAL"}, (True,), False, None,
                                [("spec.trafficPolicy.tls.mode", "needs the mesh CA")]),
    "disable_beats_auto": ({"mode": "DISABLE"}, (True, True), True, None, []),
    "simple": ({"mode": "SIMPLE", "sni": "reviews.example.com"}, (True,), True,
               UpstreamTLS(sni="reviews.example.com"), []),
    "simple_sans_ignored": ({"mode": "SIMPLE", "subjectAltNames": ["reviews.example.com"]}, (False,), True,
                            UpstreamTLS(), [("spec.trafficPolicy.tls.subjectAltNames", "used only with ISTIO_MUTUAL")]),
    "mutual": ({"mode": "MUTUAL", "clientCertificate": "c.pem", "privateKey": "k.pem", "sni": "r.example"},
               (False,), True,
               UpstreamTLS(sni="r.example", mode="MUTUAL", client_certificate="c.pem", private_key="k.pem"), []),
    "client_files_ignored_in_simple": ({"mode": "SIMPLE", "clientCertificate": "c.pem"}, (False,), True,
                                       UpstreamTLS(), [("spec.trafficPolicy.tls.clientCertificate",
                                                        "used only with mode MUTUAL")]),
    "auto": (None, (True, True), True, ISTIO_MUTUAL, []),
    "auto_needs_every_endpoint": (None, (True, False), True, None, []),
    "auto_needs_ca": (None, (True, True), False, None, []),
}


class UpstreamTLSTests(SynchronousTestCase):
    """
    DestinationRule C{trafficPolicy.tls} and auto mutual TLS become the
    cluster's L{UpstreamTLS}; with C{mtls} (a pilot with a CA) C{ISTIO_MUTUAL}
    is applied.
    """

    def test_table(self) -> None:
        for name, (tls, labeled, mtls, expected, warnings) in UPSTREAM_TLS_CASES.items():
            config = run(labeled_entry(*labeled), tls_rule(tls), mtls=mtls)
            self.assertEqual(cluster(config).tls, expected, name)
            got = [(w.field, w.message) for w in config.warnings]
            self.assertEqual(len(got), len(warnings), (name, got))
            for (field, text), (gf, gm) in zip(warnings, got, strict=True):
                self.assertEqual(field, gf, name)
                self.assertIn(text, gm, name)

    def test_mutual_needs_files(self) -> None:
        with self.assertRaises(ConfigError) as e:
            run(labeled_entry(False), tls_rule({"mode": "MUTUAL", "clientCertificate": "c.pem"}), mtls=True)
        self.assertEqual(e.exception.field, "spec.trafficPolicy.tls.privateKey")

    def test_auto_refused_by_destination(self) -> None:
        """
        Auto mutual TLS asks C{accepts_mtls} whether the host takes it.
        """
        asked = []

        def accepts(host: str) -> bool:
            asked.append(host)
            return False

        config = run(labeled_entry(True, True), tls_rule(None), mtls=True, accepts_mtls=accepts)
        self.assertIsNone(cluster(config).tls)
        self.assertEqual(asked, ["reviews.default.svc.cluster.local"])

    def test_non_spiffe_san(self) -> None:
        """
        ISTIO_MUTUAL peers are checked by SPIFFE ID: another name is an error
        naming the field.
        """
        with self.assertRaises(ConfigError) as cm:
            run(labeled_entry(False), tls_rule({"mode": "ISTIO_MUTUAL", "subjectAltNames": [SPIFFE, "reviews"]}),
                mtls=True)
        self.assertEqual((cm.exception.document, cm.exception.field),
                         (2, "spec.trafficPolicy.tls.subjectAltNames[1]"))
        self.assertIn("spiffe://", cm.exception.reason)

    def test_subsets_agreeing_apply_to_cluster(self) -> None:
        """
        Subsets that all set the same tls, under a rule with none, give it
        to the cluster.
        """
        subsets = [{"name": f"v{i}", "labels": {"version": f"v{i}"},
                    "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}} for i in (1, 2)]
        config = run(labeled_entry(False, False), tls_rule(None, subsets), mtls=True)
        self.assertEqual(cluster(config).tls, ISTIO_MUTUAL)
        self.assertEqual(config.warnings, ())

    def test_subset_differing_is_a_warning(self) -> None:
        """
        A subset tls unlike the rule's (or set by only some subsets) is not
        applied, with a warning.
        """
        subsets = [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"tls": {"mode": "DISABLE"}}},
                   {"name": "v2", "labels": {"version": "v2"}}]
        config = run(labeled_entry(True, True), tls_rule(None, subsets), mtls=True)
        self.assertEqual(cluster(config).tls, ISTIO_MUTUAL)
        self.assertEqual([(w.field, "per cluster" in w.message) for w in config.warnings],
                         [("spec.subsets[0].trafficPolicy.tls", True)])
        subsets[1]["trafficPolicy"] = {"tls": {"mode": "DISABLE"}}
        config = run(labeled_entry(False, False), tls_rule({"mode": "ISTIO_MUTUAL"}, subsets), mtls=True)
        self.assertEqual(cluster(config).tls, ISTIO_MUTUAL)
        self.assertEqual([w.field for w in config.warnings],
                         ["spec.subsets[0].trafficPolicy.tls", "spec.subsets[1].trafficPolicy.tls"])

    def test_service_entry_subject_alt_names(self) -> None:
        """
        A ServiceEntry's subjectAltNames are the identities its ISTIO_MUTUAL
        cluster accepts, as in Istio; a name that is not a SPIFFE ID is
        ignored with a warning.
        """
        other = "spiffe://cluster.local/ns/default/sa/reviews-v2"
        config = run(service_entry(subjectAltNames=[SPIFFE, "reviews.example.com", other]),
                     tls_rule({"mode": "ISTIO_MUTUAL"}), mtls=True)
        self.assertEqual(cluster(config).tls, UpstreamTLS(mode="ISTIO_MUTUAL", subject_alt_names=(SPIFFE, other)))
        self.assertEqual([w.field for w in config.warnings], ["spec.subjectAltNames[1]"])

    def test_service_entry_endpoint_accounts(self) -> None:
        """
        The serviceAccounts of a ServiceEntry's endpoints, in its namespace,
        are the SPIFFE IDs (of the translation's trust domain) an auto
        mutual TLS cluster accepts.
        """
        entry = service_entry(endpoints=[
            {"address": "10.0.0.1", "labels": MESH_LABEL, "serviceAccount": "reviews"},
            {"address": "10.0.0.2", "labels": MESH_LABEL, "serviceAccount": "reviews-v2"}])
        config = run(entry, mtls=True, trust_domain="example.org")
        self.assertEqual(cluster(config).tls.subject_alt_names,
                         ("spiffe://example.org/ns/default/sa/reviews", "spiffe://example.org/ns/default/sa/reviews-v2"))

    def test_unknown_account_keeps_trust_domain_check(self) -> None:
        """
        When one endpoint's account is unknown (and the service declares
        none), the cluster names no SANs: any peer of the trust domain,
        rather than refusing that endpoint.
        """
        entry = service_entry(endpoints=[
            {"address": "10.0.0.1", "labels": MESH_LABEL, "serviceAccount": "reviews"},
            {"address": "10.0.0.2", "labels": MESH_LABEL}])
        self.assertEqual(cluster(run(entry, mtls=True)).tls, ISTIO_MUTUAL)

    def test_bad_service_account(self) -> None:
        """
        A ServiceEntry endpoint's serviceAccount is a name, not a path.
        """
        entry = service_entry(endpoints=[{"address": "10.0.0.1", "serviceAccount": "ns/reviews"}])
        with self.assertRaises(ConfigError) as cm:
            run(entry, mtls=True)
        self.assertEqual(cm.exception.field, "spec.endpoints[0].serviceAccount")
        self.assertIn("DNS label", cm.exception.reason)

    def test_destination_rule_sans_win(self) -> None:
        """
        A DestinationRule's subjectAltNames replace the service's accounts.
        """
        entry = service_entry(endpoints=[{"address": "10.0.0.1", "serviceAccount": "reviews"}])
        other = "spiffe://cluster.local/ns/default/sa/other"
        config = run(entry, tls_rule({"mode": "ISTIO_MUTUAL", "subjectAltNames": [other]}), mtls=True)
        self.assertEqual(cluster(config).tls.subject_alt_names, (other,))

    def test_registry_accounts(self) -> None:
        """
        Endpoints from service discovery carry their accounts into the
        cluster's SANs, as C{namespace/account} or a whole SPIFFE ID.
        """
        host = "ratings.shop.svc.cluster.local"
        foreign = "spiffe://other.org/ns/x/sa/y"
        endpoints = (Endpoint("10.0.0.1", 80, MESH_PAIRS, service_account="shop/ratings"),
                     Endpoint("10.0.0.2", 80, MESH_PAIRS, service_account=foreign))
        config = run(registry={host: endpoints}, registry_ports={host: (("http", 80, "HTTP"),)}, mtls=True)
        self.assertEqual(cluster(config, f"outbound|80||{host}").tls.subject_alt_names,
                         ("spiffe://cluster.local/ns/shop/sa/ratings", foreign))
