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


class ValidateIstioTests(SynchronousTestCase):
    """
    C{txmesh validate -f} on Istio documents: translated together, offline.
    """

    BOOKINFO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "bookinfo")

    def path(self, name):
        return os.path.join(self.BOOKINFO, name)

    def test_documents_together(self):
        out, err = io.StringIO(), io.StringIO()
        files = [self.path(n) for n in ("services.yaml", "destination-rules.yaml", "virtual-services.yaml")]
        self.assertEqual(validate(files, out, err), 0, err.getvalue())
        self.assertIn("virtual host(s)", out.getvalue())

    def test_missing_rule_names_document_and_field(self):
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(validate([self.path("virtual-services.yaml")], out, err), 1)
        self.assertIn("virtual-services.yaml: document 1: spec.http[0].route[0].destination.subset:",
                      err.getvalue())

    def test_flag_form_and_mixed(self):
        self.assertEqual(main(["validate", "-f", self.path("services.yaml"), "-f", self.path("destination-rules.yaml"),
                               "-f", self.path("virtual-services.yaml"), self.path("proxy.yaml")]), 0)

    def test_no_files(self):
        with self.assertRaises(SystemExit) as cm:
            main(["validate"])
        self.assertEqual(cm.exception.code, 2)
