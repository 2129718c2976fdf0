"""
Tests for L{txmesh.config.loader} and L{txmesh.config.durations}: a valid
document becomes the right model values, and every invalid one is refused
with a L{ConfigError} naming the file, the exact field and the reason.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from txmesh.config.durations import parse_duration
from txmesh.config.errors import ConfigError, FilterConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.config.model import (
    DISABLED,
    ClusterConfig,
    DirectResponse,
    Endpoint,
    HeaderMatch,
    ListenerConfig,
    NodeConfig,
    ProxyConfig,
    Route,
    RouteMatch,
    VirtualHost,
)
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, INetworkFilterFactory, NetworkFilter
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory
from txmesh.observability.metrics import MetricsFactory


@implementer(IHTTPFilterFactory)
class StrictFactory:
    """
    An HTTP filter with a config that is checked field by field.
    """

    name = "strict"

    def parse_config(self, raw: Mapping[str, Any]) -> Any:
        unknown = set(raw) - {"limit", "nested"}
        if unknown:
            raise FilterConfigError(min(unknown), "unknown field")
        limit = raw.get("limit")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise FilterConfigError("limit", "must be an integer")
        if limit < 0:
            raise FilterConfigError("", "the limit cannot be negative")
        if limit == 13:
            raise ValueError("unlucky")
        nested = raw.get("nested")
        if nested is not None and not isinstance(nested.get("depth"), int):
            raise FilterConfigError("nested.depth", "must be an integer")
        return ("strict", limit)

    def create_filter(self, config: Any, stream: Any) -> HTTPFilter:
        return HTTPFilter()


@implementer(INetworkFilterFactory)
class ConnLimitFactory:
    """
    A network filter with a config.
    """

    name = "conn-limit"

    def parse_config(self, raw: Mapping[str, Any]) -> Any:
        if not isinstance(raw.get("max"), int):
            raise FilterConfigError("max", "must be an integer")
        return raw["max"]

    def create_filter(self, config: Any, connection: Any) -> NetworkFilter:
        return NetworkFilter()


def registry() -> FilterRegistry:
    return FilterRegistry(http=[RouterFactory(), MetricsFactory(), StrictFactory()], network=[ConnLimitFactory()])


FULL = """
node: {id: sidecar-1, workload: reviews-v1, namespace: shop, app: reviews, version: v1}
admin: {address: "tcp:15000:interface=127.0.0.1"}
clusters:
  - name: reviews
    endpoints:
      - "10.0.0.1:9080"
      - "[fd00::1]:9080"
      - {address: reviews-2.shop.svc, port: 9081, labels: {zone: eu-1, version: v2}}
    connect_timeout: 250ms
    lb_policy: least_request
    max_idle_per_endpoint: 16
    idle_timeout: 1m
  - name: db
    endpoints: ["db.internal:5432"]
    connect_timeout: 2
listeners:
  - name: http
    address: "tcp:15001:interface=127.0.0.1"
    idle_timeout: 1h
    request_headers_timeout: 15s
    max_request_headers_bytes: 32768
    default_host: reviews.shop
    http_filters:
      - name: metrics
      - name: strict
        config: {limit: 3}
    routes:
      - name: health
        match: {path: /healthz}
        direct_response: {status: 200, body: ok}
      - name: api
        match:
          prefix: /api/
          methods: [get, POST]
          headers:
            - {name: X-Canary, exact: "1"}
            - {name: x-user, prefix: admin-}
            - {name: x-id, regex: "[0-9]+"}
            - {name: x-debug, present: false}
            - {name: x-env, exact: prod, invert: true}
            - {name: x-any}
        cluster: reviews
        timeout: 1.5
        prefix_rewrite: /v2/
        host_rewrite: reviews.internal
        request_headers_to_add: {X-Route: api, x-num: 7}
        response_headers_to_add: {x-served-by: txmesh}
        filters: {strict: {limit: 1}, metrics: null}
      - match: {regex: "/users/[0-9]+"}
        cluster: reviews
        timeout: 0
  - name: vhosts
    address: "tcp:15002"
    virtual_hosts:
      - name: shop
        domains: ["shop.example.com", "*.shop.example.com"]
        routes: [{cluster: reviews}]
      - name: rest
        domains: ["*"]
        routes: [{direct_response: {status: 404}}]
    http_filters: [{name: router}]
  - name: db
    address: "tcp:15003"
    protocol: tcp
    cluster: db
    idle_timeout: 15s
    network_filters: [{name: conn-limit, config: {max: 10}}]
"""


class LoaderTestCase(SynchronousTestCase):
    def setUp(self):
        self.loader = ConfigLoader(registry())

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path

    def load(self, text: str) -> ProxyConfig:
        return self.loader.load_file(self.write(text))


class ValidConfigTests(LoaderTestCase):
    """
    A complete, valid config loads into the right model values.
    """

    def setUp(self):
        super().setUp()
        self.path = self.write(FULL)
        self.config = self.loader.load_file(self.path)

    def test_source_and_raw(self):
        self.assertEqual(self.config.source, self.path)
        self.assertEqual(self.config.raw["node"]["id"], "sidecar-1")

    def test_node_and_admin(self):
        self.assertEqual(self.config.node, NodeConfig("sidecar-1", "reviews-v1", "shop", "reviews", "v1"))
        self.assertEqual(self.config.admin_address, "tcp:15000:interface=127.0.0.1")

    def test_clusters(self):
        self.assertEqual(self.config.clusters, (
            ClusterConfig(
                "reviews",
                (
                    Endpoint("10.0.0.1", 9080),
                    Endpoint("fd00::1", 9080),
                    Endpoint("reviews-2.shop.svc", 9081, (("version", "v2"), ("zone", "eu-1"))),
                ),
                connect_timeout=0.25,
                lb_policy="least_request",
                max_idle_per_endpoint=16,
                idle_timeout=60.0,
            ),
            ClusterConfig("db", (Endpoint("db.internal", 5432),), connect_timeout=2.0),
        ))
        self.assertIs(self.config.cluster("db"), self.config.clusters[1])
        self.assertIsNone(self.config.cluster("nope"))

    def test_http_listener(self):
        http = self.config.listeners[0]
        self.assertEqual(
            (http.name, http.address, http.protocol, http.idle_timeout, http.request_headers_timeout,
             http.max_request_headers_bytes, http.default_host, http.cluster, http.network_filters),
            ("http", "tcp:15001:interface=127.0.0.1", "http", 3600.0, 15.0, 32768, b"reviews.shop", None, ()),
        )

    def test_routes_shorthand_is_a_catch_all_virtual_host(self):
        [vh] = self.config.listeners[0].virtual_hosts
        self.assertEqual((vh.name, vh.domains), ("default", ("*",)))
        self.assertEqual([r.name for r in vh.routes], ["health", "api", "routes[2]"])

    def test_direct_response_route(self):
        health = self.config.listeners[0].virtual_hosts[0].routes[0]
        self.assertEqual(health, Route(
            "health", RouteMatch(prefix=None, path=b"/healthz"), direct_response=DirectResponse(200, b"ok")))

    def test_full_route(self):
        api = self.config.listeners[0].virtual_hosts[0].routes[1]
        self.assertEqual(api.match, RouteMatch(
            prefix=b"/api/",
            headers=(
                HeaderMatch(b"x-canary", exact=b"1"),
                HeaderMatch(b"x-user", prefix=b"admin-"),
                HeaderMatch(b"x-id", regex=re.compile(b"[0-9]+")),
                HeaderMatch(b"x-debug", present=False),
                HeaderMatch(b"x-env", exact=b"prod", invert=True),
                HeaderMatch(b"x-any", present=True),
            ),
            methods=(b"GET", b"POST"),
        ))
        self.assertEqual(api.cluster, "reviews")
        self.assertIsNone(api.direct_response)
        self.assertEqual(api.timeout, 1.5)
        self.assertEqual(api.prefix_rewrite, b"/v2/")
        self.assertEqual(api.host_rewrite, b"reviews.internal")
        self.assertEqual(api.request_headers_to_add, ((b"x-route", b"api"), (b"x-num", b"7")))
        self.assertEqual(api.response_headers_to_add, ((b"x-served-by", b"txmesh"),))
        self.assertEqual(api.filter_overrides, (("strict", ("strict", 1)), ("metrics", DISABLED)))

    def test_regex_route(self):
        route = self.config.listeners[0].virtual_hosts[0].routes[2]
        self.assertEqual(route.match, RouteMatch(prefix=None, regex=re.compile(b"/users/[0-9]+")))
        self.assertEqual(route.timeout, 0.0)
        self.assertEqual(route.match.regex.pattern, b"/users/[0-9]+")

    def test_router_appended(self):
        filters = self.config.listeners[0].http_filters
        self.assertEqual([f.name for f in filters], ["metrics", "strict", "router"])
        self.assertIsInstance(filters[0].factory, MetricsFactory)
        self.assertIsNone(filters[0].config)
        self.assertEqual(filters[1].config, ("strict", 3))
        self.assertIsInstance(filters[2].factory, RouterFactory)

    def test_router_last_not_doubled(self):
        self.assertEqual([f.name for f in self.config.listeners[1].http_filters], ["router"])

    def test_virtual_hosts(self):
        listener = self.config.listeners[1]
        self.assertEqual(listener.virtual_hosts, (
            VirtualHost("shop", ("shop.example.com", "*.shop.example.com"),
                        (Route("routes[0]", RouteMatch(), cluster="reviews"),)),
            VirtualHost("rest", ("*",), (Route("routes[0]", RouteMatch(), direct_response=DirectResponse(404)),)),
        ))
        self.assertEqual(listener.idle_timeout, ListenerConfig("x", "y").idle_timeout)

    def test_tcp_listener(self):
        db = self.config.listeners[2]
        self.assertEqual((db.name, db.address, db.protocol, db.cluster, db.idle_timeout, db.virtual_hosts,
                          db.http_filters), ("db", "tcp:15003", "tcp", "db", 15.0, (), ()))
        [f] = db.network_filters
        self.assertEqual((f.name, f.config), ("conn-limit", 10))
        self.assertIsInstance(f.factory, ConnLimitFactory)

    def test_load_bytes_same_as_file(self):
        self.assertEqual(self.loader.load_bytes(FULL.encode("utf-8"), self.path), self.config)


class DefaultsTests(LoaderTestCase):
    """
    What a minimal config leaves to defaults.
    """

    def test_minimal(self):
        config = self.load("""
            clusters: [{name: app, endpoints: ["127.0.0.1:8080"]}]
            listeners: [{name: l, address: "tcp:0", routes: [{cluster: app}]}]
            """)
        self.assertEqual(config.node, NodeConfig())
        self.assertIsNone(config.admin_address)
        [listener] = config.listeners
        self.assertEqual(listener.virtual_hosts, (
            VirtualHost("default", ("*",), (Route("routes[0]", RouteMatch(prefix=b"/"), cluster="app"),)),))
        self.assertEqual([f.name for f in listener.http_filters], ["router"])
        d = ListenerConfig("l", "tcp:0")
        self.assertEqual(
            (listener.idle_timeout, listener.request_headers_timeout, listener.max_request_headers_bytes,
             listener.default_host),
            (d.idle_timeout, d.request_headers_timeout, d.max_request_headers_bytes, None))
        self.assertEqual(config.clusters[0], ClusterConfig("app", (Endpoint("127.0.0.1", 8080),)))
        self.assertEqual(config.listeners[0].virtual_hosts[0].routes[0].timeout, 15.0)

    def test_empty_match_is_catch_all(self):
        config = self.load("""
            clusters: [{name: app, endpoints: ["h:1"]}]
            listeners: [{name: l, address: "tcp:0", routes: [{cluster: app, match: {}}]}]
            """)
        self.assertEqual(config.listeners[0].virtual_hosts[0].routes[0].match, RouteMatch(prefix=b"/"))

    def test_routes_and_virtual_hosts_together(self):
        config = self.load("""
            clusters: [{name: app, endpoints: ["h:1"]}]
            listeners:
              - name: l
                address: "tcp:0"
                virtual_hosts: [{name: a, domains: [a.test], routes: [{cluster: app}]}]
                routes: [{cluster: app}]
            """)
        self.assertEqual([(v.name, v.domains) for v in config.listeners[0].virtual_hosts],
                         [("a", ("a.test",)), ("default", ("*",))])

    def test_unix_listener_address(self):
        config = self.load("""
            clusters: [{name: app, endpoints: ["h:1"]}]
            listeners: [{name: l, address: "unix:/tmp/txmesh.sock", routes: [{cluster: app}]}]
            """)
        self.assertEqual(config.listeners[0].address, "unix:/tmp/txmesh.sock")


BASE_CLUSTERS = """
clusters:
  - name: app
    endpoints: ["127.0.0.1:8080"]
"""


def listener(body: str = "routes: [{cluster: app}]", head: str = 'name: l\n    address: "tcp:8080"') -> str:
    """
    A document with the C{app} cluster and one listener.
    """
    return BASE_CLUSTERS + "listeners:\n  - " + head + "\n    " + body.replace("\n", "\n    ") + "\n"


def route(body: str) -> str:
    """
    A document with a listener whose first route is C{body} (a flow
    mapping's contents).
    """
    return listener("routes: [{" + body + "}]")


# name: (document, field, a substring of the reason)
INVALID: dict[str, tuple[str, str, str]] = {
    "unknown_top_level_key": (listener() + "tracing: {zipkin: x}\n", "tracing", "unknown field"),
    "unknown_cluster_key": (
        "clusters: [{name: app, endpoints: ['h:1'], lb_polcy: random}]\nlisteners: []\n",
        "clusters[0].lb_polcy", "unknown field (known: "),
    "unknown_listener_key": (listener("routes: [{cluster: app}]\nport: 80"), "listeners[0].port", "unknown field"),
    "unknown_route_key": (route("cluster: app, retries: 3"), "listeners[0].routes[0].retries", "unknown field"),
    "unknown_match_key": (route("cluster: app, match: {prefix: /, query: x}"),
                          "listeners[0].routes[0].match.query", "unknown field"),
    "unknown_header_match_key": (route("cluster: app, match: {headers: [{name: x, exactly: y}]}"),
                                 "listeners[0].routes[0].match.headers[0].exactly", "unknown field"),
    "unknown_node_key": (listener() + "node: {zone: eu}\n", "node.zone", "unknown field"),
    "unknown_endpoint_key": (
        "clusters: [{name: app, endpoints: [{address: h, port: 1, priority: 2}]}]\nlisteners: []\n",
        "clusters[0].endpoints[0].priority", "unknown field"),
    "unknown_direct_response_key": (route("direct_response: {status: 200, headers: {}}"),
                                    "listeners[0].routes[0].direct_response.headers", "unknown field"),
    "unknown_filter_key": (listener("routes: [{cluster: app}]\nhttp_filters: [{name: metrics, confg: {}}]"),
                           "listeners[0].http_filters[0].confg", "unknown field"),
    "tcp_listener_with_routes": (
        listener("protocol: tcp\ncluster: app\nroutes: [{cluster: app}]"), "listeners[0].routes", "unknown field"),
    "missing_listeners": (BASE_CLUSTERS, "listeners", "is required"),
    "empty_document": ("", "listeners", "is required"),
    "missing_cluster_name": ("clusters: [{endpoints: ['h:1']}]\nlisteners: []\n", "clusters[0].name",
                             "is required"),
    "missing_endpoints": ("clusters: [{name: app}]\nlisteners: []\n", "clusters[0].endpoints", "is required"),
    "empty_endpoints": ("clusters: [{name: app, endpoints: []}]\nlisteners: []\n", "clusters[0].endpoints",
                        "at least one endpoint"),
    "missing_listener_address": (BASE_CLUSTERS + "listeners: [{name: l, routes: [{cluster: app}]}]\n",
                                 "listeners[0].address", "is required"),
    "missing_listener_name": (BASE_CLUSTERS + "listeners: [{address: 'tcp:1', routes: [{cluster: app}]}]\n",
                              "listeners[0].name", "is required"),
    "missing_endpoint_port": ("clusters: [{name: app, endpoints: [{address: h}]}]\nlisteners: []\n",
                              "clusters[0].endpoints[0].port", "is required"),
    "missing_header_name": (route("cluster: app, match: {headers: [{exact: y}]}"),
                            "listeners[0].routes[0].match.headers[0].name", "is required"),
    "missing_direct_response_status": (route("direct_response: {body: x}"),
                                       "listeners[0].routes[0].direct_response.status", "is required"),
    "http_listener_without_routes": (listener("idle_timeout: 1s"), "listeners[0].routes",
                                     "needs 'routes' or 'virtual_hosts'"),
    "missing_vhost_domains": (listener("virtual_hosts: [{name: v, routes: [{cluster: app}]}]"),
                              "listeners[0].virtual_hosts[0].domains", "is required"),
    "document_is_a_list": ("- a\n- b\n", "", "expected a mapping, got a list"),
    "listeners_not_a_list": (BASE_CLUSTERS + "listeners: {name: l}\n", "listeners", "expected a list, got a mapping"),
    "cluster_not_a_mapping": ("clusters: [app]\nlisteners: []\n", "clusters[0]", "expected a mapping, got a string"),
    "cluster_name_number": ("clusters: [{name: 5, endpoints: ['h:1']}]\nlisteners: []\n", "clusters[0].name",
                            "expected a non-empty string, got a number"),
    "cluster_name_empty": ("clusters: [{name: '', endpoints: ['h:1']}]\nlisteners: []\n", "clusters[0].name",
                           "expected a non-empty string"),
    "connect_timeout_bool": ("clusters: [{name: app, endpoints: ['h:1'], connect_timeout: true}]\nlisteners: []\n",
                             "clusters[0].connect_timeout", "expected a duration"),
    "max_idle_string": (("clusters: [{name: app, endpoints: ['h:1'], max_idle_per_endpoint: '10'}]\n"
                         "listeners: []\n"), "clusters[0].max_idle_per_endpoint", "expected an integer, got a string"),
    "max_idle_negative": (("clusters: [{name: app, endpoints: ['h:1'], max_idle_per_endpoint: -1}]\n"
                           "listeners: []\n"), "clusters[0].max_idle_per_endpoint", "must be between 0 and 100000"),
    "lb_policy_unknown": ("clusters: [{name: app, endpoints: ['h:1'], lb_policy: maglev}]\nlisteners: []\n",
                          "clusters[0].lb_policy", "must be one of round_robin, random, least_request"),
    "endpoint_port_string": ("clusters: [{name: app, endpoints: [{address: h, port: '80'}]}]\nlisteners: []\n",
                             "clusters[0].endpoints[0].port", "expected an integer, got a string"),
    "endpoint_port_zero": ("clusters: [{name: app, endpoints: [{address: h, port: 0}]}]\nlisteners: []\n",
                           "clusters[0].endpoints[0].port", "must be between 1 and 65535"),
    "endpoint_labels_list": (("clusters: [{name: app, endpoints: [{address: h, port: 1, labels: [v1]}]}]\n"
                              "listeners: []\n"), "clusters[0].endpoints[0].labels", "expected a mapping"),
    "endpoint_number": ("clusters: [{name: app, endpoints: [8080]}]\nlisteners: []\n",
                        "clusters[0].endpoints[0]", "expected a mapping, got a number"),
    "endpoint_without_port": ("clusters: [{name: app, endpoints: ['10.0.0.1']}]\nlisteners: []\n",
                              "clusters[0].endpoints[0]", "expected 'host:port', got '10.0.0.1'"),
    "endpoint_port_not_numeric": ("clusters: [{name: app, endpoints: ['h:http']}]\nlisteners: []\n",
                                  "clusters[0].endpoints[0]", "expected 'host:port'"),
    "endpoint_port_too_big": ("clusters: [{name: app, endpoints: ['h:1', 'h:65536']}]\nlisteners: []\n",
                              "clusters[0].endpoints[1]", "expected 'host:port', got 'h:65536'"),
    "endpoint_without_host": ("clusters: [{name: app, endpoints: [':80']}]\nlisteners: []\n",
                              "clusters[0].endpoints[0]", "expected 'host:port'"),
    "listener_address_not_endpoint": (listener(head='name: l\n    address: "localhost:8080"'),
                                      "listeners[0].address", "not a valid Twisted server endpoint string"),
    "listener_address_bad_port": (listener(head='name: l\n    address: "tcp:eighty"'),
                                  "listeners[0].address", "not a valid Twisted server endpoint string"),
    "listener_address_number": (listener(head="name: l\n    address: 8080"), "listeners[0].address",
                                "expected a non-empty string, got a number"),
    "admin_address_not_endpoint": (listener() + "admin: {address: '127.0.0.1:15000'}\n", "admin.address",
                                   "not a valid Twisted server endpoint string"),
    "admin_without_address": (listener() + "admin: {}\n", "admin.address", "is required"),
    "protocol_unknown": (listener("protocol: udp\nroutes: [{cluster: app}]"), "listeners[0].protocol",
                         "must be one of http, tcp, got 'udp'"),
    "max_request_headers_too_small": (listener("routes: [{cluster: app}]\nmax_request_headers_bytes: 100"),
                                      "listeners[0].max_request_headers_bytes", "must be between 1024"),
    "unknown_route_cluster": (listener("routes: [{cluster: app}, {cluster: nope}]"),
                              "listeners[0].routes[1].cluster", "unknown cluster 'nope'"),
    "unknown_vhost_route_cluster": (
        listener("virtual_hosts: [{name: v, domains: ['*'], routes: [{cluster: app}, {cluster: ghost}]}]"),
        "listeners[0].virtual_hosts[0].routes[1].cluster", "unknown cluster 'ghost'"),
    "unknown_tcp_cluster": (listener("protocol: tcp\ncluster: nope"), "listeners[0].cluster",
                            "unknown cluster 'nope'"),
    "tcp_listener_without_cluster": (listener("protocol: tcp"), "listeners[0].cluster", "is required"),
    "duplicate_cluster": (("clusters: [{name: a, endpoints: ['h:1']}, {name: b, endpoints: ['h:1']},"
                           " {name: a, endpoints: ['h:2']}]\nlisteners: []\n"), "clusters[2].name",
                          "duplicate cluster name 'a'"),
    "duplicate_listener_name": (
        BASE_CLUSTERS + "listeners:\n  - {name: l, address: 'tcp:1', routes: [{cluster: app}]}\n"
        "  - {name: l, address: 'tcp:2', routes: [{cluster: app}]}\n",
        "listeners[1].name", "duplicate listener name 'l'"),
    "duplicate_listener_address": (
        BASE_CLUSTERS + "listeners:\n  - {name: a, address: 'tcp:1', routes: [{cluster: app}]}\n"
        "  - {name: b, address: 'tcp:1', routes: [{cluster: app}]}\n",
        "listeners[1].address", "duplicate listener address 'tcp:1'"),
    "unknown_http_filter": (listener("routes: [{cluster: app}]\nhttp_filters: [{name: metrics}, {name: cors}]"),
                            "listeners[0].http_filters[1].name",
                            "unknown HTTP filter 'cors' (installed: metrics, router, strict)"),
    "unknown_network_filter": (listener("protocol: tcp\ncluster: app\nnetwork_filters: [{name: rbac}]"),
                               "listeners[0].network_filters[0].name",
                               "unknown network filter 'rbac' (installed: conn-limit)"),
    "http_filter_on_tcp_listener": (listener("protocol: tcp\ncluster: app\nnetwork_filters: [{name: strict}]"),
                                    "listeners[0].network_filters[0].name", "unknown network filter 'strict'"),
    "unknown_route_filter_override": (route("cluster: app, filters: {cors: {}}"),
                                      "listeners[0].routes[0].filters.cors", "unknown HTTP filter 'cors'"),
    "filter_config_error": (listener("routes: [{cluster: app}]\nhttp_filters: [{name: strict, config: {limit: x}}]"),
                            "listeners[0].http_filters[0].config.limit", "must be an integer"),
    "filter_config_error_nested_field": (
        listener("routes: [{cluster: app}]\nhttp_filters: [{name: strict, config: {limit: 1, nested: {}}}]"),
        "listeners[0].http_filters[0].config.nested.depth", "must be an integer"),
    "filter_config_error_without_field": (
        listener("routes: [{cluster: app}]\nhttp_filters: [{name: strict, config: {limit: -1}}]"),
        "listeners[0].http_filters[0].config", "the limit cannot be negative"),
    "filter_config_missing": (listener("routes: [{cluster: app}]\nhttp_filters: [{name: strict}]"),
                              "listeners[0].http_filters[0].config.limit", "must be an integer"),
    "filter_config_value_error": (
        listener("routes: [{cluster: app}]\nhttp_filters: [{name: strict, config: {limit: 13}}]"),
        "listeners[0].http_filters[0].config", "invalid filter config: unlucky"),
    "filter_config_not_mapping": (listener("routes: [{cluster: app}]\nhttp_filters: [{name: strict, config: 3}]"),
                                  "listeners[0].http_filters[0].config", "filter config must be a mapping"),
    "metrics_filter_takes_no_config": (
        listener("routes: [{cluster: app}]\nhttp_filters: [{name: metrics, config: {buckets: 3}}]"),
        "listeners[0].http_filters[0].config.buckets", "takes no config"),
    "route_filter_override_error": (route("cluster: app, filters: {strict: {limit: 1, colour: red}}"),
                                    "listeners[0].routes[0].filters.strict.colour", "unknown field"),
    "network_filter_config_error": (
        listener("protocol: tcp\ncluster: app\nnetwork_filters: [{name: conn-limit, config: {max: lots}}]"),
        "listeners[0].network_filters[0].config.max", "must be an integer"),
    "router_not_last": (listener("routes: [{cluster: app}]\nhttp_filters: [{name: router}, {name: metrics}]"),
                        "listeners[0].http_filters[0]", "the router must be the last filter"),
    "bad_route_regex": (route("cluster: app, match: {regex: '/a('}"), "listeners[0].routes[0].match.regex",
                        "invalid regular expression"),
    "bad_header_regex": (route("cluster: app, match: {headers: [{name: x, regex: '[a-'}]}"),
                         "listeners[0].routes[0].match.headers[0].regex", "invalid regular expression"),
    "prefix_and_path": (route("cluster: app, match: {prefix: /a, path: /b}"), "listeners[0].routes[0].match.path",
                        "set only one of prefix, path, regex (got prefix, path)"),
    "path_and_regex": (route("cluster: app, match: {path: /a, regex: /b}"), "listeners[0].routes[0].match.regex",
                       "set only one of prefix, path, regex"),
    "prefix_without_slash": (route("cluster: app, match: {prefix: api}"), "listeners[0].routes[0].match.prefix",
                             "must start with '/'"),
    "path_without_slash": (route("cluster: app, match: {path: healthz}"), "listeners[0].routes[0].match.path",
                           "must start with '/'"),
    "header_exact_and_prefix": (route("cluster: app, match: {headers: [{name: x, exact: a, prefix: b}]}"),
                                "listeners[0].routes[0].match.headers[0].prefix", "set only one of"),
    "header_present_string": (route("cluster: app, match: {headers: [{name: x, present: 'false'}]}"),
                              "listeners[0].routes[0].match.headers[0].present", "expected true or false"),
    "header_invert_string": (route("cluster: app, match: {headers: [{name: x, exact: y, invert: 'no'}]}"),
                             "listeners[0].routes[0].match.headers[0].invert", "expected true or false"),
    "header_match_name_with_space": (route("cluster: app, match: {headers: [{name: 'x y', present: true}]}"),
                                     "listeners[0].routes[0].match.headers[0].name", "not a valid HTTP token"),
    "method_not_a_string": (route("cluster: app, match: {methods: [GET, {POST: 1}]}"),
                            "listeners[0].routes[0].match.methods[1]", "expected a non-empty string, got a mapping"),
    "method_with_space": (route("cluster: app, match: {methods: ['GET POST']}"),
                          "listeners[0].routes[0].match.methods[0]", "not a valid HTTP token"),
    "methods_not_a_list": (route("cluster: app, match: {methods: GET}"), "listeners[0].routes[0].match.methods",
                           "expected a list, got a string"),
    "match_not_a_mapping": (route("cluster: app, match: /api"), "listeners[0].routes[0].match",
                            "expected a mapping, got a string"),
    "domain_not_a_string": (listener("virtual_hosts: [{name: v, domains: [a.test, [b]], routes: [{cluster: app}]}]"),
                            "listeners[0].virtual_hosts[0].domains[1]", "expected a non-empty string, got a list"),
    "negative_route_timeout": (route("cluster: app, timeout: -1"), "listeners[0].routes[0].timeout",
                               "a duration cannot be negative"),
    "negative_duration_string": (listener("routes: [{cluster: app}]\nidle_timeout: -5s"),
                                 "listeners[0].idle_timeout", "expected a duration like"),
    "duration_unknown_unit": ("clusters: [{name: app, endpoints: ['h:1'], idle_timeout: 1d}]\nlisteners: []\n",
                              "clusters[0].idle_timeout", "expected a duration like '250ms', '15s', '1m' or '1h'"),
    "duration_nan": (route("cluster: app, timeout: .nan"), "listeners[0].routes[0].timeout", "finite"),
    "duration_infinite": (listener("routes: [{cluster: app}]\nrequest_headers_timeout: .inf"),
                          "listeners[0].request_headers_timeout", "finite"),
    "cluster_and_direct_response": (route("cluster: app, direct_response: {status: 200}"),
                                    "listeners[0].routes[0].cluster",
                                    "a route needs exactly one of 'cluster', 'weighted_clusters', 'direct_response' or 'redirect'"),
    "neither_cluster_nor_direct_response": (route("timeout: 1s"), "listeners[0].routes[0].cluster",
                                            "exactly one of 'cluster', 'weighted_clusters', 'direct_response' or 'redirect'"),
    "direct_response_status_out_of_range": (route("direct_response: {status: 42}"),
                                            "listeners[0].routes[0].direct_response.status",
                                            "must be between 100 and 999"),
    "headers_to_add_not_mapping": (route("cluster: app, request_headers_to_add: [x]"),
                                   "listeners[0].routes[0].request_headers_to_add", "expected a mapping"),
    "headers_to_add_crlf": (route('cluster: app, request_headers_to_add: {x-a: "v\\r\\nx-injected: 1"}'),
                            "listeners[0].routes[0].request_headers_to_add", "control characters"),
    "headers_to_add_bad_name": (route("cluster: app, response_headers_to_add: {'x a': v}"),
                                "listeners[0].routes[0].response_headers_to_add", "not a valid HTTP token"),
    "host_rewrite_crlf": (route('cluster: app, host_rewrite: "a\\r\\nx: y"'),
                          "listeners[0].routes[0].host_rewrite", "control characters"),
    "prefix_rewrite_space": (route("cluster: app, prefix_rewrite: '/a b/'"),
                             "listeners[0].routes[0].prefix_rewrite", "spaces"),
}


def _make_invalid_test(document: str, field: str, reason: str) -> Callable[[InvalidConfigTests], None]:
    def test(self: InvalidConfigTests) -> None:
        self.assertInvalid(document, field, reason)
    return test


class InvalidConfigTests(LoaderTestCase):
    """
    Every invalid document is a L{ConfigError} with the file, the exact
    field path and the reason.
    """

    def assertInvalid(self, document: str, field: str, reason: str) -> ConfigError:
        path = self.write(document)
        with self.assertRaises(ConfigError) as cm:
            self.loader.load_file(path)
        e = cm.exception
        self.assertEqual(e.source, path)
        self.assertEqual(e.field, field, e)
        self.assertIn(reason, e.reason)
        self.assertEqual(str(e), f"{path}: {field}: {e.reason}" if field else f"{path}: {e.reason}")
        return e

    def test_invalid_yaml(self):
        e = self.assertInvalid("listeners:\n  - name: l\n    address: [tcp:80\n", "", "not valid YAML: line 4, column 1")
        self.assertIn("expected ',' or ']'", e.reason)

    def test_invalid_yaml_column(self):
        self.assertInvalid("clusters: []\nlisteners: [}\n", "", "not valid YAML: line 2, column 13")

    def test_invalid_yaml_tab(self):
        self.assertInvalid("listeners:\n\t- name: l\n", "", "not valid YAML: line 2, column 1")

    def test_missing_file(self):
        path = self.mktemp()
        with self.assertRaises(ConfigError) as cm:
            self.loader.load_file(path)
        self.assertEqual(cm.exception.source, path)
        self.assertEqual(cm.exception.field, "")
        self.assertIn("cannot read", cm.exception.reason)
        self.assertIn("No such file", cm.exception.reason)
        self.assertIn(path, str(cm.exception))

    def test_load_bytes_source(self):
        with self.assertRaises(ConfigError) as cm:
            self.loader.load_bytes(b"listeners: 3\n", "from-pilot")
        self.assertEqual((cm.exception.source, cm.exception.field), ("from-pilot", "listeners"))
        with self.assertRaises(ConfigError) as cm:
            self.loader.load_bytes(b"listeners: 3\n")
        self.assertIsNone(cm.exception.source)
        self.assertEqual(str(cm.exception), "listeners: expected a list, got a number")

    def test_unknown_filter_lists_installed(self):
        loader = ConfigLoader(FilterRegistry(http=[RouterFactory()]))
        with self.assertRaises(ConfigError) as cm:
            loader.load_bytes(listener("routes: [{cluster: app}]\nhttp_filters: [{name: metrics}]").encode())
        self.assertEqual(cm.exception.reason, "unknown HTTP filter 'metrics' (installed: router)")

    def test_unknown_network_filter_none_installed(self):
        loader = ConfigLoader(FilterRegistry(http=[RouterFactory()]))
        with self.assertRaises(ConfigError) as cm:
            loader.load_bytes(listener("protocol: tcp\ncluster: app\nnetwork_filters: [{name: x}]").encode())
        self.assertEqual(cm.exception.reason, "unknown network filter 'x' (installed: none)")

    def test_unknown_field_lists_known(self):
        e = self.assertInvalid(INVALID["unknown_cluster_key"][0], "clusters[0].lb_polcy", "unknown field")
        for known in ("connect_timeout", "endpoints", "idle_timeout", "lb_policy", "max_idle_per_endpoint", "name"):
            self.assertIn(known, e.reason)


for _name, (_document, _field, _reason) in INVALID.items():
    setattr(InvalidConfigTests, f"test_{_name}", _make_invalid_test(_document, _field, _reason))
del _name, _document, _field, _reason


class DurationTests(SynchronousTestCase):
    """
    L{parse_duration}.
    """

    def test_units(self):
        for text, seconds in (("250ms", 0.25), ("15s", 15.0), ("1m", 60.0), ("1h", 3600.0), ("1.5h", 5400.0),
                              ("0.5s", 0.5), ("0ms", 0.0), ("10", 10.0), (" 3s ", 3.0), ("2 m", 120.0)):
            self.assertEqual(parse_duration(text), seconds, text)

    def test_numbers_are_seconds(self):
        self.assertEqual(parse_duration(0), 0.0)
        self.assertEqual(parse_duration(2), 2.0)
        self.assertEqual(parse_duration(2.5), 2.5)
        self.assertIsInstance(parse_duration(2), float)

    def test_invalid(self):
        for value in ("", "s", "ms", "-1s", "1d", "1e3", "1.s", ".5s", "15S", "1h30m", "fast", True, False, None,
                      [1], {"s": 1}):
            with self.assertRaises(ValueError, msg=repr(value)):
                parse_duration(value)  # type: ignore[arg-type]

    def test_negative_number(self):
        with self.assertRaises(ValueError) as cm:
            parse_duration(-0.5)
        self.assertIn("negative", str(cm.exception))

    def test_not_finite(self):
        for value in (math.inf, -math.inf, math.nan):
            with self.assertRaises(ValueError, msg=repr(value)):
                parse_duration(value)

    def test_message_shows_examples(self):
        with self.assertRaises(ValueError) as cm:
            parse_duration("1d")
        self.assertIn("'250ms', '15s', '1m' or '1h'", str(cm.exception))
        self.assertIn("'1d'", str(cm.exception))
