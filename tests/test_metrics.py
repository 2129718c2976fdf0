"""
Istio's standard metrics and txmesh's own: label computation (pure), the
metrics filter and peer metadata exchange, the exposition as Prometheus
parses it, the series cap, and the TCP families through a real L4 proxy.
"""

from types import SimpleNamespace

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from txmesh.config.errors import FilterConfigError
from txmesh.config.model import Endpoint, NodeConfig, Route, RouteMatch, WeightedDestination
from txmesh.observability.metrics import (
    BYTES_BUCKETS,
    DESTINATION,
    REQUEST_LABELS,
    SOURCE,
    TCP_LABELS,
    DestinationMetricsFilter,
    MetricsConfig,
    MetricsFactory,
    ProxyMetrics,
    SourceMetricsFilter,
    authority_host,
    namespace_of_principal,
    request_labels,
    service_of_cluster,
)
from txmesh.observability.peer_metadata import PEER_HEADER, PeerMetadata
from txmesh.proxy.stream import Headers, RequestHead, ResponseHead
from txmesh.proxy.tcp import TCPProxyFactory

U = "unknown"
NODE = NodeConfig(workload="productpage-v1", namespace="default", app="productpage", version="v1")
ME = "spiffe://cluster.local/ns/default/sa/productpage"
CALLER = "spiffe://cluster.local/ns/default/sa/frontend"
WEB_CALLER = "spiffe://cluster.local/ns/web/sa/frontend"
REVIEWS = "outbound|9080|v2|reviews.default.svc.cluster.local"
PEER = PeerMetadata("reviews-v2", "default", "reviews", "v2")


def labels(**kwargs):
    values = request_labels(**{"node": NODE, "protocol": "http", "code": 200, "grpc_status": "", "flags": "",
                               **kwargs})
    return dict(zip(REQUEST_LABELS, values, strict=True))


# (arguments, expected labels (a subset))
LABEL_CASES = {
    "source_knows_itself_and_cluster_service": (
        {"reporter": SOURCE, "cluster": REVIEWS},
        {"reporter": "source", "source_workload": "productpage-v1", "source_workload_namespace": "default",
         "source_app": "productpage", "source_version": "v1", "source_principal": U,
         "destination_service": "reviews.default.svc.cluster.local", "destination_service_name": "reviews",
         "destination_service_namespace": "default", "destination_workload": U, "destination_app": U,
         "destination_principal": U, "connection_security_policy": U, "response_flags": "-",
         "request_protocol": "http", "response_code": "200", "grpc_response_status": "",
         "source_cluster": U, "destination_cluster": U}),
    "source_peer_fills_destination": (
        {"reporter": SOURCE, "cluster": REVIEWS, "peer": PEER},
        {"destination_workload": "reviews-v2", "destination_workload_namespace": "default",
         "destination_app": "reviews", "destination_version": "v2"}),
    "source_principal_when_cluster_is_mtls": (
        {"reporter": SOURCE, "cluster": REVIEWS, "own_principal": ME, "upstream_mtls": True},
        {"source_principal": ME, "destination_principal": U, "connection_security_policy": U}),
    "source_no_principal_when_cluster_is_plain": (
        {"reporter": SOURCE, "cluster": REVIEWS, "own_principal": ME},
        {"source_principal": U}),
    "source_plain_cluster_name": (
        {"reporter": SOURCE, "cluster": "app"},
        {"destination_service": "app", "destination_service_name": "app",
         "destination_service_namespace": U}),
    "source_no_cluster": (
        {"reporter": SOURCE, "cluster": "", "code": 404, "flags": "NR"},
        {"destination_service": U, "destination_service_name": U, "response_code": "404",
         "response_flags": "NR"}),
    "destination_knows_itself": (
        {"reporter": DESTINATION, "cluster": "app"},
        {"reporter": "destination", "destination_workload": "productpage-v1", "destination_app": "productpage",
         "destination_version": "v1", "destination_workload_namespace": "default",
         "destination_service": "app", "destination_service_name": "app",
         "destination_service_namespace": "default", "source_workload": U, "source_principal": U,
         "destination_principal": U, "connection_security_policy": "none"}),
    "destination_mtls_principals": (
        {"reporter": DESTINATION, "cluster": "app", "own_principal": ME, "downstream_principal": CALLER},
        {"source_principal": CALLER, "destination_principal": ME, "connection_security_policy": "mutual_tls"}),
    "destination_peer_fills_source": (
        {"reporter": DESTINATION, "cluster": "app", "peer": PEER},
        {"source_workload": "reviews-v2", "source_workload_namespace": "default", "source_app": "reviews",
         "source_version": "v2"}),
    "destination_inbound_cluster_uses_authority": (
        {"reporter": DESTINATION, "cluster": "inbound|9080||productpage-v1",
         "authority": b"productpage.default.svc.cluster.local:9080"},
        {"destination_service": "productpage.default.svc.cluster.local",
         "destination_service_name": "productpage", "destination_service_namespace": "default"}),
    "destination_inbound_short_authority": (
        {"reporter": DESTINATION, "cluster": "inbound|9080||productpage-v1", "authority": b"productpage"},
        {"destination_service": "productpage", "destination_service_namespace": "default"}),
    "destination_inbound_garbage_authority": (
        {"reporter": DESTINATION, "cluster": "inbound|9080||productpage-v1", "authority": b"a b/c"},
        {"destination_service": U, "destination_service_name": U}),
    "destination_principal_gives_source_namespace": (
        {"reporter": DESTINATION, "cluster": "app", "own_principal": ME, "downstream_principal": WEB_CALLER},
        {"source_principal": WEB_CALLER, "source_workload_namespace": "web", "source_workload": U}),
    "destination_peer_namespace_wins_over_principal": (
        {"reporter": DESTINATION, "cluster": "app", "own_principal": ME, "downstream_principal": WEB_CALLER,
         "peer": PEER},
        {"source_workload_namespace": "default"}),
    "destination_odd_principal_no_namespace": (
        {"reporter": DESTINATION, "cluster": "app", "downstream_principal": "spiffe://cluster.local/x"},
        {"source_workload_namespace": U, "source_principal": "spiffe://cluster.local/x"}),
    "destination_inbound_cluster_without_authority": (
        {"reporter": DESTINATION, "cluster": "inbound|9080||productpage-v1"},
        {"destination_service": U, "destination_service_name": U, "destination_service_namespace": U}),
    "destination_inbound_cluster_service_host": (
        {"reporter": DESTINATION, "cluster": "inbound|9080|tcp|productpage.default.svc.cluster.local"},
        {"destination_service": "productpage.default.svc.cluster.local",
         "destination_service_name": "productpage", "destination_service_namespace": "default"}),
    "grpc": (
        {"reporter": SOURCE, "cluster": "app", "protocol": "grpc", "grpc_status": "14"},
        {"request_protocol": "grpc", "grpc_response_status": "14"}),
    "several_flags": (
        {"reporter": SOURCE, "cluster": "app", "code": 503, "flags": "UF,URX"},
        {"response_flags": "UF,URX", "response_code": "503"}),
    "no_response": (
        {"reporter": DESTINATION, "cluster": "app", "code": 0, "flags": "DC"},
        {"response_code": "0", "response_flags": "DC"}),
    "node_garbage_is_unknown": (
        {"reporter": SOURCE, "cluster": "app", "node": NodeConfig(workload="a b", app="x;y")},
        {"source_workload": U, "source_app": U}),
}


class LabelTests(SynchronousTestCase):
    def test_label_names(self):
        self.assertEqual(len(REQUEST_LABELS), 21)
        self.assertNotIn("response_code", TCP_LABELS)
        self.assertNotIn("grpc_response_status", TCP_LABELS)
        self.assertIn("response_flags", TCP_LABELS)

    def test_cluster_names(self):
        cases = {
            REVIEWS: ("reviews.default.svc.cluster.local", "reviews", "default"),
            "outbound|80||backend.demo.svc.cluster.local": ("backend.demo.svc.cluster.local", "backend", "demo"),
            "outbound|443||www.example.com": ("www.example.com", "www.example.com", U),
            "outbound|80||": ("outbound|80||", "outbound|80||", U),
            "outbound|broken": ("outbound|broken", "outbound|broken", U),
            "app": ("app", "app", U),
            "": (U, U, U),
            # Istio's older inbound names end with the service host...
            "inbound|9080|http|reviews.default.svc.cluster.local": (
                "reviews.default.svc.cluster.local", "reviews", "default"),
            # ... txmesh's with the workload, which is no service.
            "inbound|9080||reviews-v1": (U, U, U),
            "inbound|9080||": (U, U, U),
            "inbound|9080||www.example.com": (U, U, U),
            "inbound|broken": (U, U, U),
        }
        for cluster, expected in cases.items():
            s = service_of_cluster(cluster)
            self.assertEqual((s.host, s.name, s.namespace), expected, cluster)

    def test_namespace_of_principal(self):
        cases = {WEB_CALLER: "web", CALLER: "default", "spiffe://td/ns//sa/x": U, "spiffe://td/ns/a/b/sa/x": U,
                 "spiffe://td/x/a/sa/b": U, "https://td/ns/a/sa/b": U, "spiffe://td/ns/a b/sa/x": U, "": U,
                 None: U}
        for principal, expected in cases.items():
            self.assertEqual(namespace_of_principal(principal), expected, principal)

    def test_authority_host(self):
        cases = {b"Reviews:9080": "reviews", b"10.0.0.1:80": "10.0.0.1", b"a.b.svc": "a.b.svc",
                 b"[::1]:80": None, b"": None, None: None, b"\xff": None, b"a b": None, b"-a": None,
                 b"x" * 300: None}
        for authority, expected in cases.items():
            self.assertEqual(authority_host(authority), expected, authority)


def _label_case(kwargs, expected):
    def test(self):
        got = labels(**kwargs)
        self.assertEqual({k: got[k] for k in expected}, expected)
    return test


for _name, (_kwargs, _expected) in LABEL_CASES.items():
    setattr(LabelTests, f"test_{_name}", _label_case(_kwargs, _expected))


def make_stream(upstream_cluster="app", route=None, status=200, flags=(), listener="http", principal=None,
                grpc=False, request_bytes=0, response_bytes=0, authority=b"svc"):
    clock = Clock()
    request = RequestHead(b"POST", b"/x/123?id=9", authority, Headers())
    if grpc:
        request.headers.add(b"content-type", b"application/grpc+proto")
    stream = SimpleNamespace(
        response_head=ResponseHead(status, Headers()) if status else None,
        route=route or Route("r", RouteMatch(), cluster="app"),
        upstream_cluster=upstream_cluster,
        request_head=request,
        response_flags=list(flags),
        clock=clock,
        start_time=clock.seconds(),
        listener_name=listener,
        downstream_principal=principal,
        proxy=None,
        cluster_manager=None,
        bytes_received=request_bytes,
        bytes_sent=response_bytes,
    )
    return stream


def source_filter(stream, metrics):
    return SourceMetricsFilter(stream, metrics.http, metrics.http.peer_header)


def destination_filter(stream, metrics):
    return DestinationMetricsFilter(stream, metrics.http, metrics.http.peer_header)


def families(metrics):
    text = metrics.exposition()[1].decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample_value(fam, suffix="", **match):
    values = [s.value for s in fam.samples
              if s.name == fam.name + suffix and all(s.labels.get(k) == v for k, v in match.items())]
    return sum(values) if values else None


class MetricsFilterTests(SynchronousTestCase):
    def test_split_route_counts_chosen_cluster(self):
        metrics = ProxyMetrics(NodeConfig(workload="web"))
        split = Route("split", RouteMatch(), destinations=(WeightedDestination("v1", 90),
                                                           WeightedDestination("v2", 10)))
        for cluster in ("v1", "v1", "v2"):
            source_filter(make_stream(cluster, split), metrics).stream_complete()
        requests = families(metrics)["istio_requests"]
        self.assertEqual(sample_value(requests, "_total", destination_service="v1", source_workload="web"), 2)
        self.assertEqual(sample_value(requests, "_total", destination_service="v2"), 1)

    def test_local_reply_uses_route_cluster_and_flags(self):
        metrics = ProxyMetrics(NodeConfig())
        source_filter(make_stream(None, status=403, flags=["LR"]), metrics).stream_complete()
        requests = families(metrics)["istio_requests"]
        self.assertEqual(sample_value(requests, "_total", destination_service="app", response_code="403",
                                      response_flags="LR"), 1)

    def test_grpc_status_from_trailers_and_headers(self):
        metrics = ProxyMetrics(NodeConfig())
        f = source_filter(make_stream(grpc=True), metrics)
        f.response_trailers(Headers([(b"grpc-status", b"5")]))
        f.stream_complete()
        stream = make_stream(grpc=True)
        stream.response_head.headers.add(b"grpc-status", b"14")
        source_filter(stream, metrics).stream_complete()
        source_filter(make_stream(grpc=True, status=0, flags=["DC"]), metrics).stream_complete()
        source_filter(make_stream(), metrics).stream_complete()
        requests = families(metrics)["istio_requests"]
        self.assertEqual(sample_value(requests, "_total", request_protocol="grpc", grpc_response_status="5"), 1)
        self.assertEqual(sample_value(requests, "_total", request_protocol="grpc", grpc_response_status="14"), 1)
        self.assertEqual(sample_value(requests, "_total", request_protocol="grpc", grpc_response_status=U,
                                      response_code="0"), 1)
        self.assertEqual(sample_value(requests, "_total", request_protocol="http", grpc_response_status=""), 1)

    def test_source_exchange(self):
        """
        The source side sends its metadata on the request (replacing any
        the app set), and takes the destination's off the response.
        """
        metrics = ProxyMetrics(NODE)
        stream = make_stream(REVIEWS)
        f = source_filter(stream, metrics)
        head = stream.request_head
        head.headers.add(PEER_HEADER, b"w=spoofed")
        f.request_headers(head, True)
        self.assertEqual(head.headers.get_all(PEER_HEADER),
                         [b"w=productpage-v1;n=default;a=productpage;v=v1"])
        stream.response_head.headers.add(PEER_HEADER, b"w=reviews-v2;n=default;a=reviews;v=v2")
        f.response_headers(stream.response_head, False)
        self.assertNotIn(PEER_HEADER, stream.response_head.headers)
        f.stream_complete()
        requests = families(metrics)["istio_requests"]
        self.assertEqual(sample_value(requests, "_total", reporter="source", destination_workload="reviews-v2",
                                      destination_version="v2", destination_service_name="reviews"), 1)

    def test_destination_exchange(self):
        """
        The destination side takes the source's metadata off the request
        (the app never sees it) and sends its own on the response.
        """
        metrics = ProxyMetrics(NODE)
        stream = make_stream("app", listener="inbound", principal=CALLER)
        f = destination_filter(stream, metrics)
        stream.request_head.headers.add(PEER_HEADER, b"w=frontend;n=default;a=frontend;v=v3")
        f.request_headers(stream.request_head, True)
        self.assertNotIn(PEER_HEADER, stream.request_head.headers)
        f.response_headers(stream.response_head, False)
        self.assertEqual(stream.response_head.headers.get(PEER_HEADER),
                         b"w=productpage-v1;n=default;a=productpage;v=v1")
        f.stream_complete()
        requests = families(metrics)["istio_requests"]
        self.assertEqual(sample_value(requests, "_total", reporter="destination", source_workload="frontend",
                                      source_version="v3", source_principal=CALLER,
                                      connection_security_policy="mutual_tls",
                                      destination_workload="productpage-v1"), 1)

    def test_destination_garbage_peer(self):
        metrics = ProxyMetrics(NODE)
        stream = make_stream("app", listener="inbound")
        f = destination_filter(stream, metrics)
        stream.request_head.headers.add(PEER_HEADER, b"\xff\x00 w=../../etc")
        f.request_headers(stream.request_head, True)
        f.stream_complete()
        self.assertNotIn(PEER_HEADER, stream.request_head.headers)
        requests = families(metrics)["istio_requests"]
        self.assertEqual(sample_value(requests, "_total", source_workload=U, source_app=U,
                                      connection_security_policy="none"), 1)

    def test_no_path_or_id_in_labels(self):
        metrics = ProxyMetrics(NODE)
        source_filter(make_stream(), metrics).stream_complete()
        text = metrics.exposition()[1].decode()
        self.assertNotIn("/x/123", text)
        self.assertNotIn("id=9", text)


class FactoryTests(SynchronousTestCase):
    def test_parse_config(self):
        f = MetricsFactory()
        self.assertIsNone(f.parse_config(None))
        self.assertIsNone(f.parse_config({}))
        self.assertEqual(f.parse_config({"reporter": "source"}), MetricsConfig("source"))
        self.assertEqual(f.parse_config({"reporter": "destination"}), MetricsConfig("destination"))
        self.assertEqual(f.parse_config({"peer_metadata": False}), MetricsConfig(None, False))
        for raw, field in [({"reporter": "client"}, "reporter"), ({"peer_metadata": "no"}, "peer_metadata"),
                           ({"buckets": 3}, "buckets"), (["x"], "")]:
            with self.assertRaises(FilterConfigError) as e:
                f.parse_config(raw)
            self.assertEqual(e.exception.field, field)

    def test_reporter_from_listener_or_config(self):
        f = MetricsFactory()
        proxy = SimpleNamespace(metrics=ProxyMetrics(NODE))
        cases = [(None, "inbound", DestinationMetricsFilter), (None, "outbound", SourceMetricsFilter),
                 (MetricsConfig("source"), "inbound", SourceMetricsFilter),
                 (MetricsConfig("destination"), "http", DestinationMetricsFilter)]
        for config, listener, cls in cases:
            stream = make_stream(listener=listener)
            stream.proxy = proxy
            self.assertIsInstance(f.create_filter(config, stream), cls)


class ExpositionTests(SynchronousTestCase):
    def test_types_buckets_and_values(self):
        metrics = ProxyMetrics(NODE)
        stream = make_stream(REVIEWS, request_bytes=5, response_bytes=2000)
        stream.clock.advance(0.03)
        source_filter(stream, metrics).stream_complete()
        fams = families(metrics)
        self.assertEqual(fams["istio_requests"].type, "counter")
        for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
            self.assertEqual(fams[name].type, "histogram", name)
        self.assertEqual(sample_value(fams["istio_requests"], "_total"), 1)
        duration = fams["istio_request_duration_milliseconds"]
        self.assertAlmostEqual(sample_value(duration, "_sum"), 30.0)
        self.assertEqual(sample_value(duration, "_bucket", le="25.0"), 0)
        self.assertEqual(sample_value(duration, "_bucket", le="50.0"), 1)
        response = fams["istio_response_bytes"]
        les = [s.labels["le"] for s in response.samples if s.name == "istio_response_bytes_bucket"]
        self.assertEqual(les, [floatToGoString(b) for b in BYTES_BUCKETS] + ["+Inf"])
        self.assertEqual(sample_value(response, "_bucket", le="1000.0"), 0)
        self.assertEqual(sample_value(response, "_bucket", le="10000.0"), 1)
        self.assertIn("1e+06", les)
        self.assertEqual(sample_value(response, "_sum"), 2000)
        self.assertEqual(sample_value(fams["istio_request_bytes"], "_bucket", le="10.0"), 1)
        labels = next(s.labels for s in fams["istio_requests"].samples)
        self.assertEqual(set(labels), set(REQUEST_LABELS))
        for name in ("istio_tcp_connections_opened", "istio_tcp_connections_closed",
                     "istio_tcp_received_bytes", "istio_tcp_sent_bytes"):
            self.assertEqual(fams[name].type, "counter", name)

    def test_txmesh_state(self):
        class Pool:
            connections = 2

        class Breaker:
            def stats(self):
                return {"upstream_rq_overflow": 3, "upstream_rq_pending_overflow": 1, "upstream_cx_overflow": 0}

        outlier = SimpleNamespace(stats=lambda: {"ejections_enforced_total": 4, "ejections_active": 1})
        cluster = SimpleNamespace(name="app", pools=lambda: [Pool(), Pool()], breaker=Breaker(),
                                  retry_budget=SimpleNamespace(overflows=7), outlier=outlier)
        metrics = ProxyMetrics(NODE)
        status = {"connected": "tcp:127.0.0.1:15010", "acked_version": "v42"}
        metrics.watch(clusters=lambda: [cluster], config_version=lambda: 3, pilot_status=lambda: status)
        metrics.count_retry("app")
        metrics.count_retry("app")
        metrics.config_reloads.labels("applied").inc()
        fams = families(metrics)
        self.assertEqual(sample_value(fams["txmesh_upstream_connections_active"], cluster="app"), 4)
        overflow = fams["txmesh_upstream_overflow"]
        self.assertEqual(sample_value(overflow, "_total", cluster="app", kind="rq"), 3)
        self.assertEqual(sample_value(overflow, "_total", cluster="app", kind="rq_pending"), 1)
        self.assertEqual(sample_value(overflow, "_total", cluster="app", kind="retry"), 7)
        self.assertEqual(sample_value(fams["txmesh_upstream_retries"], "_total", cluster="app"), 2)
        self.assertEqual(sample_value(fams["txmesh_outlier_ejections"], "_total", cluster="app"), 4)
        self.assertEqual(sample_value(fams["txmesh_outlier_ejections_active"], cluster="app"), 1)
        self.assertEqual(sample_value(fams["txmesh_config_version"]), 3)
        self.assertEqual(sample_value(fams["txmesh_pilot_connected"]), 1)
        self.assertEqual(sample_value(fams["txmesh_pilot_info"], version="v42"), 1)
        self.assertEqual(sample_value(fams["txmesh_config_reloads"], "_total", result="applied"), 1)
        status["connected"] = None
        self.assertEqual(sample_value(families(metrics)["txmesh_pilot_connected"]), 0)

    def test_no_pilot_no_pilot_series(self):
        metrics = ProxyMetrics(NODE)
        metrics.watch(pilot_status=lambda: None)
        self.assertNotIn("txmesh_pilot_connected", families(metrics))


class SeriesCapTests(SynchronousTestCase):
    def test_overflow(self):
        metrics = ProxyMetrics(NODE, max_series=2)
        for cluster in ("a", "b", "c", "d", "c"):
            source_filter(make_stream(cluster), metrics).stream_complete()
        destination_filter(make_stream("e", listener="inbound"), metrics).stream_complete()
        fams = families(metrics)
        requests = fams["istio_requests"]
        self.assertEqual(sample_value(requests, "_total", destination_service="a"), 1)
        self.assertEqual(sample_value(requests, "_total", destination_service="b"), 1)
        self.assertIsNone(sample_value(requests, "_total", destination_service="c"))
        self.assertEqual(sample_value(requests, "_total", reporter="source", destination_service="overflow",
                                      source_workload="overflow", response_code="overflow"), 3)
        self.assertEqual(sample_value(requests, "_total", reporter="destination",
                                      destination_service="overflow"), 1)
        # c, d and e: three label sets refused (the second c is remembered).
        self.assertEqual(sample_value(fams["txmesh_metrics_series_dropped"], "_total", family="istio_requests"), 3)
        self.assertEqual(len(metrics.http.table.series), 4)

    def test_key_cache_bounded(self):
        metrics = ProxyMetrics(NODE, max_series=2)
        for i in range(50):
            stream = make_stream("app")
            stream.response_head.headers.add(PEER_HEADER, b"w=x;n=%d" % i)
            f = source_filter(stream, metrics)
            f.response_headers(stream.response_head, False)
            f.stream_complete()
        self.assertLessEqual(len(metrics.http.table.keys), 8)
        self.assertEqual(sum(s.count for s in metrics.http.table.series.values()), 50)


class _Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Client(Protocol):
    def __init__(self):
        self.received = b""
        self.closed = defer.Deferred()
        self.waiting = None

    def dataReceived(self, data):
        self.received += data
        if self.waiting is not None and len(self.received) >= self.waiting[0]:
            d, self.waiting = self.waiting[1], None
            d.callback(None)

    def wait_for(self, n):
        d = defer.Deferred()
        self.waiting = (n, d)
        if len(self.received) >= n:
            self.dataReceived(b"")
        return d

    def connectionLost(self, reason):
        self.closed.callback(None)


class TCPMetricsTests(TestCase):
    """
    The istio_tcp_* families, through txmesh.proxy.tcp on real loopback
    sockets.
    """

    @defer.inlineCallbacks
    def test_real_proxy(self):
        echo = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(_Echo))
        self.addCleanup(echo.stopListening)
        port = echo.getHost().port
        metrics = ProxyMetrics(NODE)
        factory = TCPProxyFactory(
            listener_name="tcp-reviews",
            pick_endpoint=lambda: Endpoint("127.0.0.1", port),
            connector=lambda ep: TCP4ClientEndpoint(reactor, ep.host, ep.port),
            clock=reactor,
            idle_timeout=0,
            observer=metrics.tcp_listener("tcp-reviews", REVIEWS),
        )
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        client = _Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port), client)
        client.transport.write(b"x" * 1000)
        yield client.wait_for(1000)
        # A scrape while the connection is open already counts its bytes.
        fams = families(metrics)
        match = {"reporter": "source", "destination_service_name": "reviews", "request_protocol": "tcp",
                 "source_workload": "productpage-v1", "connection_security_policy": U}
        self.assertEqual(sample_value(fams["istio_tcp_connections_opened"], "_total", **match), 1)
        self.assertEqual(sample_value(fams["istio_tcp_connections_closed"], "_total", **match), 0)
        self.assertEqual(sample_value(fams["istio_tcp_received_bytes"], "_total", **match), 1000)
        self.assertEqual(sample_value(fams["istio_tcp_sent_bytes"], "_total", **match), 1000)
        client.transport.write(b"y" * 500)
        yield client.wait_for(1500)
        client.transport.loseConnection()
        yield client.closed
        for _ in range(50):
            if not metrics.tcp.live:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        fams = families(metrics)
        self.assertEqual(sample_value(fams["istio_tcp_connections_closed"], "_total", **match), 1)
        self.assertEqual(sample_value(fams["istio_tcp_received_bytes"], "_total", **match), 1500)
        self.assertEqual(sample_value(fams["istio_tcp_sent_bytes"], "_total", **match), 1500)
        self.assertEqual(sample_value(fams["istio_tcp_connections_opened"], "_total", **match), 1)
        labels = next(s.labels for s in fams["istio_tcp_sent_bytes"].samples)
        self.assertEqual(set(labels), set(TCP_LABELS))

    @defer.inlineCallbacks
    def test_no_upstream_flag(self):
        metrics = ProxyMetrics(NODE)
        factory = TCPProxyFactory(
            listener_name="inbound", pick_endpoint=lambda: None,
            connector=lambda ep: TCP4ClientEndpoint(reactor, ep.host, ep.port), clock=reactor, idle_timeout=0,
            observer=metrics.tcp_listener("inbound", "app", "STRICT"))
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        client = _Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port), client)
        yield client.closed
        for _ in range(50):
            if not metrics.tcp.live:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        fams = families(metrics)
        closed = fams["istio_tcp_connections_closed"]
        self.assertEqual(sample_value(closed, "_total", reporter="destination", response_flags="UH",
                                      connection_security_policy="mutual_tls",
                                      destination_workload="productpage-v1"), 1)
        self.assertEqual(sample_value(fams["istio_tcp_connections_opened"], "_total", response_flags="-"), 1)


def _spiffe_transport(principal):
    """
    @return: a stand-in TLS transport whose peer certificate carries
        C{principal} (or no certificate for C{None}).
    """
    if principal is None:
        return SimpleNamespace(getPeerCertificate=lambda: None)
    extensions = x509.Extensions([x509.Extension(
        x509.SubjectAlternativeName.oid, False,
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(principal)]))])
    certificate = SimpleNamespace(extensions=extensions)
    return SimpleNamespace(getPeerCertificate=lambda: SimpleNamespace(to_cryptography=lambda: certificate))


class _Connection:
    # Hashable (live connections are dict keys), unlike SimpleNamespace.
    def __init__(self, transport):
        self.bytes_received = self.bytes_sent = 0
        self.downstream_transport = transport


def _connection(principal=None, plain=False):
    return _Connection(SimpleNamespace() if plain else _spiffe_transport(principal))


def _closed(connection, flags=()):
    return SimpleNamespace(bytes_received=connection.bytes_received, bytes_sent=connection.bytes_sent,
                           response_flags=tuple(flags))


class _Identity:
    spiffe_id = ME


class TCPListenerLabelTests(SynchronousTestCase):
    """
    The per-connection labels of L{TCPListenerMetrics}: the peer principal
    of a mutual TLS listener, the policy, the cached label sets.
    """

    def series(self, metrics, **match):
        fams = families(metrics)
        return {name: sample_value(fams[f"istio_tcp_{name}"], "_total", **match)
                for name in ("connections_opened", "connections_closed", "received_bytes", "sent_bytes")}

    def test_strict_inbound_principals(self):
        metrics = ProxyMetrics(NODE, identity=_Identity())
        observer = metrics.tcp_listener("inbound", "inbound|9080||productpage-v1", "STRICT")
        connection = _connection(WEB_CALLER)
        observer.connection_opened(connection)
        # Not counted before the handshake tells who the peer is.
        self.assertEqual(self.series(metrics)["connections_opened"], None)
        observer.connection_secured(connection)
        connection.bytes_received, connection.bytes_sent = 10, 20
        match = {"reporter": "destination", "source_principal": WEB_CALLER, "source_workload_namespace": "web",
                 "destination_principal": ME, "connection_security_policy": "mutual_tls",
                 "destination_workload": "productpage-v1", "destination_service": U, "response_flags": "-"}
        self.assertEqual(self.series(metrics, **match),
                         {"connections_opened": 1, "connections_closed": 0, "received_bytes": 10, "sent_bytes": 20})
        connection.bytes_received, connection.bytes_sent = 15, 30
        observer.connection_closed(connection, _closed(connection))
        self.assertEqual(self.series(metrics, **match),
                         {"connections_opened": 1, "connections_closed": 1, "received_bytes": 15, "sent_bytes": 30})
        self.assertEqual(metrics.tcp.live, {})

    def test_closed_before_handshake(self):
        metrics = ProxyMetrics(NODE, identity=_Identity())
        observer = metrics.tcp_listener("inbound", "app", "STRICT")
        connection = _connection(None)
        observer.connection_opened(connection)
        observer.connection_closed(connection, _closed(connection, ["UH"]))
        fams = families(metrics)
        self.assertEqual(sample_value(fams["istio_tcp_connections_opened"], "_total", response_flags="-",
                                      source_principal=U, destination_principal=U,
                                      connection_security_policy="mutual_tls"), 1)
        self.assertEqual(sample_value(fams["istio_tcp_connections_closed"], "_total", response_flags="UH"), 1)

    def test_permissive_policy_per_connection(self):
        metrics = ProxyMetrics(NODE, identity=_Identity())
        observer = metrics.tcp_listener("inbound", "app", "PERMISSIVE")
        mtls, plain = _connection(CALLER), _connection(plain=True)
        observer.connection_opened(plain)
        # A plaintext connection has no handshake to wait for.
        self.assertEqual(sample_value(families(metrics)["istio_tcp_connections_opened"], "_total"), 1)
        observer.connection_opened(mtls)
        observer.connection_secured(mtls)
        for connection in (mtls, plain):
            observer.connection_closed(connection, _closed(connection))
        fams = families(metrics)
        opened = fams["istio_tcp_connections_opened"]
        self.assertEqual(sample_value(opened, "_total", connection_security_policy="mutual_tls",
                                      source_principal=CALLER, destination_principal=ME), 1)
        self.assertEqual(sample_value(opened, "_total", connection_security_policy="none", source_principal=U,
                                      destination_principal=U), 1)

    def test_plain_listeners_read_no_certificate(self):
        metrics = ProxyMetrics(NODE, identity=_Identity())
        inbound = metrics.tcp_listener("inbound", "app")
        outbound = metrics.tcp_listener("tcp-reviews", REVIEWS, upstream_mtls=True)
        for observer in (inbound, outbound):
            # A transport with a certificate: not read without mutual TLS.
            connection = _connection(CALLER)
            observer.connection_opened(connection)
            observer.connection_closed(connection, _closed(connection))
        opened = families(metrics)["istio_tcp_connections_opened"]
        self.assertEqual(sample_value(opened, "_total", reporter="destination", source_principal=U,
                                      connection_security_policy="none"), 1)
        # The client side reports its own principal towards an ISTIO_MUTUAL cluster.
        self.assertEqual(sample_value(opened, "_total", reporter="source", source_principal=ME,
                                      destination_service="reviews.default.svc.cluster.local",
                                      connection_security_policy=U), 1)

    def test_label_sets_cached_per_peer(self):
        metrics = ProxyMetrics(NODE, identity=_Identity())
        observer = metrics.tcp_listener("inbound", "app", "STRICT")
        computed = []
        labels = metrics.tcp.labels
        metrics.tcp.labels = lambda *a: computed.append(a) or labels(*a)
        for principal in [CALLER, WEB_CALLER] * 50:
            connection = _connection(principal)
            observer.connection_opened(connection)
            observer.connection_secured(connection)
            observer.connection_closed(connection, _closed(connection))
        # One label set per peer principal, computed once.
        self.assertEqual(len(computed), 2)
        self.assertEqual(len(metrics.tcp.table.series), 2)
        self.assertEqual(sum(s.opened for s in metrics.tcp.table.series.values()), 100)

    def test_identity_set_later(self):
        metrics = ProxyMetrics(NODE)
        observer = metrics.tcp_listener("inbound", "app", "STRICT")
        for _ in range(2):
            connection = _connection(CALLER)
            observer.connection_opened(connection)
            observer.connection_secured(connection)
            observer.connection_closed(connection, _closed(connection))
            metrics.set_identity(_Identity())
        closed = families(metrics)["istio_tcp_connections_closed"]
        self.assertEqual(sample_value(closed, "_total", destination_principal=U), 1)
        self.assertEqual(sample_value(closed, "_total", destination_principal=ME), 1)


class MutualTLSTCPTests(TestCase):
    """
    The TCP families of a STRICT mutual TLS inbound listener, through
    txmesh.proxy.tcp behind txmesh's TLS listener, on real loopback sockets.
    """

    timeout = 20

    @defer.inlineCallbacks
    def test_real_mtls_inbound(self):
        import shutil
        import tempfile
        from datetime import datetime, timedelta, timezone

        from twisted.internet.endpoints import wrapClientTLS

        from txmesh.pilot.ca import CertificateAuthority, spiffe_id
        from txmesh.proxy.mesh_tls import MeshClientCreator, MeshServerCreator
        from txmesh.proxy.tls import TLSListenerFactory
        from txmesh.proxy.workload_identity import WorkloadIdentity

        directory = tempfile.mkdtemp(prefix="txmesh-metrics-")
        self.addCleanup(shutil.rmtree, directory, True)
        now = datetime.now(timezone.utc)
        ca = CertificateAuthority.load_or_create(directory, "cluster.local", now)

        def issue(namespace, account):
            identity = WorkloadIdentity(spiffe_id(ca.trust_domain, namespace, account))
            identity.install(ca.sign_csr(identity.new_request(), identity.spiffe_id, now, timedelta(hours=1)),
                             ca.trust_bundle_pem, now.timestamp())
            return identity

        server, caller = issue("default", "productpage"), issue("web", "frontend")
        echo = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(_Echo))
        self.addCleanup(echo.stopListening)
        port = echo.getHost().port
        metrics = ProxyMetrics(NODE, identity=server)
        proxy = TCPProxyFactory(
            listener_name="inbound",
            pick_endpoint=lambda: Endpoint("127.0.0.1", port),
            connector=lambda ep: TCP4ClientEndpoint(reactor, ep.host, ep.port),
            clock=reactor,
            idle_timeout=0,
            observer=metrics.tcp_listener("inbound", "inbound|9080||productpage-v1", "STRICT"),
        )
        tls = TLSListenerFactory(MeshServerCreator(server, (), require_peer=True), proxy, clock=reactor)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(tls)
        self.addCleanup(listening.stopListening)
        match = {"reporter": "destination", "request_protocol": "tcp", "source_principal": caller.spiffe_id,
                 "source_workload_namespace": "web", "destination_principal": server.spiffe_id,
                 "destination_workload": "productpage-v1", "connection_security_policy": "mutual_tls",
                 "destination_service": U}
        for n in (1, 2):
            client = _Client()
            endpoint = wrapClientTLS(MeshClientCreator(caller),
                                     TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port))
            yield connectProtocol(endpoint, client).addTimeout(5, reactor)
            client.transport.write(b"x" * 100)
            yield client.wait_for(100).addTimeout(5, reactor)
            fams = families(metrics)
            self.assertEqual(sample_value(fams["istio_tcp_connections_opened"], "_total", **match), n)
            self.assertEqual(sample_value(fams["istio_tcp_received_bytes"], "_total", **match), 100 * n)
            client.transport.loseConnection()
            yield client.closed.addTimeout(5, reactor)
            for _ in range(100):
                if not metrics.tcp.live:
                    break
                yield deferLater(reactor, 0.01, lambda: None)
        fams = families(metrics)
        self.assertEqual(sample_value(fams["istio_tcp_connections_closed"], "_total", **match), 2)
        self.assertEqual(sample_value(fams["istio_tcp_sent_bytes"], "_total", **match), 200)
        # Nothing was counted under an unknown principal.
        self.assertIsNone(sample_value(fams["istio_tcp_connections_opened"], "_total", source_principal=U))


class TwoSidecarTests(TestCase):
    """
    Two real proxies: the client's (listener "outbound", source reporter)
    and the server's (listener "inbound", destination reporter), on
    loopback; they exchange their metadata and neither application sees
    the header.
    """

    @defer.inlineCallbacks
    def test_exchange_end_to_end(self):
        from tests.support import ProxyHarness, RecordingFactory, fixed_response, listen_upstream, raw_exchange
        from txmesh.filters.registry import FilterRegistry
        from txmesh.filters.router import RouterFactory

        registry = FilterRegistry(http=[RouterFactory(), MetricsFactory()])
        app = RecordingFactory(fixed_response(b"hello"))
        app_port = yield listen_upstream(self, app)
        server = ProxyHarness(self, registry)
        yield server.start("""
            node: {workload: reviews-v2, namespace: default, app: reviews, version: v2}
            listeners:
              - name: inbound
                address: "tcp:0:interface=127.0.0.1"
                http_filters: [{name: metrics}]
                routes: [{cluster: "inbound|9080||reviews-v2"}]
              - name: tcp-in
                address: "tcp:0:interface=127.0.0.1"
                protocol: tcp
                cluster: "inbound|9080||reviews-v2"
            clusters:
              - {name: "inbound|9080||reviews-v2", endpoints: ["127.0.0.1:{app}"]}
            """, app=app_port)
        client = ProxyHarness(self, registry)
        yield client.start("""
            node: {workload: productpage-v1, namespace: default, app: productpage, version: v1}
            listeners:
              - name: outbound
                address: "tcp:0:interface=127.0.0.1"
                http_filters: [{name: metrics}]
                routes: [{cluster: "outbound|9080||reviews.default.svc.cluster.local"}]
            clusters:
              - {name: "outbound|9080||reviews.default.svc.cluster.local", endpoints: ["127.0.0.1:{inbound}"]}
            """, inbound=server.port("inbound"))
        reply = yield raw_exchange(self, client.port("outbound"),
                                   b"GET /reviews/1 HTTP/1.1\r\nHost: reviews.default.svc.cluster.local:9080\r\n"
                                   b"Connection: close\r\n\r\n")
        self.assertIn(b"hello", reply)
        self.assertNotIn(b"x-txmesh-peer", reply.lower())
        self.assertNotIn(b"x-txmesh-peer", app.all_received().lower())

        fams = families(client.service.metrics)
        self.assertEqual(sample_value(fams["istio_requests"], "_total", reporter="source",
                                      source_workload="productpage-v1", destination_workload="reviews-v2",
                                      destination_version="v2", destination_service_name="reviews",
                                      destination_service_namespace="default", response_code="200"), 1)
        self.assertEqual(sample_value(fams["txmesh_upstream_connections_active"],
                                      cluster="outbound|9080||reviews.default.svc.cluster.local"), 1)
        fams = families(server.service.metrics)
        self.assertEqual(sample_value(fams["istio_requests"], "_total", reporter="destination",
                                      source_workload="productpage-v1", source_app="productpage",
                                      destination_workload="reviews-v2",
                                      destination_service="reviews.default.svc.cluster.local",
                                      connection_security_policy="none", response_code="200"), 1)
        self.assertEqual(sample_value(fams["txmesh_config_version"]), 1)

        # The TCP listener of the same service reports too (service wiring).
        tcp_client = _Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port("tcp-in")), tcp_client)
        tcp_client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield tcp_client.wait_for(len(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")).addTimeout(5, reactor)
        tcp_client.transport.loseConnection()
        yield tcp_client.closed
        for _ in range(50):
            if not server.service.metrics.tcp.live:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        fams = families(server.service.metrics)
        self.assertEqual(sample_value(fams["istio_tcp_connections_closed"], "_total", reporter="source",
                                      request_protocol="tcp"), 1)
        self.assertGreater(sample_value(fams["istio_tcp_sent_bytes"], "_total"), 0)


class FilterFactoryCountersTests(SynchronousTestCase):
    """
    Counters filter factories keep (the tracing reporters' dropped spans)
    are exported with the proxy's metrics.
    """

    def test_tracing_reporter_counters(self) -> None:
        from txmesh.filters.tracing import TracingFactory

        class Reporter:
            # 5 refused by a full queue, 2 lost in the failed POST.
            dropped, sent, failures, spans_dropped = 5, 3, 1, 7

        factory = TracingFactory()
        factory.reporters["http://collector:9411/api/v2/spans"] = Reporter()
        metrics = ProxyMetrics(NodeConfig())
        metrics.watch(filter_factories=lambda: [factory, object()])
        text = metrics.exposition()[1].decode()
        self.assertIn('txmesh_tracing_spans_dropped_total{collector="http://collector:9411/api/v2/spans"} 7.0', text)
        self.assertIn("txmesh_tracing_spans_sent_total", text)
        self.assertIn("txmesh_tracing_report_failures_total", text)
