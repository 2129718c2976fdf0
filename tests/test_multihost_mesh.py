"""
The whole mesh across hosts: network namespaces on one Ethernet segment,
each with its own address, a real pilot on one of them and a transparent
sidecar beside an unmodified app on each of the others.

    pilot     10.248.0.1   twistd txmesh-pilot (CA, join tokens, file registry,
                           Istio documents) and a Zipkin collector
    frontend  10.248.0.11  a plain Python HTTP client/server (urllib) calling
                           http://reviews:9080/, and a grpcio client calling
                           ratings:50051
    reviews1  10.248.0.12  reviews v1 (plain Python HTTP) and ratings (grpcio)
    reviews2  10.248.0.13  reviews v2 (plain Python HTTP)

C{reviews} and C{ratings} are names in the workload hosts' C{hosts} files,
for addresses nobody has (cluster IPs): only the sidecars know where the
services are.  One test shows, in order, that the apps' requests are
captured, carried over mutual TLS, routed by the canary rule, metered and
traced, and that killing reviews v2's app ejects it while requests keep
succeeding through v1.  See docs/capture.md ("The multi-host test").
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from tests.multihost import (
    CLIENT_APP,
    COLLECTOR,
    COLLECTOR_PORT,
    SERVER_APP,
    Host,
    Pilot,
    Sidecar,
    app_env,
    python,
    total,
    until,
)
from tests.netns import Segment, skip_reason
from tests.test_grpc import RUNNER, _grpcio_missing
from tests.test_mesh_processes import TXMESH, run_txmesh
from tests.test_proxy_process import TWISTD

SUBNET = "10.248.0"
PILOT, FRONTEND, REVIEWS_V1, REVIEWS_V2 = (f"{SUBNET}.{n}" for n in (1, 11, 12, 13))
REVIEWS_VIP, RATINGS_VIP = f"{SUBNET}.100", f"{SUBNET}.101"
REVIEWS_PORT = 9080
RATINGS_PORT = 50051
CLIENT_PORT = 8000
CANARY_REQUESTS = 100
V2_WEIGHT = 20

HOSTS_FILE = f"""\
127.0.0.1 localhost
{REVIEWS_VIP} reviews reviews.default.svc.cluster.local
{RATINGS_VIP} ratings ratings.default.svc.cluster.local
"""

COLLECTOR_URL = f"http://{PILOT}:{COLLECTOR_PORT}/api/v2/spans"
TRACING = {"collector": COLLECTOR_URL, "sampling": 100, "flush_interval": "0.2s"}

MESH = f"""\
telemetry:
  metrics: true
  tracing: {json.dumps(TRACING)}
registries: [{{type: file, path: services, poll_interval: 0.2}}]
"""

MESHED = "security.istio.io/tlsMode: istio"
SERVICES = f"""\
services:
  - host: reviews.default.svc.cluster.local
    ports: [{{name: http, number: {REVIEWS_PORT}, protocol: HTTP}}]
    endpoints:
      - {{address: {REVIEWS_V1}, port: {REVIEWS_PORT}, labels: {{app: reviews, version: v1, {MESHED}}}}}
      - {{address: {REVIEWS_V2}, port: {REVIEWS_PORT}, labels: {{app: reviews, version: v2, {MESHED}}}}}
  - host: ratings.default.svc.cluster.local
    ports: [{{name: grpc, number: {RATINGS_PORT}, protocol: GRPC}}]
    endpoints:
      - {{address: {REVIEWS_V1}, port: {RATINGS_PORT}, labels: {{app: ratings, version: v1, {MESHED}}}}}
"""

ISTIO = f"""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}}
  subsets:
    - {{name: v1, labels: {{version: v1}}}}
    - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  http:
    # Any version will do: the whole service, retried on another host.
    - name: any-version
      match: [{{uri: {{prefix: /any}}}}]
      route: [{{destination: {{host: reviews.default.svc.cluster.local}}}}]
      retries: {{attempts: 2, retryOn: "5xx,connect-failure,reset"}}
    # The canary: {100 - V2_WEIGHT}% to v1, {V2_WEIGHT}% to v2.
    - name: canary
      route:
        - {{destination: {{host: reviews.default.svc.cluster.local, subset: v1}}, weight: {100 - V2_WEIGHT}}}
        - {{destination: {{host: reviews.default.svc.cluster.local, subset: v2}}, weight: {V2_WEIGHT}}}
---
# The pilot takes only endpoints from a registry, not its ports and their
# protocols: ratings gets routes and HTTP/2 from documents of its own.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [ratings.default.svc.cluster.local]
  http: [{{route: [{{destination: {{host: ratings.default.svc.cluster.local}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings, namespace: default}}
spec:
  host: ratings.default.svc.cluster.local
  trafficPolicy: {{connectionPool: {{http: {{h2UpgradePolicy: UPGRADE}}}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: default}}
spec: {{mtls: {{mode: STRICT}}}}
"""


def ratings_inbound(app_port: int) -> dict[str, Any]:
    """
    The static inbound listener of ratings, reviews1's second app: the
    pilot pushes one inbound listener per proxy, to one app port, and
    speaks HTTP/1.1 to it, so a gRPC app needs its own (h2) listener and
    cluster in the bootstrap, mutual TLS with the pushed workload
    certificate, and the telemetry the pilot would give it.
    """
    return {
        "listeners": [{
            "name": "inbound-ratings",
            "address": f"tcp:{RATINGS_PORT}:interface={REVIEWS_V1}",
            "mtls": "STRICT",
            "http_filters": [{"name": "tracing", "config": {**TRACING, "kind": "server"}},
                             {"name": "metrics", "config": {"reporter": "destination"}}],
            "routes": [{"name": "inbound-ratings", "cluster": "inbound-ratings", "timeout": "0s"}],
        }],
        "clusters": [{"name": "inbound-ratings", "http2": True, "endpoints": [f"127.0.0.1:{app_port}"]}],
    }


class MultiHostMeshTests(SynchronousTestCase):
    """
    A pilot host and three workload hosts, each a network namespace with
    its own address on a bridge; the apps know nothing of the mesh.
    """

    def setUp(self) -> None:
        reason = skip_reason("iptables", "setpriv", "curl") or _grpcio_missing()
        if reason:
            self.skipTest(reason)
        if not os.path.exists(TWISTD) or not os.path.exists(TXMESH):
            self.skipTest(f"no twistd/txmesh next to {sys.executable} (pip install -e .)")
        self.dir = tempfile.mkdtemp(prefix="txmesh-multihost-")
        os.chmod(self.dir, 0o755)  # the proxies run as their own user
        self.addCleanup(shutil.rmtree, self.dir, True)
        segment = Segment(self)
        self.pilot_host = Host(self, segment, "pilot", PILOT, self.dir)
        self.frontend = Host(self, segment, "frontend", FRONTEND, self.dir)
        self.reviews1 = Host(self, segment, "reviews1", REVIEWS_V1, self.dir)
        self.reviews2 = Host(self, segment, "reviews2", REVIEWS_V2, self.dir)
        self.workload_hosts = [self.frontend, self.reviews1, self.reviews2]
        for host in self.workload_hosts:
            host.ns.etc_file("hosts", HOSTS_FILE)
        self.addCleanup(self._log_outputs)

    def _log_outputs(self) -> None:
        for host in (self.pilot_host, *self.workload_hosts):
            for name in sorted(os.listdir(host.dir)):
                if name.endswith(".log"):
                    log.msg(f"{host.name}/{name}:\n{host.read_log(name[:-4])}")

    def _write(self, relative: str, text: str) -> None:
        path = os.path.join(self.config_dir, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def _start_control_plane(self) -> Pilot:
        self.config_dir = os.path.join(self.pilot_host.dir, "config")
        self._write("mesh.yaml", MESH)
        self._write("services/mesh.yaml", SERVICES)
        self._write("istio/reviews.yaml", ISTIO)
        self.pilot_host.spawn("collector", python(COLLECTOR, str(COLLECTOR_PORT)))
        pilot = Pilot(self.pilot_host, self.config_dir)
        pilot.start()
        until(lambda: self.pilot_host.http(f"http://127.0.0.1:{COLLECTOR_PORT}/spans", 1)[0] == 200,
              "the collector answering", 10)
        return pilot

    def _start_apps(self) -> None:
        self.reviews_v1_app = self.reviews1.spawn("app-reviews", python(SERVER_APP, "reviews", "v1",
                                                                         str(REVIEWS_PORT)))
        self.reviews_v2_app = self.reviews2.spawn("app-reviews", python(SERVER_APP, "reviews", "v2",
                                                                         str(REVIEWS_PORT)))
        self.frontend.spawn("app-frontend", python(CLIENT_APP, str(CLIENT_PORT)))
        self.grpc_code = os.path.join(self.dir, "grpc")
        made = subprocess.run([sys.executable, RUNNER, "generate", self.grpc_code], capture_output=True,
                              text=True, timeout=60, check=False)
        self.assertEqual(made.returncode, 0, made.stderr)
        portfile = os.path.join(self.reviews1.dir, "ratings.port")
        # The grpcio server stops when its stdin closes (at cleanup).
        self.reviews1.spawn("app-ratings", [sys.executable, RUNNER, "server", self.grpc_code, portfile],
                            stdin=subprocess.PIPE)
        until(lambda: os.path.exists(portfile), "the grpcio server's port", 20)
        with open(portfile) as f:
            self.ratings_app_port = int(f.read())
        for host, port in ((self.reviews1, REVIEWS_PORT), (self.reviews2, REVIEWS_PORT),
                           (self.frontend, CLIENT_PORT)):
            url = f"http://127.0.0.1:{port}/call?n=0&url=-"
            until(lambda host=host, url=url: host.http(url, 1)[0] == 200, f"the app on {host.name} answering", 10)

    def _start_sidecars(self, pilot: Pilot, only: tuple[str, ...] = ("frontend", "reviews1", "reviews2"),
                        ) -> dict[str, Sidecar]:
        def token(host: Host, account: str) -> str:
            # A join token is good once: one per proxy, in its host's directory.
            made = run_txmesh("token", "create", "--config-dir", self.config_dir, "--namespace", "default",
                              "--service-account", account)
            self.assertEqual(made.returncode, 0, made.stderr)
            path = os.path.join(host.dir, f"{account}.token")
            with open(path, "w") as f:
                f.write(made.stdout.strip())
            return path

        made = {
            "frontend": lambda: Sidecar(self.frontend, pilot, "frontend", "frontend", "v1", "frontend",
                                        token(self.frontend, "frontend")),
            "reviews1": lambda: Sidecar(self.reviews1, pilot, "reviews-v1", "reviews", "v1", "reviews",
                                        token(self.reviews1, "reviews"), app_port=REVIEWS_PORT,
                                        inbound_ports=[REVIEWS_PORT], static=ratings_inbound(self.ratings_app_port)),
            "reviews2": lambda: Sidecar(self.reviews2, pilot, "reviews-v2", "reviews", "v2", "reviews",
                                        token(self.reviews2, "reviews"), app_port=REVIEWS_PORT,
                                        inbound_ports=[REVIEWS_PORT]),
        }
        sidecars = {name: made[name]() for name in only}
        for sidecar in sidecars.values():
            sidecar.capture()
            sidecar.start()
        for sidecar in sidecars.values():
            sidecar.wait_ready()

        def synced() -> bool:
            proxies = pilot.get("/proxies")
            return len(proxies) == len(sidecars) and all(p["status"] == "SYNCED" for p in proxies)

        until(synced, f"{len(sidecars)} proxies SYNCED at the pilot", 20)
        return sidecars

    def call(self, url: str, n: int) -> list[dict[str, Any]]:
        """
        Ask the frontend app to GET C{url} C{n} times.

        @return: what it got, each with C{body} parsed when it is JSON.
        """
        status, body = self.frontend.http(f"http://127.0.0.1:{CLIENT_PORT}/call?n={n}&url={url}", 60)
        self.assertEqual(status, 200, body)
        results = json.loads(body)
        for result in results:
            if result.get("status") == 200:
                result["body"] = json.loads(result["body"])
        return results

    def grpc_call(self) -> dict[str, Any]:
        done = self.frontend.ns.run(
            ["env", "-i", *(f"{k}={v}" for k, v in app_env().items()), "GRPC_DNS_RESOLVER=native",
             sys.executable, RUNNER, "client", self.grpc_code, f"ratings:{RATINGS_PORT}", "unary"], timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout)["unary"]

    def test_mesh_across_hosts(self) -> None:
        """
        The apps' requests are captured, carried over mutual TLS, routed by
        the canary rule, metered by both sidecars and traced; killing
        reviews v2's app ejects its host and requests go on through v1.
        """
        pilot = self._start_control_plane()
        self._start_apps()
        sidecars = self._start_sidecars(pilot)
        front, v1, v2 = sidecars["frontend"], sidecars["reviews1"], sidecars["reviews2"]

        # The pushed config reaches the frontend: a first call goes through.
        until(lambda: self.call("http://reviews:9080/any", 1)[0]["status"] == 200, "a first call to reviews", 20)

        # 1. Captured, protected, routed: the app asks for http://reviews:9080/
        # (an address nobody has) and gets reviews v1 or v2 on the other hosts.
        before = {name: s.metric("istio_requests_total") for name, s in sidecars.items()}
        redirected = front.redirected("TXMESH_REDIRECT")
        results = self.call("http://reviews:9080/canary", CANARY_REQUESTS)
        # urllib opens a connection per request: the kernel handed each to the sidecar.
        self.assertGreaterEqual(front.redirected("TXMESH_REDIRECT") - redirected, CANARY_REQUESTS)
        self.assertEqual([r["status"] for r in results], [200] * CANARY_REQUESTS, results)
        versions = collections.Counter(r["body"]["version"] for r in results)
        log.msg(f"canary {100 - V2_WEIGHT}/{V2_WEIGHT}: {dict(versions)}")
        self.assertEqual(set(versions), {"v1", "v2"})
        # 20% of 100: a loose bound (the chance of falling outside is < 1e-4).
        self.assertTrue(5 <= versions["v2"] <= 40, versions)
        # On the other side, the client sidecar's connections to the apps'
        # port were redirected to the server sidecars.
        for sidecar in (v1, v2):
            self.assertGreaterEqual(sidecar.redirected("TXMESH_IN_REDIRECT"), 1)
        for result in results:
            # The app behind the server sidecar learns who called: mutual TLS.
            xfcc = result["body"]["headers"].get("x-forwarded-client-cert", "")
            self.assertIn("URI=spiffe://cluster.local/ns/default/sa/frontend", xfcc)
            self.assertIn("By=spiffe://cluster.local/ns/default/sa/reviews", xfcc)

        # 2. Metered: each sidecar's istio_requests_total counts those
        # requests, the source side all of them, each destination its share.
        after = {name: s.metric("istio_requests_total") for name, s in sidecars.items()}

        def delta(name: str, **labels: str) -> float:
            return total(after[name], **labels) - total(before[name], **labels)

        service = "reviews.default.svc.cluster.local"
        self.assertEqual(delta("frontend", reporter="source", destination_service=service, response_code="200",
                               source_workload="frontend"), CANARY_REQUESTS)
        for name, version in (("reviews1", "v1"), ("reviews2", "v2")):
            self.assertEqual(delta(name, reporter="destination", response_code="200",
                                   connection_security_policy="mutual_tls",
                                   source_principal="spiffe://cluster.local/ns/default/sa/frontend",
                                   destination_version=version), versions[version], (name, after[name]))
        self.assertEqual(delta("frontend", reporter="source", destination_service=service), CANARY_REQUESTS)  # no errors

        # 3. gRPC across hosts: the grpcio client on the frontend host calls
        # ratings:50051; reviews1's sidecar takes it over mutual TLS.
        reply = self.grpc_call()
        self.assertEqual((reply["status"], reply.get("payload")), ("OK", "ping"), reply)
        self.assertEqual(reply["trailing"].get("x-served-by"), "grpcio")
        self.assertGreaterEqual(total(front.metric("istio_requests_total"), reporter="source",
                                      destination_service="ratings.default.svc.cluster.local",
                                      request_protocol="grpc", grpc_response_status="0"), 1)
        self.assertGreaterEqual(total(v1.metric("istio_requests_total"), reporter="destination",
                                      request_protocol="grpc", grpc_response_status="0",
                                      connection_security_policy="mutual_tls",
                                      source_principal="spiffe://cluster.local/ns/default/sa/frontend"), 1)

        # 4. Traced: for a call, the frontend sidecar's client span and the
        # server span of the sidecar that served it reach the collector with
        # one trace id, the server's parent being the client.
        def traces() -> dict[str, list[dict[str, Any]]]:
            status, body = self.pilot_host.http(f"http://127.0.0.1:{COLLECTOR_PORT}/spans")
            by_trace: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
            for span in json.loads(body) if status == 200 else ():
                by_trace[span["traceId"]].append(span)
            return by_trace

        def crossing(workload: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
            pairs = []
            for spans in traces().values():
                clients = [s for s in spans if s["kind"] == "CLIENT" and s["localEndpoint"]["serviceName"] == "frontend"]
                servers = [s for s in spans if s["kind"] == "SERVER" and s["localEndpoint"]["serviceName"] == workload]
                pairs += [(c, s) for c in clients for s in servers if s.get("parentId") == c["id"]]
            return pairs

        for workload in ("reviews-v1", "reviews-v2"):
            pairs = until(lambda workload=workload: crossing(workload), f"a trace from frontend to {workload}", 10)
            client, server = pairs[0]
            self.assertEqual(client["traceId"], server["traceId"])
            self.assertEqual(server["tags"]["http.status_code"], "200")
            self.assertEqual(server["tags"]["node_id"], f"{workload}-1")
        client, server = until(lambda: [(c, s) for c, s in crossing("reviews-v1")
                                        if "/txmesh.test.Echo/Unary" in s["tags"].get("http.url", "")],
                               "a trace of the gRPC call", 10)[0]
        self.assertEqual(client["traceId"], server["traceId"])

        # 5. Killing reviews v2's app: requests for any version keep
        # succeeding (through v1), and the frontend sidecar's outlier
        # detection ejects v2's host.
        self.reviews_v2_app.kill()
        self.reviews_v2_app.wait(5)
        results = self.call("http://reviews:9080/any", 20)
        self.assertEqual([(r["status"], r["body"]["version"]) for r in results], [(200, "v1")] * 20, results)
        clusters = json.loads(front.admin("/clusters"))
        [(cluster, hosts)] = [(name, c["outlier_detection"]["hosts"]) for name, c in clusters.items()
                              if (c["outlier_detection"] or {}).get("hosts", {}).get(f"{REVIEWS_V2}:{REVIEWS_PORT}")]
        self.assertTrue(hosts[f"{REVIEWS_V2}:{REVIEWS_PORT}"]["ejected"], hosts)
        self.assertFalse(hosts.get(f"{REVIEWS_V1}:{REVIEWS_PORT}", {}).get("ejected"), hosts)
        self.assertIn(service, cluster)
        self.assertGreaterEqual(total(front.metric("txmesh_outlier_ejections_total"), cluster=cluster), 1)
        self.assertEqual(total(front.metric("txmesh_outlier_ejections_active"), cluster=cluster), 1)

        # Nothing went wrong inside the mesh's processes.
        for host, what in ((self.pilot_host, "pilot"), (self.frontend, "proxy"), (self.reviews1, "proxy"),
                           (self.reviews2, "proxy")):
            text = host.read_log(what)
            self.assertNotIn("Traceback", text, f"{host.name} {what}:\n{text[-20000:]}")

    def test_unknown_destination_passes_through(self) -> None:
        """
        A connection to an address the mesh does not know (here the
        collector on the pilot host, which has no sidecar) goes through
        the frontend's sidecar to where the app sent it, as Istio's
        C{ALLOW_ANY} and a txmesh C{capture} listener do.
        """
        pilot = self._start_control_plane()
        self.frontend.spawn("app-frontend", python(CLIENT_APP, str(CLIENT_PORT)))
        until(lambda: self.frontend.http(f"http://127.0.0.1:{CLIENT_PORT}/call?n=0&url=-", 1)[0] == 200,
              "the frontend app answering", 10)
        self._start_sidecars(pilot, only=("frontend",))
        [result] = self.call(f"http://{PILOT}:{COLLECTOR_PORT}/spans", 1)
        self.assertEqual(result["status"], 200, result)

