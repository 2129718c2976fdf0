"""
The C{authz} filter: Istio C{AuthorizationPolicy} enforcement, as Envoy's
RBAC filter does it for an Istio sidecar.

On each request head the filter builds the request's
L{RequestAttributes} -- the peer's mutual-TLS identity
(C{stream.downstream_principal}), its address, the local port, the JWT the
C{jwt} filter verified (C{stream.metadata["request.auth"]}), the method,
path, authority and headers -- and L{evaluate}s its policies.  A denied
request gets C{403 RBAC: access denied} with response flag C{RBACD}; the
upstream never sees it.  Every denied request and every request an AUDIT
policy matches is written to the audit log, when one is configured.

The decision is left in C{stream.metadata["authz"]} for later filters.

Listener config::

    http_filters:
      - name: authz
        config:
          policies:                       # native policies (txmesh.policy.istio_security)
            - name: deny-admin
              namespace: web
              action: DENY
              rules:
                - from: [{source: {namespaces: [other]}}]
                  to: [{operation: {methods: [GET], paths: [/admin, /admin/*]}}]
          audit: {path: /var/log/txmesh/audit.log}    # or "-" for standard output
          num_trusted_proxies: 0                      # X-Forwarded-For hops to trust for remote.ip

Paths are matched after RFC 3986 normalization (percent-encoded unreserved
characters decoded, C{.} and C{..} segments removed), as Istio's default
C{BASE} normalization, so C{/public/../admin} cannot slip past a rule on
C{/admin}; the upstream still receives the path as sent.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

import attrs
from zope.interface import implementer

from txmesh.config.errors import ConfigError, FilterConfigError
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, LocalReply
from txmesh.observability.audit import AuditLog, AuditLogs, AuditRecord
from txmesh.policy.authorization import AUDIT, DENY, Decision, Policy, RequestAttributes, evaluate
from txmesh.policy.istio_security import from_native
from txmesh.proxy.stream import RequestHead, ResponseFlag

__all__ = ["DENIED_BODY", "AuthzConfig", "AuthzFactory", "AuthzFilter", "normalize_path", "request_attributes"]

DENIED_BODY = b"RBAC: access denied"
"""
The body of a denied request's 403, as Envoy's RBAC filter sends it.
"""

_FIELDS = ("policies", "audit", "num_trusted_proxies")
_UNRESERVED_ESCAPE = re.compile(rb"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")


@attrs.frozen
class AuthzConfig:
    """
    The parsed config of the C{authz} filter.

    @ivar policies: the policies that apply to this workload.
    @ivar audit: where audit records go, or C{None}.
    @ivar num_trusted_proxies: how many proxies in front of this one append
        to C{X-Forwarded-For}; 0 makes C{remote.ip} the peer's address.
    """

    policies: tuple[Policy, ...] = ()
    audit: AuditLog | None = None
    num_trusted_proxies: int = 0


def normalize_path(target: bytes) -> str:
    """
    @param target: a request target in origin form (path and query).
    @return: its path, without query or fragment, with percent-encoded
        unreserved characters decoded and dot segments removed (RFC 3986
        section 5.2.4).
    """
    for sep in (b"?", b"#"):
        cut = target.find(sep)
        if cut >= 0:
            target = target[:cut]
    target = _UNRESERVED_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), target)
    path = target.decode("latin-1")
    if not path.startswith("/"):
        return path
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _ip(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def request_attributes(head: RequestHead, stream: Any, num_trusted_proxies: int = 0) -> RequestAttributes:
    """
    Gather what policies look at in one request.

    @param head: the request head.
    @param stream: the L{txmesh.filters.api.IStreamContext}.
    @param num_trusted_proxies: X-Forwarded-For entries, from the right, that
        trusted proxies added: C{remote.ip} is the last of those.
    @return: the request's L{RequestAttributes}.
    """
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = _text(name).lower()
        headers[key] = f"{headers[key]},{_text(value)}" if key in headers else _text(value)
    source_ip = _ip(getattr(stream.downstream_address, "host", None))
    remote_ip = source_ip
    if num_trusted_proxies > 0:
        hops = [h.strip() for h in headers.get("x-forwarded-for", "").split(",") if h.strip()]
        if len(hops) >= num_trusted_proxies:
            remote_ip = _ip(hops[-num_trusted_proxies])
    auth = stream.metadata.get("request.auth") or {}
    audiences = auth.get("audiences") or ()
    if isinstance(audiences, str):
        audiences = (audiences,)
    authority = head.authority or head.headers.get(b"host") or b""
    return RequestAttributes(
        source_principal=stream.downstream_principal,
        source_ip=source_ip,
        remote_ip=remote_ip,
        request_principal=auth.get("principal"),
        audiences=tuple(a for a in audiences if isinstance(a, str)),
        presenter=auth.get("presenter"),
        claims=auth.get("claims") or {},
        host=_text(authority) or None,
        method=_text(head.method),
        path=normalize_path(head.path),
        port=stream.downstream_port,
        headers=headers,
    )


class AuthzFilter(HTTPFilter):
    """
    One stream's authorization decision.
    """

    def __init__(self, config: AuthzConfig, stream: Any):
        self._config = config
        self._stream = stream

    def request_headers(self, head: RequestHead, end_stream: bool) -> Any:
        config, stream = self._config, self._stream
        attributes = request_attributes(head, stream, config.num_trusted_proxies)
        decision = evaluate(config.policies, attributes)
        stream.metadata["authz"] = decision
        if config.audit is not None and (not decision.allowed or decision.audited):
            config.audit.write(self._record(attributes, decision))
        if decision.allowed:
            return None
        return LocalReply(403, DENIED_BODY, flag=ResponseFlag.RBAC_DENIED)

    def _record(self, r: RequestAttributes, decision: Decision) -> AuditRecord:
        if decision.allowed:
            policy, action, reason = decision.audit_policy, AUDIT, f"matched AUDIT policy {decision.audit_policy}"
        else:
            policy, action, reason = decision.policy, decision.action, decision.reason
        request_id = self._stream.request_id
        return AuditRecord(
            time=self._stream.clock.seconds(),
            source_principal=r.source_principal,
            source_ip=str(r.source_ip) if r.source_ip is not None else None,
            host=r.host, port=r.port, method=r.method, path=r.path,
            policy=policy,
            decision="ALLOW" if decision.allowed else DENY,
            action=action,
            request_id=request_id.decode("latin-1") if isinstance(request_id, bytes) else request_id,
            reason=reason,
        )


@implementer(IHTTPFilterFactory)
class AuthzFactory:
    """
    The C{authz} filter: allow or deny requests by Istio authorization policies.
    """

    name = "authz"

    def __init__(self) -> None:
        self._audit_logs = AuditLogs()

    def parse_config(self, raw: Mapping[str, Any]) -> AuthzConfig:
        """
        @param raw: C{policies} (a list of native policies, see
            L{txmesh.policy.istio_security}), optional C{audit: {path:
            FILE or "-"}} and C{num_trusted_proxies} (default 0).
        @raise FilterConfigError: naming the offending field.
        """
        for key in raw:
            if key not in _FIELDS:
                raise FilterConfigError(str(key), f"unknown field (expected one of: {', '.join(_FIELDS)})")
        items = raw.get("policies")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise FilterConfigError("policies", "expected a list of policies")
        policies = []
        for i, item in enumerate(items):
            try:
                policies.append(from_native(item, path=f"policies[{i}]"))
            except ConfigError as e:
                raise FilterConfigError(e.field, e.reason) from None
        trusted = raw.get("num_trusted_proxies", 0)
        if isinstance(trusted, bool) or not isinstance(trusted, int) or trusted < 0:
            raise FilterConfigError("num_trusted_proxies", f"expected a whole number >= 0, got {trusted!r}")
        audit = self._audit_logs.from_config(raw.get("audit"))
        return AuthzConfig(tuple(policies), audit, trusted)

    def create_filter(self, config: AuthzConfig | None, stream: Any) -> AuthzFilter | HTTPFilter:
        if config is None:
            return HTTPFilter()
        return AuthzFilter(config, stream)
