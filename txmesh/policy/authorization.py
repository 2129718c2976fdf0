"""
Istio's C{AuthorizationPolicy} semantics as a pure engine: policies and a
request's attributes in, a L{Decision} out.  No reactor, no IO.

Evaluation follows Istio (CUSTOM is not supported)::

    1. if any DENY policy matches the request, deny it;
    2. if there is no ALLOW policy, allow it;
    3. if any ALLOW policy matches it, allow it;
    4. deny it.

AUDIT policies never change the decision; L{Decision.audited} says one
matched.

Matching, as Istio documents it:

    - a policy matches if any of its rules matches; a policy without rules
      matches nothing (so an ALLOW policy with C{spec: {}} denies
      everything, while C{rules: [{}]} allows everything);
    - a rule matches if any of its sources (C{from}) matches, and any of
      its operations (C{to}) matches, and every condition (C{when})
      matches; an absent C{from}, C{to} or C{when} matches anything;
    - inside a source or an operation every field given must match; a
      field matches if any of its values matches the request, a C{not}
      field if none does (so C{notPrincipals} matches a request without
      a peer identity);
    - values are exact strings, prefixes (C{"abc*"}), suffixes
      (C{"*abc"}) or C{"*"} (any value, but the attribute must be
      present); hosts compare case-insensitively; IP blocks are addresses
      or CIDR ranges.

Principals are written as Istio writes them, without C{spiffe://}:
C{cluster.local/ns/default/sa/sleep} matches the peer identity
C{spiffe://cluster.local/ns/default/sa/sleep}.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

__all__ = [
    "ACTIONS",
    "ALLOW",
    "AUDIT",
    "CONDITION_KEYS",
    "DENY",
    "Condition",
    "Decision",
    "Operation",
    "Policy",
    "RequestAttributes",
    "Rule",
    "Source",
    "evaluate",
    "condition_key",
    "condition_value",
    "ip_block",
    "namespace_of",
    "pattern",
    "port",
]

ALLOW = "ALLOW"
DENY = "DENY"
AUDIT = "AUDIT"
ACTIONS = (ALLOW, DENY, AUDIT)

SPIFFE_PREFIX = "spiffe://"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SPIFFE_NAMESPACE = re.compile(r"^(?:spiffe://)?[^/]+/ns/([^/]+)/sa/[^/]+$")
_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")
_CLAIM_PART = re.compile(r"\[([^\[\]]+)\]")

CONDITION_KEYS = (
    "request.headers[NAME]",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[NAME]",
    "destination.port",
    "connection.sni",
)
"""
The C{when} keys txmesh evaluates (NAME in brackets; claims nest as
C{request.auth.claims[a][b]}).
"""

_IP_KEYS = ("source.ip", "remote.ip")
_STRING_KEYS = ("source.namespace", "source.principal", "request.auth.principal", "request.auth.audiences",
                "request.auth.presenter", "connection.sni")


# --- single values ----------------------------------------------------------


def pattern(value: Any) -> str:
    """
    Check a match value: an exact string, C{"prefix*"}, C{"*suffix"} or C{"*"}.

    @return: C{value}.
    @raise ValueError: if it is not a non-empty string, or has a C{*}
        anywhere but at one end.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_kind(value)}")
    if "*" in value[1:-1] or (len(value) > 1 and value[0] == "*" and value[-1] == "*"):
        raise ValueError(f"{value!r}: '*' may only stand alone or begin or end a value "
                         "(exact, 'prefix*', '*suffix' or '*')")
    return value


def ip_block(value: Any) -> IPNetwork:
    """
    Read an IP block: an address (C{10.1.2.3}) or a CIDR range (C{10.0.0.0/8}).

    @raise ValueError: if C{value} is neither.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected an IP address or CIDR range, got {_kind(value)}")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or CIDR range: {value!r}") from None


def port(value: Any) -> int:
    """
    Read a port, written as Istio writes them (C{"8080"}) or as a number.

    @raise ValueError: if C{value} is not a port number 0..65535.
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"expected a port number 0..65535, got {value!r}")
    return value


def namespace_of(principal: str | None) -> str | None:
    """
    @return: the namespace in a SPIFFE identity
        (C{spiffe://<trust-domain>/ns/<namespace>/sa/<account>}), or C{None}.
    """
    if not principal:
        return None
    m = _SPIFFE_NAMESPACE.match(principal)
    return m.group(1) if m else None


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "nothing"}.get(type(value), type(value).__name__)


def _address(value: Any) -> IPAddress | None:
    if value is None or value == "":
        return None
    address = value if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) \
        else ipaddress.ip_address(str(value).strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        return address.ipv4_mapped
    return address


def _match(pat: str, value: str | None, ignore_case: bool = False) -> bool:
    if value is None:
        return False
    if pat == "*":
        return True
    if ignore_case:
        pat, value = pat.lower(), value.lower()
    if pat.startswith("*"):
        return value.endswith(pat[1:])
    if pat.endswith("*"):
        return value.startswith(pat[:-1])
    return value == pat


def _any(patterns: Iterable[str], values: Sequence[str], ignore_case: bool = False) -> bool:
    return any(_match(p, v, ignore_case) for p in patterns for v in values)


def _in_blocks(blocks: Iterable[IPNetwork], address: IPAddress | None) -> bool:
    return address is not None and any(address in block for block in blocks)


def _field(positive: Sequence[Any], negative: Sequence[Any], matches: Any) -> bool:
    """
    Istio's field semantics: if given, some positive value must match and no
    negative value may.
    """
    if positive and not any(matches(v) for v in positive):
        return False
    return not any(matches(v) for v in negative)


def _patterns(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(pattern(v) for v in values)


def _blocks(values: Iterable[Any]) -> tuple[IPNetwork, ...]:
    return tuple(v if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)) else ip_block(v)
                 for v in values)


def _ports(values: Iterable[Any]) -> tuple[int, ...]:
    return tuple(port(v) for v in values)


# --- the request ------------------------------------------------------------


def _dict(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(value or {})


def _headers(value: Mapping[str, str] | None) -> dict[str, str]:
    return {str(k).lower(): v for k, v in (value or {}).items()}


@attrs.frozen(eq=False)
class RequestAttributes:
    """
    What policies look at in one request.

    @ivar source_principal: the peer's verified identity
        (C{spiffe://td/ns/NS/sa/SA}) over mutual TLS, else C{None}.
    @ivar source_namespace: the peer's namespace; by default taken from
        C{source_principal}.
    @ivar source_ip: the downstream connection's address.
    @ivar remote_ip: the original client address (from C{X-Forwarded-For}
        behind trusted proxies); by default C{source_ip}.
    @ivar request_principal: the authenticated JWT's C{iss/sub}, or C{None}.
    @ivar audiences: the JWT's audiences.
    @ivar presenter: the JWT's authorized presenter (C{azp}), or C{None}.
    @ivar claims: the JWT's claims.
    @ivar host: the request's authority (C{Host}), as sent.
    @ivar method: the request method.
    @ivar path: the request path without the query.
    @ivar port: the local port the request arrived on.
    @ivar headers: request headers, lower-case names to values (repeated
        headers joined with C{","}).
    @ivar sni: the TLS server name the client asked for, if any.
    """

    source_principal: str | None = attrs.field(default=None, converter=lambda v: v or None)
    source_namespace: str | None = attrs.field()
    source_ip: IPAddress | None = attrs.field(default=None, converter=_address)
    remote_ip: IPAddress | None = attrs.field(converter=_address)
    request_principal: str | None = None
    audiences: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    presenter: str | None = None
    claims: dict[str, Any] = attrs.field(factory=dict, converter=_dict)
    host: str | None = None
    method: str | None = None
    path: str | None = None
    port: int | None = None
    headers: dict[str, str] = attrs.field(factory=dict, converter=_headers)
    sni: str | None = None

    @source_namespace.default
    def _source_namespace(self) -> str | None:
        return namespace_of(self.source_principal)

    @remote_ip.default
    def _remote_ip(self) -> IPAddress | None:
        return self.source_ip

    @property
    def peer_identity(self) -> str | None:
        """
        @return: C{source_principal} as Istio policies name it: without
            C{spiffe://}.
        """
        p = self.source_principal
        if p is not None and p.startswith(SPIFFE_PREFIX):
            return p[len(SPIFFE_PREFIX):]
        return p


# --- the policy model -------------------------------------------------------


@attrs.frozen
class Source:
    """
    Istio's C{from.source}: who sent the request.  Every field given must
    match.
    """

    principals: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    not_principals: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    request_principals: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    not_request_principals: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    namespaces: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    not_namespaces: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    ip_blocks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_blocks)
    not_ip_blocks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_blocks)
    remote_ip_blocks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_blocks)
    not_remote_ip_blocks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_blocks)

    def matches(self, r: RequestAttributes) -> bool:
        """
        @return: whether the request comes from this source.
        """
        peer = r.peer_identity
        return (
            _field(self.principals, self.not_principals, lambda p: _match(p, peer))
            and _field(self.request_principals, self.not_request_principals,
                       lambda p: _match(p, r.request_principal))
            and _field(self.namespaces, self.not_namespaces, lambda p: _match(p, r.source_namespace))
            and _field(self.ip_blocks, self.not_ip_blocks, lambda b: _in_blocks((b,), r.source_ip))
            and _field(self.remote_ip_blocks, self.not_remote_ip_blocks,
                       lambda b: _in_blocks((b,), r.remote_ip))
        )

    def is_empty(self) -> bool:
        """
        @return: whether no field is given (Istio refuses such a source).
        """
        return not any(getattr(self, a.name) for a in attrs.fields(Source))


@attrs.frozen
class Operation:
    """
    Istio's C{to.operation}: what the request asks for.  Every field given
    must match.
    """

    hosts: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    not_hosts: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    ports: tuple[int, ...] = attrs.field(default=(), converter=_ports)
    not_ports: tuple[int, ...] = attrs.field(default=(), converter=_ports)
    methods: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    not_methods: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    paths: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    not_paths: tuple[str, ...] = attrs.field(default=(), converter=_patterns)

    def matches(self, r: RequestAttributes) -> bool:
        """
        @return: whether the request is this operation.
        """
        return (
            _field(self.hosts, self.not_hosts, lambda h: _match(h, r.host, ignore_case=True))
            and _field(self.ports, self.not_ports, lambda p: r.port is not None and p == r.port)
            and _field(self.methods, self.not_methods, lambda m: _match(m, r.method))
            and _field(self.paths, self.not_paths, lambda p: _match(p, r.path))
        )

    def is_empty(self) -> bool:
        """
        @return: whether no field is given (Istio refuses such an operation).
        """
        return not any(getattr(self, a.name) for a in attrs.fields(Operation))


def _condition_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"expected a non-empty string, got {_kind(key)}")
    if key in _IP_KEYS or key in _STRING_KEYS or key == "destination.port":
        return key
    if _HEADER_KEY.match(key) or _CLAIM_KEY.match(key):
        return key
    raise ValueError(f"unsupported condition key {key!r} (supported: {', '.join(CONDITION_KEYS)})")


def condition_key(key: Any) -> str:
    """
    Check a C{when} key.

    @return: C{key}.
    @raise ValueError: naming the supported keys, if txmesh cannot evaluate it.
    """
    return _condition_key(key)


def condition_value(key: str, value: Any) -> Any:
    """
    Check one value of the C{when} condition on C{key}.

    @return: the value as the engine compares it (an IP network for
        C{source.ip}/C{remote.ip}, a port number for C{destination.port},
        else the string).
    @raise ValueError: if it is not a valid value for C{key}.
    """
    if key in _IP_KEYS:
        return ip_block(value)
    if key == "destination.port":
        return port(value)
    return pattern(value)


def _claim(claims: Mapping[str, Any], path: Sequence[str]) -> list[str]:
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return []
        value = value[part]
    # Istio matches claims that are strings or lists of strings.
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


@attrs.frozen
class Condition:
    """
    One C{when} entry: the attribute named by C{key} must match one of
    C{values} (if any are given) and none of C{not_values}.
    """

    key: str = attrs.field(converter=_condition_key)
    values: tuple[Any, ...] = attrs.field(default=())
    not_values: tuple[Any, ...] = attrs.field(default=())

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(condition_value(self.key, v) for v in self.values))
        object.__setattr__(self, "not_values", tuple(condition_value(self.key, v) for v in self.not_values))
        if not self.values and not self.not_values:
            raise ValueError(f"condition {self.key}: give values or notValues")

    def _test(self, r: RequestAttributes) -> Any:
        key = self.key
        if key in _IP_KEYS:
            address = r.source_ip if key == "source.ip" else r.remote_ip
            return lambda b: _in_blocks((b,), address)
        if key == "destination.port":
            return lambda p: r.port is not None and p == r.port
        m = _HEADER_KEY.match(key)
        if m is not None:
            header = r.headers.get(m.group(1).lower())
            # "*" on a header is a presence match: an empty value counts.
            return lambda v: header is not None and (v == "*" or _match(v, header))
        m = _CLAIM_KEY.match(key)
        if m is not None:
            found = _claim(r.claims, _CLAIM_PART.findall(m.group(1)))
            return lambda v: _any((v,), found)
        found = {
            "source.namespace": [r.source_namespace],
            "source.principal": [r.peer_identity],
            "request.auth.principal": [r.request_principal],
            "request.auth.audiences": list(r.audiences),
            "request.auth.presenter": [r.presenter],
            "connection.sni": [r.sni],
        }[key]
        return lambda v: any(_match(v, f) for f in found)

    def matches(self, r: RequestAttributes) -> bool:
        """
        @return: whether the request meets this condition.
        """
        return _field(self.values, self.not_values, self._test(r))


@attrs.frozen
class Rule:
    """
    One rule: any source, any operation, and every condition must match;
    an empty list matches anything.
    """

    sources: tuple[Source, ...] = attrs.field(default=(), converter=tuple)
    operations: tuple[Operation, ...] = attrs.field(default=(), converter=tuple)
    conditions: tuple[Condition, ...] = attrs.field(default=(), converter=tuple)

    def matches(self, r: RequestAttributes) -> bool:
        """
        @return: whether the request matches this rule.
        """
        return (
            (not self.sources or any(s.matches(r) for s in self.sources))
            and (not self.operations or any(o.matches(r) for o in self.operations))
            and all(c.matches(r) for c in self.conditions)
        )


def _action(value: Any) -> str:
    if value not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {value!r}")
    return value


def _selector(value: Any) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


@attrs.frozen
class Policy:
    """
    An authorization policy.

    @ivar name: the policy's name.
    @ivar namespace: the policy's namespace.
    @ivar action: L{ALLOW}, L{DENY} or L{AUDIT}.
    @ivar rules: the policy matches if any rule does; with none it matches
        nothing.
    @ivar selector: the workload labels (sorted pairs) the policy applies
        to, or C{None} for every workload in its namespace (scoping is
        L{txmesh.policy.istio_security.policies_for}'s job; L{evaluate}
        ignores it).
    """

    name: str
    namespace: str = "default"
    action: str = attrs.field(default=ALLOW, converter=_action)
    rules: tuple[Rule, ...] = attrs.field(default=(), converter=tuple)
    selector: tuple[tuple[str, str], ...] | None = attrs.field(default=None, converter=_selector)

    @property
    def key(self) -> str:
        """
        @return: C{namespace/name}.
        """
        return f"{self.namespace}/{self.name}"

    def matches(self, r: RequestAttributes) -> bool:
        """
        @return: whether any rule matches the request.
        """
        return any(rule.matches(r) for rule in self.rules)


@attrs.frozen
class Decision:
    """
    The outcome of L{evaluate}.

    @ivar allowed: whether the request may proceed.
    @ivar policy: C{namespace/name} of the policy that decided, or C{None}
        (no policy at all, or no ALLOW policy matched).
    @ivar action: the deciding policy's action, or C{None}.
    @ivar audited: whether an AUDIT policy matched.
    @ivar audit_policy: C{namespace/name} of the first AUDIT policy that
        matched, or C{None}.
    @ivar reason: the decision in words, for logs.
    """

    allowed: bool
    policy: str | None = None
    action: str | None = None
    audited: bool = False
    audit_policy: str | None = None
    reason: str = ""


def evaluate(policies: Iterable[Policy], attributes: RequestAttributes) -> Decision:
    """
    Decide a request as Istio does: a matching DENY policy denies; without
    ALLOW policies everything else is allowed; with them, one must match.
    AUDIT policies only set L{Decision.audited}.

    @param policies: the policies that apply to the workload (see
        L{txmesh.policy.istio_security.policies_for}); order decides only
        which policy is named when several match.
    @param attributes: the request.
    @return: the L{Decision}.
    """
    policies = list(policies)
    audit = next((p for p in policies if p.action == AUDIT and p.matches(attributes)), None)
    audited = {"audited": audit is not None, "audit_policy": audit.key if audit is not None else None}
    for p in policies:
        if p.action == DENY and p.matches(attributes):
            return Decision(False, p.key, DENY, reason=f"matched DENY policy {p.key}", **audited)
    allows = [p for p in policies if p.action == ALLOW]
    if not allows:
        return Decision(True, None, None, reason="no ALLOW policy applies", **audited)
    for p in allows:
        if p.matches(attributes):
            return Decision(True, p.key, ALLOW, reason=f"matched ALLOW policy {p.key}", **audited)
    return Decision(False, None, None, reason="no ALLOW policy matched", **audited)
