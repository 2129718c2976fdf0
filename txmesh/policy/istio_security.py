"""
Istio C{security.istio.io} C{AuthorizationPolicy} documents translated into
L{txmesh.policy.authorization} models, pure: plain values in, plain values
out.

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
    "from_native",
    "is_authorization_policy",
    "parse_authorization_policies",
    "parse_authorization_policy",
    "policies_for",
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
    top = _Obj(source, document, "", body, ("apiVersion", "kind", "metadata", "spec", "status"))
    version = body.get("apiVersion")
    if version not in API_VERSIONS:
        raise top.error("apiVersion", f"unsupported apiVersion {version!r} (supported: {', '.join(API_VERSIONS)})")
    if body.get("kind") != KIND:
        raise top.error("kind", f"expected {KIND}, got {body.get('kind')!r}")
    meta = top.get("metadata", lambda v: v, required=True)
    if not isinstance(meta, Mapping):
        raise top.error("metadata", f"expected a mapping, got {_kind(meta)}")
    # Other metadata (labels, annotations, uid, ...) carries no policy.
    metadata = top.child("metadata", meta, meta.keys())
    name = metadata.get("name", _string, required=True)
    namespace = metadata.get("namespace", _string, default=namespace)
    # An absent or empty spec is Istio's "allow nothing" policy.
    spec_value = body.get("spec")
    spec = top.child("spec", {} if spec_value is None else spec_value,
                     ("selector", "action", "rules", "provider", "targetRef", "targetRefs"))
    for unsupported in ("targetRef", "targetRefs"):
        if spec.value.get(unsupported) is not None:
            raise spec.error(spec.field(unsupported), "policies attached to Gateway API resources are not "
                                                      "supported by txmesh; use selector.matchLabels")
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
