"""
Tests for the C{authz} filter (L{txmesh.filters.authz}) and the audit log
(L{txmesh.observability.audit}), through L{FilterHarness}.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import FilterConfigError
from txmesh.filters.api import HTTPFilter
from txmesh.filters.authz import AuthzFactory, normalize_path
from txmesh.observability.audit import AuditLog, AuditRecord, iso8601
from txmesh.observability.log_writer import LogWriter
from txmesh.policy.authorization import Decision
from txmesh.testing import FilterHarness

OTHER = "spiffe://cluster.local/ns/other/sa/app"
FRONTEND = "spiffe://cluster.local/ns/web/sa/frontend"

DENY_ADMIN = {
    "name": "deny-admin", "namespace": "web", "action": "DENY",
    "rules": [{"from": [{"source": {"namespaces": ["other"]}}],
               "to": [{"operation": {"methods": ["GET"], "paths": ["/admin", "/admin/*"]}}]}],
}
AUDIT_WRITES = {
    "name": "audit-writes", "namespace": "web", "action": "AUDIT",
    "rules": [{"to": [{"operation": {"methods": ["POST", "PUT", "DELETE"]}}]}],
}
ALLOW_FRONTEND = {
    "name": "allow-frontend", "namespace": "web", "action": "ALLOW",
    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/web/sa/frontend"]}}]}],
}


class _JWTStub(HTTPFilter):
    """
    Stands for the jwt filter: leaves C{request.auth} metadata.
    """

    def __init__(self, stream: Any, auth: dict[str, Any]):
        stream.metadata["request.auth"] = auth


class _JWTStubFactory:
    name = "jwt-stub"

    def parse_config(self, raw: Any) -> Any:
        return dict(raw)

    def create_filter(self, config: Any, stream: Any) -> _JWTStub:
        return _JWTStub(stream, config)


class FilterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.factory = AuthzFactory()
        self.audit_path = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1764090368.5)  # 2025-11-25T17:06:08.500Z

    def harness(self, policies: list[dict[str, Any]], audit: bool = True, extra: tuple = (),
                **kw: Any) -> FilterHarness:
        config: dict[str, Any] = {"policies": policies}
        if audit:
            config["audit"] = {"path": self.audit_path}
        return FilterHarness([*extra, (self.factory, config)], clock=self.clock, **kw)

    def audit_lines(self) -> list[dict[str, Any]]:
        try:
            with open(self.audit_path, encoding="utf-8") as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    def test_issue_example_denied(self) -> None:
        """
        C{GET /admin} from namespace C{other} gets 403, flag C{RBACD}, and
        never reaches the upstream; the denial is audited.
        """
        h = self.harness([DENY_ADMIN], downstream_principal=OTHER)
        response = h.request("GET", "/admin", headers={"x-request-id": "req-1"})
        self.assertEqual(response.status, 403)
        self.assertEqual(response.body, b"RBAC: access denied")
        self.assertEqual(response.flags, ["RBACD"])
        self.assertIsNone(response.upstream_request)
        self.assertEqual(h.upstream.requests, [])
        [line] = self.audit_lines()
        self.assertEqual(line["time"], "2025-11-25T17:06:08.500Z")
        self.assertEqual(line["source_principal"], OTHER)
        self.assertEqual(line["source_ip"], "127.0.0.1")
        self.assertEqual(line["destination"], {"host": "example.com", "port": 8080})
        self.assertEqual((line["method"], line["path"]), ("GET", "/admin"))
        self.assertEqual((line["policy"], line["decision"], line["action"]), ("web/deny-admin", "DENY", "DENY"))
        self.assertEqual(line["reason"], "matched DENY policy web/deny-admin")
        self.assertIsInstance(line["request_id"], str)
        self.assertEqual(sorted(line), sorted(["time", "source_principal", "source_ip", "destination", "method",
                                               "path", "policy", "decision", "action", "request_id", "reason"]))

    def test_issue_example_allowed(self) -> None:
        """
        Other namespaces, other paths and other methods pass; nothing is audited.
        """
        for principal, method, path in [(FRONTEND, "GET", "/admin"), (OTHER, "GET", "/info"),
                                        (OTHER, "POST", "/admin"), (None, "GET", "/admin")]:
            h = self.harness([DENY_ADMIN], downstream_principal=principal)
            response = h.request(method, path, body=b"x" if method == "POST" else b"")
            self.assertEqual(response.status, 200, (principal, method, path))
            self.assertEqual(response.flags, [])
            self.assertEqual(response.upstream_request.head.path, path.encode())
        self.assertEqual(self.audit_lines(), [])

    def test_query_and_dot_segments(self) -> None:
        """
        The query does not hide the path, nor do dot segments or escapes.
        """
        h = self.harness([DENY_ADMIN], downstream_principal=OTHER)
        for target in ["/admin?x=1", "/admin/users", "/public/../admin", "/%61dmin", "/./admin"]:
            self.assertEqual(h.request("GET", target).status, 403, target)
        self.assertEqual(h.upstream.requests, [])

    def test_audit_policy(self) -> None:
        """
        An AUDIT match is written and the request still passes.
        """
        h = self.harness([DENY_ADMIN, AUDIT_WRITES], downstream_principal=FRONTEND)
        response = h.request("POST", "/orders", body=b"{}")
        self.assertEqual(response.status, 200)
        self.assertIsNotNone(response.upstream_request)
        self.assertEqual(h.request("GET", "/orders").status, 200)
        [line] = self.audit_lines()
        self.assertEqual((line["policy"], line["decision"], line["action"]), ("web/audit-writes", "ALLOW", "AUDIT"))
        self.assertEqual((line["method"], line["path"]), ("POST", "/orders"))
        self.assertEqual(line["reason"], "matched AUDIT policy web/audit-writes")

    def test_allow_policy_default_deny(self) -> None:
        h = self.harness([ALLOW_FRONTEND], downstream_principal=OTHER)
        response = h.request("GET", "/")
        self.assertEqual((response.status, response.flags), (403, ["RBACD"]))
        [line] = self.audit_lines()
        self.assertEqual((line["policy"], line["decision"], line["action"]), (None, "DENY", None))
        self.assertEqual(line["reason"], "no ALLOW policy matched")
        h = self.harness([ALLOW_FRONTEND], downstream_principal=FRONTEND)
        self.assertEqual(h.request("GET", "/").status, 200)

    def test_plaintext_is_denied_by_principal_allow(self) -> None:
        h = self.harness([ALLOW_FRONTEND])
        self.assertEqual(h.request("GET", "/").status, 403)
        self.assertIsNone(self.audit_lines()[0]["source_principal"])

    def test_allow_nothing(self) -> None:
        h = self.harness([{"name": "allow-nothing", "namespace": "web"}], downstream_principal=FRONTEND)
        self.assertEqual(h.request("GET", "/").status, 403)

    def test_no_policies(self) -> None:
        h = self.harness([], audit=False)
        self.assertEqual(h.request("GET", "/").status, 200)
        h = FilterHarness([(self.factory, {})])
        self.assertEqual(h.request("GET", "/").status, 200)

    def test_no_audit_configured(self) -> None:
        h = self.harness([DENY_ADMIN], audit=False, downstream_principal=OTHER)
        self.assertEqual(h.request("GET", "/admin").status, 403)
        self.assertEqual(self.audit_lines(), [])

    def test_decision_in_metadata(self) -> None:
        h = self.harness([DENY_ADMIN], audit=False, downstream_principal=OTHER)
        stream, response = h.start("GET", "/admin")
        self.assertIsInstance(stream.metadata["authz"], Decision)
        self.assertFalse(stream.metadata["authz"].allowed)

    def test_request_auth_from_jwt_filter(self) -> None:
        """
        The JWT the jwt filter left in C{request.auth} feeds
        C{requestPrincipals} and C{request.auth.*} conditions.
        """
        policy = {"name": "jwt", "namespace": "web", "rules": [{
            "from": [{"source": {"requestPrincipals": ["issuer.example.com/*"]}}],
            "when": [{"key": "request.auth.claims[groups]", "values": ["admins"]},
                     {"key": "request.auth.audiences", "values": ["web"]},
                     {"key": "request.auth.presenter", "values": ["cli"]}],
        }]}
        auth = {"principal": "issuer.example.com/alice", "claims": {"groups": ["dev", "admins"]},
                "audiences": ["web"], "presenter": "cli"}
        h = self.harness([policy], extra=((_JWTStubFactory(), auth),))
        self.assertEqual(h.request("GET", "/").status, 200)
        h = self.harness([policy], extra=((_JWTStubFactory(), dict(auth, claims={"groups": "dev"})),))
        self.assertEqual(h.request("GET", "/").status, 403)
        h = self.harness([policy])
        self.assertEqual(h.request("GET", "/").status, 403)

    def test_operation_fields(self) -> None:
        policy = {"name": "ops", "namespace": "web", "rules": [{"to": [{"operation": {
            "hosts": ["*.example.com"], "ports": ["8080"], "methods": ["GET"], "notPaths": ["/private*"]}}]}]}
        h = self.harness([policy], audit=False)
        self.assertEqual(h.request("GET", "/", authority="API.Example.com").status, 200)
        self.assertEqual(h.request("GET", "/", authority="example.org").status, 403)
        self.assertEqual(h.request("GET", "/private/x", authority="a.example.com").status, 403)
        self.assertEqual(h.request("DELETE", "/", authority="a.example.com").status, 403)
        h = self.harness([policy], audit=False, downstream_port=9090)
        self.assertEqual(h.request("GET", "/", authority="a.example.com").status, 403)

    def test_headers_and_ip(self) -> None:
        policy = {"name": "deny", "namespace": "web", "action": "DENY", "rules": [
            {"when": [{"key": "request.headers[X-Tenant]", "values": ["evil", "bad*"]}]},
            {"from": [{"source": {"ipBlocks": ["2001:db8::/32"]}}]},
        ]}
        h = self.harness([policy], audit=False)
        self.assertEqual(h.request("GET", "/", headers={"x-tenant": "badger"}).status, 403)
        self.assertEqual(h.request("GET", "/", headers={"x-tenant": "good"}).status, 200)
        h = self.harness([policy], audit=False, downstream_address=IPv6Address("TCP", "2001:db8::7", 5000))
        self.assertEqual(h.request("GET", "/").status, 403)
        h = self.harness([policy], audit=False, downstream_address=UNIXAddress("/tmp/sock"))
        self.assertEqual(h.request("GET", "/").status, 200)

    def test_remote_ip_from_trusted_proxies(self) -> None:
        policy = {"name": "deny", "namespace": "web", "action": "DENY",
                  "rules": [{"from": [{"source": {"remoteIpBlocks": ["192.0.2.0/24"]}}]}]}
        h = FilterHarness([(self.factory, {"policies": [policy], "num_trusted_proxies": 1})])
        self.assertEqual(h.request("GET", "/", headers={"x-forwarded-for": "198.51.100.1, 192.0.2.5"}).status, 403)
        self.assertEqual(h.request("GET", "/", headers={"x-forwarded-for": "192.0.2.5, 198.51.100.1"}).status, 200)
        self.assertEqual(h.request("GET", "/").status, 200)
        # Without trusted proxies, X-Forwarded-For is the client's to forge.
        h = FilterHarness([(self.factory, {"policies": [policy]})])
        self.assertEqual(h.request("GET", "/", headers={"x-forwarded-for": "192.0.2.5"}).status, 200)

    def test_audit_file_shared_and_appended(self) -> None:
        with open(self.audit_path, "w", encoding="utf-8") as f:
            f.write('{"earlier": true}\n')
        h1 = self.harness([DENY_ADMIN], downstream_principal=OTHER)
        h2 = self.harness([DENY_ADMIN], downstream_principal=OTHER)
        self.assertIs(h1._configs[0].config.audit, h2._configs[0].config.audit)
        h1.request("GET", "/admin")
        h2.request("GET", "/admin")
        lines = self.audit_lines()
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[0], {"earlier": True})


class ConfigTests(SynchronousTestCase):
    def error(self, raw: Any) -> FilterConfigError:
        return self.assertRaises(FilterConfigError, AuthzFactory().parse_config, raw)

    def test_errors(self) -> None:
        cases = [
            ({"polices": []}, "polices", "unknown field"),
            ({"policies": {}}, "policies", "expected a list"),
            ({"policies": [{"namespace": "x"}]}, "policies[0].name", "is required"),
            ({"policies": [{"name": "p", "rules": [{"from": [{"source": {"ipBlocks": ["x"]}}]}]}]},
             "policies[0].rules[0].from[0].source.ipBlocks[0]", "not an IP address"),
            ({"policies": [{"name": "p", "action": "CUSTOM"}]}, "policies[0].action", "not supported"),
            ({"audit": "file"}, "audit", "expected a mapping"),
            ({"audit": {"file": "x"}}, "audit.file", "unknown field"),
            ({"audit": {"path": ""}}, "audit.path", "expected a file name"),
            ({"audit": {"path": "/nonexistent-dir/audit.log"}}, "audit.path", "cannot open"),
            ({"num_trusted_proxies": -1}, "num_trusted_proxies", ">= 0"),
        ]
        for raw, field, reason in cases:
            e = self.error(raw)
            self.assertEqual(e.field, field, raw)
            self.assertIn(reason, e.reason, raw)

    def test_parsed(self) -> None:
        config = AuthzFactory().parse_config({"policies": [DENY_ADMIN, AUDIT_WRITES], "audit": {"path": "-"}})
        self.assertEqual([p.key for p in config.policies], ["web/deny-admin", "web/audit-writes"])
        self.assertEqual(config.audit.name, "<stdout>")

    def test_plugin(self) -> None:
        from txmesh.filters.registry import FilterRegistry

        self.assertIsInstance(FilterRegistry.from_plugins().http("authz"), AuthzFactory)


class AuditLogTests(SynchronousTestCase):
    def test_format(self) -> None:
        out = io.StringIO()
        AuditLog(out).write(AuditRecord(0.25, None, "10.0.0.1", "h", 80, "GET", "/", None, "DENY", None, "r1",
                                        "no ALLOW policy matched"))
        self.assertTrue(out.getvalue().endswith("\n"))
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertEqual(json.loads(out.getvalue())["time"], "1970-01-01T00:00:00.250Z")

    def test_iso8601(self) -> None:
        self.assertEqual(iso8601(1764090368.5), "2025-11-25T17:06:08.500Z")

    def test_write_failure_is_logged(self) -> None:
        out = io.StringIO()
        events: list[dict[str, Any]] = []
        writer = LogWriter(out, "closed")
        out.close()
        writer.log = Logger(observer=events.append)
        log = AuditLog(writer)
        log.write(AuditRecord(0, None, None, None, None, None, None, None, "DENY", None, None, ""))
        [event] = events
        self.assertEqual(event["name"], "closed")
        self.assertIn("write failed", event["log_format"])


class NormalizePathTests(SynchronousTestCase):
    def test_cases(self) -> None:
        for raw, expected in [
            (b"/", "/"), (b"/a/b?c=/d", "/a/b"), (b"/a#f", "/a"), (b"/a/./b", "/a/b"), (b"/a/../b", "/b"),
            (b"/../../a", "/a"), (b"/a/..", "/"), (b"/a/.", "/a/"), (b"/%7Euser/%2E%2E/x", "/x"),
            (b"/a%2Fb", "/a%2Fb"), (b"/a%20b", "/a%20b"), (b"*", "*"),
        ]:
            self.assertEqual(normalize_path(raw), expected, raw)
