"""
The operator API protected like the channel: served over TLS with the
pilot's certificate, operators let in by a client certificate from the mesh
CA (C{txmesh cert create}) or by the bearer token.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from txmesh.cli import PilotClient, cert_create, operator_agent, proxy_status
from txmesh.pilot.channel_security import ca_directory, load_channel_security
from txmesh.pilot.service import PilotService

OPERATOR = "spiffe://cluster.local/ns/istio-system/sa/operator"


class OperatorMutualTLSTests(TestCase):
    token: str | None = None

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.mkdir(os.path.join(self.dir, "istio"))
        security = load_channel_security(ca_directory(self.dir), "cluster.local", reactor)
        # Beyond loopback (0.0.0.0): allowed because operators must prove who they are.
        self.pilot = PilotService(self.dir, reactor, "tcp:0:interface=127.0.0.1", "tcp:0:interface=0.0.0.0",
                                  security=security, api_token=self.token, api_tls=True, api_admins=(OPERATOR,))
        yield self.pilot.startService()
        self.addCleanup(self.pilot.stopService)
        self.url = f"https://127.0.0.1:{self.pilot.api_port.getHost().port}"
        self.root = os.path.join(self.dir, "ca", "root-cert.pem")

    def certificate(self, spiffe_id: str, name: str) -> tuple[str, str]:
        out = os.path.join(self.dir, name)
        code = cert_create(ca_directory(self.dir), "cluster.local", spiffe_id, out, 600, reactor.seconds(),
                           io.StringIO(), io.StringIO())
        self.assertEqual(code, 0)
        return os.path.join(out, "cert-chain.pem"), os.path.join(out, "key.pem")

    @defer.inlineCallbacks
    def status(self, cert: str | None = None, key: str | None = None, token: str | None = None) -> Any:
        out, err = io.StringIO(), io.StringIO()
        client = PilotClient(self.url, token, 5.0, agent=operator_agent(self.root, cert, key))
        code = yield proxy_status(client, out, err)
        return code, out.getvalue() + err.getvalue()

    @defer.inlineCallbacks
    def test_operator_certificate_lets_in(self) -> Any:
        code, text = yield self.status(*self.certificate(OPERATOR, "op"))
        self.assertEqual(code, 0, text)

    @defer.inlineCallbacks
    def test_no_certificate_refused(self) -> Any:
        code, text = yield self.status()
        self.assertEqual(code, 1)
        self.assertIn("operator's client certificate", text)

    @defer.inlineCallbacks
    def test_other_identity_refused(self) -> Any:
        code, text = yield self.status(*self.certificate("spiffe://cluster.local/ns/default/sa/web", "web"))
        self.assertEqual(code, 1, text)

    def test_tls_needs_the_ca(self) -> None:
        with self.assertRaises(ValueError) as e:
            PilotService(self.dir, reactor, "tcp:0", "tcp:0:interface=127.0.0.1", api_tls=True)
        self.assertIn("CA", str(e.exception))


class OperatorTokenOverTLSTests(OperatorMutualTLSTests):
    token = "s3cret"

    @defer.inlineCallbacks
    def test_token_still_works(self) -> Any:
        code, text = yield self.status(token="s3cret")
        self.assertEqual(code, 0, text)

    @defer.inlineCallbacks
    def test_no_certificate_refused(self) -> Any:
        code, text = yield self.status()
        self.assertEqual(code, 1)
        self.assertIn("token", text)
