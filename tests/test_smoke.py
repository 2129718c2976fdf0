from twisted.internet import defer
from twisted.trial import unittest

from tests.support import ProxyHarness, RecordingFactory, fixed_response, listen_upstream, raw_exchange


class Smoke(unittest.TestCase):
    @defer.inlineCallbacks
    def test_get(self):
        up = RecordingFactory(fixed_response(b"hi"))
        upport = yield listen_upstream(self, up)
        h = ProxyHarness(self)
        yield h.start("""
            listeners:
              - name: http
                address: "tcp:0:interface=127.0.0.1"
                routes: [{match: {prefix: /}, cluster: app}]
            clusters:
              - {name: app, endpoints: ["127.0.0.1:{up}"]}
            """, up=upport)
        data = yield raw_exchange(self, h.port(), b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        self.assertIn(b"200 OK", data)
        self.assertTrue(data.endswith(b"hi"), data)
