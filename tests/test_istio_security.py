"""
Tests for L{txmesh.policy.istio_security}: Istio AuthorizationPolicy,
PeerAuthentication and RequestAuthentication documents, scoping to
workloads, the native forms, and errors that name the field.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import ConfigError
from txmesh.policy.authorization import ALLOW, AUDIT, DENY, Operation, Policy, RequestAttributes, Rule, Source, evaluate
from txmesh.policy.istio_security import (
    PeerAuthentication,
    RequestAuthentication,
    from_native,
    is_authorization_policy,
    jwt_rules_for,
    mtls_mode,
    parse_authorization_policies,
    parse_authorization_policy,
    parse_peer_authentications,
    parse_request_authentications,
    policies_for,
    request_authentications_for,
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


# --- PeerAuthentication and RequestAuthentication ------------------------------


def security(kind: str, name: str, namespace: str | None, spec: Any, version: str = "security.istio.io/v1"
             ) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": version, "kind": kind, "metadata": metadata, "spec": spec}


def pa(name: str, namespace: str | None, mode: str | None = None, selector: dict[str, str] | None = None,
       ports: dict[Any, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    return security("PeerAuthentication", name, namespace, spec)


def ra(name: str, namespace: str | None, *rules: dict[str, Any], selector: dict[str, str] | None = None
       ) -> dict[str, Any]:
    spec: dict[str, Any] = {"jwtRules": list(rules)}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    return security("RequestAuthentication", name, namespace, spec)


def numbered(*documents: Any) -> list[tuple[str, int, Any]]:
    return [("sec.yaml", i, d) for i, d in enumerate(documents, start=1)]


WEB = {"app": "web", "version": "v1"}

# name: (documents, namespace, labels, port, expected mode)
MTLS_CASES: dict[str, tuple[list[Any], str, dict[str, str], int | None, str]] = {
    "default_permissive": ([], "foo", WEB, 8080, "PERMISSIVE"),
    "mesh": ([pa("default", "istio-system", "STRICT")], "foo", WEB, 8080, "STRICT"),
    "namespace_over_mesh": ([pa("default", "istio-system", "STRICT"), pa("default", "foo", "PERMISSIVE")],
                            "foo", WEB, 8080, "PERMISSIVE"),
    "namespace_unset_inherits": ([pa("default", "istio-system", "STRICT"), pa("default", "foo", "UNSET")],
                                 "foo", WEB, 8080, "STRICT"),
    "namespace_no_mtls_inherits": ([pa("default", "istio-system", "STRICT"), pa("default", "foo")],
                                   "foo", WEB, 8080, "STRICT"),
    "mesh_unset_is_permissive": ([pa("default", "istio-system", "UNSET")], "foo", WEB, 8080, "PERMISSIVE"),
    "namespace_disable": ([pa("default", "foo", "DISABLE")], "foo", WEB, 8080, "DISABLE"),
    "other_namespace": ([pa("default", "bar", "STRICT")], "foo", WEB, 8080, "PERMISSIVE"),
    "workload_over_namespace": ([pa("default", "foo", "DISABLE"), pa("web", "foo", "STRICT", {"app": "web"})],
                                "foo", WEB, 8080, "STRICT"),
    "workload_not_selected": ([pa("default", "foo", "DISABLE"), pa("db", "foo", "STRICT", {"app": "db"})],
                              "foo", WEB, 8080, "DISABLE"),
    "workload_in_other_namespace": ([pa("web", "bar", "STRICT", {"app": "web"})], "foo", WEB, 8080, "PERMISSIVE"),
    "workload_unset_inherits": ([pa("default", "foo", "STRICT"), pa("web", "foo", "UNSET", {"app": "web"})],
                                "foo", WEB, 8080, "STRICT"),
    "port_level": ([pa("web", "foo", "STRICT", {"app": "web"}, {8080: "DISABLE"})], "foo", WEB, 8080, "DISABLE"),
    "port_level_string_key": ([pa("web", "foo", "STRICT", {"app": "web"}, {"8080": "PERMISSIVE"})],
                              "foo", WEB, 8080, "PERMISSIVE"),
    "port_level_other_port": ([pa("web", "foo", "STRICT", {"app": "web"}, {9090: "DISABLE"})],
                              "foo", WEB, 8080, "STRICT"),
    "port_level_unset": ([pa("default", "istio-system", "STRICT"),
                          pa("web", "foo", None, {"app": "web"}, {8080: "UNSET"})], "foo", WEB, 8080, "STRICT"),
    "port_level_over_inherited": ([pa("default", "foo", "STRICT"),
                                   pa("web", "foo", "UNSET", {"app": "web"}, {8080: "PERMISSIVE"})],
                                  "foo", WEB, 8080, "PERMISSIVE"),
    "no_port": ([pa("web", "foo", "STRICT", {"app": "web"}, {8080: "DISABLE"})], "foo", WEB, None, "STRICT"),
    "root_selector_not_mesh_wide": ([pa("web", "istio-system", "STRICT", {"app": "web"})], "foo", WEB, 8080,
                                    "PERMISSIVE"),
    "empty_selector_is_namespace_wide": ([pa("all", "foo", "STRICT", {})], "foo", {}, 8080, "STRICT"),
    "oldest_namespace_wins": ([pa("a", "foo", "STRICT"), pa("b", "foo", "DISABLE")], "foo", WEB, 8080, "STRICT"),
    "oldest_workload_wins": ([pa("a", "foo", "DISABLE", {"app": "web"}), pa("b", "foo", "STRICT", {"app": "web"})],
                             "foo", WEB, 8080, "DISABLE"),
    "update_keeps_age": ([pa("a", "foo", "STRICT"), pa("b", "foo", "DISABLE"), pa("a", "foo", "PERMISSIVE")],
                         "foo", WEB, 8080, "PERMISSIVE"),
    "no_namespace_takes_default": ([pa("default", None, "STRICT")], "foo", WEB, 8080, "STRICT"),
}


class PeerAuthenticationTests(SynchronousTestCase):
    """
    PeerAuthentication documents and L{mtls_mode}'s precedence: workload
    over namespace over mesh, C{UNSET} inheriting, port level over all.
    """

    def test_table(self) -> None:
        for name, (documents, namespace, labels, port, expected) in MTLS_CASES.items():
            parsed = parse_peer_authentications(numbered(*documents), namespace="foo")
            self.assertEqual(mtls_mode(parsed, namespace, labels, port), expected, name)

    def test_parse(self) -> None:
        [parsed] = parse_peer_authentications(numbered(
            pa("web", "foo", "STRICT", {"version": "v1", "app": "web"}, {"8080": "DISABLE", 9090: "UNSET"})))
        self.assertEqual(parsed, PeerAuthentication("web", "foo", "STRICT", ((8080, "DISABLE"), (9090, "UNSET")),
                                                    (("app", "web"), ("version", "v1"))))

    def test_both_versions_and_other_kinds(self) -> None:
        beta = pa("a", "foo", "STRICT")
        beta["apiVersion"] = "security.istio.io/v1beta1"
        documents = numbered(beta, security("AuthorizationPolicy", "x", "foo", {}), None,
                             {"apiVersion": "networking.istio.io/v1", "kind": "PeerAuthentication"})
        self.assertEqual([p.mode for p in parse_peer_authentications(documents)], ["STRICT"])

    def test_root_namespace(self) -> None:
        parsed = parse_peer_authentications(numbered(pa("default", "mesh-root", "STRICT")))
        self.assertEqual(mtls_mode(parsed, "foo", {}, 80, root_namespace="mesh-root"), "STRICT")
        self.assertEqual(mtls_mode(parsed, "foo", {}, 80), "PERMISSIVE")


REQUEST_AUTH_ERRORS: dict[str, tuple[Any, str, str]] = {
    "pa_mode": (pa("a", "foo", "ON"), "spec.mtls.mode", "must be one of UNSET, DISABLE, PERMISSIVE, STRICT"),
    "pa_unknown": (security("PeerAuthentication", "a", "foo", {"mtls": {"mode": "STRICT", "x": 1}}),
                   "spec.mtls.x", "unknown field"),
    "pa_port_without_selector": (pa("a", "foo", "STRICT", ports={8080: "DISABLE"}), "spec.portLevelMtls",
                                 "needs a workload selector"),
    "pa_port_number": (pa("a", "foo", "STRICT", {"app": "web"}, {"http": "DISABLE"}), "spec.portLevelMtls.http",
                       "expected a port number"),
    "pa_port_mode": (pa("a", "foo", "STRICT", {"app": "web"}, {8080: "OFF"}), "spec.portLevelMtls.8080.mode",
                     "must be one of"),
    "pa_selector": (security("PeerAuthentication", "a", "foo", {"selector": {"matchLabels": {"app": 1}}}),
                    "spec.selector.matchLabels", "values must be strings"),
    "pa_version": (security("PeerAuthentication", "a", "foo", {}, version="security.istio.io/v2"),
                   "apiVersion", "unsupported apiVersion"),
    "pa_target_ref": (security("PeerAuthentication", "a", "foo", {"targetRef": {"kind": "Gateway"}}),
                      "spec.targetRef", "unknown field"),
    "ra_no_issuer": (ra("a", "foo", {"jwksUri": "https://x/jwks"}), "spec.jwtRules[0].issuer", "is required"),
    "ra_discovery": (ra("a", "foo", {"issuer": "https://x"}), "spec.jwtRules[0]", "give exactly one of"),
    "ra_both_sources": (ra("a", "foo", {"issuer": "https://x", "jwksUri": "https://x/j", "jwks": "{}"}),
                        "spec.jwtRules[0]", "give exactly one of"),
    "ra_uri_scheme": (ra("a", "foo", {"issuer": "i", "jwksUri": "ftp://x/j"}), "spec.jwtRules[0].jwksUri",
                      "http:// or https://"),
    "ra_bad_jwks": (ra("a", "foo", {"issuer": "i", "jwks": "not json"}), "spec.jwtRules[0].jwks", ""),
    "ra_cookies": (ra("a", "foo", {"issuer": "i", "jwksUri": "https://x/j", "fromCookies": ["t"]}),
                   "spec.jwtRules[0].fromCookies", "not supported"),
    "ra_timeout": (ra("a", "foo", {"issuer": "i", "jwksUri": "https://x/j", "timeout": "1s"}),
                   "spec.jwtRules[0].timeout", "not supported"),
    "ra_header": (ra("a", "foo", {"issuer": "i", "jwksUri": "https://x/j", "fromHeaders": [{"prefix": "B "}]}),
                  "spec.jwtRules[0].fromHeaders[0].name", "is required"),
    "ra_claim": (ra("a", "foo", {"issuer": "i", "jwksUri": "https://x/j",
                                 "outputClaimToHeaders": [{"header": "x-sub"}]}),
                 "spec.jwtRules[0].outputClaimToHeaders[0].claim", "is required"),
    "ra_forward": (ra("a", "foo", {"issuer": "i", "jwksUri": "https://x/j", "forwardOriginalToken": "yes"}),
                   "spec.jwtRules[0].forwardOriginalToken", "true or false"),
    "ra_unknown": (ra("a", "foo", {"issuer": "i", "jwksUri": "https://x/j", "jwksURI": "x"}),
                   "spec.jwtRules[0].jwksURI", "unknown field"),
    "ra_target_refs": (security("RequestAuthentication", "a", "foo", {"targetRefs": [{"kind": "Gateway"}]}),
                       "spec.targetRefs", "Gateway API"),
}


class SecurityErrorTests(SynchronousTestCase):
    """
    Invalid PeerAuthentication and RequestAuthentication documents are
    L{ConfigError}s naming the file, the document and the field.
    """

    def test_table(self) -> None:
        for name, (document, field, reason) in REQUEST_AUTH_ERRORS.items():
            parse = parse_peer_authentications if name.startswith("pa_") else parse_request_authentications
            with self.assertRaises(ConfigError, msg=name) as cm:
                parse(numbered(None, document))
            self.assertEqual((cm.exception.source, cm.exception.document, cm.exception.field),
                             ("sec.yaml", 2, field), name)
            self.assertIn(reason, cm.exception.reason, name)


FULL_RULE = {
    "issuer": "https://issuer.example.com",
    "audiences": ["bookstore"],
    "jwksUri": "https://issuer.example.com/jwks.json",
    "fromHeaders": [{"name": "x-jwt", "prefix": "Bearer "}, {"name": "x-raw"}],
    "fromParams": ["token"],
    "outputPayloadToHeader": "x-jwt-payload",
    "outputClaimToHeaders": [{"header": "x-jwt-sub", "claim": "sub"}],
    "forwardOriginalToken": True,
}
FULL_NATIVE = {
    "issuer": "https://issuer.example.com",
    "audiences": ["bookstore"],
    "jwks_uri": "https://issuer.example.com/jwks.json",
    "from_headers": [{"name": "x-jwt", "prefix": "Bearer "}, {"name": "x-raw"}],
    "from_params": ["token"],
    "output_payload_to_header": "x-jwt-payload",
    "output_claim_to_headers": [{"header": "x-jwt-sub", "claim": "sub"}],
    "forward_original_token": True,
}


class RequestAuthenticationTests(SynchronousTestCase):
    """
    RequestAuthentication C{jwtRules} in the jwt filter's native form,
    scoped to workloads as authorization policies are.
    """

    def test_full_rule(self) -> None:
        [parsed] = parse_request_authentications(numbered(ra("jwt", "foo", FULL_RULE, selector={"app": "web"})))
        self.assertEqual(parsed, RequestAuthentication("jwt", "foo", (FULL_NATIVE,), (("app", "web"),)))

    def test_native_rules_load(self) -> None:
        """
        The rules are what the jwt filter's C{parse_config} takes, inline
        key sets included.
        """
        from tests.test_jwt import default_jwks
        from txmesh.filters.jwt_authn import JwtAuthnFactory

        inline = {"issuer": "https://other.example.com", "jwks": json.dumps(default_jwks())}
        rules = jwt_rules_for(parse_request_authentications(numbered(ra("jwt", "foo", FULL_RULE, inline))),
                              "foo", {})
        self.assertEqual(rules[0], FULL_NATIVE)
        self.assertEqual(rules[1], {"issuer": "https://other.example.com", "jwks": inline["jwks"]})
        config = JwtAuthnFactory().parse_config(json.loads(json.dumps({"rules": rules})))
        self.assertEqual([r.rule.issuer for r in config.rules], ["https://issuer.example.com",
                                                                  "https://other.example.com"])
        self.assertTrue(config.rules[0].rule.forward_original_token)

    def test_minimal_and_deprecated_uri(self) -> None:
        [parsed] = parse_request_authentications(numbered(ra("jwt", None, {"issuer": "i", "jwks_uri": "http://k"})))
        self.assertEqual((parsed.namespace, parsed.rules), ("default", ({"issuer": "i", "jwks_uri": "http://k"},)))

    def test_scope(self) -> None:
        rule = {"issuer": "i", "jwksUri": "https://k"}
        documents = numbered(
            ra("mesh", "istio-system", dict(rule, issuer="mesh")),
            ra("ns", "foo", dict(rule, issuer="ns")),
            ra("web", "foo", dict(rule, issuer="web"), selector={"app": "web"}),
            ra("db", "foo", dict(rule, issuer="db"), selector={"app": "db"}),
            ra("bar", "bar", dict(rule, issuer="bar")),
            ra("none", "foo"),
        )
        parsed = parse_request_authentications(documents)
        self.assertEqual([r["issuer"] for r in jwt_rules_for(parsed, "foo", WEB)], ["mesh", "ns", "web"])
        self.assertEqual([r["issuer"] for r in jwt_rules_for(parsed, "bar", WEB)], ["mesh", "bar"])
        self.assertEqual([r.name for r in request_authentications_for(parsed, "foo", {"app": "db"})],
                         ["mesh", "ns", "db", "none"])
