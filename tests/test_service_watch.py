"""
L{ProxyService} reload triggers and what a reload carries, on a fake
reactor: C{--watch} notices edits to the Istio files a config includes,
and node app/version labels take part in C{sourceLabels} matching.
"""

import os
import tempfile
import textwrap

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from txmesh.config.model import NodeConfig
from txmesh.filters.registry import FilterRegistry
from txmesh.filters.router import RouterFactory
from txmesh.observability.metrics import MetricsFactory
from txmesh.proxy.connection_manager import node_labels
from txmesh.proxy.open_set import OpenSet
from txmesh.proxy.service import ProxyService

PROXY = """
istio: {files: [vs.yaml]}
listeners:
  - name: out
    address: "tcp:15999:interface=127.0.0.1"
    istio_routes: true
    routes: [{match: {path: /local}, direct_response: {status: 200}}]
"""

VS = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}], timeout: TIMEOUT}]
"""


class WatchTests(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "proxy.yaml")
        self.write("proxy.yaml", PROXY)
        self.write("vs.yaml", VS.replace("TIMEOUT", "1s"))
        self.reactor = MemoryReactorClock()
        self.service = ProxyService(self.path, self.reactor, FilterRegistry(http=[RouterFactory(), MetricsFactory()]),
                                    watch_interval=1.0)
        self.service.load_initial()
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        # Make the change visible to mtime even within the same second.
        st = os.stat(path)
        os.utime(path, (st.st_atime + 5, st.st_mtime + 5))

    def routes(self):
        return [r for vh in self.service.config.listeners[0].virtual_hosts for r in vh.routes]

    def test_included_file_change_reloads(self):
        self.assertEqual(self.service.config.included_files, (os.path.join(self.dir, "vs.yaml"),))
        self.assertEqual(self.service.version, 1)
        self.reactor.advance(1.0)
        self.assertEqual(self.service.version, 1, "nothing changed yet")
        self.write("vs.yaml", VS.replace("TIMEOUT", "7s"))
        self.reactor.advance(1.0)
        self.assertEqual(self.service.version, 2)
        self.assertIn(7.0, [r.timeout for r in self.routes()])

    def test_invalid_included_file_keeps_serving(self):
        self.write("vs.yaml", VS.replace("TIMEOUT", "soon"))
        self.reactor.advance(1.0)
        self.assertEqual(self.service.version, 1)
        self.assertIn(1.0, [r.timeout for r in self.routes()])


class NodeLabelTests(TestCase):
    def test_app_and_version_are_labels(self):
        node = NodeConfig(app="productpage", version="v1", labels=(("team", "red"),))
        self.assertEqual(node_labels(node), {"app": "productpage", "version": "v1", "team": "red"})

    def test_explicit_labels_win_and_unknown_is_left_out(self):
        node = NodeConfig(labels=(("app", "x"),))
        self.assertEqual(node_labels(node), {"app": "x"})


class WhenIdleTests(TestCase):
    """
    L{HTTP1ServerFactory.when_idle}: what shutdown waits on instead of
    polling.
    """

    def test_fires_when_last_connection_closes(self):
        from txmesh.proxy.http1_server import HTTP1ServerFactory

        factory = HTTP1ServerFactory.__new__(HTTP1ServerFactory)
        factory.connections = OpenSet()
        factory._gauge = lambda delta: None
        self.assertIsNone(self.successResultOf(factory.when_idle()))
        a, b = object(), object()
        factory.connections.add(a)
        factory.connections.add(b)
        d = factory.when_idle()
        factory.connection_closed(a)
        self.assertNoResult(d)
        factory.connection_closed(b)
        self.assertIsNone(self.successResultOf(d))

    def test_cancel(self):
        from twisted.internet.defer import CancelledError

        from txmesh.proxy.http1_server import HTTP1ServerFactory

        factory = HTTP1ServerFactory.__new__(HTTP1ServerFactory)
        factory.connections = OpenSet()
        factory._gauge = lambda delta: None
        connection = object()
        factory.connections.add(connection)
        d = factory.when_idle()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        # The cancelled wait is forgotten: the last close fires nothing
        # (firing it again would raise AlreadyCalledError).
        factory.connection_closed(connection)
        self.assertEqual(len(factory.connections), 0)
