"""
C{twistd txmesh-proxy --concurrency 2} configured by a pilot: the parent
holds the one channel and the workload identity, the workers serve.

Unit tests drive L{WorkerPool} with fake processes (a push is acked once
every worker applied it, refused with a worker's reason, the identity
reaches new and running workers); the process test runs a real pilot, a
server sidecar and a two-worker client sidecar, and shows mutual TLS with
the parent's certificate in both workers, a route change served by both,
and one proxy (not two) at the pilot.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
from datetime import datetime, timedelta, timezone
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from tests.support import curl, free_port, poll_until
from tests.test_mesh_processes import TXMESH, PilotProcess, join_token, run_txmesh
from tests.test_proxy_process import TWISTD, ProxyProcess
from tests.test_workers import ProcessReactor
from tests.test_zero_trust import SERVICES, SIDECAR, EchoApp
from txmesh.config.errors import ConfigError
from txmesh.pilot.ca import CertificateAuthority
from txmesh.proxy.worker import WorkerChannel, worker_document, worker_identity
from txmesh.proxy.worker_channel import encode
from txmesh.proxy.workers import ROLLOUT_TIMEOUT, WorkerPool
from txmesh.proxy.workload_identity import IdentityError, WorkloadIdentity

BOOTSTRAP = """\
node: {id: web-1, namespace: default}
admin: {address: "tcp:15999:interface=127.0.0.1"}
pilot:
  addresses: ["tcp:127.0.0.1:1"]
  insecure: true
"""

PUSHED = {
    "node": {"id": "web-1", "namespace": "default"},
    "listeners": [{"name": "outbound", "address": "tcp:18600:interface=127.0.0.1",
                   "routes": [{"match": {"prefix": "/"}, "cluster": "app"}]}],
    "clusters": [{"name": "app", "endpoints": [{"address": "127.0.0.1", "port": 18601}]}],
}


class PushRolloutTests(unittest.TestCase):
    """
    A pilot push through the parent: validated there, sent to every worker,
    acked (the returned Deferred fires) once all have applied it.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "proxy.yaml")
        with open(self.path, "w") as f:
            f.write(BOOTSTRAP)
        self.reactor = ProcessReactor()
        self.pool = WorkerPool(self.path, self.reactor, 2)
        self.pool.load_initial()
        self.pool.startService()
        # Not waited for: the fake workers never end.
        self.addCleanup(lambda: self.pool.running and self.pool.stopService() and None)
        self.workers = [w for w, _, _ in self.reactor.spawned]

    def say(self, worker: Any, message: dict) -> None:
        worker.childDataReceived(3, encode(message))

    def test_workers_start_without_the_pilot_section(self) -> None:
        """
        Workers get the bootstrap; only the parent connects to the pilot.
        """
        [message] = self.workers[0].transport.messages()
        self.assertEqual(worker_document(message["document"]).get("pilot"), None)
        self.assertIsNone(message["identity"])  # a plaintext (insecure) channel: no identity
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["127.0.0.1"])
        self.assertIsNotNone(self.pool.pilot_status())

    def test_acked_when_every_worker_applied(self) -> None:
        d = self.pool._apply_pushed(PUSHED, "pilot tcp:127.0.0.1:1")
        for worker in self.workers:
            message = worker.transport.messages()[-1]
            self.assertEqual((message["type"], message["version"]), ("config", 2))
            self.assertEqual(message["document"]["listeners"][0]["name"], "outbound")
        self.say(self.workers[0], {"type": "applied", "version": 2, "ok": True, "error": None})
        self.assertNoResult(d)
        self.say(self.workers[1], {"type": "applied", "version": 2, "ok": True, "error": None})
        self.assertIsNone(self.successResultOf(d))

    def test_a_worker_refusal_is_the_reason(self) -> None:
        d = self.pool._apply_pushed(PUSHED, "pilot tcp:127.0.0.1:1")
        self.say(self.workers[1], {"type": "applied", "version": 2, "ok": False,
                                   "error": "listeners[0].address: port taken"})
        failure = self.failureResultOf(d, ConfigError)
        self.assertIn("worker 1: listeners[0].address: port taken", str(failure.value))

    def test_invalid_push_reaches_no_worker(self) -> None:
        with self.assertRaises(ConfigError):
            self.pool._apply_pushed({**PUSHED, "clusters": [{"name": "app"}]}, "pilot tcp:127.0.0.1:1")
        for worker in self.workers:
            self.assertEqual(len(worker.transport.messages()), 1)

    def test_an_exited_worker_is_not_waited_for(self) -> None:
        """
        A worker that exits is not waited for: its replacement starts from
        the new config.
        """
        d = self.pool._apply_pushed(PUSHED, "pilot tcp:127.0.0.1:1")
        self.say(self.workers[0], {"type": "applied", "version": 2, "ok": True, "error": None})
        self.workers[1].transport.pid = None
        self.workers[1].processEnded(Failure(Exception("gone")))
        self.assertIsNone(self.successResultOf(d))
        self.reactor.advance(1.0)
        replacement = self.reactor.spawned[-1][0]
        self.assertEqual(replacement.transport.messages()[0]["version"], 2)

    def test_slow_workers_refuse_it(self) -> None:
        d = self.pool._apply_pushed(PUSHED, "pilot tcp:127.0.0.1:1")
        self.say(self.workers[0], {"type": "applied", "version": 2, "ok": True, "error": None})
        self.reactor.advance(ROLLOUT_TIMEOUT)
        failure = self.failureResultOf(d, ConfigError)
        self.assertIn("worker(s) 1 did not apply it", str(failure.value))

    def test_file_changes_are_not_reloaded(self) -> None:
        """
        As a single proxy's: with a pilot the file is only the bootstrap.
        """
        self.assertFalse(self.successResultOf(self.pool.reload()))
        self.assertEqual(len(self.workers[0].transport.messages()), 1)


NOW = datetime(2026, 11, 25, tzinfo=timezone.utc)


class IdentityToWorkersTests(unittest.TestCase):
    """
    The parent's workload identity reaches the workers over their pipes.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = CertificateAuthority.load_or_create(os.path.join(self.dir, "ca"), "cluster.local", NOW)

    def certified(self, spiffe_id: str = "spiffe://cluster.local/ns/default/sa/web") -> WorkloadIdentity:
        identity = WorkloadIdentity(spiffe_id)
        chain = self.ca.sign_csr(identity.new_request(), spiffe_id, NOW, timedelta(hours=1))
        identity.install(chain, self.ca.root_pem, NOW.timestamp())
        return identity

    def test_material_round_trip(self) -> None:
        self.assertIsNone(WorkloadIdentity("spiffe://cluster.local/ns/default/sa/web").material())
        parent = self.certified()
        worker = worker_identity({"spiffe_id": parent.spiffe_id, "material": parent.material()}, 0.0)
        self.assertEqual((worker.key_pem, worker.chain_pem, worker.roots_pem),
                         (parent.key_pem, parent.chain_pem, parent.roots_pem))
        self.assertIsNone(worker_identity(None, 0.0))
        self.assertIsNone(worker_identity({"spiffe_id": parent.spiffe_id, "material": None}, 0.0).chain_pem)

    def test_wrong_material_refused(self) -> None:
        parent = self.certified()
        other = WorkloadIdentity("spiffe://cluster.local/ns/default/sa/other")
        with self.assertRaises(IdentityError) as e:
            other.adopt(parent.material(), 0.0)
        self.assertIn("names spiffe://cluster.local/ns/default/sa/web", str(e.exception))
        another_key = {**parent.material(), "key": self.certified().material()["key"]}
        with self.assertRaises(IdentityError) as e:
            WorkloadIdentity(parent.spiffe_id).adopt(another_key, 0.0)
        self.assertIn("not for the key", str(e.exception))
        for broken in ({**parent.material(), "key": "junk"}, {"chain": "x"}, {}):
            with self.assertRaises(IdentityError):
                WorkloadIdentity(parent.spiffe_id).adopt(broken, 0.0)

    def test_worker_channel_adopts_updates(self) -> None:
        parent = self.certified()
        worker = WorkloadIdentity(parent.spiffe_id)
        changes = []
        worker.subscribe(changes.append)

        class Service:
            identity = worker

        channel = WorkerChannel(Service(), reactor)
        channel.dataReceived(encode({"type": "identity", "spiffe_id": parent.spiffe_id,
                                     "material": parent.material()}))
        self.assertEqual(worker.chain_pem, parent.chain_pem)
        self.assertEqual(len(changes), 1)
        # The same material again changes nothing (no TLS contexts rebuilt).
        channel.dataReceived(encode({"type": "identity", "spiffe_id": parent.spiffe_id,
                                     "material": parent.material()}))
        self.assertEqual(len(changes), 1)


ROUTES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: default}}
spec:
  hosts: [api.default.svc.cluster.local]
  http:
    - route: [{{destination: {{host: api.default.svc.cluster.local}}}}]
      headers: {{response: {{set: {{x-route: "{route}"}}}}}}
"""

STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
"""


class WorkersWithPilotProcessTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> Any:
        if not os.path.exists(TWISTD) or not os.path.exists(TXMESH):
            raise unittest.SkipTest(f"no twistd/txmesh next to {sys.executable} (pip install -e .)")
        self.dir = tempfile.mkdtemp(prefix="txmesh-workers-pilot-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        for sub in ("istio", "services"):
            os.mkdir(os.path.join(self.dir, sub))
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    def write(self, relative: str, text: str) -> None:
        path = os.path.join(self.dir, relative)
        with open(path + ".tmp", "w") as f:
            f.write(textwrap.dedent(text))
        os.replace(path + ".tmp", path)

    @defer.inlineCallbacks
    def sidecar(self, pilot: PilotProcess, name: str, app: str, app_port: int, inbound: int, *options: str) -> Any:
        proxy = ProxyProcess(self)
        proxy.write(SIDECAR.format(name=name, namespace="default", app=app, pilot=pilot.address,
                                   root=os.path.join(self.dir, "ca", "root-cert.pem"),
                                   token=join_token(self.dir, app), inbound=inbound, app_port=app_port))
        proxy.start(*options)
        yield proxy.wait_ready()
        return proxy

    @defer.inlineCallbacks
    def call(self, proxy: ProxyProcess) -> Any:
        """
        One request on a new connection (the kernel picks the worker).

        @return: C{(status, x-route header, the app's JSON)} or C{None}.
        """
        try:
            response = yield self.agent.request(
                b"GET", (proxy.http + "/hello").encode("ascii"),
                Headers({b"host": [b"api.default.svc.cluster.local"]}))
            body = yield readBody(response)
        except Exception:
            return None
        route = (response.headers.getRawHeaders(b"x-route") or [b""])[0].decode("ascii")
        return response.code, route, body

    @defer.inlineCallbacks
    def calls(self, proxy: ProxyProcess, n: int) -> Any:
        results = yield defer.gatherResults([self.call(proxy) for _ in range(n)])
        return results

    def until(self, check: Any, what: str, timeout: float = 20.0) -> Any:
        return poll_until(check, what, timeout)

    @defer.inlineCallbacks
    def admin_json(self, proxy: ProxyProcess, page: str) -> Any:
        out, _, code = yield curl("-s", "--max-time", "5", f"{proxy.admin}/{page}")
        self.assertEqual(code, 0)
        return json.loads(out)

    @defer.inlineCallbacks
    def test_two_workers_one_proxy(self) -> Any:
        app = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(EchoApp()))
        self.addCleanup(app.stopListening)
        inbound = free_port()
        self.write("services/api.yaml", SERVICES.format(api_endpoint=inbound))
        self.write("istio/routes.yaml", ROUTES.format(route="one"))
        self.write("istio/peer.yaml", STRICT)
        pilot = PilotProcess(self, self.dir, "pilot")
        yield pilot.start()
        yield self.sidecar(pilot, "api-1", "api", app.getHost().port, inbound)
        web = yield self.sidecar(pilot, "web-1", "web", free_port(), free_port(), "--concurrency", "2")

        # Mutual TLS from both workers, with the certificate the parent got.
        def all_ok() -> Any:
            return self.calls(web, 8).addCallback(
                lambda rs: rs if all(r is not None and r[0] == 200 for r in rs) else None)

        results = yield self.until(all_ok, "both workers reaching api over mutual TLS")
        results += yield self.calls(web, 32)
        for status, route, body in results:
            self.assertEqual((status, route), (200, "one"))
            xfcc = json.loads(body)["headers"]["x-forwarded-client-cert"]
            self.assertIn("URI=spiffe://cluster.local/ns/default/sa/web", xfcc)
        clusters = yield self.admin_json(web, "clusters")
        served = {index: sum(c["upstream_requests"] for name, c in view.items() if "api" in name)
                  for index, view in clusters["workers"].items()}
        self.assertEqual(sorted(served), ["0", "1"])
        self.assertTrue(all(n > 0 for n in served.values()), served)

        # A route change reaches both workers.
        self.write("istio/routes.yaml", ROUTES.format(route="two"))

        def changed() -> Any:
            return self.calls(web, 16).addCallback(
                lambda rs: rs if all(r is not None and r[1] == "two" for r in rs) else None)

        yield self.until(changed, "the new route in both workers")
        dump = yield self.admin_json(web, "config_dump")
        self.assertEqual({(w["version"], w["error"]) for w in dump["workers"]}, {(dump["version"], None)})

        # The pilot sees one proxy per sidecar, both in sync.
        pilot_view = yield self.admin_json(web, "pilot")
        self.assertTrue(pilot_view["identity"]["certificate"])
        out, _, _ = yield curl("-s", "--max-time", "5", f"{web.admin}/stats/prometheus")
        self.assertEqual([line for line in out.decode().splitlines() if line.startswith("txmesh_pilot_connected")],
                         ["txmesh_pilot_connected 1.0"])
        listed = run_txmesh("proxy-status", "-o", "json", pilot=pilot)
        self.assertEqual(sorted((p["id"], p["status"]) for p in json.loads(listed.stdout)),
                         [("api-1", "SYNCED"), ("web-1", "SYNCED")])
