"""
The metrics filter: Istio-named series, labelled by the cluster the
router actually chose (so weighted splits count each destination).
"""

from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.model import NodeConfig, Route, RouteMatch, WeightedDestination
from txmesh.observability.metrics import MetricsFilter, ProxyMetrics
from txmesh.proxy.stream import Headers, RequestHead, ResponseHead


class MetricsFilterTests(SynchronousTestCase):
    def stream(self, upstream_cluster, route, status=200, flags=()):
        clock = Clock()
        return SimpleNamespace(
            response_head=ResponseHead(status, Headers()),
            route=route,
            upstream_cluster=upstream_cluster,
            request_head=RequestHead(b"GET", b"/", b"svc", Headers()),
            response_flags=list(flags),
            clock=clock,
            start_time=clock.seconds(),
        )

    def test_split_route_counts_chosen_cluster(self):
        metrics = ProxyMetrics(NodeConfig(workload="web"))
        split = Route("split", RouteMatch(), destinations=(WeightedDestination("v1", 90), WeightedDestination("v2", 10)))
        for cluster in ("v1", "v1", "v2"):
            MetricsFilter(self.stream(cluster, split), metrics).stream_complete()
        text = metrics.exposition()[1].decode()
        self.assertIn('destination_service="v1"', text)
        self.assertIn('destination_service="v2"', text)
        self.assertEqual(metrics.request_series("v1", "http", 200, "").count, 2)
        self.assertEqual(metrics.request_series("v2", "http", 200, "").count, 1)

    def test_local_reply_uses_route_cluster_and_flags(self):
        metrics = ProxyMetrics(NodeConfig())
        route = Route("r", RouteMatch(), cluster="app")
        MetricsFilter(self.stream(None, route, 403, ["LR"]), metrics).stream_complete()
        self.assertEqual(metrics.request_series("app", "http", 403, "LR").count, 1)

    def test_grpc_protocol(self):
        metrics = ProxyMetrics(NodeConfig())
        stream = self.stream("app", Route("r", RouteMatch(), cluster="app"))
        stream.request_head.headers.add(b"content-type", b"application/grpc+proto")
        MetricsFilter(stream, metrics).stream_complete()
        self.assertEqual(metrics.request_series("app", "grpc", 200, "").count, 1)
