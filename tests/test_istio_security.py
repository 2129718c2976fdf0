"""
Tests for L{txmesh.policy.istio_security}: Istio AuthorizationPolicy
documents, scoping to workloads, the native form, and errors that name
the field.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import ConfigError
from txmesh.policy.authorization import ALLOW, AUDIT, DENY, Operation, Policy, RequestAttributes, Rule, Source, evaluate
from txmesh.policy.istio_security import (
    from_native,
    is_authorization_policy,
    parse_authorization_policies,
    parse_authorization_policy,
    policies_for,
    to_native,
)

HTTPBIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
  labels: {team: web}
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
        notIpBlocks: ["203.0.113.0/24"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
        ports: ["8000"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
    - key: request.headers[x-tenant]
      notValues: ["evil"]
"""


def doc(text: str) -> Any:
    return yaml.safe_load(text)


def spec_doc(spec: Any, name: str = "p", namespace: str | None = "foo",
             api: str = "security.istio.io/v1beta1") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    body: dict[str, Any] = {"apiVersion": api, "kind": "AuthorizationPolicy", "metadata": meta}
    if spec is not ...:
        body["spec"] = spec
    return body


class ParseTests(SynchronousTestCase):
    def test_full_document(self) -> None:
        p = parse_authorization_policy(doc(HTTPBIN), "policies.yaml", 1)
        self.assertEqual((p.name, p.namespace, p.action), ("httpbin", "foo", ALLOW))
        self.assertEqual(p.selector, (("app", "httpbin"), ("version", "v1")))
        self.assertEqual(len(p.rules), 1)
        rule = p.rules[0]
        self.assertEqual(rule.sources[0], Source(principals=["cluster.local/ns/default/sa/sleep"]))
        self.assertEqual(rule.sources[1], Source(namespaces=["test"], not_ip_blocks=["203.0.113.0/24"]))
        self.assertEqual(rule.operations[1], Operation(methods=["POST"], paths=["/data"], ports=[8000]))
        self.assertEqual([c.key for c in rule.conditions], ["request.auth.claims[iss]", "request.headers[x-tenant]"])
        self.assertEqual(rule.conditions[1].not_values, ("evil",))
        r = RequestAttributes(source_principal="spiffe://cluster.local/ns/default/sa/sleep", method="GET",
                              path="/info/x", claims={"iss": "https://accounts.google.com"})
        self.assertTrue(evaluate([p], r).allowed)
        self.assertFalse(evaluate([p], RequestAttributes(method="GET", path="/info")).allowed)

    def test_defaults(self) -> None:
        p = parse_authorization_policy(spec_doc({"rules": [{}]}, namespace=None), namespace="bar")
        self.assertEqual((p.namespace, p.action, p.selector, p.rules), ("bar", ALLOW, None, (Rule(),)))

    def test_both_versions(self) -> None:
        for api in ("security.istio.io/v1", "security.istio.io/v1beta1"):
            self.assertEqual(parse_authorization_policy(spec_doc({"action": "DENY"}, api=api)).action, DENY)

    def test_audit(self) -> None:
        self.assertEqual(parse_authorization_policy(spec_doc({"action": "AUDIT", "rules": [{}]})).action, AUDIT)

    def test_allow_nothing_forms(self) -> None:
        """
        C{spec: {}}, an absent spec and C{rules: []} are Istio's allow-nothing;
        C{rules: [{}]} is allow-all.
        """
        r = RequestAttributes(method="GET", path="/")
        for spec in ({}, ..., None, {"rules": []}, {"action": "ALLOW"}):
            p = parse_authorization_policy(spec_doc(spec))
            self.assertEqual(p.rules, ())
            self.assertFalse(evaluate([p], r).allowed, spec)
        p = parse_authorization_policy(spec_doc({"rules": [{}]}))
        self.assertTrue(evaluate([p], r).allowed)

    def test_several_documents(self) -> None:
        docs = [
            ("a.yaml", 1, doc(HTTPBIN)),
            ("a.yaml", 2, {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService"}),
            ("a.yaml", 3, None),
            ("b.yaml", 1, spec_doc({"action": "DENY"}, name="httpbin")),
            ("b.yaml", 2, spec_doc({}, name="other", namespace=None)),
        ]
        policies = parse_authorization_policies(docs, namespace="bar")
        self.assertEqual([(p.key, p.action) for p in policies], [("foo/httpbin", DENY), ("bar/other", ALLOW)])

    def test_is_authorization_policy(self) -> None:
        self.assertTrue(is_authorization_policy(doc(HTTPBIN)))
        self.assertFalse(is_authorization_policy({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication"}))
        self.assertFalse(is_authorization_policy({"apiVersion": "networking.istio.io/v1", "kind": "AuthorizationPolicy"}))
        self.assertFalse(is_authorization_policy(None))


class ErrorTests(SynchronousTestCase):
    """
    Errors name the file, the document and the field.
    """

    def assertError(self, spec: Any, field: str, reason: str, body: Any = None) -> ConfigError:
        body = spec_doc(spec) if body is None else body
        e = self.assertRaises(ConfigError, parse_authorization_policy, body, "authz.yaml", 3)
        self.assertEqual(e.field, field)
        self.assertIn(reason, e.reason)
        self.assertEqual((e.source, e.document), ("authz.yaml", 3))
        return e

    def test_ip_block(self) -> None:
        e = self.assertError({"rules": [{"from": [{"source": {"namespaces": ["a"]}},
                                                   {"source": {"ipBlocks": ["10.0.0.0/8", "10.0.0.300"]}}]}]},
                             "spec.rules[0].from[1].source.ipBlocks[1]", "not an IP address or CIDR range")
        self.assertTrue(str(e).startswith("authz.yaml: document 3: spec.rules[0].from[1].source.ipBlocks[1]: "))

    def test_fields(self) -> None:
        cases = [
            ({"action": "CUSTOM", "provider": {"name": "ext"}}, "spec.action", "CUSTOM"),
            ({"action": "DENY", "provider": {"name": "ext"}}, "spec.provider", "not supported"),
            ({"action": "deny"}, "spec.action", "must be one of ALLOW, DENY, AUDIT"),
            ({"targetRefs": [{"kind": "Gateway", "name": "gw"}]}, "spec.targetRefs", "not supported"),
            ({"selector": {"matchLabels": {"app": 1}}}, "spec.selector.matchLabels", "quote them"),
            ({"selector": {"labels": {}}}, "spec.selector.labels", "unknown field"),
            ({"rules": {}}, "spec.rules", "expected a list"),
            ({"rules": [{"form": []}]}, "spec.rules[0].form", "unknown field"),
            ({"rules": [{"from": [{}]}]}, "spec.rules[0].from[0].source", "is required"),
            ({"rules": [{"from": [{"source": {}}]}]}, "spec.rules[0].from[0].source", "must not be empty"),
            ({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}, "spec.rules[0].from[0].source.principal",
             "unknown field"),
            ({"rules": [{"from": [{"source": {"principals": "x"}}]}]}, "spec.rules[0].from[0].source.principals",
             "expected a list"),
            ({"rules": [{"from": [{"source": {"principals": ["a*b"]}}]}]},
             "spec.rules[0].from[0].source.principals[0]", "'*' may only"),
            ({"rules": [{"to": [{"operation": {"ports": ["80", "http"]}}]}]},
             "spec.rules[0].to[0].operation.ports[1]", "port number"),
            ({"rules": [{"to": [{"operation": {"paths": [""]}}]}]},
             "spec.rules[0].to[0].operation.paths[0]", "non-empty string"),
            ({"rules": [{"to": [{"operation": {}}]}]}, "spec.rules[0].to[0].operation", "must not be empty"),
            ({"rules": [{"when": [{"key": "destination.ip", "values": ["1.2.3.4"]}]}]},
             "spec.rules[0].when[0].key", "unsupported condition key"),
            ({"rules": [{"when": [{"values": ["x"]}]}]}, "spec.rules[0].when[0].key", "is required"),
            ({"rules": [{"when": [{"key": "source.ip"}]}]}, "spec.rules[0].when[0]", "values or notValues"),
            ({"rules": [{"when": [{"key": "source.ip", "notValues": ["x"]}]}]},
             "spec.rules[0].when[0].notValues[0]", "not an IP address"),
            ({"rules": [{"when": [{"key": "destination.port", "values": ["99999"]}]}]},
             "spec.rules[0].when[0].values[0]", "port number"),
        ]
        for spec, field, reason in cases:
            self.assertError(spec, field, reason)

    def test_document(self) -> None:
        self.assertError(None, "apiVersion", "unsupported apiVersion",
                         body=spec_doc({}, api="security.istio.io/v1alpha1"))
        self.assertError(None, "metadata.name", "is required",
                         body={"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {}})
        self.assertError(None, "metadata", "is required",
                         body={"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy"})
        self.assertError(None, "", "expected a mapping", body=["x"])
        self.assertError(None, "spec", "expected a mapping", body=spec_doc(["x"]))


def P(name: str, namespace: str, selector: dict[str, str] | None = None) -> Policy:
    return Policy(name, namespace, ALLOW, (Rule(),), selector)


class ScopeTests(SynchronousTestCase):
    """
    L{policies_for}: mesh-wide, namespace-wide and workload policies.
    """

    POLICIES = [
        P("mesh", "istio-system"),
        P("mesh-web", "istio-system", {"app": "web"}),
        P("ns", "foo"),
        P("web", "foo", {"app": "web"}),
        P("web-v2", "foo", {"app": "web", "version": "v2"}),
        P("empty-selector", "foo", {}),
        P("bar", "bar"),
        P("bar-web", "bar", {"app": "web"}),
    ]

    def names(self, namespace: str, labels: dict[str, str], root: str = "istio-system") -> list[str]:
        return [p.key for p in policies_for(self.POLICIES, namespace, labels, root)]

    def test_web_in_foo(self) -> None:
        self.assertEqual(self.names("foo", {"app": "web", "version": "v1"}),
                         ["istio-system/mesh", "istio-system/mesh-web", "foo/ns", "foo/web", "foo/empty-selector"])

    def test_web_v2(self) -> None:
        self.assertIn("foo/web-v2", self.names("foo", {"app": "web", "version": "v2"}))

    def test_other_workload(self) -> None:
        self.assertEqual(self.names("foo", {"app": "db"}), ["istio-system/mesh", "foo/ns", "foo/empty-selector"])

    def test_other_namespace(self) -> None:
        self.assertEqual(self.names("bar", {"app": "web"}),
                         ["istio-system/mesh", "istio-system/mesh-web", "bar/bar", "bar/bar-web"])
        self.assertEqual(self.names("baz", {}), ["istio-system/mesh"])

    def test_root_namespace(self) -> None:
        self.assertEqual(self.names("baz", {}, root="foo"), ["foo/ns", "foo/empty-selector"])


class NativeTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        p = parse_authorization_policy(doc(HTTPBIN))
        native = to_native(p)
        self.assertEqual(json.loads(json.dumps(native)), native)
        self.assertEqual(from_native(native), p)
        self.assertEqual(native["name"], "httpbin")
        self.assertEqual(native["selector"], {"app": "httpbin", "version": "v1"})
        self.assertEqual(native["rules"][0]["to"][1], {"operation": {"ports": ["8000"], "methods": ["POST"],
                                                                     "paths": ["/data"]}})
        self.assertEqual(native["rules"][0]["when"][1], {"key": "request.headers[x-tenant]", "notValues": ["evil"]})
        self.assertEqual(native["rules"][0]["from"][1]["source"]["notIpBlocks"], ["203.0.113.0/24"])

    def test_round_trip_every_field(self) -> None:
        rule = Rule(
            sources=[Source(principals=["a"], not_principals=["b"], request_principals=["c"],
                            not_request_principals=["d"], namespaces=["e"], not_namespaces=["f"],
                            ip_blocks=["10.0.0.0/8"], not_ip_blocks=["10.1.0.0/16"],
                            remote_ip_blocks=["::1"], not_remote_ip_blocks=["192.0.2.0/24"])],
            operations=[Operation(hosts=["h"], not_hosts=["i"], ports=[1], not_ports=[2], methods=["GET"],
                                  not_methods=["PUT"], paths=["/a*"], not_paths=["*/b"])],
        )
        for p in (Policy("p", "ns", DENY, (rule, Rule())), Policy("q", "ns"), Policy("r", "ns", AUDIT, (), {})):
            self.assertEqual(from_native(json.loads(json.dumps(to_native(p)))), p)

    def test_minimal(self) -> None:
        self.assertEqual(from_native({"name": "p"}), Policy("p", "default", ALLOW, ()))

    def test_errors(self) -> None:
        e = self.assertRaises(ConfigError, from_native,
                              {"name": "p", "rules": [{"to": [{"operation": {"ports": ["x"]}}]}]},
                              "proxy.yaml", "policies[2]")
        self.assertEqual(e.field, "policies[2].rules[0].to[0].operation.ports[0]")
        self.assertEqual(e.source, "proxy.yaml")
        self.assertIsNone(e.document)
        e = self.assertRaises(ConfigError, from_native, {"rules": []})
        self.assertEqual(e.field, "name")
        e = self.assertRaises(ConfigError, from_native, {"name": "p", "spec": {}})
        self.assertEqual(e.field, "spec")
        e = self.assertRaises(ConfigError, from_native, {"name": "p", "action": "CUSTOM"})
        self.assertEqual(e.field, "action")
