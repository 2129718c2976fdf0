"""
A real Prometheus scraping a real mesh: Debian's C{prometheus} binary, run
with its own config and storage, scrapes a C{twistd txmesh-proxy} process's
admin C{/stats/prometheus} and a C{twistd txmesh-pilot} process's
C{/metrics} every second; the test drives HTTP traffic (200s and 503s)
through the proxy and reads the result back with PromQL over Prometheus'
HTTP API, as a dashboard would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.python import log
from twisted.trial import unittest

from tests.support import CURL, RecordingFactory, curl, fixed_response, free_port, listen_upstream, sleep
from tests.test_mesh_processes import TXMESH, PilotProcess, run_txmesh
from tests.test_pilot import ChannelClient
from tests.test_pilot_channel import LABELS
from tests.test_proxy_process import TWISTD, ProxyProcess, _stop_process
from txmesh.pilot.ca import client_tls_options
from txmesh.pilot.messages import Hello, Node, Push

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)

REQUEST_RATE = ('sum(rate(istio_requests_total{reporter="destination"}[1m])) '
                'by (destination_service, response_code)')

# The proxy's inbound side: a listener named "inbound" counting requests,
# one route to a live upstream and one to a cluster whose endpoint refuses
# connections (503, flag UF).
PROXY_CONFIG = """
    node: {id: reviews-v1-1, workload: reviews-v1, namespace: default, app: reviews, version: v1}
    admin: {address: "tcp:{admin}:interface=127.0.0.1"}
    listeners:
      - name: inbound
        address: "tcp:{http}:interface=127.0.0.1"
        http_filters: [{name: metrics}]
        routes:
          - {name: down, match: {prefix: /down}, cluster: down}
          - {name: app, match: {prefix: /}, cluster: app}
    clusters:
      - name: app
        endpoints: ["127.0.0.1:{app}"]
      - name: down
        endpoints: ["127.0.0.1:{down}"]
"""

PROMETHEUS_CONFIG = """
    global:
      scrape_interval: 1s
      scrape_timeout: 1s
      evaluation_interval: 1s
    scrape_configs:
      - job_name: txmesh-proxy
        metrics_path: /stats/prometheus
        static_configs: [{{targets: ["127.0.0.1:{proxy}"]}}]
      - job_name: txmesh-pilot
        metrics_path: /metrics
        static_configs: [{{targets: ["127.0.0.1:{pilot}"]}}]
"""


class Prometheus:
    """
    C{prometheus} as a child process: its own config, a temporary TSDB and
    a loopback web port.
    """

    def __init__(self, testcase: Any, config: str):
        self.dir = tempfile.mkdtemp(prefix="txmesh-prometheus-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.port = free_port()
        self.config_path = os.path.join(self.dir, "prometheus.yml")
        with open(self.config_path, "w") as f:
            f.write(config)
        self.log_path = os.path.join(self.dir, "prometheus.log")
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                cwd=self.dir, stdout=out, stderr=subprocess.STDOUT)
        testcase.addCleanup(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        _stop_process(self.process, signal.SIGTERM)
        log.msg(f"prometheus output (exit {self.process.returncode}):\n{self.log_text()}")

    @defer.inlineCallbacks
    def wait_ready(self, timeout: float = 15.0) -> Any:
        """
        Poll C{/-/ready} until it answers 200; fail early if it exits.
        """
        deadline = reactor.seconds() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log_text()}")
            out, _, code = yield curl("--max-time", "1", "-o", "/dev/null", "-w", "%{http_code}",
                                      self.url + "/-/ready")
            if code == 0 and out == b"200":
                return
            if reactor.seconds() > deadline:
                raise AssertionError(f"prometheus not ready within {timeout}s:\n{self.log_text()}")
            yield sleep(0.1)

    @defer.inlineCallbacks
    def query(self, promql: str) -> Any:
        """
        Run an instant query through C{/api/v1/query}.

        @return: the result vector: a list of C{(labels, value)}.
        """
        out, err, code = yield curl("--max-time", "2", "--get", "--data-urlencode", f"query={promql}",
                                    self.url + "/api/v1/query")
        assert code == 0, (promql, code, err)
        answer = json.loads(out)
        assert answer["status"] == "success", answer
        return [(sample["metric"], float(sample["value"][1])) for sample in answer["data"]["result"]]

    @defer.inlineCallbacks
    def wait_query(self, promql: str, check: Any, timeout: float) -> Any:
        """
        Poll C{promql} until C{check(result)} is true, bounded in time.

        @return: the last result.
        """
        deadline = reactor.seconds() + timeout
        while True:
            result = yield self.query(promql)
            if check(result):
                return result
            if reactor.seconds() > deadline:
                raise AssertionError(f"{promql!r} gave {result!r}, not what was expected within {timeout}s")
            yield sleep(0.25)


class PrometheusScrapeTests(unittest.TestCase):
    """
    Prometheus reads what the proxy and the pilot export.
    """

    timeout = 60

    def setUp(self) -> None:
        if PROMETHEUS is None:
            raise unittest.SkipTest("the prometheus binary is not installed (apt-get install prometheus)")
        if CURL is None:
            raise unittest.SkipTest("curl is not installed")
        if not os.path.exists(TWISTD) or not os.path.exists(TXMESH):
            raise unittest.SkipTest(f"no twistd/txmesh next to {sys.executable} (pip install -e .)")

    @defer.inlineCallbacks
    def start_pilot(self) -> Any:
        """
        Start a pilot process and connect one channel client to it (TLS,
        a join token), so it has a proxy to count.

        @return: the pilot.
        """
        config_dir = tempfile.mkdtemp(prefix="txmesh-pilot-")
        self.addCleanup(shutil.rmtree, config_dir, True)
        os.mkdir(os.path.join(config_dir, "istio"))
        pilot = PilotProcess(self, config_dir, "pilot")
        yield pilot.start()
        made = run_txmesh("token", "create", "--config-dir", config_dir, "--namespace", "default",
                          "--service-account", "reviews")
        self.assertEqual(made.returncode, 0, made.stderr)
        with open(os.path.join(config_dir, "ca", "root-cert.pem"), "rb") as f:
            root = f.read()
        client = ChannelClient()
        endpoint = wrapClientTLS(client_tls_options("127.0.0.1", root),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", pilot.port))
        yield connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        client.send(Hello(node=Node(id="reviews-v1-1", namespace="default", labels=LABELS),
                          credential=made.stdout.strip()))
        push = yield client.next(timeout=10)
        self.assertIsInstance(push, Push)
        return pilot

    @defer.inlineCallbacks
    def traffic(self, proxy: ProxyProcess, ok: int, failed: int) -> Any:
        """
        Send C{ok} requests to the live route and C{failed} to the refused
        one, checking each status.
        """
        urls = [proxy.http + "/hello"] * ok + [proxy.http + "/down"] * failed
        args: list[str] = []
        for url in urls:
            args += ["-o", "/dev/null", url]
        out, err, code = yield curl("--max-time", "10", "-w", "%{http_code}\n", *args)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode().split(), ["200"] * ok + ["503"] * failed)

    @defer.inlineCallbacks
    def test_request_rate_by_destination(self) -> Any:
        """
        Requests through the proxy's inbound listener show in Prometheus
        as C{istio_requests_total} rates by destination service and
        response code (200 and 503), and the pilot's
        C{txmesh_pilot_proxies_connected} is scraped too.
        """
        app = yield listen_upstream(self, RecordingFactory(fixed_response(b"hello")))
        proxy = ProxyProcess(self)
        yield proxy.run(PROXY_CONFIG, "--drain-timeout", "2", app=app, down=free_port())
        pilot = yield self.start_pilot()
        prometheus = Prometheus(self, textwrap.dedent(PROMETHEUS_CONFIG).format(
            proxy=proxy.ports["admin"], pilot=pilot.metrics_port))
        yield prometheus.wait_ready()

        # A first batch makes the series exist; once Prometheus holds them,
        # a second batch makes their rates positive.
        yield self.traffic(proxy, ok=5, failed=2)
        yield prometheus.wait_query(
            'count(istio_requests_total{response_code=~"200|503"})', lambda r: r and r[0][1] >= 2, timeout=10)
        # Each target's first scrape comes at its own offset in the interval.
        yield prometheus.wait_query(
            "up", lambda r: {m["job"]: v for m, v in r} == {"txmesh-proxy": 1.0, "txmesh-pilot": 1.0}, timeout=5)
        yield self.traffic(proxy, ok=20, failed=5)

        rates = yield prometheus.wait_query(
            "sum(rate(istio_requests_total[1m])) by (reporter, destination_service, response_code)",
            lambda r: {m.get("response_code") for m, v in r if v > 0} >= {"200", "503"}, timeout=10)
        connected = yield prometheus.wait_query(
            "txmesh_pilot_proxies_connected", lambda r: r and r[0][1] == 1, timeout=5)
        self.assertEqual(connected[0][0]["job"], "txmesh-pilot")
        pushes = yield prometheus.query("sum(txmesh_pilot_pushes_total)")
        self.assertGreater(pushes[0][1], 0, pushes)

        # A listener named "inbound" reports as the destination's sidecar.
        self.assertIn("destination", {m.get("reporter") for m, _ in rates}, rates)
        # Exactly one series per (service, code): the live route's cluster
        # answered 200, the refused one's 503, and nothing else was counted.
        expected = {("app", "200"), ("down", "503")}

        def series(result: Any) -> set[tuple[str | None, str | None]]:
            return {(m.get("destination_service"), m.get("response_code")) for m, _ in result}

        rates = yield prometheus.wait_query(
            REQUEST_RATE, lambda r: series(r) == expected and all(v > 0 for _, v in r), timeout=10)
        log.msg(f"{REQUEST_RATE} = {rates!r}")
        self.assertEqual(len(rates), len(expected), rates)
        self.assertEqual(series(rates), expected)
        for metric, value in rates:
            self.assertEqual(set(metric), {"destination_service", "response_code"}, rates)
            self.assertGreater(value, 0, rates)
