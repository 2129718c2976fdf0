"""
The example filters in C{examples/filters}: their behaviour (through
L{txmesh.testing}) and their discovery as Twisted plugins by name.
"""

import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import FilterConfigError

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "filters")


class ExampleFilterTests(SynchronousTestCase):
    def setUp(self):
        sys.path.insert(0, EXAMPLES)
        self.addCleanup(sys.path.remove, EXAMPLES)
        from txmesh_examples.add_header import AddHeaderFactory
        from txmesh_examples.reject_header import RejectByHeaderFactory

        self.add = AddHeaderFactory()
        self.reject = RejectByHeaderFactory()

    def test_add_header(self):
        from txmesh.testing import FilterHarness

        h = FilterHarness([(self.add, {"request": {"x-env": "test"}, "response": {"x-by": "txmesh"}})])
        r = h.request("GET", "/")
        self.assertEqual(r.upstream_request.head.headers.get("x-env"), b"test")
        self.assertEqual(r.headers.get("x-by"), b"txmesh")

    def test_reject(self):
        from txmesh.testing import FilterHarness

        h = FilterHarness([(self.reject, {"header": "x-tenant", "values": ["evil"]})])
        self.assertEqual(h.request("GET", "/", headers={"x-tenant": "evil"}).status, 403)
        ok = h.request("GET", "/", headers={"x-tenant": "good"})
        self.assertEqual(ok.status, 200)
        self.assertEqual(len(h.upstream.requests), 1)

    def test_config_errors(self):
        self.assertRaises(FilterConfigError, self.reject.parse_config, {"values": ["x"]})
        self.assertRaises(FilterConfigError, self.reject.parse_config, {"header": "h", "values": ["x"], "status": 200})
        self.assertRaises(FilterConfigError, self.add.parse_config, {"requests": {}})

    def test_discovered_as_plugins(self):
        """
        With C{examples/filters} on the plugin path, the registry finds both
        filters by name, next to the built-ins.
        """
        import twisted.plugins
        from txmesh.filters.registry import FilterRegistry

        plugin_dir = os.path.join(EXAMPLES, "twisted", "plugins")
        twisted.plugins.__path__.append(plugin_dir)
        self.addCleanup(twisted.plugins.__path__.remove, plugin_dir)
        registry = FilterRegistry.from_plugins()
        for name in ("add-header", "reject-header", "router", "metrics"):
            self.assertIsNotNone(registry.http(name), name)
