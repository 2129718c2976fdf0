"""
Tests for L{txmesh.policy.authorization}: Istio's matching and evaluation
semantics, field by field.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from txmesh.policy.authorization import (
    ALLOW,
    AUDIT,
    DENY,
    Condition,
    Decision,
    Operation,
    Policy,
    RequestAttributes,
    Rule,
    Source,
    evaluate,
    ip_block,
    namespace_of,
    pattern,
    port,
)

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
OTHER = "spiffe://cluster.local/ns/other/sa/app"


def request(**kw: object) -> RequestAttributes:
    base: dict[str, object] = dict(
        source_principal=SLEEP, source_ip="10.1.2.3", host="web.example.com", method="GET",
        path="/info", port=8080, headers={"User-Agent": "Mozilla/5.0", "x-empty": ""},
        request_principal="issuer.example.com/alice", audiences=("web", "api"), presenter="client-1",
        claims={"iss": "issuer.example.com", "groups": ["dev", "ops"], "org": {"team": {"name": "core"}},
                "admin": True},
    )
    base.update(kw)
    return RequestAttributes(**base)  # type: ignore[arg-type]


ANON = dict(source_principal=None, request_principal=None, audiences=(), presenter=None, claims={})


class PatternTests(SynchronousTestCase):
    """
    Exact, prefix, suffix and presence values.
    """

    CASES = [
        # (pattern, path, matches)
        ("/info", "/info", True),
        ("/info", "/info/x", False),
        ("/info*", "/info/x", True),
        ("/info*", "/inf", False),
        ("*/x", "/info/x", True),
        ("*/x", "/info/y", False),
        ("*", "/anything", True),
        ("*", "", True),
    ]

    def test_paths(self) -> None:
        for pat, path, expected in self.CASES:
            rule = Rule(operations=[Operation(paths=[pat])])
            self.assertEqual(rule.matches(request(path=path)), expected, (pat, path))

    def test_presence_needs_a_value(self) -> None:
        """
        C{*} matches any value, but not an absent attribute.
        """
        self.assertTrue(Source(principals=["*"]).matches(request()))
        self.assertFalse(Source(principals=["*"]).matches(request(**ANON)))
        self.assertTrue(Source(request_principals=["*"]).matches(request()))
        self.assertFalse(Source(request_principals=["*"]).matches(request(**ANON)))

    def test_invalid_patterns(self) -> None:
        for bad in ["", "a*b", "*a*", "**", None, 3]:
            self.assertRaises(ValueError, pattern, bad)
        for good in ["*", "a*", "*a", "a"]:
            self.assertEqual(pattern(good), good)

    def test_ports_and_blocks(self) -> None:
        self.assertEqual(port("8080"), 8080)
        self.assertEqual(port(443), 443)
        for bad in ["http", "-1", 70000, True, None]:
            self.assertRaises(ValueError, port, bad)
        self.assertEqual(ip_block("10.1.2.3"), ipaddress.ip_network("10.1.2.3/32"))
        self.assertEqual(ip_block("10.1.2.3/8"), ipaddress.ip_network("10.0.0.0/8"))
        for bad in ["10.1.2", "x", "", None]:
            self.assertRaises(ValueError, ip_block, bad)


class RequestAttributesTests(SynchronousTestCase):
    def test_namespace_from_spiffe(self) -> None:
        self.assertEqual(request().source_namespace, "default")
        self.assertEqual(request(source_principal=OTHER).source_namespace, "other")
        self.assertIsNone(request(source_principal=None).source_namespace)
        self.assertIsNone(request(source_principal="spiffe://td/not-a-workload").source_namespace)
        self.assertEqual(request(source_namespace="given").source_namespace, "given")
        self.assertEqual(namespace_of("td/ns/x/sa/y"), "x")

    def test_remote_ip_defaults_to_source(self) -> None:
        r = request()
        self.assertEqual(r.remote_ip, ipaddress.ip_address("10.1.2.3"))
        self.assertEqual(request(remote_ip="192.0.2.1").remote_ip, ipaddress.ip_address("192.0.2.1"))

    def test_ipv4_mapped(self) -> None:
        self.assertEqual(request(source_ip="::ffff:10.1.2.3").source_ip, ipaddress.ip_address("10.1.2.3"))

    def test_header_names_lower_cased(self) -> None:
        self.assertEqual(request().headers["user-agent"], "Mozilla/5.0")

    def test_peer_identity(self) -> None:
        self.assertEqual(request().peer_identity, "cluster.local/ns/default/sa/sleep")


class SourceTests(SynchronousTestCase):
    """
    Every C{from.source} field and its C{not} twin.
    """

    CASES = [
        # (source fields, request overrides, matches)
        (dict(principals=["cluster.local/ns/default/sa/sleep"]), {}, True),
        (dict(principals=["cluster.local/ns/default/sa/other"]), {}, False),
        (dict(principals=["cluster.local/ns/default/*"]), {}, True),
        (dict(principals=["*/sa/sleep"]), {}, True),
        (dict(principals=["cluster.local/ns/default/sa/sleep"]), dict(source_principal=None), False),
        (dict(not_principals=["cluster.local/ns/default/sa/sleep"]), {}, False),
        (dict(not_principals=["cluster.local/ns/default/sa/other"]), {}, True),
        # A not-field matches a request without the attribute (no mTLS).
        (dict(not_principals=["*"]), dict(source_principal=None), True),
        (dict(request_principals=["issuer.example.com/alice"]), {}, True),
        (dict(request_principals=["issuer.example.com/*"]), {}, True),
        (dict(request_principals=["issuer.example.com/bob"]), {}, False),
        (dict(not_request_principals=["*"]), {}, False),
        (dict(not_request_principals=["*"]), dict(request_principal=None), True),
        (dict(namespaces=["default"]), {}, True),
        (dict(namespaces=["other"]), {}, False),
        (dict(namespaces=["def*"]), {}, True),
        (dict(namespaces=["default"]), dict(source_principal=None), False),
        (dict(not_namespaces=["default"]), {}, False),
        (dict(not_namespaces=["other"]), {}, True),
        (dict(ip_blocks=["10.1.2.3"]), {}, True),
        (dict(ip_blocks=["10.0.0.0/8"]), {}, True),
        (dict(ip_blocks=["192.168.0.0/16", "10.1.0.0/16"]), {}, True),
        (dict(ip_blocks=["192.168.0.0/16"]), {}, False),
        (dict(ip_blocks=["10.0.0.0/8"]), dict(source_ip=None), False),
        (dict(ip_blocks=["2001:db8::/32"]), dict(source_ip="2001:db8::1"), True),
        (dict(ip_blocks=["2001:db8::/32"]), {}, False),
        (dict(not_ip_blocks=["10.0.0.0/8"]), {}, False),
        (dict(not_ip_blocks=["192.168.0.0/16"]), {}, True),
        (dict(remote_ip_blocks=["192.0.2.0/24"]), dict(remote_ip="192.0.2.9"), True),
        (dict(remote_ip_blocks=["192.0.2.0/24"]), {}, False),
        (dict(not_remote_ip_blocks=["192.0.2.0/24"]), dict(remote_ip="192.0.2.9"), False),
        (dict(not_remote_ip_blocks=["192.0.2.0/24"]), {}, True),
        # Fields AND together; values of one field OR.
        (dict(namespaces=["default"], ip_blocks=["192.168.0.0/16"]), {}, False),
        (dict(namespaces=["default"], ip_blocks=["10.0.0.0/8"]), {}, True),
        (dict(namespaces=["default"], not_principals=["*/sa/sleep"]), {}, False),
    ]

    def test_table(self) -> None:
        for fields, overrides, expected in self.CASES:
            self.assertEqual(Source(**fields).matches(request(**overrides)), expected, (fields, overrides))


class OperationTests(SynchronousTestCase):
    """
    Every C{to.operation} field and its C{not} twin.
    """

    CASES = [
        (dict(hosts=["web.example.com"]), {}, True),
        (dict(hosts=["WEB.Example.COM"]), {}, True),
        (dict(hosts=["*.example.com"]), dict(host="Web.EXAMPLE.com"), True),
        (dict(hosts=["web.*"]), {}, True),
        (dict(hosts=["api.example.com"]), {}, False),
        (dict(hosts=["web.example.com"]), dict(host=None), False),
        (dict(not_hosts=["web.example.com"]), {}, False),
        (dict(not_hosts=["API.example.com"]), {}, True),
        (dict(ports=[8080]), {}, True),
        (dict(ports=["8080"]), {}, True),
        (dict(ports=[9090]), {}, False),
        (dict(ports=[8080]), dict(port=None), False),
        (dict(not_ports=[8080]), {}, False),
        (dict(not_ports=[9090]), {}, True),
        (dict(methods=["GET", "HEAD"]), {}, True),
        (dict(methods=["POST"]), {}, False),
        (dict(methods=["get"]), {}, False),  # methods are case-sensitive
        (dict(not_methods=["GET"]), {}, False),
        (dict(not_methods=["POST"]), {}, True),
        (dict(paths=["/info"]), {}, True),
        (dict(paths=["/inf*"]), {}, True),
        (dict(paths=["/INFO"]), {}, False),  # paths are case-sensitive
        (dict(not_paths=["/info"]), {}, False),
        (dict(not_paths=["/admin*"]), {}, True),
        (dict(methods=["GET"], paths=["/admin"]), {}, False),
        (dict(methods=["GET"], paths=["/info"], ports=[8080], hosts=["web.example.com"]), {}, True),
    ]

    def test_table(self) -> None:
        for fields, overrides, expected in self.CASES:
            self.assertEqual(Operation(**fields).matches(request(**overrides)), expected, (fields, overrides))


class ConditionTests(SynchronousTestCase):
    """
    Every supported C{when} key, with C{values} and C{notValues}.
    """

    CASES = [
        ("request.headers[User-Agent]", ["Mozilla/*"], [], {}, True),
        ("request.headers[user-agent]", ["curl/*"], [], {}, False),
        ("request.headers[x-missing]", ["*"], [], {}, False),
        ("request.headers[x-empty]", ["*"], [], {}, True),  # presence: an empty header is present
        ("request.headers[user-agent]", [], ["curl*"], {}, True),
        ("request.headers[user-agent]", [], ["Mozilla/*"], {}, False),
        ("source.ip", ["10.0.0.0/8"], [], {}, True),
        ("source.ip", ["10.0.0.0/8"], ["10.1.2.3"], {}, False),
        ("source.ip", ["192.168.1.1"], [], {}, False),
        ("remote.ip", ["192.0.2.0/24"], [], dict(remote_ip="192.0.2.1"), True),
        ("remote.ip", ["192.0.2.0/24"], [], {}, False),
        ("source.namespace", ["default"], [], {}, True),
        ("source.namespace", [], ["default"], {}, False),
        ("source.principal", ["cluster.local/ns/default/sa/sleep"], [], {}, True),
        ("source.principal", ["*"], [], dict(source_principal=None), False),
        ("request.auth.principal", ["issuer.example.com/alice"], [], {}, True),
        ("request.auth.principal", ["*"], [], dict(request_principal=None), False),
        ("request.auth.audiences", ["api"], [], {}, True),
        ("request.auth.audiences", ["other"], [], {}, False),
        ("request.auth.audiences", [], ["api"], {}, False),
        ("request.auth.presenter", ["client-*"], [], {}, True),
        ("request.auth.presenter", ["client-2"], [], {}, False),
        ("request.auth.claims[iss]", ["issuer.example.com"], [], {}, True),
        ("request.auth.claims[iss]", ["other"], [], {}, False),
        ("request.auth.claims[groups]", ["ops"], [], {}, True),  # any element of a list claim
        ("request.auth.claims[groups]", [], ["ops"], {}, False),
        ("request.auth.claims[groups]", ["admin"], [], {}, False),
        ("request.auth.claims[org][team][name]", ["core"], [], {}, True),
        ("request.auth.claims[org][team][name]", ["edge"], [], {}, False),
        ("request.auth.claims[org][missing]", ["*"], [], {}, False),
        ("request.auth.claims[admin]", ["*"], [], {}, False),  # only string claims match
        ("request.auth.claims[iss]", ["*"], [], dict(claims={}), False),
        ("destination.port", ["8080"], [], {}, True),
        ("destination.port", ["80", "443"], [], {}, False),
        ("destination.port", [], ["8080"], {}, False),
        ("connection.sni", ["web.*"], [], dict(sni="web.example.com"), True),
        ("connection.sni", ["web.*"], [], {}, False),
    ]

    def test_table(self) -> None:
        for key, values, not_values, overrides, expected in self.CASES:
            c = Condition(key, values, not_values)
            self.assertEqual(c.matches(request(**overrides)), expected, (key, values, not_values, overrides))

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, Condition, "destination.ip", ["10.0.0.1"])
        self.assertRaises(ValueError, Condition, "request.headers[]", ["x"])
        self.assertRaises(ValueError, Condition, "source.ip", ["not-an-ip"])
        self.assertRaises(ValueError, Condition, "destination.port", ["http"])
        self.assertRaises(ValueError, Condition, "source.namespace")


def policy(name: str, action: str = ALLOW, *rules: Rule, namespace: str = "foo") -> Policy:
    return Policy(name, namespace, action, rules)


GET_ADMIN = Rule(operations=[Operation(methods=["GET"], paths=["/admin*"])])
FROM_OTHER = Rule(sources=[Source(namespaces=["other"])])


class RuleTests(SynchronousTestCase):
    def test_empty_rule_matches_everything(self) -> None:
        self.assertTrue(Rule().matches(request()))
        self.assertTrue(Rule().matches(RequestAttributes()))

    def test_from_to_when_all_needed(self) -> None:
        rule = Rule(
            sources=[Source(namespaces=["other"]), Source(principals=["*/sa/sleep"])],  # OR
            operations=[Operation(paths=["/admin"]), Operation(paths=["/info"])],  # OR
            conditions=[Condition("request.auth.claims[iss]", ["issuer.example.com"]),
                        Condition("destination.port", ["8080"])],  # AND
        )
        self.assertTrue(rule.matches(request()))
        self.assertFalse(rule.matches(request(path="/x")))
        self.assertFalse(rule.matches(request(source_principal=None)))
        self.assertFalse(rule.matches(request(port=9090)))


class EvaluateTests(SynchronousTestCase):
    """
    Istio's evaluation order.
    """

    def test_no_policies_allow(self) -> None:
        d = evaluate([], request())
        self.assertEqual(d, Decision(True, None, None, reason="no ALLOW policy applies"))

    def test_deny_matches(self) -> None:
        d = evaluate([policy("deny-admin", DENY, GET_ADMIN)], request(path="/admin"))
        self.assertEqual((d.allowed, d.policy, d.action), (False, "foo/deny-admin", DENY))

    def test_deny_not_matching_allows_without_allow_policies(self) -> None:
        d = evaluate([policy("deny-admin", DENY, GET_ADMIN)], request(path="/info"))
        self.assertEqual((d.allowed, d.policy, d.action), (True, None, None))

    def test_deny_wins_over_allow(self) -> None:
        policies = [policy("allow-all", ALLOW, Rule()), policy("deny-admin", DENY, GET_ADMIN)]
        d = evaluate(policies, request(path="/admin/x"))
        self.assertEqual((d.allowed, d.policy), (False, "foo/deny-admin"))
        d = evaluate(policies, request(path="/info"))
        self.assertEqual((d.allowed, d.policy, d.action), (True, "foo/allow-all", ALLOW))

    def test_allow_policies_need_a_match(self) -> None:
        policies = [policy("allow-other", ALLOW, FROM_OTHER)]
        d = evaluate(policies, request())
        self.assertEqual((d.allowed, d.policy, d.reason), (False, None, "no ALLOW policy matched"))
        self.assertTrue(evaluate(policies, request(source_principal=OTHER)).allowed)

    def test_any_allow_policy(self) -> None:
        policies = [policy("a", ALLOW, FROM_OTHER), policy("b", ALLOW, GET_ADMIN)]
        d = evaluate(policies, request(path="/admin"))
        self.assertEqual((d.allowed, d.policy), (True, "foo/b"))

    def test_allow_nothing(self) -> None:
        """
        An ALLOW policy without rules (C{spec: {}}) matches nothing: with it,
        every request is denied.
        """
        d = evaluate([policy("allow-nothing", ALLOW)], request())
        self.assertFalse(d.allowed)
        # ... but another ALLOW policy can still allow.
        self.assertTrue(evaluate([policy("allow-nothing"), policy("allow-all", ALLOW, Rule())], request()).allowed)

    def test_allow_all(self) -> None:
        """
        C{rules: [{}]} matches every request.
        """
        self.assertTrue(evaluate([policy("allow-all", ALLOW, Rule())], RequestAttributes()).allowed)

    def test_deny_without_rules_never_matches(self) -> None:
        self.assertTrue(evaluate([policy("deny-nothing", DENY)], request()).allowed)

    def test_deny_all(self) -> None:
        self.assertFalse(evaluate([policy("deny-all", DENY, Rule())], request()).allowed)

    def test_audit_never_decides(self) -> None:
        audit = policy("audit-admin", AUDIT, GET_ADMIN)
        d = evaluate([audit], request(path="/admin"))
        self.assertEqual(d, Decision(True, None, None, True, "foo/audit-admin", "no ALLOW policy applies"))
        d = evaluate([audit, policy("deny-admin", DENY, GET_ADMIN)], request(path="/admin"))
        self.assertEqual((d.allowed, d.audited, d.audit_policy, d.policy), (False, True, "foo/audit-admin",
                                                                             "foo/deny-admin"))
        d = evaluate([audit, policy("allow-other", ALLOW, FROM_OTHER)], request(path="/info"))
        self.assertEqual((d.allowed, d.audited), (False, False))
        # An AUDIT policy is not an ALLOW policy: it does not make ALLOW-less
        # workloads deny by default.
        self.assertTrue(evaluate([audit], request(path="/info")).allowed)

    def test_issue_example(self) -> None:
        """
        A policy denying C{GET /admin} from namespace C{other}.
        """
        deny = policy("deny-admin", DENY, Rule(sources=[Source(namespaces=["other"])],
                                               operations=[Operation(methods=["GET"], paths=["/admin"])]))
        self.assertFalse(evaluate([deny], request(source_principal=OTHER, path="/admin")).allowed)
        self.assertTrue(evaluate([deny], request(source_principal=OTHER, path="/info")).allowed)
        self.assertTrue(evaluate([deny], request(source_principal=OTHER, method="POST", path="/admin")).allowed)
        self.assertTrue(evaluate([deny], request(path="/admin")).allowed)
        self.assertTrue(evaluate([deny], request(source_principal=None, path="/admin")).allowed)

    def test_policy_validation(self) -> None:
        self.assertRaises(ValueError, Policy, "p", "ns", "CUSTOM")
        self.assertEqual(Policy("p", "ns", selector={"b": "2", "a": "1"}).selector, (("a", "1"), ("b", "2")))
        self.assertEqual(Policy("p", "ns").key, "ns/p")
