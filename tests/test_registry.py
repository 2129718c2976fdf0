"""
Service discovery registries: the file registry (load, change detection,
invalid files, directories), the DNS registry (A/AAAA/SRV, TTL timing,
failures) on a fake resolver and against a real local C{twisted.names}
server, and L{CombinedRegistry}.
"""

import itertools
import os
import tempfile
import textwrap

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.names import client, dns, error, server
from twisted.names.common import ResolverBase
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from txmesh.config.errors import ConfigError
from txmesh.config.model import Endpoint
from txmesh.pilot.registry import CombinedRegistry, IRegistry, ServiceEndpoints, ServicePort
from txmesh.pilot.registry.dns import DNSRegistry
from txmesh.pilot.registry.file import FileRegistry

REVIEWS = """
services:
  - host: reviews.default.svc.cluster.local
    ports: [{name: http, number: 9080, protocol: HTTP}]
    endpoints:
      - {address: 127.0.0.1, port: 19083, labels: {version: v1}, weight: 1, locality: eu/a/1}
      - {address: 127.0.0.2, port: 19084, labels: {version: v2}, weight: 3}
"""

RATINGS = """
services:
  - host: ratings.default.svc.cluster.local
    ports: [{name: grpc, number: 9090, protocol: GRPC}]
    endpoints: [{address: 10.0.0.9, port: 9090}]
"""


class Recorder:
    """
    A subscriber that counts its calls.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, registry):
        self.calls.append(dict(registry.services()))


_mtime = itertools.count(1_000_000_000)


def write(path, text):
    """
    Write C{text} to C{path} with a modification time later than any before,
    so change detection never depends on the filesystem's timestamp grain.
    """
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    when = next(_mtime)
    os.utime(path, (when, when))


class FileRegistryTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.clock = Clock()

    def registry(self, path):
        reg = FileRegistry(path, self.clock, poll_interval=1.0)
        self.addCleanup(reg.stop)
        return reg

    def test_interface(self):
        self.assertTrue(verifyObject(IRegistry, self.registry(os.path.join(self.dir, "x.yaml"))))

    def test_load(self):
        path = os.path.join(self.dir, "services.yaml")
        write(path, REVIEWS)
        reg = self.registry(path)
        reg.start()
        svc = reg.services()["reviews.default.svc.cluster.local"]
        self.assertEqual(svc.ports, (ServicePort("http", 9080, "HTTP"),))
        self.assertEqual(svc.endpoints, (
            Endpoint("127.0.0.1", 19083, (("version", "v1"),), 1, "eu/a/1"),
            Endpoint("127.0.0.2", 19084, (("version", "v2"),), 3, ""),
        ))
        self.assertTrue(svc.healthy)
        status = reg.status()
        self.assertEqual((status["ok"], status["error"], status["services"]), (True, None, 1))
        self.assertEqual(status["last_update"], 0.0)

    def test_service_accounts(self):
        """
        A service's C{service_account} is its endpoints' unless one names
        its own (C{namespace/account} or a SPIFFE ID); without either an
        endpoint's is unknown (empty).
        """
        path = os.path.join(self.dir, "services.yaml")
        write(path, """
            services:
              - host: reviews.shop.svc.cluster.local
                service_account: shop/reviews
                endpoints:
                  - {address: 127.0.0.1, port: 1}
                  - {address: 127.0.0.2, port: 1, service_account: "spiffe://example.org/ns/x/sa/legacy"}
              - host: ratings.shop.svc.cluster.local
                endpoints: [{address: 127.0.0.3, port: 1}]
            """)
        reg = self.registry(path)
        reg.start()
        view = reg.services()
        self.assertEqual([e.service_account for e in view["reviews.shop.svc.cluster.local"].endpoints],
                         ["shop/reviews", "spiffe://example.org/ns/x/sa/legacy"])
        self.assertEqual([e.service_account for e in view["ratings.shop.svc.cluster.local"].endpoints], [""])

    def test_change_notifies_once(self):
        path = os.path.join(self.dir, "services.yaml")
        write(path, REVIEWS)
        reg = self.registry(path)
        seen = Recorder()
        reg.subscribe(seen)
        reg.start()
        self.assertEqual(len(seen.calls), 1)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(len(seen.calls), 1, "no change, no call")

        write(path, REVIEWS + RATINGS.replace("services:\n", ""))
        self.clock.advance(0.5)
        self.assertEqual(len(seen.calls), 1, "not polled yet")
        self.clock.advance(0.5)
        self.assertEqual(len(seen.calls), 1 + 1)
        self.assertEqual(sorted(seen.calls[-1]), ["ratings.default.svc.cluster.local",
                                                  "reviews.default.svc.cluster.local"])
        self.clock.advance(5)
        self.assertEqual(len(seen.calls), 2)
        self.assertEqual(reg.status()["last_update"], 3.0)

    def test_touch_without_change_is_silent(self):
        path = os.path.join(self.dir, "services.yaml")
        write(path, REVIEWS)
        reg = self.registry(path)
        seen = Recorder()
        reg.subscribe(seen)
        reg.start()
        write(path, REVIEWS)
        self.clock.advance(1)
        self.assertEqual(len(seen.calls), 1)

    def test_invalid_keeps_last_view(self):
        path = os.path.join(self.dir, "services.yaml")
        write(path, REVIEWS)
        reg = self.registry(path)
        seen = Recorder()
        reg.subscribe(seen)
        reg.start()
        before = dict(reg.services())

        write(path, REVIEWS.replace("port: 19084", "port: 99999"))
        self.clock.advance(1)
        self.assertEqual(dict(reg.services()), before)
        self.assertEqual(len(seen.calls), 1)
        status = reg.status()
        self.assertFalse(status["ok"])
        self.assertIn(path, status["error"])
        self.assertIn("services[0].endpoints[1].port", status["error"])
        self.assertIn("between 1 and 65535", status["error"])
        self.assertEqual(status["services"], 1)

        # Fixed: the error clears and the fix is published.
        write(path, REVIEWS.replace("weight: 3", "weight: 4"))
        self.clock.advance(1)
        self.assertTrue(reg.status()["ok"])
        self.assertEqual(len(seen.calls), 2)
        self.assertEqual(reg.services()["reviews.default.svc.cluster.local"].endpoints[1].weight, 4)

    def test_invalid_yaml_and_unknown_fields(self):
        path = os.path.join(self.dir, "services.yaml")
        for text, field, reason in [
            ("services: [", "", "not valid YAML"),
            ("services: {}", "services", "expected a list"),
            ("services: [{host: a, endpoints: [{address: x, port: 1, wieght: 2}]}]",
             "services[0].endpoints[0].wieght", "unknown field"),
            ("services: [{ports: []}]", "services[0].host", "is required"),
            ("services: [{host: a, ports: [{number: 80, protocol: UDP}]}]",
             "services[0].ports[0].protocol", "must be one of"),
            ("services: [{host: a}, {host: a}]", "services[1].host", "registered twice"),
            ("services: [{host: a, endpoints: [{address: x, port: 1, labels: {v: 1}}]}]",
             "services[0].endpoints[0].labels", "quote them"),
            ("services: [{host: a, service_account: reviews}]", "services[0].service_account",
             "NAMESPACE/ACCOUNT"),
            ("services: [{host: a, endpoints: [{address: x, port: 1, service_account: 'spiffe://td'}]}]",
             "services[0].endpoints[0].service_account", "SPIFFE ID"),
        ]:
            write(path, text)
            reg = FileRegistry(path, self.clock)
            reg.check()
            status = reg.status()
            self.assertFalse(status["ok"], text)
            self.assertEqual(reg.services(), {})
            self.assertIn(f"{path}: {field}", status["error"])
            self.assertIn(reason, status["error"])

    def test_missing_file(self):
        path = os.path.join(self.dir, "absent.yaml")
        reg = self.registry(path)
        reg.start()
        self.assertFalse(reg.status()["ok"])
        self.assertIn("cannot read", reg.status()["error"])
        write(path, REVIEWS)
        self.clock.advance(1)
        self.assertTrue(reg.status()["ok"])
        self.assertEqual(list(reg.services()), ["reviews.default.svc.cluster.local"])

    def test_directory(self):
        write(os.path.join(self.dir, "reviews.yaml"), REVIEWS)
        write(os.path.join(self.dir, "notes.txt"), "not: [yaml")
        reg = self.registry(self.dir)
        seen = Recorder()
        reg.subscribe(seen)
        reg.start()
        self.assertEqual(list(reg.services()), ["reviews.default.svc.cluster.local"])

        # A new file is noticed.
        write(os.path.join(self.dir, "ratings.yaml"), RATINGS)
        self.clock.advance(1)
        self.assertEqual(sorted(reg.services()), ["ratings.default.svc.cluster.local",
                                                  "reviews.default.svc.cluster.local"])
        # The same host in two files is an error naming the later file.
        write(os.path.join(self.dir, "zdup.yaml"), RATINGS)
        self.clock.advance(1)
        self.assertFalse(reg.status()["ok"])
        self.assertIn("zdup.yaml", reg.status()["error"])
        self.assertIn("also registered", reg.status()["error"])
        self.assertEqual(len(reg.services()), 2)
        # A removed file is noticed too.
        os.remove(os.path.join(self.dir, "zdup.yaml"))
        os.remove(os.path.join(self.dir, "ratings.yaml"))
        self.clock.advance(1)
        self.assertTrue(reg.status()["ok"])
        self.assertEqual(list(reg.services()), ["reviews.default.svc.cluster.local"])
        self.assertEqual(len(seen.calls), 3)

    def test_stop(self):
        path = os.path.join(self.dir, "services.yaml")
        write(path, REVIEWS)
        reg = self.registry(path)
        reg.start()
        reg.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


def rr(name, payload, ttl):
    return dns.RRHeader(name=name, type=payload.TYPE, payload=payload, ttl=ttl)


class FakeResolver:
    """
    A resolver whose answers the test sets, and which records each query.
    Answers are C{(type, name)} keyed lists of records, or an exception.
    """

    def __init__(self):
        self.answers = {}
        self.queries = []
        self.pending = None

    def _answer(self, kind, name):
        self.queries.append((kind, name))
        if self.pending is not None:
            d, self.pending = self.pending, None
            return d
        result = self.answers.get((kind, name), error.DNSNameError(name))
        if isinstance(result, Exception):
            return defer.fail(result)
        return defer.succeed((result, [], []))

    def lookupAddress(self, name):
        return self._answer("A", name)

    def lookupIPV6Address(self, name):
        return self._answer("AAAA", name)

    def lookupService(self, name):
        return self._answer("SRV", name)


class DNSRegistryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.resolver = FakeResolver()

    def registry(self, names, **kw):
        reg = DNSRegistry(names, self.resolver, self.clock, **kw)
        self.addCleanup(reg.stop)
        return reg

    def test_interface(self):
        self.assertTrue(verifyObject(IRegistry, self.registry([])))

    def test_a_and_aaaa(self):
        self.resolver.answers[("A", "web.example")] = [
            rr("web.example", dns.Record_CNAME("real.example"), 60),
            rr("real.example", dns.Record_A("10.0.0.1"), 30),
            rr("real.example", dns.Record_A("10.0.0.2"), 30),
        ]
        self.resolver.answers[("AAAA", "web.example")] = [rr("web.example", dns.Record_AAAA("fd00::1"), 30)]
        reg = self.registry([{"host": "web.example", "port": 8080, "kind": "A", "protocol": "HTTP"},
                             {"host": "web.example", "port": 8080, "kind": "AAAA"}])
        reg.start()
        svc = reg.services()["web.example"]
        self.assertEqual(svc.ports, (ServicePort("http-8080", 8080, "HTTP"),))
        self.assertEqual(svc.endpoints, (Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.2", 8080),
                                         Endpoint("fd00::1", 8080)))
        self.assertTrue(reg.status()["ok"])

    def test_srv(self):
        self.resolver.answers[("SRV", "_http._tcp.api.example")] = [
            rr("_http._tcp.api.example", dns.Record_SRV(10, 5, 9001, "a.api.example"), 20),
            rr("_http._tcp.api.example", dns.Record_SRV(10, 0, 9002, "b.api.example"), 20),
        ]
        reg = self.registry([{"host": "api.example", "port": 80, "kind": "SRV", "name": "_http._tcp.api.example"}])
        reg.start()
        self.assertEqual(reg.services()["api.example"].endpoints, (
            Endpoint("a.api.example", 9001, weight=5), Endpoint("b.api.example", 9002, weight=1)))
        self.assertEqual(reg.services()["api.example"].ports[0].number, 80)

    def test_ttl_reresolve(self):
        self.resolver.answers[("A", "web.example")] = [rr("web.example", dns.Record_A("10.0.0.1"), 30)]
        reg = self.registry([{"host": "web.example", "port": 80, "kind": "A"}], min_ttl=5, max_ttl=100)
        seen = Recorder()
        reg.subscribe(seen)
        reg.start()
        self.assertEqual(len(self.resolver.queries), 1)
        self.clock.advance(29.9)
        self.assertEqual(len(self.resolver.queries), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.resolver.queries), 2)
        self.assertEqual(len(seen.calls), 1, "same answer, no notification")

        # The answer changes and its TTL is below min_ttl: clamped up.
        self.resolver.answers[("A", "web.example")] = [rr("web.example", dns.Record_A("10.0.0.2"), 0)]
        self.clock.advance(30)
        self.assertEqual(len(self.resolver.queries), 3)
        self.assertEqual(len(seen.calls), 2)
        self.assertEqual(reg.services()["web.example"].endpoints, (Endpoint("10.0.0.2", 80),))
        self.clock.advance(4.9)
        self.assertEqual(len(self.resolver.queries), 3)
        self.clock.advance(0.1)
        self.assertEqual(len(self.resolver.queries), 4)

        # A TTL above max_ttl is clamped down.
        self.resolver.answers[("A", "web.example")] = [rr("web.example", dns.Record_A("10.0.0.2"), 86400)]
        self.clock.advance(5)
        self.assertEqual(len(self.resolver.queries), 5)
        self.clock.advance(99.9)
        self.assertEqual(len(self.resolver.queries), 5)
        self.clock.advance(0.1)
        self.assertEqual(len(self.resolver.queries), 6)

    def test_failure_keeps_last_view(self):
        self.resolver.answers[("A", "web.example")] = [rr("web.example", dns.Record_A("10.0.0.1"), 10)]
        reg = self.registry([{"host": "web.example", "port": 80, "kind": "A"}], min_ttl=2)
        seen = Recorder()
        reg.subscribe(seen)
        reg.start()
        before = dict(reg.services())

        self.resolver.answers[("A", "web.example")] = error.DNSServerError("web.example")
        self.clock.advance(10)
        self.assertEqual(dict(reg.services()), before)
        status = reg.status()
        self.assertFalse(status["ok"])
        self.assertIn("A web.example", status["error"])
        self.assertIn("DNSServerError", status["error"])
        self.assertEqual(status["last_update"], 0.0)
        self.assertEqual(len(seen.calls), 1)

        # An empty answer is a failure too, and retried after min_ttl.
        self.resolver.answers[("A", "web.example")] = []
        self.clock.advance(2)
        self.assertEqual(len(self.resolver.queries), 3)
        self.assertIn("no A records", reg.status()["error"])
        self.assertEqual(dict(reg.services()), before)

        # Recovery clears the error.
        self.resolver.answers[("A", "web.example")] = [rr("web.example", dns.Record_A("10.0.0.3"), 10)]
        self.clock.advance(2)
        self.assertTrue(reg.status()["ok"])
        self.assertEqual(reg.services()["web.example"].endpoints, (Endpoint("10.0.0.3", 80),))
        self.assertEqual(len(seen.calls), 2)

    def test_never_resolved(self):
        reg = self.registry([{"host": "gone.example", "port": 80, "kind": "A"}])
        reg.start()
        self.assertEqual(reg.services(), {})
        self.assertIn("DNSNameError", reg.status()["error"])

    def test_stop_ignores_late_answer(self):
        self.resolver.pending = defer.Deferred()
        late = self.resolver.pending
        reg = self.registry([{"host": "web.example", "port": 80, "kind": "A"}])
        reg.start()
        reg.stop()
        late.callback(([rr("web.example", dns.Record_A("10.0.0.1"), 10)], [], []))
        self.assertEqual(reg.services(), {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_names(self):
        for names, field in [
            ([{"host": "a", "port": 80, "kind": "MX"}], "names[0].kind"),
            ([{"host": "a", "kind": "A"}], "names[0].port"),
            ([{"host": "a", "port": 80, "kind": "A", "ttl": 5}], "names[0].ttl"),
            (["a"], "names[0]"),
        ]:
            e = self.assertRaises(ConfigError, DNSRegistry, names, self.resolver, self.clock)
            self.assertEqual(e.field, field)


class StaticRegistry:
    """
    An L{IRegistry} whose view the test sets.
    """

    def __init__(self, name, view=None):
        self.name = name
        self.view = dict(view or {})
        self.callbacks = []
        self.broken = False
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True
        return None

    def services(self):
        if self.broken:
            raise ValueError("garbage from the source")
        return self.view

    def subscribe(self, callback):
        self.callbacks.append(callback)

    def set(self, view):
        self.view = dict(view)
        for callback in self.callbacks:
            callback(self)

    def status(self):
        return {"name": self.name, "ok": True, "error": None, "last_update": None, "services": len(self.view)}


def svc(host, ports, *endpoints):
    return ServiceEndpoints(host, tuple(ServicePort(f"p{p}", p, "HTTP") for p in ports), tuple(endpoints))


class CombinedRegistryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.a = StaticRegistry("a", {"r": svc("r", [80], Endpoint("1.1.1.1", 80))})
        self.b = StaticRegistry("b", {"r": svc("r", [80, 81], Endpoint("2.2.2.2", 80), Endpoint("1.1.1.1", 80)),
                                      "s": svc("s", [90], Endpoint("3.3.3.3", 90))})
        self.combined = CombinedRegistry([self.a, self.b], self.clock)

    def test_interface(self):
        self.assertTrue(verifyObject(IRegistry, self.combined))

    def test_merge(self):
        view = self.combined.services()
        self.assertEqual([p.number for p in view["r"].ports], [80, 81])
        self.assertEqual(view["r"].endpoints, (Endpoint("1.1.1.1", 80), Endpoint("2.2.2.2", 80)))
        self.assertEqual(view["s"], self.b.view["s"])

    def test_start_stop(self):
        self.combined.start()
        self.assertTrue(self.a.started and self.b.started)
        d = self.combined.stop()
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(self.a.stopped and self.b.stopped)

    def test_subscription(self):
        seen = Recorder()
        self.combined.subscribe(seen)
        self.b.set({"s": svc("s", [90], Endpoint("3.3.3.4", 90))})
        self.assertEqual(len(seen.calls), 1)
        self.assertEqual(seen.calls[0]["r"].endpoints, (Endpoint("1.1.1.1", 80),))
        # A change that leaves the merge as it was is not passed on.
        self.b.set({"s": svc("s", [90], Endpoint("3.3.3.4", 90))})
        self.assertEqual(len(seen.calls), 1)

    def test_status(self):
        status = self.combined.status()
        self.assertTrue(status["ok"])
        self.assertEqual([p["name"] for p in status["registries"]], ["a", "b"])
        self.assertEqual(status["services"], 2)

    def test_broken_registry_keeps_last_view(self):
        before = dict(self.combined.services())
        self.b.broken = True
        seen = Recorder()
        self.combined.subscribe(seen)
        self.a.set({"r": svc("r", [80], Endpoint("1.1.1.9", 80))})
        self.assertEqual(len(seen.calls), 1)
        view = self.combined.services()
        self.assertEqual(view["s"], before["s"])
        self.assertEqual(view["r"].endpoints, (Endpoint("1.1.1.9", 80), Endpoint("2.2.2.2", 80),
                                               Endpoint("1.1.1.1", 80)))
        status = self.combined.status()
        self.assertFalse(status["ok"])
        self.assertIn("b: services() failed", status["error"])
        self.assertEqual([p["ok"] for p in status["registries"]], [True, False])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

        # The source recovers: its new view is used and the status clears.
        self.b.broken = False
        self.b.set({"s": svc("s", [90], Endpoint("3.3.3.5", 90))})
        self.assertEqual(self.combined.services()["s"].endpoints, (Endpoint("3.3.3.5", 90),))
        self.assertTrue(self.combined.status()["ok"])

    def test_with_file_and_dns(self):
        d = tempfile.mkdtemp()
        path = os.path.join(d, "s.yaml")
        write(path, REVIEWS)
        resolver = FakeResolver()
        resolver.answers[("A", "reviews.default.svc.cluster.local")] = [
            rr("reviews.default.svc.cluster.local", dns.Record_A("10.1.1.1"), 30)]
        combined = CombinedRegistry([
            FileRegistry(path, self.clock),
            DNSRegistry([{"host": "reviews.default.svc.cluster.local", "port": 9080, "kind": "A"}],
                        resolver, self.clock)], self.clock)
        seen = Recorder()
        combined.subscribe(seen)
        combined.start()
        self.addCleanup(combined.stop)
        eps = combined.services()["reviews.default.svc.cluster.local"].endpoints
        self.assertEqual([e.host for e in eps], ["127.0.0.1", "127.0.0.2", "10.1.1.1"])
        self.assertEqual(len(seen.calls), 2)

        # A child's own error shows in the combined status; its view stays.
        write(path, "services: [{host: reviews.default.svc.cluster.local, ports: [{number: 0}]}]")
        self.clock.advance(1)
        status = combined.status()
        self.assertFalse(status["ok"])
        self.assertIn(f"file:{path}: {path}: services[0].ports[0].number", status["error"])
        self.assertEqual([p["ok"] for p in status["registries"]], [False, True])
        self.assertEqual(combined.services()["reviews.default.svc.cluster.local"].endpoints, eps)


class MemoryAuthority(ResolverBase):
    """
    An in-memory authority for a real C{twisted.names} server: name and
    type to records.
    """

    def __init__(self, records):
        super().__init__()
        self.records = records

    def _lookup(self, name, cls, type, timeout):
        name = name.decode("ascii") if isinstance(name, bytes) else str(name)
        answers = [rr(name, payload, ttl) for payload, ttl in self.records.get((name, type), [])]
        for a in answers:
            a.auth = True
        if not answers:
            return defer.fail(error.DomainError(name))
        return defer.succeed((answers, [], []))


class RealDNSServerTests(TestCase):
    """
    The DNS registry against a real C{twisted.names} server on loopback,
    through C{twisted.names.client.Resolver}.
    """

    timeout = 10

    def setUp(self):
        self.authority = MemoryAuthority({
            ("web.mesh.test", dns.A): [(dns.Record_A("127.0.0.7"), 60)],
            ("web.mesh.test", dns.AAAA): [(dns.Record_AAAA("::1"), 60)],
            ("_http._tcp.web.mesh.test", dns.SRV): [(dns.Record_SRV(0, 7, 8081, "web.mesh.test"), 60)],
        })
        factory = server.DNSServerFactory(authorities=[self.authority])
        self.port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_resolve(self):
        resolver = client.Resolver(servers=[("127.0.0.1", self.port.getHost().port)], reactor=reactor)
        reg = DNSRegistry([
            {"host": "web.mesh.test", "port": 8080, "kind": "A"},
            {"host": "web.mesh.test", "port": 8080, "kind": "AAAA"},
            {"host": "web.mesh.test", "port": 8080, "kind": "SRV", "name": "_http._tcp.web.mesh.test"},
        ], resolver, reactor)
        done = defer.Deferred()

        def changed(registry):
            if len(registry.services().get("web.mesh.test", ServiceEndpoints("x")).endpoints) == 3:
                if not done.called:
                    done.callback(None)

        reg.subscribe(changed)
        reg.start()
        self.addCleanup(reg.stop)
        yield done
        self.assertEqual(set(reg.services()["web.mesh.test"].endpoints), {
            Endpoint("127.0.0.7", 8080), Endpoint("::1", 8080), Endpoint("web.mesh.test", 8081, weight=7)})
        self.assertTrue(reg.status()["ok"])
