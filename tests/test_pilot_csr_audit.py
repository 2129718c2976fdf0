"""
Garbage CSRs sent to the pilot over an admitted channel: each is refused
with a reason, written to the audit log as a C{CSR} C{DENY} record of the
channel's identity, and nothing else is affected (the channel keeps
working, a good CSR is still signed).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor

from tests import test_pilot_channel as channel
from tests.test_pilot_channel import LABELS
from txmesh.pilot.channel_security import ca_directory, token_authority
from txmesh.pilot.messages import (
    CertificateDenied,
    CertificateIssued,
    CertificateRequest,
    Hello,
    Node,
    Ping,
    Pong,
    Push,
)
from txmesh.proxy.pilot_client import pilot_tls_options
from txmesh.proxy.workload_identity import WorkloadIdentity

WEB = "spiffe://cluster.local/ns/default/sa/web"

GARBAGE = {
    "not PEM": "hello",
    "PEM header, no body": "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n",
    "PEM of nonsense": "-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n",
}


class GarbageCSRAuditTests(channel._PilotCase):
    security = True

    def audited(self) -> list[dict]:
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]

    @defer.inlineCallbacks
    def test_garbage_csrs_audited(self) -> Any:
        token = token_authority(ca_directory(self.dir)).create("default", "web", reactor.seconds(), 3600)
        address = f"tcp:127.0.0.1:{self.pilot.channel_port.getHost().port}"
        client = yield self.connect(pilot_tls_options(None, self.channel_security.root_pem, address, None,
                                                      reactor.seconds()))
        client.send(Hello(node=Node(id="p1", labels=LABELS), credential=token))
        self.assertIsInstance((yield client.next()), Push)
        reasons = []
        for i, csr in enumerate(GARBAGE.values(), start=1):
            client.send(CertificateRequest(id=i, csr=csr))
            answer = yield client.next()
            self.assertIsInstance(answer, CertificateDenied, csr)
            self.assertEqual(answer.id, i)
            self.assertTrue(answer.reason, csr)
            reasons.append(answer.reason)
        records = self.audited()
        self.assertEqual([(r["method"], r["path"], r["decision"], r["source_principal"]) for r in records],
                         [("CSR", "p1", "DENY", WEB)] * len(GARBAGE))
        self.assertEqual([r["reason"] for r in records], reasons)
        self.assertIn("not a PEM certificate signing request", reasons[1])

        # Nothing else is affected: the channel answers and a good CSR is signed.
        client.send(Ping(id=99))
        self.assertEqual((yield client.next()), Pong(id=99))
        client.send(CertificateRequest(id=100, csr=WorkloadIdentity(WEB).new_request().decode()))
        self.assertIsInstance((yield client.next()), CertificateIssued)
        self.assertEqual(self.audited()[-1]["decision"], "ALLOW")
