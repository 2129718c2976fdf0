"""
C{txmesh apply -f FILE [--name NAME]} against a live pilot: the file is
validated at the pilot and, if valid, becomes its C{istio/NAME}.
"""

import io
import json
import os
import sys
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_cli import Streams
from tests.test_operator_api import DESTINATION_RULE, SUBSET_ROUTE, TIMEOUT, LivePilot
from txmesh.cli import PilotClient, apply, main, parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ApplyParserTests(SynchronousTestCase):
    def test_arguments(self):
        args = parser({}).parse_args(["apply", "-f", "x/rules.yaml"])
        self.assertEqual((args.command, args.file, args.name, args.output), ("apply", "x/rules.yaml", None, "table"))
        args = parser({}).parse_args(["apply", "--file", "x/canary.yaml", "--name", "routes.yaml", "-o", "json"])
        self.assertEqual((args.file, args.name, args.output), ("x/canary.yaml", "routes.yaml", "json"))

    def test_file_required(self):
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit) as cm:
            main(["apply"], environ={})
        self.assertEqual(cm.exception.code, 2)


class ApplyTests(LivePilot, TestCase):
    def client(self, **kw):
        kw.setdefault("token", self.token)
        return PilotClient(kw.pop("url", self.url), http=self.http, timeout=TIMEOUT, **kw)

    def local(self, name, text):
        """
        Write a file on the operator's side (not in the pilot's directory).
        """
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def at_pilot(self, name):
        path = os.path.join(self.istio_dir, name)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    @defer.inlineCallbacks
    def test_applied_under_base_name(self):
        """
        A valid file becomes C{istio/<its base name>}; one line says so.
        """
        path = self.local("rules.yaml", DESTINATION_RULE)
        generation = self.pilot.status()["config"]["generation"]
        s = Streams()
        code = yield apply(self.client(), path, None, s.out, s.err)
        self.assertEqual((code, s.err.getvalue()), (0, ""))
        self.assertEqual(self.at_pilot("rules.yaml"), DESTINATION_RULE)
        now = self.pilot.status()["config"]["generation"]
        self.assertGreater(now, generation)
        self.assertEqual(s.out.getvalue(), f"applied {path} as rules.yaml (pilot config generation {now})\n")

    @defer.inlineCallbacks
    def test_name_replaces_file(self):
        """
        C{--name} picks the file at the pilot, replacing one of that name;
        C{-o json} prints the API's answer.
        """
        self.write("rules.yaml", "# placeholder\n")
        path = self.local("canary.yaml", DESTINATION_RULE + "---\n" + SUBSET_ROUTE)
        s = Streams()
        code = yield apply(self.client(), path, "rules.yaml", s.out, s.err, output="json")
        self.assertEqual((code, s.err.getvalue()), (0, ""))
        answer = json.loads(s.out.getvalue())
        self.assertEqual(answer["applied"], "rules.yaml")
        self.assertEqual(self.at_pilot("rules.yaml"), DESTINATION_RULE + "---\n" + SUBSET_ROUTE)
        self.assertIsNone(self.at_pilot("canary.yaml"))

    @defer.inlineCallbacks
    def test_refused_with_reason(self):
        """
        Invalid documents: the pilot's reason on stderr, exit 1, nothing
        written.
        """
        path = self.local("route.yaml", SUBSET_ROUTE)  # its DestinationRule is missing
        s = Streams()
        code = yield apply(self.client(), path, None, s.out, s.err)
        self.assertEqual((code, s.out.getvalue()), (1, ""))
        err = s.err.getvalue()
        self.assertTrue(err.startswith("txmesh apply: refused, nothing changed: "), err)
        self.assertIn("spec.http[0].route[0].destination.subset", err)
        self.assertIn("v1", err)
        self.assertEqual(err.count("\n"), 1)
        self.assertIsNone(self.at_pilot("route.yaml"))

    @defer.inlineCallbacks
    def test_bad_name(self):
        """
        A name the API refuses (not C{.yaml}): its reason, exit 1.
        """
        path = self.local("rules.yaml", DESTINATION_RULE)
        s = Streams()
        code = yield apply(self.client(), path, "rules.txt", s.out, s.err)
        self.assertEqual(code, 1)
        self.assertIn("(400 from ", s.err.getvalue())
        self.assertIsNone(self.at_pilot("rules.txt"))

    @defer.inlineCallbacks
    def test_missing_file(self):
        """
        A file that cannot be read: said so, exit 1, the pilot not asked.
        """
        s = Streams()
        code = yield apply(self.client(url="http://127.0.0.1:1"), "/nonexistent/rules.yaml", None, s.out, s.err)
        self.assertEqual(code, 1)
        self.assertEqual(s.err.getvalue(), "txmesh apply: /nonexistent/rules.yaml: No such file or directory\n")

    @defer.inlineCallbacks
    def test_unreachable(self):
        """
        No pilot: one line, exit 1.
        """
        path = self.local("rules.yaml", DESTINATION_RULE)
        s = Streams()
        code = yield apply(self.client(url="http://127.0.0.1:1"), path, None, s.out, s.err)
        self.assertEqual(code, 1)
        self.assertTrue(s.err.getvalue().startswith("txmesh: cannot reach the pilot at http://127.0.0.1:1: "))

    @defer.inlineCallbacks
    def test_main_process(self):
        """
        C{python -m txmesh.cli apply} end to end: exit 0 applied, exit 1
        refused with the reason on stderr.
        """
        env = dict(os.environ, TXMESH_PILOT=self.url)
        env.pop("TXMESH_TOKEN", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        good = self.local("rules.yaml", DESTINATION_RULE)
        d = getProcessOutputAndValue(sys.executable, ("-m", "txmesh.cli", "apply", "-f", good), env=env, path=REPO)
        d.addTimeout(30, reactor)
        out, err, code = yield d
        self.assertEqual((code, err), (0, b""))
        self.assertTrue(out.startswith(b"applied "), out)
        self.assertEqual(self.at_pilot("rules.yaml"), DESTINATION_RULE)

        bad = self.local("bad.yaml", SUBSET_ROUTE.replace("subset: v1", "subset: v3"))
        d = getProcessOutputAndValue(sys.executable, ("-m", "txmesh.cli", "apply", "-f", bad, "--name", "rules.yaml"),
                                     env=env, path=REPO)
        d.addTimeout(30, reactor)
        out, err, code = yield d
        self.assertEqual((code, out), (1, b""))
        self.assertIn(b"subset 'v3' is not defined", err)
        self.assertEqual(self.at_pilot("rules.yaml"), DESTINATION_RULE)


class AuthApplyTests(LivePilot, TestCase):
    """
    C{apply} against a pilot with a token.
    """

    token = "t0ken"

    @defer.inlineCallbacks
    def test_token(self):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "rules.yaml")
        with open(path, "w") as f:
            f.write(DESTINATION_RULE)
        s = Streams()
        code = yield apply(PilotClient(self.url, http=self.http, timeout=TIMEOUT), path, None, s.out, s.err)
        self.assertEqual(code, 1)
        self.assertEqual(s.err.getvalue(), f"txmesh: the pilot at {self.url} refused the request: it needs a token "
                                           f"(--token or TXMESH_TOKEN)\n")
        self.assertFalse(os.path.exists(os.path.join(self.istio_dir, "rules.yaml")))
        s = Streams()
        code = yield apply(PilotClient(self.url, token="t0ken", http=self.http, timeout=TIMEOUT), path, None,
                           s.out, s.err)
        self.assertEqual((code, s.err.getvalue()), (0, ""))
        self.assertTrue(os.path.exists(os.path.join(self.istio_dir, "rules.yaml")))
