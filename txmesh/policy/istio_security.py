"""
Istio C{security.istio.io} documents translated into txmesh models, pure:
plain values in, plain values out.  C{AuthorizationPolicy} becomes
L{txmesh.policy.authorization} policies; C{PeerAuthentication} a listener's
C{mtls} mode (L{mtls_mode}); C{RequestAuthentication} the C{jwt} filter's
rules (L{jwt_rules_for}).

Also the policies' native form: the same shape as an Istio policy's
C{spec}, flattened with its name and namespace, which the pilot pushes to
proxies and a proxy's YAML config may carry (the C{authz} filter's
C{policies})::

    {"name": "deny-admin", "namespace": "web", "action": "DENY",
     "selector": {"app": "web"},
     "rules": [{"from": [{"source": {"namespaces": ["other"]}}],
                "to": [{"operation": {"methods": ["GET"], "paths": ["/admin*"]}}],
                "when": [{"key": "request.headers[x-tenant]", "values": ["evil"]}]}]}

Every problem is a L{ConfigError} naming the file, the document and the
field path, e.g. C{spec.rules[0].from[1].source.ipBlocks[0]}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs

from txmesh.config.errors import ConfigError
from txmesh.policy.authorization import (
    ACTIONS,
    ALLOW,
    Condition,
    Operation,
    Policy,
    Rule,
    Source,
    condition_key,
    condition_value,
    ip_block,
    pattern,
    port,
)

__all__ = [
    "API_VERSIONS",
    "KIND",
    "MTLS_MODES",
    "PEER_AUTHENTICATION",
    "REQUEST_AUTHENTICATION",
    "PeerAuthentication",
    "RequestAuthentication",
    "from_native",
    "is_authorization_policy",
    "jwt_rules_for",
    "mtls_mode",
    "parse_authorization_policies",
    "parse_authorization_policy",
    "parse_peer_authentications",
    "parse_request_authentications",
    "policies_for",
    "request_authentications_for",
    "to_native",
]

T = TypeVar("T")

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
KIND = "AuthorizationPolicy"

# Istio field name -> (Source/Operation attribute, reader of one value).
_SOURCE_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "principals": ("principals", pattern),
    "notPrincipals": ("not_principals", pattern),
    "requestPrincipals": ("request_principals", pattern),
    "notRequestPrincipals": ("not_request_principals", pattern),
    "namespaces": ("namespaces", pattern),
    "notNamespaces": ("not_namespaces", pattern),
    "ipBlocks": ("ip_blocks", ip_block),
    "notIpBlocks": ("not_ip_blocks", ip_block),
    "remoteIpBlocks": ("remote_ip_blocks", ip_block),
    "notRemoteIpBlocks": ("not_remote_ip_blocks", ip_block),
}
_OPERATION_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "hosts": ("hosts", pattern),
    "notHosts": ("not_hosts", pattern),
    "ports": ("ports", port),
    "notPorts": ("not_ports", port),
    "methods": ("methods", pattern),
    "notMethods": ("not_methods", pattern),
    "paths": ("paths", pattern),
    "notPaths": ("not_paths", pattern),
}
_NATIVE_FIELDS = ("name", "namespace", "action", "selector", "rules")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "nothing"}.get(type(value), type(value).__name__)


class _Obj:
    """
    A mapping being read, with its field path for messages; unknown keys
    are errors.
    """

    def __init__(self, source: str | None, document: int | None, path: str, value: Any,
                 fields: Iterable[str]):
        self.source = source
        self.document = document
        self.path = path
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected a mapping, got {_kind(value)}")
        self.value = value
        known = set(fields)
        for key in value:
            if key not in known:
                raise self.error(self.field(str(key)), f"unknown field (known: {', '.join(sorted(known))})")

    def error(self, field: str, reason: str) -> ConfigError:
        return ConfigError(self.source, field, reason, document=self.document)

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def child(self, key: str, value: Any, fields: Iterable[str], path: str | None = None) -> _Obj:
        return _Obj(self.source, self.document, path or self.field(key), value, fields)

    def get(self, key: str, convert: Callable[[Any], T], default: Any = None, required: bool = False) -> T:
        value = self.value.get(key)
        if value is None:
            if required:
                raise self.error(self.field(key), "is required")
            return default
        try:
            return convert(value)
        except (ValueError, TypeError) as e:
            raise self.error(self.field(key), str(e)) from None

    def items(self, key: str) -> list[tuple[str, Any]]:
        value = self.value.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(self.field(key), f"expected a list, got {_kind(value)}")
        return [(f"{self.field(key)}[{i}]", v) for i, v in enumerate(value)]

    def values(self, key: str, convert: Callable[[Any], T]) -> tuple[T, ...]:
        out = []
        for path, v in self.items(key):
            try:
                out.append(convert(v))
            except (ValueError, TypeError) as e:
                raise self.error(path, str(e)) from None
        return tuple(out)


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_kind(value)}")
    return value


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of label name to value, got {_kind(value)}")
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"label names must be non-empty strings, got {k!r}")
        if not isinstance(v, str):
            raise ValueError(f"label {k!r}: values must be strings (quote them), got {_kind(v)}")
    return dict(value)


def _action(value: Any) -> str:
    if value == "CUSTOM":
        raise ValueError("action CUSTOM (an external authorizer) is not supported by txmesh; "
                         f"use one of {', '.join(ACTIONS)}")
    if value not in ACTIONS:
        raise ValueError(f"must be one of {', '.join(ACTIONS)}, got {value!r}")
    return value


def _part(parent: _Obj, path: str, value: Any, wrapper: str,
          fields: dict[str, tuple[str, Callable[[Any], Any]]], make: Callable[..., T]) -> T:
    outer = parent.child("", value, (wrapper,), path=path)
    if outer.value.get(wrapper) is None:
        raise outer.error(outer.field(wrapper), "is required")
    inner = outer.child(wrapper, outer.value[wrapper], fields)
    kwargs = {attr: inner.values(name, read) for name, (attr, read) in fields.items()}
    if not any(kwargs.values()):
        raise inner.error(inner.path, f"must not be empty (give at least one of: {', '.join(fields)})")
    return make(**kwargs)


def _condition(parent: _Obj, path: str, value: Any) -> Condition:
    o = parent.child("", value, ("key", "values", "notValues"), path=path)
    key = o.get("key", condition_key, required=True)
    values = o.values("values", lambda v: condition_value(key, v))
    not_values = o.values("notValues", lambda v: condition_value(key, v))
    if not values and not not_values:
        raise o.error(o.path, "give values or notValues")
    return Condition(key, values, not_values)


def _rules(o: _Obj) -> tuple[Rule, ...]:
    rules = []
    for path, value in o.items("rules"):
        r = o.child("", value, ("from", "to", "when"), path=path)
        sources = tuple(_part(r, p, v, "source", _SOURCE_FIELDS, Source) for p, v in r.items("from"))
        operations = tuple(_part(r, p, v, "operation", _OPERATION_FIELDS, Operation) for p, v in r.items("to"))
        conditions = tuple(_condition(r, p, v) for p, v in r.items("when"))
        rules.append(Rule(sources, operations, conditions))
    return tuple(rules)


def is_authorization_policy(body: Any) -> bool:
    """
    @return: whether C{body} is a C{security.istio.io} AuthorizationPolicy
        document (of any version; L{parse_authorization_policy} checks it).
    """
    return (isinstance(body, Mapping) and body.get("kind") == KIND
            and str(body.get("apiVersion", "")).startswith("security.istio.io/"))


def parse_authorization_policy(body: Any, source: str | None = None, document: int | None = None,
                               namespace: str = "default") -> Policy:
    """
    Translate one Istio C{AuthorizationPolicy} document.

    @param body: the parsed YAML/JSON document.
    @param source: the file it came from, for messages.
    @param document: its number in that file (from 1), for messages.
    @param namespace: the namespace when C{metadata.namespace} is absent.
    @return: the L{Policy}; C{spec.action} defaults to C{ALLOW}.
    @raise ConfigError: naming the field, if the document is invalid or
        uses what txmesh does not support (C{CUSTOM}, C{provider},
        C{targetRef}/C{targetRefs}).
    """
    # An absent or empty spec is Istio's "allow nothing" policy.
    name, namespace, spec = _security_header(body, source, document, namespace, KIND,
                                             ("selector", "action", "rules", "provider", "targetRef", "targetRefs"))
    action = spec.get("action", _action, default=ALLOW)
    if spec.value.get("provider") is not None:
        raise spec.error(spec.field("provider"), "extension providers (action CUSTOM) are not supported by txmesh")
    selector = None
    if spec.value.get("selector") is not None:
        sel = spec.child("selector", spec.value["selector"], ("matchLabels",))
        selector = sel.get("matchLabels", _labels, default={})
    return Policy(name, namespace, action, _rules(spec), selector)


def parse_authorization_policies(documents: Iterable[tuple[str | None, int, Any]],
                                 namespace: str = "default") -> list[Policy]:
    """
    Translate the AuthorizationPolicy documents among C{documents}; other
    documents are skipped.  Of policies with the same namespace and name
    the later wins, as C{kubectl apply} of the files in order would.

    @param documents: C{(source file, document number, parsed document)}.
    @param namespace: the namespace of documents without one.
    @raise ConfigError: on the first invalid policy.
    """
    found: dict[tuple[str, str], Policy] = {}
    for source, number, body in documents:
        if not is_authorization_policy(body):
            continue
        policy = parse_authorization_policy(body, source, number, namespace)
        found.pop((policy.namespace, policy.name), None)
        found[(policy.namespace, policy.name)] = policy
    return list(found.values())


def policies_for(policies: Iterable[Policy], workload_namespace: str, workload_labels: Mapping[str, str],
                 root_namespace: str = "istio-system") -> list[Policy]:
    """
    The policies that apply to one workload, as Istio scopes them: a policy
    in the root namespace applies mesh-wide, one elsewhere to its own
    namespace; with C{selector} only to workloads carrying every label of it.

    @param workload_namespace: the workload's namespace.
    @param workload_labels: the workload's labels.
    @param root_namespace: the mesh's root (config) namespace.
    @return: the applicable policies, in their given order.
    """
    out = []
    for p in policies:
        if p.namespace not in (root_namespace, workload_namespace):
            continue
        if p.selector and any(workload_labels.get(k) != v for k, v in p.selector):
            continue
        out.append(p)
    return out


def _strings(values: Iterable[Any]) -> list[str]:
    return [str(v) for v in values]


def to_native(policy: Policy) -> dict[str, Any]:
    """
    @return: C{policy} in its native JSON-able form (see the module's
        docstring); L{from_native} reads it back.  Ports are strings, as
        Istio writes them; empty fields are left out.
    """
    rules = []
    for rule in policy.rules:
        r: dict[str, Any] = {}
        if rule.sources:
            r["from"] = [{"source": {name: _strings(getattr(s, attr)) for name, (attr, _) in _SOURCE_FIELDS.items()
                                     if getattr(s, attr)}} for s in rule.sources]
        if rule.operations:
            r["to"] = [{"operation": {name: _strings(getattr(o, attr))
                                      for name, (attr, _) in _OPERATION_FIELDS.items() if getattr(o, attr)}}
                       for o in rule.operations]
        if rule.conditions:
            r["when"] = []
            for c in rule.conditions:
                w: dict[str, Any] = {"key": c.key}
                if c.values:
                    w["values"] = _strings(c.values)
                if c.not_values:
                    w["notValues"] = _strings(c.not_values)
                r["when"].append(w)
        rules.append(r)
    native: dict[str, Any] = {"name": policy.name, "namespace": policy.namespace, "action": policy.action}
    if policy.selector is not None:
        native["selector"] = dict(policy.selector)
    native["rules"] = rules
    return native


def from_native(raw: Any, source: str | None = None, path: str = "") -> Policy:
    """
    Read a policy in its native form (see the module's docstring).

    @param raw: the mapping.
    @param source: where it came from, for messages.
    @param path: the field path of C{raw} in its document, for messages
        (e.g. C{policies[2]}).
    @raise ConfigError: naming the field, e.g. C{policies[2].rules[0].to[0].operation.ports[0]}.
    """
    o = _Obj(source, None, path, raw, _NATIVE_FIELDS)
    name = o.get("name", _string, required=True)
    namespace = o.get("namespace", _string, default="default")
    action = o.get("action", _action, default=ALLOW)
    selector = o.get("selector", _labels)
    return Policy(name, namespace, action, _rules(o), selector)


# --- PeerAuthentication and RequestAuthentication ------------------------------

PEER_AUTHENTICATION = "PeerAuthentication"
REQUEST_AUTHENTICATION = "RequestAuthentication"
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
DEFAULT_MTLS_MODE = "PERMISSIVE"

_JWT_RULE_FIELDS = ("issuer", "audiences", "jwksUri", "jwks_uri", "jwks", "fromHeaders", "fromParams",
                    "outputPayloadToHeader", "outputClaimToHeaders", "forwardOriginalToken", "fromCookies",
                    "timeout")


@attrs.frozen
class PeerAuthentication:
    """
    An Istio C{PeerAuthentication}: the mutual TLS its workloads accept.

    @ivar mode: one of L{MTLS_MODES}; C{UNSET} inherits.
    @ivar port_modes: C{(port, mode)} for the workload's own ports.
    @ivar selector: the workload labels (sorted pairs) it applies to, or
        C{None} for its whole namespace (or the mesh, in the root namespace).
    """

    name: str
    namespace: str
    mode: str = "UNSET"
    port_modes: tuple[tuple[int, str], ...] = ()
    selector: tuple[tuple[str, str], ...] | None = None


@attrs.frozen
class RequestAuthentication:
    """
    An Istio C{RequestAuthentication}.

    @ivar rules: its C{jwtRules} in the C{jwt} filter's native form (see
        L{txmesh.filters.jwt_authn}).
    @ivar selector: as L{PeerAuthentication.selector}.
    """

    name: str
    namespace: str
    rules: tuple[Mapping[str, Any], ...] = ()
    selector: tuple[tuple[str, str], ...] | None = None


def _security_header(body: Any, source: str | None, document: int | None, namespace: str, kind: str,
                     spec_fields: Iterable[str]) -> tuple[str, str, _Obj]:
    """
    Check a C{security.istio.io} document's envelope.

    @return: its name, namespace and C{spec}.
    """
    top = _Obj(source, document, "", body, ("apiVersion", "kind", "metadata", "spec", "status"))
    version = body.get("apiVersion")
    if version not in API_VERSIONS:
        raise top.error("apiVersion", f"unsupported apiVersion {version!r} (supported: {', '.join(API_VERSIONS)})")
    if body.get("kind") != kind:
        raise top.error("kind", f"expected {kind}, got {body.get('kind')!r}")
    meta = top.get("metadata", lambda v: v, required=True)
    if not isinstance(meta, Mapping):
        raise top.error("metadata", f"expected a mapping, got {_kind(meta)}")
    metadata = top.child("metadata", meta, meta.keys())
    name = metadata.get("name", _string, required=True)
    namespace = metadata.get("namespace", _string, default=namespace)
    spec_value = body.get("spec")
    spec = top.child("spec", {} if spec_value is None else spec_value, spec_fields)
    for unsupported in ("targetRef", "targetRefs"):
        if spec.value.get(unsupported) is not None:
            raise spec.error(spec.field(unsupported), "policies attached to Gateway API resources are not "
                                                      "supported by txmesh; use selector.matchLabels")
    return name, namespace, spec


def _selector(spec: _Obj) -> tuple[tuple[str, str], ...] | None:
    if spec.value.get("selector") is None:
        return None
    sel = spec.child("selector", spec.value["selector"], ("matchLabels",))
    labels = sel.get("matchLabels", _labels, default={})
    # An empty selector selects nothing in particular: the whole namespace.
    return tuple(sorted(labels.items())) or None


def _mode(value: Any) -> str:
    if value not in MTLS_MODES:
        raise ValueError(f"must be one of {', '.join(MTLS_MODES)}, got {value!r}")
    return value


def _port_key(value: Any) -> int:
    try:
        number = int(value) if not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        number = -1
    if not 1 <= number <= 65535:
        raise ValueError(f"expected a port number (1-65535), got {value!r}")
    return number


def parse_peer_authentication(body: Any, source: str | None = None, document: int | None = None,
                              namespace: str = "default") -> PeerAuthentication:
    """
    Translate one Istio C{PeerAuthentication} document.

    @raise ConfigError: naming the field, if it is invalid (C{portLevelMtls}
        without a selector is refused, as Istio's validation does).
    """
    name, namespace, spec = _security_header(body, source, document, namespace, PEER_AUTHENTICATION,
                                             ("selector", "mtls", "portLevelMtls"))
    selector = _selector(spec)
    mode = "UNSET"
    if spec.value.get("mtls") is not None:
        mtls = spec.child("mtls", spec.value["mtls"], ("mode",))
        mode = mtls.get("mode", _mode, default="UNSET")
    ports: list[tuple[int, str]] = []
    levels = spec.value.get("portLevelMtls")
    if levels is not None:
        field = spec.field("portLevelMtls")
        if not isinstance(levels, Mapping):
            raise spec.error(field, f"expected a mapping of port to {{mode: ...}}, got {_kind(levels)}")
        if selector is None:
            raise spec.error(field, "port-level mutual TLS needs a workload selector (selector.matchLabels)")
        for key, value in levels.items():
            at = f"{field}.{key}"
            try:
                port_number = _port_key(key)
            except ValueError as e:
                raise spec.error(at, str(e)) from None
            level = spec.child("", value, ("mode",), path=at)
            ports.append((port_number, level.get("mode", _mode, default="UNSET")))
    return PeerAuthentication(name, namespace, mode, tuple(sorted(ports)), selector)


def _jwt_rule(spec: _Obj, path: str, value: Any) -> dict[str, Any]:
    r = spec.child("", value, _JWT_RULE_FIELDS, path=path)
    for unsupported, why in (("fromCookies", "tokens in cookies are not read by txmesh"),
                             ("timeout", "the key set fetch timeout is the jwt filter's (jwks_fetch_timeout, 5s)")):
        if r.value.get(unsupported) is not None:
            raise r.error(r.field(unsupported), f"not supported: {why}; remove it")
    rule: dict[str, Any] = {"issuer": r.get("issuer", _string, required=True)}
    audiences = r.values("audiences", _string)
    if audiences:
        rule["audiences"] = list(audiences)
    uri_key = "jwksUri" if r.value.get("jwksUri") is not None else "jwks_uri"
    uri = r.get(uri_key, _string)
    jwks = r.get("jwks", _string)
    if (uri is None) == (jwks is None):
        raise r.error(r.path, "give exactly one of jwksUri, jwks (txmesh does not discover the key set "
                              "through OpenID Connect)")
    if uri is not None:
        if not uri.startswith(("http://", "https://")):
            raise r.error(r.field(uri_key), f"expected an http:// or https:// URL, got {uri!r}")
        rule["jwks_uri"] = uri
    else:
        from txmesh.policy.jwks import StaticJwks
        from txmesh.policy.jwt import JwksError

        try:
            StaticJwks.from_json(jwks)
        except JwksError as e:
            raise r.error(r.field("jwks"), str(e)) from None
        rule["jwks"] = jwks
    headers = []
    for at, h in r.items("fromHeaders"):
        loc = r.child("", h, ("name", "prefix"), path=at)
        header: dict[str, Any] = {"name": loc.get("name", _string, required=True)}
        prefix = loc.value.get("prefix")
        if prefix is not None:
            if not isinstance(prefix, str):
                raise loc.error(loc.field("prefix"), f"expected a string, got {_kind(prefix)}")
            header["prefix"] = prefix
        headers.append(header)
    if headers:
        rule["from_headers"] = headers
    params = r.values("fromParams", _string)
    if params:
        rule["from_params"] = list(params)
    payload = r.get("outputPayloadToHeader", _string)
    if payload is not None:
        rule["output_payload_to_header"] = payload
    claims = []
    for at, c in r.items("outputClaimToHeaders"):
        out = r.child("", c, ("header", "claim"), path=at)
        claims.append({"header": out.get("header", _string, required=True),
                       "claim": out.get("claim", _string, required=True)})
    if claims:
        rule["output_claim_to_headers"] = claims
    forward = r.value.get("forwardOriginalToken")
    if forward is not None:
        if not isinstance(forward, bool):
            raise r.error(r.field("forwardOriginalToken"), f"expected true or false, got {_kind(forward)}")
        if forward:
            rule["forward_original_token"] = True
    return rule


def parse_request_authentication(body: Any, source: str | None = None, document: int | None = None,
                                 namespace: str = "default") -> RequestAuthentication:
    """
    Translate one Istio C{RequestAuthentication} document.

    @raise ConfigError: naming the field, if it is invalid or uses what
        txmesh does not support (OpenID discovery of the key set,
        C{fromCookies}, C{timeout}, C{targetRef}/C{targetRefs}).
    """
    name, namespace, spec = _security_header(body, source, document, namespace, REQUEST_AUTHENTICATION,
                                             ("selector", "jwtRules", "targetRef", "targetRefs"))
    selector = _selector(spec)
    rules = tuple(_jwt_rule(spec, path, value) for path, value in spec.items("jwtRules"))
    return RequestAuthentication(name, namespace, rules, selector)


def _is_security(body: Any, kind: str) -> bool:
    return (isinstance(body, Mapping) and body.get("kind") == kind
            and str(body.get("apiVersion", "")).startswith("security.istio.io/"))


def _parse_all(documents: Iterable[tuple[str | None, int, Any]], namespace: str, kind: str,
               parse: Callable[..., T]) -> list[T]:
    # The later document with a namespace and name wins, in the place of
    # the first (an update keeps the resource's age, which decides
    # between conflicting policies).
    found: dict[tuple[str, str], Any] = {}
    for source, number, body in documents:
        if _is_security(body, kind):
            item: Any = parse(body, source, number, namespace)
            found[(item.namespace, item.name)] = item
    return list(found.values())


def parse_peer_authentications(documents: Iterable[tuple[str | None, int, Any]],
                               namespace: str = "default") -> list[PeerAuthentication]:
    """
    Translate the PeerAuthentication documents among C{documents}, oldest
    (first given) first; other documents are skipped.

    @raise ConfigError: on the first invalid one.
    """
    return _parse_all(documents, namespace, PEER_AUTHENTICATION, parse_peer_authentication)


def parse_request_authentications(documents: Iterable[tuple[str | None, int, Any]],
                                  namespace: str = "default") -> list[RequestAuthentication]:
    """
    Translate the RequestAuthentication documents among C{documents};
    other documents are skipped.

    @raise ConfigError: on the first invalid one.
    """
    return _parse_all(documents, namespace, REQUEST_AUTHENTICATION, parse_request_authentication)


def _selects(selector: tuple[tuple[str, str], ...] | None, labels: Mapping[str, str]) -> bool:
    return selector is not None and all(labels.get(k) == v for k, v in selector)


def mtls_mode(peer_authentications: Iterable[PeerAuthentication], workload_namespace: str,
              workload_labels: Mapping[str, str], port: int | None = None,
              root_namespace: str = "istio-system") -> str:
    """
    The mutual TLS a workload accepts on C{port}, as Istio composes it:
    the workload's policy (a selector matching its labels, in its
    namespace) over its namespace's (no selector) over the mesh's (no
    selector, in the root namespace); C{UNSET} inherits, and with nothing
    set the mode is C{PERMISSIVE}.  A policy with a selector in the root
    namespace applies to no other namespace.  Of several policies at one
    level the first (the oldest) applies.

    @param port: the workload's port (C{portLevelMtls} keys), or C{None}.
    @return: C{STRICT}, C{PERMISSIVE} or C{DISABLE}.
    """
    mesh = namespace = workload = None
    for pa in peer_authentications:
        if pa.selector is None:
            if pa.namespace == workload_namespace and namespace is None:
                namespace = pa
            elif pa.namespace == root_namespace and mesh is None:
                mesh = pa
        elif pa.namespace == workload_namespace and workload is None and _selects(pa.selector, workload_labels):
            workload = pa
    mode = DEFAULT_MTLS_MODE
    for pa in (mesh, namespace, workload):
        if pa is not None and pa.mode != "UNSET":
            mode = pa.mode
    if workload is not None and port is not None:
        level = dict(workload.port_modes).get(port, "UNSET")
        if level != "UNSET":
            mode = level
    return mode


def request_authentications_for(request_authentications: Iterable[RequestAuthentication],
                                workload_namespace: str, workload_labels: Mapping[str, str],
                                root_namespace: str = "istio-system") -> list[RequestAuthentication]:
    """
    The RequestAuthentications that apply to one workload, scoped as
    L{policies_for} scopes authorization policies.
    """
    return [ra for ra in request_authentications
            if ra.namespace in (root_namespace, workload_namespace)
            and (ra.selector is None or _selects(ra.selector, workload_labels))]


def jwt_rules_for(request_authentications: Iterable[RequestAuthentication], workload_namespace: str,
                  workload_labels: Mapping[str, str], root_namespace: str = "istio-system") -> list[dict[str, Any]]:
    """
    @return: the C{jwt} filter's C{rules} for one workload: the rules of
        every RequestAuthentication that applies to it, in order (Istio
        accepts a token any of them validates).
    """
    return [dict(rule) for ra in request_authentications_for(request_authentications, workload_namespace,
                                                             workload_labels, root_namespace)
            for rule in ra.rules]
