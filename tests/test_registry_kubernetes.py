"""
The Kubernetes registry: the pure mapping of Services, EndpointSlices and
Pods to services (tables), its configuration, and list + watch against the
fake API server in L{tests.k8s_fake} over real loopback sockets.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.k8s_fake import FakeKubernetes, endpoint, endpoint_slice, pod, service
from txmesh.config.errors import ConfigError
from txmesh.config.model import Endpoint
from txmesh.pilot.registry import IRegistry, ServiceEndpoints, ServicePort
from txmesh.pilot.registry.kubernetes import (
    IN_CLUSTER_TOKEN,
    KubernetesRegistry,
    build_view,
    collection_path,
    from_config,
    port_protocol,
)

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"


class PortProtocolTests(SynchronousTestCase):
    def test_table(self):
        """
        appProtocol wins; else the name's prefix as Istio reads it; else TCP.
        """
        table = [
            ("http", None, "HTTP"),
            ("http-web", None, "HTTP"),
            ("HTTP2", None, "HTTP2"),
            ("http2-api", None, "HTTP2"),
            ("grpc", None, "GRPC"),
            ("grpc-api", None, "GRPC"),
            ("grpc-web", None, "HTTP"),
            ("https-admin", None, "HTTPS"),
            ("tls", None, "TLS"),
            ("tcp-db", None, "TCP"),
            ("mysql", None, "TCP"),
            ("", None, "TCP"),
            ("httpx", None, "TCP"),
            ("web", "http", "HTTP"),
            ("web", "kubernetes.io/h2c", "HTTP2"),
            ("http", "grpc", "GRPC"),
            ("grpc", "unknown.example/proto", "GRPC"),
        ]
        for name, app, expected in table:
            self.assertEqual(port_protocol(name, app), expected, (name, app))


def _view(services=(), slices=(), pods=(), suffix="cluster.local"):
    return build_view(list(services), list(slices), list(pods), suffix)


class BuildViewTests(SynchronousTestCase):
    """
    L{build_view}, a pure function of the API's objects.
    """

    def test_service_with_endpoints(self):
        """
        A Service and its slice give the FQDN, the ports and the ready
        endpoints on the slice's (target) port, with pod labels, zone and
        service account.
        """
        view = _view(
            [service("reviews", ports=[{"name": "http", "protocol": "TCP", "port": 9080, "targetPort": 8080}])],
            [endpoint_slice("reviews-abc", "reviews",
                            [endpoint("10.1.0.1", pod="reviews-v1", zone="eu-a"), endpoint("10.1.0.2", pod="reviews-v2")],
                            ports=[{"name": "http", "protocol": "TCP", "port": 8080}])],
            [pod("reviews-v1", {"app": "reviews", "version": "v1"}, "10.1.0.1"),
             pod("reviews-v2", {"app": "reviews", "version": "v2",
                                "topology.kubernetes.io/region": "eu", "topology.kubernetes.io/zone": "eu-b"},
                 "10.1.0.2")],
        )
        self.assertEqual(list(view), [REVIEWS])
        svc = view[REVIEWS]
        self.assertEqual(svc.ports, (ServicePort("http", 9080, "HTTP"),))
        self.assertEqual(svc.endpoints, (
            Endpoint("10.1.0.1", 8080, (("app", "reviews"), ("version", "v1")), 1, "/eu-a", "default/default"),
            Endpoint("10.1.0.2", 8080, (("app", "reviews"), ("topology.kubernetes.io/region", "eu"),
                                        ("topology.kubernetes.io/zone", "eu-b"), ("version", "v2")), 1, "eu/eu-b",
                     "default/default"),
        ))
        self.assertTrue(svc.healthy)

    def test_service_accounts(self):
        """
        Each endpoint carries its Pod's C{spec.serviceAccountName} in the
        Pod's namespace; an endpoint with no Pod, or a Pod without the
        field, has none (unknown).
        """
        v1 = pod("reviews-v1", {}, "10.1.0.1", namespace="shop")
        v1["spec"]["serviceAccountName"] = "bookinfo-reviews"
        v2 = pod("reviews-v2", {}, "10.1.0.2", namespace="shop")
        del v2["spec"]["serviceAccountName"]
        view = _view([service("reviews", namespace="shop")],
                     [endpoint_slice("s", "reviews", [endpoint("10.1.0.1", pod="reviews-v1", namespace="shop"),
                                                      endpoint("10.1.0.2", pod="reviews-v2", namespace="shop"),
                                                      endpoint("10.1.0.3")], namespace="shop")],
                     [v1, v2])
        self.assertEqual([e.service_account for e in view["reviews.shop.svc.cluster.local"].endpoints],
                         ["shop/bookinfo-reviews", "", ""])

    def test_readiness(self):
        """
        Endpoints whose conditions.ready is false are left out; a missing
        condition counts as ready.
        """
        view = _view([service("reviews")], [endpoint_slice("s", "reviews", [
            endpoint("10.1.0.1", ready=True), endpoint("10.1.0.2", ready=False), endpoint("10.1.0.3", ready=None)])])
        self.assertEqual([e.host for e in view[REVIEWS].endpoints], ["10.1.0.1", "10.1.0.3"])

    def test_ports_by_name(self):
        """
        Each service port takes the slice port of the same name; unnamed
        ports match unnamed slice ports; UDP ports are left out.
        """
        ports = [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "web"},
                 {"name": "grpc", "protocol": "TCP", "port": 90, "appProtocol": "grpc"},
                 {"name": "dns", "protocol": "UDP", "port": 53}]
        view = _view([service("ratings", ports=ports)], [endpoint_slice("s", "ratings", [endpoint("10.2.0.1")], ports=[
            {"name": "grpc", "protocol": "TCP", "port": 9090}, {"name": "http", "protocol": "TCP", "port": 8080},
            {"name": "dns", "protocol": "UDP", "port": 5353}])])
        svc = view[RATINGS]
        self.assertEqual(svc.ports, (ServicePort("http", 80, "HTTP"), ServicePort("grpc", 90, "GRPC")))
        self.assertEqual(svc.endpoints, (Endpoint("10.2.0.1", 8080), Endpoint("10.2.0.1", 9090)))
        unnamed = _view([service("ratings", ports=[{"protocol": "TCP", "port": 80, "targetPort": 8000}])],
                        [endpoint_slice("s", "ratings", [endpoint("10.2.0.1")], ports=[{"port": 8000}])])
        self.assertEqual(unnamed[RATINGS].ports, (ServicePort("80", 80, "TCP"),))
        self.assertEqual(unnamed[RATINGS].endpoints, (Endpoint("10.2.0.1", 8000),))

    def test_slices_belong_by_label_and_namespace(self):
        """
        Only slices labelled with the service's name in its namespace
        count; endpoints repeated across slices appear once.
        """
        view = _view(
            [service("reviews"), service("reviews", namespace="shop")],
            [endpoint_slice("a", "reviews", [endpoint("10.0.0.1")]),
             endpoint_slice("b", "reviews", [endpoint("10.0.0.1"), endpoint("10.0.0.2")]),
             endpoint_slice("c", "ratings", [endpoint("10.0.0.3")]),
             endpoint_slice("d", "reviews", [endpoint("10.0.0.4")], namespace="shop")],
        )
        self.assertEqual([str(e) for e in view[REVIEWS].endpoints], ["10.0.0.1:19080", "10.0.0.2:19080"])
        self.assertEqual([str(e) for e in view["reviews.shop.svc.cluster.local"].endpoints], ["10.0.0.4:19080"])

    def test_domain_suffix_and_no_endpoints(self):
        """
        The host ends in the configured domain; a service without slices
        is listed with no endpoints.
        """
        view = _view([service("reviews")], suffix="mesh.example")
        self.assertEqual(view, {"reviews.default.svc.mesh.example": ServiceEndpoints(
            "reviews.default.svc.mesh.example", (ServicePort("http", 9080, "HTTP"),), ())})

    def test_external_name(self):
        """
        An ExternalName service resolves to its external name on its ports.
        """
        view = _view([service("db", type="ExternalName", externalName="db.example.com",
                              ports=[{"name": "tcp", "port": 5432, "protocol": "TCP"}])])
        self.assertEqual(view["db.default.svc.cluster.local"].endpoints, (Endpoint("db.example.com", 5432),))

    def test_malformed_parts_skipped(self):
        """
        Objects and parts of objects without the documented shape are
        skipped; the rest is mapped.
        """
        bad_slice = endpoint_slice("s", "reviews", [
            "nope", {"addresses": []}, {"addresses": [7]}, endpoint("10.0.0.1", pod="missing"),
            {"addresses": ["10.0.0.2"], "conditions": "yes", "targetRef": "x"}])
        view = _view(
            [service("reviews", ports=[{"name": "http", "port": "80"}, "x", {"name": "http", "port": 9080}]),
             {"metadata": {"namespace": "default"}}, {"metadata": {"name": "nons"}}, "junk", {}],
            [bad_slice, {"metadata": {"name": "x", "namespace": "default"}}, {"metadata": "x"}],
            [{"metadata": {"name": "p", "labels": {"a": 1}}}, []],
        )
        self.assertEqual(list(view), [REVIEWS])
        self.assertEqual([str(e) for e in view[REVIEWS].endpoints], ["10.0.0.1:19080", "10.0.0.2:19080"])


class FromConfigTests(SynchronousTestCase):
    def test_http(self):
        """
        An http api: no token unless a token file is given; namespaces and
        the domain are taken.
        """
        registry = from_config("pilot.yaml", "registries[0]", {
            "type": "kubernetes", "api": "http://127.0.0.1:8001/", "namespaces": ["default", "shop"],
            "domain_suffix": "mesh.local"}, task.Clock())
        self.assertIsInstance(registry, KubernetesRegistry)
        self.assertEqual(registry.api, "http://127.0.0.1:8001")
        self.assertEqual(registry.namespaces, ("default", "shop"))
        self.assertEqual(registry.domain_suffix, "mesh.local")
        self.assertEqual(registry.headers(), {"Accept": ["application/json"]})
        self.assertEqual(registry.name, "kubernetes:http://127.0.0.1:8001")
        verifyObject(IRegistry, registry)

    def test_errors(self):
        """
        Each invalid key is named in the error.
        """
        table = [
            ({"bogus": 1}, "registries[0].bogus", "unknown field"),
            ({"api": "ftp://x"}, "registries[0].api", "http:// or https://"),
            ({"api": "http://x/api/v1"}, "registries[0].api", "without path"),
            ({"api": 3}, "registries[0].api", "non-empty string"),
            ({"api": "http://x", "namespaces": "default"}, "registries[0].namespaces", "list"),
            ({"api": "http://x", "namespaces": ["Bad_NS"]}, "registries[0].namespaces", "DNS labels"),
            ({"api": "http://x", "domain_suffix": ".local."}, "registries[0].domain_suffix", "cluster.local"),
            ({"api": "http://x", "token_file": ""}, "registries[0].token_file", "non-empty"),
            ({"api": "http://x", "ca_file": "/ca.pem"}, "registries[0].ca_file", "only used with an https api"),
            ({"api": "https://x", "ca_file": "/nonexistent/ca.pem"}, "registries[0].ca_file", "cannot read"),
        ]
        for body, field, reason in table:
            with self.assertRaises(ConfigError, msg=body) as cm:
                from_config("pilot.yaml", "registries[0]", body, task.Clock())
            self.assertEqual((cm.exception.source, cm.exception.field), ("pilot.yaml", field), body)
            self.assertIn(reason, cm.exception.reason, body)

    def test_in_cluster_defaults(self):
        """
        Outside a pod the in-cluster CA is missing, and the error says what
        to set; an https api reads the in-cluster token file by default.
        """
        with self.assertRaises(ConfigError) as cm:
            from_config("pilot.yaml", "registries[0]", {"type": "kubernetes"}, task.Clock())
        self.assertEqual(cm.exception.field, "registries[0].ca_file")
        self.assertIn("not running in a pod", cm.exception.reason)
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        ca = os.path.join(d, "ca.pem")
        with open(ca, "w") as f:
            f.write(_self_signed_pem())
        registry = from_config("pilot.yaml", "r", {"api": "https://10.96.0.1:443", "ca_file": ca}, task.Clock())
        self.assertEqual(registry._token_file, IN_CLUSTER_TOKEN)


def _self_signed_pem():
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@defer.inlineCallbacks
def wait_until(predicate, what, timeout=5.0):
    """
    Poll C{predicate} on the reactor until it is true; fail after C{timeout}.
    """
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


class WatchTests(TestCase):
    """
    List + watch against the fake API server on a loopback socket.
    """

    timeout = 15

    def setUp(self):
        self.fake = FakeKubernetes(reactor)
        self.fake.add("services", service("reviews"))
        self.fake.add("services", service("ratings", ports=[{"name": "grpc", "protocol": "TCP", "port": 9090}]))
        self.fake.add("pods", pod("reviews-v1", {"app": "reviews", "version": "v1"}, "10.1.0.1"))
        self.fake.add("pods", pod("reviews-v2", {"app": "reviews", "version": "v2"}, "10.1.0.2"))
        self.fake.add("endpointslices", endpoint_slice("reviews-1", "reviews", [
            endpoint("10.1.0.1", pod="reviews-v1"), endpoint("10.1.0.2", pod="reviews-v2")]))
        self.fake.add("endpointslices", endpoint_slice("ratings-1", "ratings", [endpoint("10.2.0.1")],
                                                       ports=[{"name": "grpc", "protocol": "TCP", "port": 19090}]))
        self.fake.start()
        self.addCleanup(self.fake.stop)
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.token_file = os.path.join(self.tmp, "token")
        self.write_token(self.fake.token)

    def write_token(self, token):
        with open(self.token_file, "w") as f:
            f.write(token + "\n")

    def registry(self, **kwargs):
        kwargs.setdefault("token_file", self.token_file)
        registry = KubernetesRegistry(self.fake.url, reactor, retry_min=0.02, retry_max=0.1, **kwargs)
        self.calls = []
        registry.subscribe(lambda r: self.calls.append(dict(r.services())))
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    def watching(self, *kinds):
        kinds = kinds or ("services", "endpointslices", "pods")
        return wait_until(lambda: all(any(w.kind == k for w in self.fake.watches) for k in kinds),
                          f"watches of {kinds}")

    def versions(self, registry):
        return sorted(e.label("version") or "" for e in registry.services()[REVIEWS].endpoints)

    @defer.inlineCallbacks
    def test_initial_lists(self):
        """
        The first view holds every service with its endpoints and pod
        labels, published once when all three collections are listed.
        """
        registry = self.registry()
        verifyObject(IRegistry, registry)
        yield wait_until(lambda: registry.services(), "the first view")
        view = registry.services()
        self.assertEqual(sorted(view), [RATINGS, REVIEWS])
        self.assertEqual(view[REVIEWS].endpoints, (
            Endpoint("10.1.0.1", 19080, (("app", "reviews"), ("version", "v1")), service_account="default/default"),
            Endpoint("10.1.0.2", 19080, (("app", "reviews"), ("version", "v2")), service_account="default/default"),
        ))
        self.assertEqual(view[RATINGS].ports, (ServicePort("grpc", 9090, "GRPC"),))
        self.assertEqual(view[RATINGS].endpoints, (Endpoint("10.2.0.1", 19090),))
        self.assertEqual(len(self.calls), 1)
        status = registry.status()
        self.assertEqual((status["ok"], status["error"], status["services"]), (True, None, 2))
        yield self.watching()
        for kind in ("services", "endpointslices", "pods"):
            self.assertEqual(self.fake.watch_requests(kind)[0]["resourceVersion"], "106")
            self.assertEqual(self.fake.watch_requests(kind)[0]["allowWatchBookmarks"], "true")

    @defer.inlineCallbacks
    def test_events(self):
        """
        ADDED, MODIFIED and DELETED Services, EndpointSlices and Pods all
        change the view.
        """
        registry = self.registry()
        yield self.watching()
        self.fake.add("services", service("details"))
        self.fake.add("endpointslices", endpoint_slice("details-1", "details", [endpoint("10.3.0.1")]))
        details = "details.default.svc.cluster.local"
        yield wait_until(lambda: details in registry.services() and registry.services()[details].endpoints,
                         "details and its endpoint")
        # An endpoint goes unready.
        self.fake.modify("endpointslices", endpoint_slice("reviews-1", "reviews", [
            endpoint("10.1.0.1", pod="reviews-v1"), endpoint("10.1.0.2", pod="reviews-v2", ready=False)]))
        yield wait_until(lambda: len(registry.services()[REVIEWS].endpoints) == 1, "the unready endpoint gone")
        # A pod's labels change.
        self.fake.modify("pods", pod("reviews-v1", {"app": "reviews", "version": "v3"}, "10.1.0.1"))
        yield wait_until(lambda: self.versions(registry) == ["v3"], "the new pod label")
        # A pod is deleted: its endpoint stays (the slice says so) without labels.
        self.fake.delete("pods", "reviews-v1")
        yield wait_until(lambda: self.versions(registry) == [""], "the pod's labels gone")
        self.fake.delete("services", "details")
        yield wait_until(lambda: details not in registry.services(), "details gone")
        self.assertTrue(registry.status()["ok"])

    @defer.inlineCallbacks
    def test_bookmark(self):
        """
        A BOOKMARK moves the resourceVersion without changing the view, and
        the next watch starts from it.
        """
        registry = self.registry()
        yield self.watching()
        calls = len(self.calls)
        version = self.fake.bookmark("services")
        path = collection_path("services")
        yield wait_until(lambda: registry.resource_versions()[path] == version, "the bookmark's version")
        self.assertEqual(len(self.calls), calls)
        self.fake.end_watches("services")
        yield wait_until(lambda: len(self.fake.watch_requests("services")) == 2, "the second watch")
        self.assertEqual(self.fake.watch_requests("services")[1]["resourceVersion"], version)
        self.assertEqual(len(self.fake.list_requests("services")), 1)
        self.assertTrue(registry.status()["ok"])

    @defer.inlineCallbacks
    def test_stream_end_rewatches(self):
        """
        A watch that ends is watched again from the last version, and
        events in between are not lost.
        """
        registry = self.registry()
        yield self.watching()
        self.fake.end_watches()
        self.fake.add("services", service("details"))
        yield wait_until(lambda: "details.default.svc.cluster.local" in registry.services(), "details")
        self.assertEqual(self.fake.watch_requests("services")[1]["resourceVersion"], "106")
        self.assertEqual(len(self.fake.list_requests("services")), 1)

    @defer.inlineCallbacks
    def test_gone_event_relists(self):
        """
        An ERROR event with a 410 Status, on an open watch or on a watch
        from a compacted version, makes the registry list again, and it
        sees what changed.
        """
        registry = self.registry()
        yield self.watching()
        self.fake.send_gone("services")
        yield wait_until(lambda: len(self.fake.list_requests("services")) == 2, "the services relist")
        # The pods watch ends; a change happens and the history is compacted
        # before the registry watches again.
        self.fake.end_watches("pods")
        self.fake.modify("pods", pod("reviews-v1", {"app": "reviews", "version": "v7"}, "10.1.0.1"))
        self.fake.compact()
        yield wait_until(lambda: "v7" in self.versions(registry), "the pod change after the relist")
        self.assertEqual(len(self.fake.list_requests("pods")), 2)
        self.assertEqual(len(self.fake.list_requests("endpointslices")), 1)
        self.assertTrue(registry.status()["ok"])

    @defer.inlineCallbacks
    def test_gone_http_relists(self):
        """
        A watch answered with HTTP 410 makes the registry list again.
        """
        registry = self.registry()
        yield self.watching()
        self.fake.answer_next_watch("endpointslices", 410)
        self.fake.end_watches("endpointslices")
        yield wait_until(lambda: len(self.fake.list_requests("endpointslices")) == 2, "the relist")
        yield wait_until(lambda: len(self.fake.watch_requests("endpointslices")) == 3, "the watch after")
        self.assertEqual(self.fake.watch_requests("endpointslices")[2]["resourceVersion"], str(self.fake.version))
        self.assertTrue(registry.status()["ok"])
        self.assertEqual(sorted(registry.services()), [RATINGS, REVIEWS])

    @defer.inlineCallbacks
    def test_server_down_and_back(self):
        """
        While the API server is gone the last view stays and the status
        says why; when it is back the registry reads everything again.
        """
        registry = self.registry()
        yield self.watching()
        before = dict(registry.services())
        yield self.fake.stop()
        # The open watches fail first (connection lost); the reconnects
        # that follow are refused, and the status says so.
        yield wait_until(lambda: "refused" in (registry.status()["error"] or ""), "the refusal")
        self.assertFalse(registry.status()["ok"])
        self.assertEqual(registry.services(), before)
        self.fake.add("services", service("details"))
        self.fake.compact()
        self.fake.start()
        yield wait_until(lambda: "details.default.svc.cluster.local" in registry.services(), "the resync")
        yield wait_until(lambda: registry.status()["ok"], "the error cleared")
        self.assertIsNone(registry.status()["error"])

    @defer.inlineCallbacks
    def test_garbage(self):
        """
        An event that is not JSON, and then a list that is not JSON, are
        errors in the status; the last view stays until a good read.
        """
        registry = self.registry()
        yield self.watching()
        before = dict(registry.services())
        self.fake.garbage.add("services")
        self.fake.send_raw("services", b'{"type": "ADDED", "object": {\n')
        yield wait_until(lambda: not registry.status()["ok"], "the error")
        yield wait_until(lambda: "list is not JSON" in (registry.status()["error"] or ""), "the list error")
        self.assertIn("/api/v1/services", registry.status()["error"])
        self.assertEqual(registry.services(), before)
        # Other collections still work.
        self.fake.modify("pods", pod("reviews-v1", {"app": "reviews", "version": "v9"}, "10.1.0.1"))
        yield wait_until(lambda: "v9" in self.versions(registry), "the pod change")
        self.assertFalse(registry.status()["ok"])
        self.fake.garbage.clear()
        yield wait_until(lambda: registry.status()["ok"], "recovery")

    @defer.inlineCallbacks
    def test_unreadable_event_shape(self):
        """
        JSON that is not a watch event is an error too.
        """
        registry = self.registry()
        yield self.watching()
        self.fake.garbage.add("pods")
        self.fake.send_raw("pods", b'{"type": "ADDED"}\n')
        yield wait_until(lambda: "no type or no object" in (registry.status()["error"] or ""), "the error")
        self.fake.garbage.clear()
        yield wait_until(lambda: registry.status()["ok"], "recovery")

    @defer.inlineCallbacks
    def test_token_required(self):
        """
        A wrong token is an error in the status naming the 401; the token
        file is read again, so fixing it recovers.
        """
        self.write_token("wrong")
        registry = self.registry()
        yield wait_until(lambda: not registry.status()["ok"], "the error")
        self.assertIn("HTTP 401", registry.status()["error"])
        self.assertEqual(registry.services(), {})
        self.write_token(self.fake.token)
        yield wait_until(lambda: registry.status()["ok"] and registry.services(), "recovery")
        self.assertEqual(sorted(registry.services()), [RATINGS, REVIEWS])

    @defer.inlineCallbacks
    def test_missing_token_file(self):
        """
        An unreadable token file is an error in the status.
        """
        registry = self.registry(token_file=os.path.join(self.tmp, "nope"))
        yield wait_until(lambda: not registry.status()["ok"], "the error")
        self.assertIn("cannot read the token file", registry.status()["error"])

    @defer.inlineCallbacks
    def test_namespaces(self):
        """
        With namespaces given, only their collections are read.
        """
        self.fake.add("services", service("reviews", namespace="shop"))
        self.fake.add("endpointslices", endpoint_slice("r", "reviews", [endpoint("10.9.0.1")], namespace="shop"))
        registry = self.registry(namespaces=["shop"])
        yield wait_until(lambda: registry.services(), "the view")
        self.assertEqual(list(registry.services()), ["reviews.shop.svc.cluster.local"])
        paths = {path for path, _ in self.fake.requests}
        self.assertEqual(paths, {"/api/v1/namespaces/shop/services", "/api/v1/namespaces/shop/pods",
                                 "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"})

    @defer.inlineCallbacks
    def test_stop(self):
        """
        After stop no subscriber is called and the watches are closed.
        """
        registry = self.registry()
        yield self.watching()
        registry.stop()
        calls = len(self.calls)
        yield wait_until(lambda: not self.fake.watches, "the watches closed")
        self.fake.add("services", service("details"))
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(self.calls), calls)
