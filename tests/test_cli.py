"""
The C{txmesh} command line.
"""

import io
import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from txmesh.cli import main, validate

GOOD = """
listeners:
  - name: http
    address: "tcp:0"
    routes: [{match: {prefix: /}, cluster: app}]
clusters: [{name: app, endpoints: ["127.0.0.1:80"]}]
"""


class ValidateTests(SynchronousTestCase):
    def write(self, text):
        fd, path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.remove, path)
        return path

    def test_valid(self):
        out, err = io.StringIO(), io.StringIO()
        path = self.write(GOOD)
        self.assertEqual(validate([path], out, err), 0)
        self.assertIn("valid: " + path, out.getvalue())
        self.assertEqual(err.getvalue(), "")

    def test_invalid_names_file_field_reason(self):
        out, err = io.StringIO(), io.StringIO()
        path = self.write(GOOD.replace("cluster: app}", "cluster: nope}"))
        self.assertEqual(validate([path], out, err), 1)
        self.assertIn(f"{path}: listeners[0].routes[0].cluster: unknown cluster 'nope'", err.getvalue())

    def test_main(self):
        self.assertEqual(main(["validate", self.write(GOOD)]), 0)
