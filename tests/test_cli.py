"""
The C{txmesh} command line: C{validate} offline, and the commands that ask a
live pilot's operator API.
"""

import io
import json
import os
import re
import sys
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_operator_api import TIMEOUT, LivePilot
from txmesh.cli import (
    DEFAULT_PILOT,
    PilotClient,
    main,
    parser,
    proxy_config,
    proxy_status,
    services,
    token_create,
    token_key_command,
    validate,
)
from txmesh.pilot.channel_security import token_authority
from txmesh.pilot.messages import Nack
from txmesh.pilot.tokens import InvalidCredential

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


class ParserTests(SynchronousTestCase):
    """
    Global options and their environment defaults.
    """

    def test_defaults(self):
        args = parser({}).parse_args(["proxy-status"])
        self.assertEqual((args.pilot, args.token, args.output), (DEFAULT_PILOT, None, "table"))

    def test_environment(self):
        args = parser({"TXMESH_PILOT": "http://pilot:1", "TXMESH_TOKEN": "t"}).parse_args(["services", "-o", "json"])
        self.assertEqual((args.pilot, args.token, args.output), ("http://pilot:1", "t", "json"))
        args = parser({"TXMESH_PILOT": "http://pilot:1"}).parse_args(
            ["--pilot", "http://other:2", "--token", "u", "proxy-config", "routes", "p1"])
        self.assertEqual((args.pilot, args.token, args.view, args.proxy), ("http://other:2", "u", "routes", "p1"))

    def test_usage_errors(self):
        for argv in (["proxy-config", "routes"], ["proxy-config", "listeners", "p1"], ["proxy-status", "-o", "yaml"],
                     ["--pilot", "127.0.0.1:15011", "proxy-status"], []):
            with self.assertRaises(SystemExit) as cm:
                main(argv, environ={})
            self.assertEqual(cm.exception.code, 2, argv)


def columns(line: str) -> list[str]:
    """
    @return: the cells of a table line (cells are apart by 2+ spaces).
    """
    return re.split(r"\s{2,}", line.strip())


class Streams:
    """
    C{out} and C{err} of one command run.
    """

    def __init__(self):
        self.out, self.err = io.StringIO(), io.StringIO()


class RemoteCommandTests(LivePilot, TestCase):
    """
    C{proxy-status}, C{proxy-config} and C{services} against a live pilot.
    """

    def client(self, **kw: Any) -> PilotClient:
        kw.setdefault("token", self.token)
        return PilotClient(kw.pop("url", self.url), http=self.http, timeout=TIMEOUT, **kw)

    @defer.inlineCallbacks
    def test_proxy_status(self):
        """
        A table like istioctl's, one row per proxy; a NACKed one shows its
        error.
        """
        _, push = yield self.proxy("p1")
        client, other = yield self.proxy("p2", ack=False)
        client.send(Nack(nonce=other.nonce, version=other.version, error="no such\nfilter"))
        yield self.wait_for(lambda: "NACKED" in [p["status"] for p in self.pilot.proxies()])
        s = Streams()
        code = yield proxy_status(self.client(), s.out, s.err)
        self.assertEqual((code, s.err.getvalue()), (0, ""))
        lines = s.out.getvalue().splitlines()
        self.assertEqual(columns(lines[0]), ["NAME", "STATUS", "ACKED VERSION", "PUSHED VERSION", "LAST ERROR"])
        self.assertEqual(lines[1].split(), ["p1", "SYNCED", push.version, push.version, "-"])
        self.assertEqual(lines[2].split(), ["p2", "NACKED", "-", other.version, "no", "such", "filter"])
        self.assertEqual(len(lines), 3)

    @defer.inlineCallbacks
    def test_json(self):
        """
        C{-o json} prints what the API answered.
        """
        yield self.proxy()
        s = Streams()
        code = yield proxy_status(self.client(), s.out, s.err, output="json")
        self.assertEqual(code, 0)
        self.assertEqual([p["id"] for p in json.loads(s.out.getvalue())], ["p1"])
        s = Streams()
        code = yield proxy_config(self.client(), "endpoints", "p1", s.out, s.err, output="json")
        self.assertEqual(code, 0)
        endpoints = json.loads(s.out.getvalue())
        self.assertIn("10.0.0.1:80", [e["endpoint"] for e in endpoints])

    @defer.inlineCallbacks
    def test_proxy_config_views(self):
        """
        C{proxy-config routes|clusters|endpoints PROXY}: readable tables.
        """
        yield self.proxy()
        s = Streams()
        code = yield proxy_config(self.client(), "routes", "p1", s.out, s.err)
        self.assertEqual((code, s.err.getvalue()), (0, ""))
        lines = s.out.getvalue().splitlines()
        self.assertEqual(columns(lines[0]), ["LISTENER", "VIRTUAL HOST", "DOMAINS", "MATCH", "DESTINATION",
                                                 "TIMEOUT"])
        # The VirtualService's host (the registry's services have default routes too).
        [outbound] = [line for line in lines if line.startswith("outbound") and "a.example.com" in line]
        self.assertIn(" /* ", outbound)
        self.assertIn("outbound|80||a.example.com", outbound)
        [inbound] = [line for line in lines if line.startswith("inbound")]
        self.assertEqual(inbound.split()[:5], ["inbound", "-", "*", "/*", "inbound|9080||a-v1"])

        s = Streams()
        code = yield proxy_config(self.client(), "clusters", "p1", s.out, s.err)
        self.assertEqual(code, 0)
        lines = s.out.getvalue().splitlines()
        self.assertEqual(columns(lines[0]), ["NAME", "LB POLICY", "ENDPOINTS", "SUBSETS", "CONNECT TIMEOUT"])
        self.assertIn(["outbound|80||a.example.com", "round_robin", "1"], [line.split()[:3] for line in lines])

        s = Streams()
        code = yield proxy_config(self.client(), "endpoints", "p1", s.out, s.err)
        self.assertEqual(code, 0)
        lines = s.out.getvalue().splitlines()
        self.assertEqual(columns(lines[0]), ["ENDPOINT", "CLUSTER", "WEIGHT", "LOCALITY", "LABELS"])
        self.assertIn(["10.0.0.1:80", "outbound|80||a.example.com", "1", "-", "version=v1"],
                      [line.split() for line in lines])

    @defer.inlineCallbacks
    def test_unknown_proxy(self):
        """
        An unknown proxy: one line on stderr, exit 1.
        """
        s = Streams()
        code = yield proxy_config(self.client(), "routes", "no/body", s.out, s.err)
        self.assertEqual((code, s.out.getvalue()), (1, ""))
        self.assertEqual(s.err.getvalue(), f"txmesh: no connected proxy no/body (404 from "
                                           f"{self.url}/proxies/no%2Fbody/config/routes)\n")

    @defer.inlineCallbacks
    def test_services(self):
        """
        C{services}: host, ports, endpoint count and addresses.
        """
        s = Streams()
        code = yield services(self.client(), s.out, s.err)
        self.assertEqual((code, s.err.getvalue()), (0, ""))
        self.assertEqual(s.out.getvalue().splitlines()[1].split(),
                         ["b.default.svc.cluster.local", "8080/HTTP", "2", "127.0.0.1:18080,127.0.0.2:18080"])

    @defer.inlineCallbacks
    def test_unreachable(self):
        """
        Nothing listening: one line on stderr, exit 1.
        """
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(protocol.Factory())
        url = f"http://127.0.0.1:{port.getHost().port}"
        yield port.stopListening()
        for command in (proxy_status, services):
            s = Streams()
            code = yield command(self.client(url=url), s.out, s.err)
            self.assertEqual((code, s.out.getvalue()), (1, ""))
            self.assertTrue(s.err.getvalue().startswith(f"txmesh: cannot reach the pilot at {url}: "), s.err.getvalue())
            self.assertEqual(s.err.getvalue().count("\n"), 1)

    @defer.inlineCallbacks
    def test_no_answer(self):
        """
        A server that never answers: bounded by the timeout, exit 1.
        """
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            protocol.Factory.forProtocol(protocol.Protocol))
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        s = Streams()
        code = yield proxy_status(PilotClient(url, http=self.http, timeout=0.3), s.out, s.err)
        self.assertEqual(code, 1)
        self.assertEqual(s.err.getvalue(), f"txmesh: cannot reach the pilot at {url}: no answer in 0.3s\n")

    @defer.inlineCallbacks
    def test_not_the_api(self):
        """
        Something answering that is not the operator API: exit 1.
        """
        site = __import__("twisted.web.server", fromlist=["Site"]).Site(
            __import__("twisted.web.static", fromlist=["Data"]).Data(b"<html>hi</html>", "text/html"))
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        s = Streams()
        code = yield services(self.client(url=f"http://127.0.0.1:{port.getHost().port}"), s.out, s.err)
        self.assertEqual(code, 1)
        self.assertIn("not JSON", s.err.getvalue())

    @defer.inlineCallbacks
    def test_main_process(self):
        """
        C{python -m txmesh.cli} end to end: C{TXMESH_PILOT} names the pilot,
        exit 0 with the table; an unreachable pilot exits 1 with one line.
        """
        yield self.proxy()
        env = dict(os.environ, TXMESH_PILOT=self.url)
        env.pop("TXMESH_TOKEN", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        d = getProcessOutputAndValue(sys.executable, ("-m", "txmesh.cli", "proxy-status"), env=env, path=REPO)
        d.addTimeout(30, reactor)
        out, err, code = yield d
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out.decode().splitlines()[1].split()[:2], ["p1", "SYNCED"])
        d = getProcessOutputAndValue(sys.executable, ("-m", "txmesh.cli", "--pilot", "http://127.0.0.1:1",
                                                      "proxy-config", "clusters", "p1"), env=env, path=REPO)
        d.addTimeout(30, reactor)
        out, err, code = yield d
        self.assertEqual((code, out), (1, b""))
        self.assertTrue(err.startswith(b"txmesh: cannot reach the pilot at http://127.0.0.1:1: "), err)
        self.assertEqual(err.count(b"\n"), 1)


class AuthCommandTests(LivePilot, TestCase):
    """
    The commands against a pilot with a token.
    """

    token = "t0ken"

    def run_status(self, token):
        s = Streams()
        d = proxy_status(PilotClient(self.url, token=token, http=self.http, timeout=TIMEOUT), s.out, s.err)
        return d.addCallback(lambda code: (code, s.out.getvalue(), s.err.getvalue()))

    @defer.inlineCallbacks
    def test_token(self):
        """
        No token or a wrong one: one line and exit 1; the right one: exit 0.
        """
        code, out, err = yield self.run_status(None)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"txmesh: the pilot at {self.url} refused the request: it needs a token "
                              f"(--token or TXMESH_TOKEN)\n")
        code, out, err = yield self.run_status("wrong")
        self.assertEqual(err, f"txmesh: the pilot at {self.url} refused the request: the token was refused\n")
        code, out, err = yield self.run_status("t0ken")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("NAME"))


class TokenKeyCommandTests(SynchronousTestCase):
    """
    C{txmesh token create}, C{rotate-key} and C{finish-key-rotation} on a
    CA directory, offline.
    """

    NOW = 1_772_366_400.0

    def setUp(self):
        self.config_dir = self.mktemp()
        self.ca_dir = os.path.join(self.config_dir, "ca")

    def create(self):
        s = Streams()
        self.assertEqual(token_create(self.ca_dir, "default", "web", 3600, self.NOW, s.out, s.err), 0)
        return s.out.getvalue().strip()

    def run_key_command(self, command):
        s = Streams()
        code = token_key_command(command, self.ca_dir, s.out, s.err)
        return code, s.out.getvalue(), s.err.getvalue()

    def test_rotate_then_finish(self):
        old_token = self.create()
        old_kid = token_authority(self.ca_dir).key_id
        code, out, err = self.run_key_command("rotate-key")
        new_kid = token_authority(self.ca_dir).key_id
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"new token key {new_kid} in {self.ca_dir}; tokens signed by {old_kid} accepted "
                              "until 'txmesh token finish-key-rotation'\n")
        new_token = self.create()
        self.assertEqual(token_authority(self.ca_dir).verify(old_token, self.NOW).key_id, old_kid)
        self.assertEqual(token_authority(self.ca_dir).verify(new_token, self.NOW).key_id, new_kid)

        self.assertEqual(self.run_key_command("finish-key-rotation"),
                         (0, f"stopped accepting tokens signed by {old_kid}\n", ""))
        e = self.assertRaises(InvalidCredential, token_authority(self.ca_dir).verify, old_token, self.NOW)
        self.assertIn(f"join token signed by unknown key {old_kid}", e.reason)
        self.assertEqual(token_authority(self.ca_dir).verify(new_token, self.NOW).key_id, new_kid)
        self.assertEqual(self.run_key_command("finish-key-rotation"),
                         (0, "no key rotation in progress: nothing to finish\n", ""))

    def test_unusable_directory(self):
        os.makedirs(self.ca_dir)
        with open(os.path.join(self.ca_dir, "token.key"), "wb") as f:
            f.write(b"tiny")
        code, out, err = self.run_key_command("rotate-key")
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("txmesh token rotate-key: ") and "holds 4 bytes" in err, err)
        with open(os.path.join(self.ca_dir, "token-previous.keys"), "w") as f:
            f.write("not hex\n")
        code, out, err = self.run_key_command("finish-key-rotation")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("txmesh token finish-key-rotation: ", err)
        self.assertIn("key 1 is not hex", err)

    def test_main(self):
        self.create()
        old_kid = token_authority(self.ca_dir).key_id
        self.assertEqual(main(["token", "rotate-key", "--config-dir", self.config_dir], environ={}), 0)
        self.assertEqual(token_authority(self.ca_dir).previous_key_ids, (old_kid,))
        other = os.path.join(self.config_dir, "other-ca")
        self.assertEqual(main(["token", "finish-key-rotation", "--config-dir", "/nonexistent", "--ca-dir", other],
                              environ={}), 0)
        self.assertEqual(main(["token", "finish-key-rotation", "--config-dir", self.config_dir], environ={}), 0)
        self.assertEqual(token_authority(self.ca_dir).previous_key_ids, ())
        with self.assertRaises(SystemExit) as cm:
            main(["token", "rotate-key"], environ={})
        self.assertEqual(cm.exception.code, 2)
