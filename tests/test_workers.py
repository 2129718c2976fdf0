"""
Tests of C{twistd txmesh-proxy --concurrency N}: the parent/worker channel's
framing, the metrics merge, C{SO_REUSEPORT} listening, the worker's and the
parent's handling of messages (with fake processes), and the real command
with two worker processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from tests.support import ProxyHarness, free_port, poll_until
from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader
from txmesh.filters.registry import FilterRegistry
from txmesh.proxy.admin import AdminResource
from txmesh.proxy.reuseport import ReusePortEndpoint, listener_endpoint, shared_address_error
from txmesh.proxy.worker import WorkerChannel, worker_document
from txmesh.proxy.worker_channel import FrameDecoder, FrameError, encode, read_message
from txmesh.proxy.worker_metrics import merge_expositions, render
from txmesh.proxy.workers import WorkerPool, check_shareable, exit_description, restart_delay

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


# The channel's framing

class FramingTests(unittest.TestCase):
    def test_round_trip_in_any_pieces(self) -> None:
        """
        Messages come out whole and in order however the bytes are cut.
        """
        messages = [{"type": "config", "document": {"listeners": [], "é": "ü"}, "version": 3},
                    {"type": "admin", "id": 1, "page": "metrics"}]
        data = b"".join(encode(m) for m in messages)
        for size in (1, 3, 7, len(data)):
            decoder = FrameDecoder()
            out = []
            for i in range(0, len(data), size):
                out.extend(decoder.feed(data[i:i + size]))
            self.assertEqual(out, messages)
            self.assertEqual(decoder.pending, 0)

    def test_partial_frame_waits(self) -> None:
        decoder = FrameDecoder()
        frame = encode({"type": "ready"})
        self.assertEqual(decoder.feed(frame[:-1]), [])
        self.assertEqual(decoder.pending, len(frame) - 1)
        self.assertEqual(decoder.feed(frame[-1:]), [{"type": "ready"}])

    def test_too_long(self) -> None:
        """
        A frame announcing more than the limit is refused before it is read.
        """
        decoder = FrameDecoder(max_frame=16)
        with self.assertRaises(FrameError):
            decoder.feed((17).to_bytes(4, "big"))

    def test_not_a_message(self) -> None:
        for body in (b"\xff", b"[1]", b'{"no": "type"}', b'{"type": 3}', b"{"):
            with self.subTest(body=body), self.assertRaises(FrameError):
                FrameDecoder().feed(len(body).to_bytes(4, "big") + body)

    def test_encode_needs_type(self) -> None:
        with self.assertRaises(FrameError):
            encode({"document": {}})

    def test_read_message_leaves_the_rest(self) -> None:
        """
        L{read_message} reads exactly one frame from a descriptor (a worker
        reads its first config so, and its reactor reads the rest).
        """
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        os.write(w, encode({"type": "config", "version": 1}) + encode({"type": "admin", "id": 2}))
        os.close(w)
        self.assertEqual(read_message(r), {"type": "config", "version": 1})
        self.assertEqual(read_message(r), {"type": "admin", "id": 2})
        self.assertIsNone(read_message(r))


# The metrics merge

WORKER_0 = """\
# HELP istio_requests_total Requests.
# TYPE istio_requests_total counter
istio_requests_total{response_code="200"} 3.0
istio_requests_total{response_code="503"} 1.0
# HELP d Duration.
# TYPE d histogram
d_bucket{le="1.0"} 2.0
d_bucket{le="+Inf"} 4.0
d_count 4.0
d_sum 3.5
# HELP txmesh_downstream_connections_active Open.
# TYPE txmesh_downstream_connections_active gauge
txmesh_downstream_connections_active{listener="http"} 2.0
# HELP txmesh_config_version Version.
# TYPE txmesh_config_version gauge
txmesh_config_version 2.0
# HELP txmesh_config_reloads_total Reloads.
# TYPE txmesh_config_reloads_total counter
txmesh_config_reloads_total{result="applied"} 1.0
# HELP txmesh_config_reloads_created Reloads.
# TYPE txmesh_config_reloads_created gauge
txmesh_config_reloads_created{result="applied"} 200.0
"""

WORKER_1 = """\
# HELP istio_requests_total Requests.
# TYPE istio_requests_total counter
istio_requests_total{response_code="200"} 5.0
# HELP d Duration.
# TYPE d histogram
d_bucket{le="1.0"} 1.0
d_bucket{le="+Inf"} 1.0
d_count 1.0
d_sum 0.5
# HELP txmesh_downstream_connections_active Open.
# TYPE txmesh_downstream_connections_active gauge
txmesh_downstream_connections_active{listener="http"} 1.0
# HELP txmesh_config_version Version.
# TYPE txmesh_config_version gauge
txmesh_config_version 2.0
# HELP txmesh_config_reloads_total Reloads.
# TYPE txmesh_config_reloads_total counter
txmesh_config_reloads_total{result="applied"} 1.0
# HELP txmesh_config_reloads_created Reloads.
# TYPE txmesh_config_reloads_created gauge
txmesh_config_reloads_created{result="applied"} 100.0
"""


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class MetricsMergeTests(unittest.TestCase):
    def test_sums_counters_histograms_and_gauges(self) -> None:
        merged = samples(render(merge_expositions([WORKER_0, WORKER_1])).decode())
        self.assertEqual(merged[("istio_requests_total", (("response_code", "200"),))], 8.0)
        self.assertEqual(merged[("istio_requests_total", (("response_code", "503"),))], 1.0)
        self.assertEqual(merged[("d_bucket", (("le", "1.0"),))], 3.0)
        self.assertEqual(merged[("d_bucket", (("le", "+Inf"),))], 5.0)
        self.assertEqual(merged[("d_count", ())], 5.0)
        self.assertEqual(merged[("d_sum", ())], 4.0)
        self.assertEqual(merged[("txmesh_downstream_connections_active", (("listener", "http"),))], 3.0)

    def test_shared_state_takes_the_largest(self) -> None:
        """
        Every worker applies the same configs: the version and the reload
        count are not multiplied by the number of workers; a counter's
        creation time is the earliest.
        """
        merged = samples(render(merge_expositions([WORKER_0, WORKER_1])).decode())
        self.assertEqual(merged[("txmesh_config_version", ())], 2.0)
        self.assertEqual(merged[("txmesh_config_reloads_total", (("result", "applied"),))], 1.0)
        self.assertEqual(merged[("txmesh_config_reloads_created", (("result", "applied"),))], 100.0)

    def test_one_page_is_itself(self) -> None:
        self.assertEqual(samples(render(merge_expositions([WORKER_0])).decode()), samples(WORKER_0))

    def test_families_from_one_worker_only(self) -> None:
        extra = "# HELP only Only.\n# TYPE only counter\nonly_total 7.0\n"
        merged = samples(render(merge_expositions([WORKER_0, extra])).decode())
        self.assertEqual(merged[("only_total", ())], 7.0)
        self.assertEqual(merged[("istio_requests_total", (("response_code", "200"),))], 3.0)


# Listening with SO_REUSEPORT

class ReusePortTests(unittest.TestCase):
    def test_two_ports_share_an_address(self) -> None:
        """
        Two listeners with SO_REUSEPORT bind the same port (two worker
        processes do the same); a third without it cannot.
        """
        port = free_port()
        address = f"tcp:{port}:interface=127.0.0.1"
        ports = []
        for _ in range(2):
            endpoint = listener_endpoint(reactor, address, reuse_port=True)
            self.assertIsInstance(endpoint, ReusePortEndpoint)
            d = endpoint.listen(Factory.forProtocol(Protocol))
            ports.append(self.successResultOf(d))
        for p in ports:
            self.addCleanup(p.stopListening)
            self.assertEqual(p.getHost().port, port)
        self.failureResultOf(listener_endpoint(reactor, address).listen(Factory.forProtocol(Protocol)))

    def test_ipv6(self) -> None:
        if not socket.has_ipv6:
            raise unittest.SkipTest("no IPv6")
        port = free_port()
        endpoint = listener_endpoint(reactor, f"tcp6:{port}:interface=\\:\\:1", reuse_port=True)
        try:
            listening = self.successResultOf(endpoint.listen(Factory.forProtocol(Protocol)))
        except Exception as e:  # pragma: no cover - hosts without ::1
            raise unittest.SkipTest(f"cannot bind ::1: {e}") from None
        self.addCleanup(listening.stopListening)
        self.assertEqual(listening.getHost().host, "::1")

    def test_what_can_be_shared(self) -> None:
        self.assertIsNone(shared_address_error(reactor, "tcp:8080:interface=127.0.0.1"))
        self.assertIn("port 0", shared_address_error(reactor, "tcp:0"))
        self.assertIn("only tcp", shared_address_error(reactor, "unix:/tmp/x.sock"))
        with self.assertRaises(ValueError):
            listener_endpoint(reactor, "unix:/tmp/x.sock", reuse_port=True)

    def test_check_shareable(self) -> None:
        loader = ConfigLoader(FilterRegistry.from_plugins())

        def config(address: str) -> Any:
            return loader.load_document({
                "listeners": [{"name": "tcp", "address": address, "protocol": "tcp", "cluster": "app"}],
                "clusters": [{"name": "app", "endpoints": [{"address": "127.0.0.1", "port": 1}]}],
            }, "proxy.yaml")

        check_shareable(config("tcp:8080"), "proxy.yaml", reactor)
        with self.assertRaises(ConfigError) as e:
            check_shareable(config("tcp:0:interface=127.0.0.1"), "proxy.yaml", reactor)
        self.assertIn("listeners[0].address", str(e.exception))


# The worker's end

class FakeProxy:
    def __init__(self) -> None:
        self.applied: list[tuple[Any, str]] = []
        self.refuse: str | None = None

    def apply_document(self, document: Any, source: str) -> defer.Deferred:
        self.applied.append((document, source))
        return defer.succeed(self.refuse)

    def metrics_text(self) -> tuple[str, bytes]:
        return "text/plain", b"# metrics\n"

    def clusters_dump(self) -> dict:
        return {"app": {"upstream_requests": 3}}

    def config_dump(self) -> dict:
        return {"version": 1}


class WorkerChannelTests(unittest.TestCase):
    def setUp(self) -> None:
        self.proxy = FakeProxy()
        self.channel = WorkerChannel(self.proxy, Clock())
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def sent(self) -> list[dict]:
        return FrameDecoder().feed(self.transport.value())

    def test_config_is_applied_without_admin(self) -> None:
        """
        The parent serves the admin endpoint: a worker applies the config
        without it, and says which version it applied.
        """
        document = {"admin": {"address": "tcp:15000"}, "listeners": []}
        self.channel.dataReceived(encode({"type": "config", "document": document, "source": "/etc/p.yaml",
                                          "version": 4}))
        self.assertEqual(self.proxy.applied, [({"listeners": []}, "/etc/p.yaml")])
        self.assertEqual(self.sent(), [{"type": "applied", "version": 4, "ok": True, "error": None}])

    def test_refused_config(self) -> None:
        self.proxy.refuse = "p.yaml: listeners[0]: bad"
        self.channel.dataReceived(encode({"type": "config", "document": {}, "source": "p.yaml", "version": 5}))
        self.assertEqual(self.sent(), [{"type": "applied", "version": 5, "ok": False,
                                        "error": "p.yaml: listeners[0]: bad"}])

    def test_admin_pages(self) -> None:
        self.channel.dataReceived(encode({"type": "admin", "id": 7, "page": "metrics"})
                                  + encode({"type": "admin", "id": 8, "page": "clusters"}))
        self.assertEqual(self.sent(), [{"type": "admin", "id": 7, "body": "# metrics\n"},
                                       {"type": "admin", "id": 8, "body": {"app": {"upstream_requests": 3}}}])

    def test_worker_document(self) -> None:
        self.assertEqual(worker_document({"admin": {}, "node": {"id": "a"}}), {"node": {"id": "a"}})
        self.assertIsNone(worker_document(None))


class ApplyDocumentTests(unittest.TestCase):
    """
    L{ProxyService.apply_document}: how a worker applies its parent's
    config.
    """

    @defer.inlineCallbacks
    def test_applied_and_refused(self) -> Any:
        harness = ProxyHarness(self)
        service = yield harness.start(CONFIG % {"port": 0, "upstream": 1})
        document = {"listeners": [{"name": "http", "address": "tcp:0:interface=127.0.0.1",
                                   "protocol": "tcp", "cluster": "other"}],
                    "clusters": [{"name": "other", "endpoints": [{"address": "127.0.0.1", "port": 2}]}]}
        error = yield service.apply_document(document, harness.path)
        self.assertIsNone(error)
        self.assertEqual((service.version, service.config.listeners[0].protocol), (2, "tcp"))
        error = yield service.apply_document({"listeners": 3}, harness.path)
        self.assertIn("listeners", error)
        self.assertEqual(service.version, 2)
        self.flushLoggedErrors()


# The parent's end, with fake processes

class FakeProcessTransport:
    def __init__(self, pid: int):
        self.pid: int | None = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def messages(self) -> list[dict]:
        return FrameDecoder().feed(b"".join(self.written))


class ProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None, path: Any = None,
                     uid: Any = None, gid: Any = None, usePTY: bool = False, childFDs: Any = None) -> Any:
        transport = FakeProcessTransport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args, childFDs))
        return transport


CONFIG = """\
listeners:
  - {name: http, address: "tcp:%(port)d:interface=127.0.0.1",
     virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: /}, cluster: app}]}]}
clusters:
  - {name: app, endpoints: [{address: 127.0.0.1, port: %(upstream)d}]}
"""


class WorkerPoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "proxy.yaml")
        with open(self.path, "w") as f:
            f.write(CONFIG % {"port": 18500, "upstream": 18501})
        self.reactor = ProcessReactor()
        self.pool = WorkerPool(self.path, self.reactor, 2)
        self.pool.load_initial()
        self.pool.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.pool.running:
            self.pool.stopService()

    def say(self, worker: Any, message: dict) -> None:
        worker.childDataReceived(3, encode(message))

    def test_workers_get_the_config(self) -> None:
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, (worker, args, fds) in enumerate(self.reactor.spawned):
            self.assertEqual(args[1:5], ["-m", "txmesh.proxy.worker", "--index", str(index)])
            self.assertEqual(fds, {0: "w", 1: "r", 2: "r", 3: "r"})
            [message] = worker.transport.messages()
            self.assertEqual((message["type"], message["version"], message["source"]), ("config", 1, self.path))
            self.assertEqual(message["document"]["clusters"][0]["name"], "app")

    def test_ready_when_all_are(self) -> None:
        first, second = (w for w, _, _ in self.reactor.spawned)
        self.assertFalse(self.pool.is_ready())
        self.say(first, {"type": "ready", "pid": 1, "version": 1})
        self.assertFalse(self.pool.is_ready())
        self.say(second, {"type": "ready", "pid": 2, "version": 1})
        self.assertTrue(self.pool.is_ready())

    def test_reload_reaches_every_worker(self) -> None:
        workers = [w for w, _, _ in self.reactor.spawned]
        for w in workers:
            self.say(w, {"type": "ready", "pid": 1, "version": 1})
        with open(self.path, "w") as f:
            f.write(CONFIG % {"port": 18500, "upstream": 18502})
        self.assertTrue(self.successResultOf(self.pool.reload()))
        for w in workers:
            message = w.transport.messages()[-1]
            self.assertEqual((message["type"], message["version"]), ("config", 2))
            self.assertEqual(message["document"]["clusters"][0]["endpoints"][0]["port"], 18502)
        # Workers serve the config before while they apply it: still ready.
        self.assertTrue(self.pool.is_ready())
        self.say(workers[0], {"type": "applied", "version": 2, "ok": True, "error": None})
        self.say(workers[1], {"type": "applied", "version": 2, "ok": False, "error": "p.yaml: x: bad"})
        self.assertEqual([(w["version"], w["error"]) for w in self.pool.config_dump()["workers"]],
                         [(2, None), (2, "p.yaml: x: bad")])

    def test_invalid_reload_reaches_no_worker(self) -> None:
        with open(self.path, "w") as f:
            f.write("listeners: 3\n")
        self.assertFalse(self.successResultOf(self.pool.reload()))
        for w, _, _ in self.reactor.spawned:
            self.assertEqual(len(w.transport.messages()), 1)
        self.assertEqual(self.pool.version, 1)

    def test_dead_worker_restarts_with_backoff(self) -> None:
        """
        A worker that exits is started again after the backoff, which
        doubles while its slot keeps failing; the new one gets the current
        config.
        """
        worker = self.reactor.spawned[0][0]
        worker.transport.pid = None
        worker.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        self.assertIsNone(self.pool.workers[0])
        self.reactor.advance(0.4)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.spawned), 3)
        again = self.reactor.spawned[2][0]
        self.assertIs(self.pool.workers[0], again)
        self.assertEqual(again.transport.messages()[0]["type"], "config")
        again.processEnded(Failure(ProcessDone(0)))
        self.reactor.advance(0.9)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_stop_terminates_every_worker(self) -> None:
        workers = [w for w, _, _ in self.reactor.spawned]
        d = self.pool.stopService()
        for w in workers:
            self.assertEqual(w.transport.signals, ["TERM"])
        self.assertNoResult(d)
        for w in workers:
            w.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stop_kills_a_worker_that_does_not_drain(self) -> None:
        workers = [w for w, _, _ in self.reactor.spawned]
        d = self.pool.stopService()
        workers[0].processEnded(Failure(ProcessDone(0)))
        self.reactor.advance(10.0)
        self.assertEqual(workers[1].transport.signals, ["TERM", "KILL"])
        workers[1].processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        self.successResultOf(d)

    def test_metrics_are_merged(self) -> None:
        workers = [w for w, _, _ in self.reactor.spawned]
        for w in workers:
            self.say(w, {"type": "ready", "pid": 1, "version": 1})
        d = self.pool.metrics_text()
        for w, count in zip(workers, (3, 4), strict=True):
            request = w.transport.messages()[-1]
            self.assertEqual(request["page"], "metrics")
            self.say(w, {"type": "admin", "id": request["id"],
                         "body": f"# TYPE r counter\nr_total{{code=\"200\"}} {count}.0\n"})
        _, body = self.successResultOf(d)
        merged = samples(body.decode())
        self.assertEqual(merged[("r_total", (("code", "200"),))], 7.0)
        self.assertEqual(merged[("txmesh_workers", (("state", "ready"),))], 2.0)

    def test_silent_worker_is_left_out(self) -> None:
        workers = [w for w, _, _ in self.reactor.spawned]
        for w in workers:
            self.say(w, {"type": "ready", "pid": 1, "version": 1})
        d = self.pool.metrics_text()
        request = workers[0].transport.messages()[-1]
        self.say(workers[0], {"type": "admin", "id": request["id"], "body": "# TYPE r counter\nr_total 3.0\n"})
        self.assertNoResult(d)
        self.reactor.advance(5.0)
        _, body = self.successResultOf(d)
        self.assertEqual(samples(body.decode())[("r_total", ())], 3.0)
        self.flushLoggedErrors()

    def test_helpers(self) -> None:
        self.assertEqual([restart_delay(n) for n in (1, 2, 3, 10)], [0.5, 1.0, 2.0, 30.0])
        self.assertEqual(exit_description(ProcessTerminated(signal=signal.SIGKILL)), "was killed by SIGKILL")
        self.assertEqual(exit_description(ProcessTerminated(exitCode=3)), "exited with status 3")


class AsyncAdminTests(unittest.TestCase):
    def test_deferred_page(self) -> None:
        """
        The admin endpoint serves pages its state computes later (the parent
        asks its workers).
        """
        pending: defer.Deferred = defer.Deferred()

        class State:
            def metrics_text(self) -> defer.Deferred:
                return pending

        root = AdminResource(State())
        request = DummyRequest([b"prometheus"])
        resource = root.getChildWithDefault(b"stats", request).getChildWithDefault(b"prometheus", request)
        self.assertEqual(resource.render(request), NOT_DONE_YET)
        pending.callback(("text/plain", b"m 1\n"))
        self.assertEqual(b"".join(request.written), b"m 1\n")
        self.assertEqual(request.finished, 1)


# The real command

UPSTREAM = r'''
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"hello\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''

PROCESS_CONFIG = """\
admin: {address: "tcp:%(admin)d:interface=127.0.0.1"}
listeners:
  - name: http
    address: "tcp:%(port)d:interface=127.0.0.1"
    http_filters: [{name: metrics}]
    virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: /}, cluster: app}]}]
%(more)s
clusters:
  - {name: app, endpoints: [{address: 127.0.0.1, port: %(upstream)d}]}
"""

SECOND_LISTENER = """\
  - name: second
    address: "tcp:%(second)d:interface=127.0.0.1"
    http_filters: [{name: metrics}]
    virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: /}, cluster: app}]}]
"""


def get(url: str) -> tuple[int, bytes]:
    """
    A GET on a new connection (each may go to either worker).
    """
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ConcurrencyProcessTests(unittest.TestCase):
    """
    C{twistd txmesh-proxy --concurrency 2} from a static config.
    """

    timeout = 240

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.ports = {name: free_port() for name in ("admin", "port", "upstream", "second")}
        upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(self.ports["upstream"])])
        self.addCleanup(self._end, upstream)
        self.path = os.path.join(self.dir, "proxy.yaml")
        self.write("")

    def write(self, more: str) -> None:
        with open(self.path + ".tmp", "w") as f:
            f.write(PROCESS_CONFIG % dict(self.ports, more=more % self.ports))
        os.replace(self.path + ".tmp", self.path)

    def _end(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.kill()
            process.wait()

    def admin(self, page: str) -> defer.Deferred:
        return deferToThread(get, f"http://127.0.0.1:{self.ports['admin']}/{page}")

    def until(self, what: str, check: Any, timeout: float = 90.0) -> defer.Deferred:
        """
        Poll C{check} (returning a Deferred of a true value when done) at
        most C{timeout} seconds; a failure shows the proxy's log.
        """
        def with_log(failure: Any) -> None:
            failure.trap(AssertionError)
            raise AssertionError(f"{failure.value}; log:\n{self.log()}")

        return poll_until(check, what, timeout, every=0.2).addErrback(with_log)

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "twistd.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    @defer.inlineCallbacks
    def workers(self) -> Any:
        status, body = yield self.admin("config_dump")
        return json.loads(body)["workers"] if status == 200 else None

    @defer.inlineCallbacks
    def ready(self) -> Any:
        status, _ = yield self.admin("ready")
        return status == 200

    @defer.inlineCallbacks
    def test_two_workers(self) -> Any:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        proxy = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-l", os.path.join(self.dir, "twistd.log"), "txmesh-proxy",
             "--config", self.path, "--concurrency", "2"], env=env, cwd=self.dir)
        self.addCleanup(self._end, proxy)
        yield self.until("both workers ready", self.ready)
        first = yield self.workers()
        pids = [w["pid"] for w in first]
        self.assertEqual(len(set(pids)), 2)

        # Both workers serve: each connection goes to one of them (the
        # kernel's choice); each worker counts its own upstream requests.
        url = f"http://127.0.0.1:{self.ports['port']}/"
        for _ in range(40):
            status, body = yield deferToThread(get, url)
            self.assertEqual((status, body), (200, b"hello\n"))
        status, body = yield self.admin("clusters")
        per_worker = {index: clusters["app"]["upstream_requests"]
                      for index, clusters in json.loads(body)["workers"].items()}
        self.assertEqual(sum(per_worker.values()), 40)
        self.assertTrue(all(n > 0 for n in per_worker.values()), per_worker)

        # One page counts all of them.
        status, body = yield self.admin("stats/prometheus")
        self.assertEqual(status, 200)
        total = sum(v for (name, labels), v in samples(body.decode()).items()
                    if name == "istio_requests_total" and ("response_code", "200") in labels)
        self.assertEqual(total, 40)

        # A reload that adds a listener reaches both workers.
        self.write(SECOND_LISTENER)
        proxy.send_signal(signal.SIGHUP)

        @defer.inlineCallbacks
        def applied() -> Any:
            workers = yield self.workers()
            return workers is not None and all(w["version"] == 2 for w in workers)

        yield self.until("both workers apply version 2", applied)
        for _ in range(20):
            status, body = yield deferToThread(get, f"http://127.0.0.1:{self.ports['second']}/")
            self.assertEqual((status, body), (200, b"hello\n"))
        status, body = yield self.admin("clusters")
        counts = [c["app"]["upstream_requests"] for c in json.loads(body)["workers"].values()]
        self.assertEqual(sum(counts), 60)

        # A killed worker is started again, with the current config.
        os.kill(pids[0], signal.SIGKILL)

        @defer.inlineCallbacks
        def replaced() -> Any:
            workers = yield self.workers()
            return (workers is not None and workers[0]["pid"] not in (None, pids[0]) and workers[0]["ready"]
                    and workers[0]["version"] == 2)

        yield self.until("worker 0 restarted", replaced)
        yield self.until("ready again", self.ready)
        status, body = yield self.admin("stats/prometheus")
        self.assertEqual(samples(body.decode())[("txmesh_worker_restarts_total", ())], 1.0)
        status, body = yield deferToThread(get, f"http://127.0.0.1:{self.ports['second']}/")
        self.assertEqual(status, 200)
        now = yield self.workers()
        pids = [w["pid"] for w in now]

        # SIGTERM stops the parent and every worker.
        proxy.send_signal(signal.SIGTERM)

        def stopped() -> defer.Deferred:
            return defer.succeed(proxy.poll() is not None and not any(alive(p) for p in pids))

        yield self.until("everything stopped", stopped, timeout=60.0)
        # twistd ends with the signal it was stopped by, after its shutdown.
        self.assertIn(proxy.returncode, (0, -signal.SIGTERM))
        self.assertIn("all workers stopped", self.log())


class OptionTests(unittest.TestCase):
    def test_concurrency_option(self) -> None:
        from twisted.python import usage

        from twisted.plugins.txmesh_plugins import ProxyOptions

        options = ProxyOptions()
        options.parseOptions(["--config", "p.yaml"])
        self.assertEqual(options["concurrency"], 1)
        options = ProxyOptions()
        options.parseOptions(["--config", "p.yaml", "--concurrency", "4"])
        self.assertEqual(options["concurrency"], 4)
        with self.assertRaises(usage.UsageError):
            ProxyOptions().parseOptions(["--config", "p.yaml", "--concurrency", "0"])
        # The parent holds the pilot channel (tests/test_workers_pilot.py).
        options = ProxyOptions()
        options.parseOptions(["--pilot", "tcp:p:1", "--pilot-insecure", "--concurrency", "2"])
        self.assertEqual(options["concurrency"], 2)

