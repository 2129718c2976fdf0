"""
A small mesh end to end: a real pilot pushing to a real proxy over the
channel, in front of two upstream services; a route change reaches live
traffic, and traffic keeps flowing on last-known-good when the pilot goes.
"""

import os
import shutil
import tempfile
import textwrap

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support import ProxyHarness, RecordingFactory, fixed_response, listen_upstream, raw_exchange, sleep
from txmesh.pilot.service import PilotService
from txmesh.pilot.snapshot import MeshConfig

ISTIO = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
    - {{address: 127.0.0.1, ports: {{http: {v1}}}, labels: {{version: v1}}}}
    - {{address: 127.0.0.1, ports: {{http: {v2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: web
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web]
  http: [{{route: [{{destination: {{host: web, subset: {subset}}}}}]}}]
"""


class MeshTests(unittest.TestCase):
    def write_istio(self, **values):
        path = os.path.join(self.dir, "istio", "web.yaml")
        with open(path, "w") as f:
            f.write(textwrap.dedent(ISTIO).format(**values))
        st = os.stat(path)
        os.utime(path, (st.st_atime + 5, st.st_mtime + 5))

    @defer.inlineCallbacks
    def start_pilot(self, port=0):
        pilot = PilotService(self.dir, reactor, f"tcp:{port}:interface=127.0.0.1", None, poll_interval=0.1,
                             mesh_defaults=MeshConfig(outbound_address="tcp:0:interface=127.0.0.1"))
        yield pilot.startService()
        return pilot

    @defer.inlineCallbacks
    def get(self, proxy):
        data = yield raw_exchange(self, proxy.port("outbound"),
                                  b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        return data

    @defer.inlineCallbacks
    def wait_for(self, proxy, body, seconds=5.0):
        deadline = reactor.seconds() + seconds
        while True:
            try:
                data = yield self.get(proxy)
            except (KeyError, Exception):
                data = b""
            if data.endswith(body) or reactor.seconds() > deadline:
                return data
            yield sleep(0.05)

    @defer.inlineCallbacks
    def test_route_change_pilot_loss_and_restart(self):
        self.dir = tempfile.mkdtemp(prefix="txmesh-mesh-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.makedirs(os.path.join(self.dir, "istio"))
        v1 = yield listen_upstream(self, RecordingFactory(fixed_response(b"v1")))
        v2 = yield listen_upstream(self, RecordingFactory(fixed_response(b"v2")))
        self.write_istio(v1=v1, v2=v2, subset="v1")
        pilot = yield self.start_pilot()
        pilot_port = pilot.channel_port.getHost().port

        proxy = ProxyHarness(self)
        yield proxy.start(f"""
            node: {{id: web-client, workload: client, namespace: default}}
            pilot: {{addresses: ["tcp:127.0.0.1:{pilot_port}"], insecure: true}}
            """)
        data = yield self.wait_for(proxy, b"v1")
        self.assertTrue(data.endswith(b"v1"), data)

        # A route change reaches live traffic, and the pilot sees the ACK.
        start = reactor.seconds()
        self.write_istio(v1=v1, v2=v2, subset="v2")
        data = yield self.wait_for(proxy, b"v2")
        self.assertTrue(data.endswith(b"v2"), data)
        self.assertLess(reactor.seconds() - start, 5.0)
        [state] = pilot.proxies()
        self.assertEqual(state["status"], "SYNCED")

        # The pilot goes away: traffic keeps flowing on last-known-good.
        yield pilot.stopService()
        for _ in range(3):
            data = yield self.get(proxy)
            self.assertTrue(data.endswith(b"v2"), data)

        # A pilot comes back on the same address: the proxy resyncs.
        self.write_istio(v1=v1, v2=v2, subset="v1")
        pilot = yield self.start_pilot(pilot_port)
        self.addCleanup(pilot.stopService)
        data = yield self.wait_for(proxy, b"v1", seconds=20.0)
        self.assertTrue(data.endswith(b"v1"), data)
