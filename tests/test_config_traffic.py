"""
Native YAML for traffic policy: weighted clusters, subsets, retries,
faults, mirroring, redirects, header operations, hashing, breakers,
outlier detection and active health checks.
"""

import textwrap

from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.config.model import (
    CircuitBreakerConfig,
    HashPolicy,
    HeaderMatch,
    HeaderOps,
    HealthCheckConfig,
    MirrorPolicy,
    OutlierDetectionConfig,
    Redirect,
    SubsetConfig,
    WeightedDestination,
)
from txmesh.filters.fault import FaultFactory
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory
from txmesh.observability.metrics import MetricsFactory

FULL = """
node: {labels: {app: web, version: v1}, locality: "eu/a/1"}
listeners:
  - name: http
    address: "tcp:0"
    routes:
      - name: canary
        match: {prefix: /, query_params: [{name: debug, exact: "1"}], port: 80, source_labels: {app: web}}
        weighted_clusters:
          - {cluster: reviews, subset: v1, weight: 90}
          - {cluster: reviews, subset: v2, weight: 10, response_headers: {set: {x-canary: "yes"}}}
        retry: {attempts: 3, per_try_timeout: 1s, retry_on: "5xx,reset,unavailable,409"}
        fault: {delay: 100ms, delay_percent: 10}
        mirror: {cluster: shadow, percent: 50}
        request_headers: {set: {x-a: b}, add: {x-b: c}, remove: [X-Secret]}
      - {name: old, match: {prefix: /old}, redirect: {uri: /new, code: 302}}
      - {name: sticky, match: {prefix: /cart}, cluster: reviews, subset: v1, hash_policy: {header: X-User}}
clusters:
  - name: reviews
    endpoints:
      - {address: 127.0.0.1, port: 9001, labels: {version: v1}, weight: 2, locality: eu/a/1}
      - {address: 127.0.0.1, port: 9002, labels: {version: v2}}
    lb_policy: consistent_hash
    hash_policy: {cookie: session, algorithm: maglev}
    subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}, lb_policy: random}]
    circuit_breaker: {max_connections: 10, max_pending_requests: 5, max_requests: 100, max_requests_per_connection: 7}
    outlier_detection: {consecutive_5xx: 3, interval: 1s, base_ejection_time: 10s, max_ejection_percent: 50}
    health_check: {kind: http, path: /healthz, interval: 2s, unhealthy_threshold: 2}
    locality_failover: true
  - {name: shadow, endpoints: ["127.0.0.1:9003"]}
"""


class NativeTrafficConfigTests(SynchronousTestCase):
    def setUp(self):
        self.loader = ConfigLoader(FilterRegistry(http=[RouterFactory(), MetricsFactory(), FaultFactory()]))

    def load(self, text):
        return self.loader.load_bytes(textwrap.dedent(text).encode(), "traffic.yaml")

    def test_full(self):
        config = self.load(FULL)
        self.assertEqual(config.node.labels, (("app", "web"), ("version", "v1")))
        listener = config.listeners[0]
        canary, old, sticky = listener.virtual_hosts[0].routes
        self.assertEqual(canary.destinations, (
            WeightedDestination("reviews", 90, "v1"),
            WeightedDestination("reviews", 10, "v2", response_headers=HeaderOps(set=((b"x-canary", b"yes"),))),
        ))
        self.assertEqual(canary.match.query_params, (HeaderMatch(b"debug", exact=b"1"),))
        self.assertEqual((canary.match.port, canary.match.source_labels), (80, (("app", "web"),)))
        self.assertEqual(canary.retry.attempts, 3)
        self.assertEqual(canary.retry.per_try_timeout, 1.0)
        self.assertEqual(canary.retry.retry_on, frozenset({"5xx", "reset", "unavailable", "409"}))
        self.assertEqual((canary.fault.delay, canary.fault.delay_percent), (0.1, 10.0))
        self.assertEqual(canary.mirror, MirrorPolicy("shadow", None, 50.0))
        self.assertEqual(canary.request_headers,
                         HeaderOps(set=((b"x-a", b"b"),), add=((b"x-b", b"c"),), remove=(b"x-secret",)))
        self.assertEqual(old.redirect, Redirect(uri=b"/new", code=302))
        self.assertEqual(sticky.destinations, (WeightedDestination("reviews", 100, "v1"),))
        self.assertEqual(sticky.hash_policy, HashPolicy(header=b"x-user"))
        # A route with a fault gets the fault filter, just before the router.
        self.assertEqual([f.name for f in listener.http_filters], ["fault", "router"])
        reviews = config.cluster("reviews")
        self.assertEqual(reviews.endpoints[0].weight, 2)
        self.assertEqual(reviews.endpoints[0].locality, "eu/a/1")
        self.assertEqual(reviews.hash_policy, HashPolicy(cookie=b"session", algorithm="maglev"))
        self.assertEqual(reviews.subsets[1], SubsetConfig("v2", (("version", "v2"),), "random"))
        self.assertEqual(reviews.circuit_breaker, CircuitBreakerConfig(10, 5, 100, 7))
        self.assertEqual(reviews.outlier_detection, OutlierDetectionConfig(3, 0, 1.0, 10.0, 50))
        self.assertEqual(reviews.health_check, HealthCheckConfig("http", b"/healthz", 2.0, 1.0, 1, 2))
        self.assertTrue(reviews.locality_failover)

    def assertInvalid(self, old, new, field, reason):
        text = FULL.replace(old, new)
        self.assertNotEqual(text, FULL, "replacement did not apply")
        with self.assertRaises(ConfigError) as cm:
            self.load(text)
        self.assertEqual(cm.exception.source, "traffic.yaml")
        self.assertEqual(cm.exception.field, field)
        self.assertIn(reason, cm.exception.reason)

    def test_weights_must_sum_to_100(self):
        self.assertInvalid("weight: 10, response", "weight: 20, response",
                           "listeners[0].routes[0].weighted_clusters", "weights must sum to 100, not 110")

    def test_subset_without_endpoints(self):
        self.assertInvalid("{name: v2, labels: {version: v2}", "{name: v2, labels: {version: v9}",
                           "clusters[0].subsets[1].labels", "no endpoint of the cluster has these labels")

    def test_consistent_hash_needs_policy(self):
        self.assertInvalid("    hash_policy: {cookie: session, algorithm: maglev}\n", "",
                           "clusters[0].lb_policy", "consistent_hash needs a hash_policy")

    def test_unknown_retry_condition(self):
        self.assertInvalid("5xx,reset,unavailable,409", "5xx,sometimes",
                           "listeners[0].routes[0].retry.retry_on", "unknown retry condition 'sometimes'")

    def test_unknown_mirror_cluster(self):
        self.assertInvalid("mirror: {cluster: shadow", "mirror: {cluster: nowhere",
                           "listeners[0].routes[0].mirror.cluster", "unknown cluster 'nowhere'")

    def test_abort_percent_needs_status(self):
        self.assertInvalid("fault: {delay: 100ms, delay_percent: 10}", "fault: {abort_percent: 10}",
                           "listeners[0].routes[0].fault.abort_percent", "needs abort_status")

    def test_route_targets_exclusive(self):
        self.assertInvalid("redirect: {uri: /new, code: 302}", "redirect: {uri: /new}, cluster: shadow",
                           "listeners[0].routes[1].cluster", "exactly one of")

    def test_redirect_code(self):
        self.assertInvalid("code: 302", "code: 200", "listeners[0].routes[1].redirect.code", "must be one of")

    def test_hash_policy_one_key(self):
        self.assertInvalid("{cookie: session, algorithm: maglev}", "{cookie: session, header: x}",
                           "clusters[0].hash_policy", "exactly one of")

    def test_health_check_path(self):
        self.assertInvalid("path: /healthz", "path: healthz", "clusters[0].health_check.path",
                           "must start with '/'")

    def test_unknown_subset(self):
        self.assertInvalid("{cluster: reviews, subset: v1, weight: 90}", "{cluster: reviews, subset: v9, weight: 90}",
                           "listeners[0].routes[0].weighted_clusters[0].subset",
                           "cluster 'reviews' has no subset 'v9' (subsets: v1, v2)")

    def test_host_is_not_a_header(self):
        self.assertInvalid("request_headers: {set: {x-a: b}", "request_headers: {set: {Host: b}",
                           "listeners[0].routes[0].request_headers.set", "host_rewrite")

    def test_maglev_table_smaller_than_endpoints(self):
        self.assertInvalid("{cookie: session, algorithm: maglev}", "{cookie: session, algorithm: maglev, table_size: 1}",
                           "clusters[0].hash_policy.table_size", "at least one slot per endpoint")

    def test_fault_without_percent_applies_to_all(self):
        config = self.load(FULL.replace("fault: {delay: 100ms, delay_percent: 10}", "fault: {delay: 2s}"))
        fault = config.listeners[0].virtual_hosts[0].routes[0].fault
        self.assertEqual((fault.delay, fault.delay_percent, fault.abort_percent), (2.0, 100.0, 0.0))

    def test_one_abort_kind(self):
        self.assertInvalid("fault: {delay: 100ms, delay_percent: 10}", "fault: {abort_status: 503, abort_grpc_status: 14}",
                           "listeners[0].routes[0].fault.abort_grpc_status", "only one of")
