"""
Certificate rotation under load, with real processes: nothing is dropped.

    wrk -> client sidecar --ISTIO_MUTUAL--> server sidecar (mtls: STRICT) -> nginx

A real pilot (C{twistd txmesh-pilot}, C{workload_cert_ttl: 1m}, so proxies
renew after about 30 s) gives both sidecars (C{twistd txmesh-proxy},
bootstrapped with join tokens from C{txmesh token create}) their workload
certificates; their listeners and clusters are static.  The client's
cluster retires a connection every 100 requests and closes idle ones after
a second, so new mutual TLS handshakes happen all through the run rather
than only at its start.  The route has no retry policy: a failed
handshake or a reset would reach wrk.

During one C{wrk -t1 -c4 -d40s}:

  - at about 10 s, C{txmesh ca rotate}: the pilot pushes the two-root trust
    bundle (the overlap);
  - at about 30 s after they got their certificates, both proxies renew at
    half-life, onto the new root.

wrk must see no non-2xx response and no socket error.  While it runs, each
proxy's admin C{/pilot} is polled: both must renew after the rotation (so
onto the new root), and the client must open upstream connections after
that (its admin C{/clusters}).  Afterwards both proxies trust 2 roots and
hold a later certificate; C{txmesh ca finish-rotation} drops them to 1
root, and new connections still work, because both certificates now come
from the new root.

Ending the overlap in the middle of the run instead (before the renewals)
makes this test fail: every new handshake is refused until the proxies
renew, and wrk counts the 503s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.python import log
from twisted.trial import unittest

from tests.support import CURL, Nginx, curl, free_port, poll_until, sleep
from tests.test_mesh_processes import TXMESH, PilotProcess, join_token, run_txmesh
from tests.test_proxy_process import TWISTD, ProxyProcess

WRK = shutil.which("wrk")

DURATION = 40
"""Seconds of load: the rotation at L{ROTATE_AT} and the half-life renewals fall inside."""

ROTATE_AT = 10
"""Seconds into the load when C{txmesh ca rotate} runs."""

PAYLOAD = "rotation-under-load-ok"

APP = """\
server {{
  listen 127.0.0.1:{port} backlog=1024;
  location / {{ return 200 "{payload}"; }}
}}
"""

SIDECAR = """\
node: {id: {node}, workload: {node}, namespace: default}
admin: {address: "tcp:{admin}:interface=127.0.0.1"}
pilot:
  addresses: ["{pilot}"]
  ca_file: {root}
  token_file: {token}
  outbound_address: "tcp:{outbound}:interface=127.0.0.1"
  backoff_base: 0.1
  backoff_max: 0.5
listeners:
  - name: {listener}
    address: "tcp:{port}:interface=127.0.0.1"
    protocol: http
{mtls}    http_filters: [{name: router}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{name: all, match: {prefix: /}, cluster: {cluster}}]
clusters:
  - name: {cluster}
    endpoints: ["127.0.0.1:{upstream}"]
{cluster_extra}"""

# Retire pooled connections often and drop idle ones fast: every phase of
# the run (before the rotation, during the overlap, after the renewals)
# makes fresh mutual TLS handshakes.
MUTUAL_CLUSTER = """\
    idle_timeout: 1s
    circuit_breaker: {max_requests_per_connection: 100}
    tls: {mode: ISTIO_MUTUAL}
"""


def parse_wrk(out: str) -> dict[str, int]:
    """
    @return: C{requests}, C{non2xx} and C{socket_errors} from wrk's report
        (the last two are absent from it when zero).
    @raise ValueError: the report has no request count.
    """
    requests = re.search(r"(\d+) requests in ", out)
    if requests is None:
        raise ValueError(f"no request count in wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(requests.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(n) for n in socket.groups()) if socket else 0,
    }


class RotationUnderLoadTests(unittest.TestCase):
    # 40 s of load plus start-up and the checks after; every wait below is
    # bounded on its own, this is the backstop.
    timeout = 150

    def setUp(self) -> None:
        if WRK is None:
            raise unittest.SkipTest("wrk is not installed: it makes the load this test rotates under")
        if CURL is None:
            raise unittest.SkipTest("curl is not installed")
        if not os.path.exists(TWISTD) or not os.path.exists(TXMESH):
            raise unittest.SkipTest(f"no twistd/txmesh next to {sys.executable} (pip install -e .)")
        self.dir = tempfile.mkdtemp(prefix="txmesh-rotation-load-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.mkdir(os.path.join(self.dir, "istio"))
        with open(os.path.join(self.dir, "mesh.yaml"), "w") as f:
            f.write("workload_cert_ttl: 1m\n")

    def sidecar(self, pilot: PilotProcess, node: str, listener: str, cluster: str, upstream: int,
                mtls: str = "", cluster_extra: str = "") -> ProxyProcess:
        proxy = ProxyProcess(self)
        proxy.write(SIDECAR, node=node, pilot=pilot.address, root=os.path.join(self.dir, "ca", "root-cert.pem"),
                    token=join_token(self.dir, node), outbound=free_port(), listener=listener, cluster=cluster,
                    port=proxy.ports["http"], upstream=upstream, mtls=mtls, cluster_extra=cluster_extra)
        proxy.start()
        return proxy

    @defer.inlineCallbacks
    def identity(self, proxy: ProxyProcess) -> Any:
        """
        @return: the C{identity} of the proxy's admin C{/pilot}.
        """
        out, err, code = yield curl("--max-time", "2", proxy.admin + "/pilot")
        self.assertEqual(code, 0, err)
        return json.loads(out)["identity"]

    @defer.inlineCallbacks
    def connections(self, client: ProxyProcess) -> Any:
        """
        @return: how many connections the client sidecar has opened to the
            server sidecar so far (its admin C{/clusters}).
        """
        out, err, code = yield curl("--max-time", "2", client.admin + "/clusters")
        self.assertEqual(code, 0, err)
        return json.loads(out)["server-mtls"]["endpoints"][0]["total_connections"]

    @defer.inlineCallbacks
    def watch(self, proxies: dict[str, ProxyProcess], client: ProxyProcess, load: defer.Deferred,
              started: float, events: list[dict[str, Any]]) -> Any:
        """
        Until C{load} fires, poll each proxy's identity twice a second and
        append to C{events} when its trust bundle grows or its certificate
        is renewed: C{{"proxy", "event", "at" (seconds into the load),
        "connections" (opened by the client so far)}}.
        """
        last = {}
        for name, proxy in proxies.items():
            last[name] = yield self.identity(proxy)
        while not load.called:
            for name, proxy in proxies.items():
                ident = yield self.identity(proxy)
                changes = []
                if ident["roots"] != last[name]["roots"]:
                    changes.append(f"roots {ident['roots']}")
                if ident["not_after"] != last[name]["not_after"]:
                    changes.append("renewed")
                if changes:
                    opened = yield self.connections(client)
                    for change in changes:
                        events.append({"proxy": name, "event": change, "at": round(reactor.seconds() - started, 1),
                                       "connections": opened})
                last[name] = ident
            yield sleep(0.5)

    def until(self, check: Any, what: str, timeout: float = 15.0) -> Any:
        return poll_until(check, what, timeout)

    @defer.inlineCallbacks
    def get(self, url: str) -> Any:
        """
        @return: C{(status, body)}; status 0 when curl failed.
        """
        out, _, code = yield curl("--max-time", "3", "-s", "-o", "-", "-w", "\n%{http_code}", url)
        if code != 0:
            return 0, b""
        body, _, status = out.rpartition(b"\n")
        return int(status), body

    @defer.inlineCallbacks
    def test_rotation_and_renewal_under_load(self) -> Any:
        app = free_port()
        nginx = Nginx(self, APP.format(port=app, payload=PAYLOAD))
        yield nginx.wait_listening(app)
        pilot = PilotProcess(self, self.dir, "pilot")
        yield pilot.start()
        server = self.sidecar(pilot, "server", "inbound-mtls", "app", app, mtls="    mtls: STRICT\n")
        client = self.sidecar(pilot, "client", "outbound-mtls", "server-mtls", server.ports["http"],
                              cluster_extra=MUTUAL_CLUSTER)
        proxies = {"client": client, "server": server}
        for proxy in proxies.values():
            yield proxy.wait_ready()

        @defer.inlineCallbacks
        def answers() -> Any:
            status, body = yield self.get(client.http + "/")
            return status == 200 and body == PAYLOAD.encode()

        yield self.until(answers, "the client sidecar answering 200 through the mTLS hop")
        # The hop is mutual TLS: the STRICT listener refuses plaintext.
        status, _ = yield self.get(server.http + "/")
        self.assertNotEqual(status, 200, "the server sidecar's STRICT listener answered plaintext")

        before = {}
        for name, proxy in proxies.items():
            ident = yield self.identity(proxy)
            self.assertTrue(ident["certificate"], ident)
            self.assertEqual(ident["roots"], 1, ident)
            before[name] = ident
        log.msg(f"identities before the load: {before}")

        url = client.http + "/"
        opened_before = yield self.connections(client)
        started = reactor.seconds()
        load = deferToThread(
            subprocess.run, [WRK, "-t1", "-c4", f"-d{DURATION}s", "--timeout", "5s", url],
            capture_output=True, text=True, timeout=DURATION + 30, check=False)
        events: list[dict[str, Any]] = []
        watching = self.watch(proxies, client, load, started, events)
        yield sleep(ROTATE_AT)
        rotated = yield deferToThread(run_txmesh, "ca", "rotate", "--config-dir", self.dir)
        rotated_at = reactor.seconds() - started
        self.assertEqual(rotated.returncode, 0, rotated.stderr)
        log.msg(f"txmesh ca rotate at {rotated_at:.1f} s: {rotated.stdout.strip()}")
        done = yield load
        yield watching
        opened_after = yield self.connections(client)
        log.msg(f"wrk (exit {done.returncode}):\n{done.stdout}{done.stderr}")
        log.msg(f"during the load: {events}; upstream connections opened {opened_after - opened_before}")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        figures = parse_wrk(done.stdout)
        self.assertEqual(figures["non2xx"], 0, done.stdout)
        self.assertEqual(figures["socket_errors"], 0, done.stdout)
        self.assertGreater(figures["requests"], 1000, done.stdout)

        # Both renewed during the run, after the rotation (so onto the new
        # root), and the client kept opening mutual TLS connections after
        # that; both still trust the old root too.
        for name, proxy in proxies.items():
            renewals = [e for e in events if e["proxy"] == name and e["event"] == "renewed"]
            self.assertTrue(renewals, f"{name} did not renew its certificate during the run: {events}")
            self.assertGreater(renewals[0]["at"], rotated_at,
                               f"{name} renewed before the rotation, so not onto the new root (the set-up took "
                               f"too long before the load started?): {events}")
            self.assertGreater(opened_after, renewals[-1]["connections"],
                               f"no upstream connection was opened after {name} renewed: {events}")
            ident = yield self.identity(proxy)
            log.msg(f"{name} identity after the load: {ident}")
            self.assertGreater(datetime.fromisoformat(ident["not_after"]),
                               datetime.fromisoformat(before[name]["not_after"]), ident)
            self.assertEqual(ident["roots"], 2, f"{name} does not trust both roots during the overlap: {ident}")

        finished = yield deferToThread(run_txmesh, "ca", "finish-rotation", "--config-dir", self.dir)
        self.assertEqual(finished.returncode, 0, finished.stderr)
        for name, proxy in proxies.items():

            @defer.inlineCallbacks
            def one_root(proxy: ProxyProcess = proxy) -> Any:
                ident = yield self.identity(proxy)
                return ident["roots"] == 1

            yield self.until(one_root, f"{name} trusting only the new root")
        # Let the client's pooled connections (idle_timeout 1s) close, so the
        # requests below make new handshakes under the one-root bundle.
        yield sleep(1.5)
        for _ in range(5):
            status, body = yield self.get(url)
            self.assertEqual((status, body), (200, PAYLOAD.encode()))
