"""
The C{jwt} filter: request authentication with JSON Web Tokens, as Istio's
C{RequestAuthentication} (Envoy's C{jwt_authn} filter) does it.

  - A request without a token passes unchanged: whether it needs one is for
    authorization to decide.
  - A request with a token that fails validation gets a local reply with
    Envoy's reason as its body (C{401}, or C{403} for
    C{Audiences in Jwt are not allowed}) and
    C{www-authenticate: Bearer realm="<url>", error="invalid_token"}.
  - A valid token leaves C{stream.metadata["request.auth"]} for later
    filters (C{principal} C{iss/sub}, C{claims}, C{audiences}, C{presenter})
    and sets the configured claim headers; the header the token came in is
    removed unless C{forward_original_token}.

Config::

    http_filters:
      - name: jwt
        config:
          rules:
            - issuer: https://accounts.example.com
              audiences: [bookstore]
              jwks_uri: https://accounts.example.com/jwks.json   # or jwks / jwks_file
              from_headers: [{name: x-jwt, prefix: "Bearer "}]
              from_params: [token]
              output_payload_to_header: x-jwt-payload
              output_claim_to_headers: [{header: x-jwt-sub, claim: sub}]
              forward_original_token: false
          # optional: clock_skew (60s), jwks_cache_duration (10m), jwks_fetch_timeout (5s)

The module is called C{jwt_authn} (Envoy's name) so it does not shadow PyJWT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.config.durations import parse_duration
from txmesh.config.errors import FilterConfigError
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, LocalReply
from txmesh.observability.audit import AuditLog, AuditLogs, AuditRecord
from txmesh.policy.jwks import (
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_MIN_REFETCH_INTERVAL,
    DEFAULT_REFRESH_INTERVAL,
    RemoteJwks,
    StaticJwks,
)
from txmesh.policy.jwt import (
    DEFAULT_LEEWAY,
    ClaimToHeader,
    ExtractedToken,
    HeaderLocation,
    JwksError,
    JwksUnavailable,
    Jwt,
    JwtAuthResult,
    JwtError,
    JwtRule,
    KeySet,
    UnknownKid,
    check_algorithm,
    check_claims,
    check_time,
    claim_value,
    extract_tokens,
    parse_jwt,
    result_of,
    verify_signature,
)
from txmesh.proxy.stream import RequestHead

METADATA_KEY = "request.auth"
"""
The key of C{stream.metadata} the filter leaves a verified identity under.
"""

MAX_REALM_PATH = 256
"""
The longest path put in the C{www-authenticate} realm (as Envoy).
"""

_FIELDS = ("rules", "clock_skew", "jwks_cache_duration", "jwks_fetch_timeout", "audit")
_RULE_FIELDS = (
    "issuer", "audiences", "jwks_uri", "jwks", "jwks_file", "from_headers", "from_params",
    "output_payload_to_header", "output_claim_to_headers", "forward_original_token",
)


@attrs.frozen
class ConfiguredRule:
    """
    A rule with its key source: C{keys} for inline and file key sets,
    C{None} for a C{jwks_uri} (fetched by the factory).
    """

    rule: JwtRule
    keys: StaticJwks | None


@attrs.frozen
class JwtAuthnConfig:
    """
    The parsed config of the C{jwt} filter.

    @ivar rules: the rules, in config order.
    @ivar clock_skew: seconds of leeway on C{exp}/C{nbf}.
    @ivar cache_duration: seconds between refreshes of fetched key sets.
    @ivar fetch_timeout: the bound on one fetch, and on how long a request
        waits for the first one.
    @ivar output_headers: every header some rule writes; removed from every
        request so a client cannot forge them.
    @ivar audit: where refused tokens are recorded, or C{None}.
    """

    rules: tuple[ConfiguredRule, ...]
    clock_skew: float = DEFAULT_LEEWAY
    cache_duration: float = DEFAULT_REFRESH_INTERVAL
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    output_headers: frozenset[bytes] = frozenset()
    audit: AuditLog | None = attrs.field(default=None, eq=False)


class JwtAuthnFilter(HTTPFilter):
    """
    One stream's token check.
    """

    log = Logger()
    _pending: Deferred | None = None

    def __init__(self, config: JwtAuthnConfig | None, stream: Any, factory: JwtAuthnFactory):
        self._config = config
        self._stream = stream
        self._factory = factory

    def request_headers(self, head: RequestHead, end_stream: bool) -> Any:
        config = self._config
        if config is None:
            return None
        if config.output_headers:
            head.headers.remove_many(config.output_headers)
        found: list[tuple[ConfiguredRule, ExtractedToken]] = []
        for configured in config.rules:
            for extracted in extract_tokens(configured.rule, head.headers, head.path):
                found.append((configured, extracted))
        if not found:
            return None
        # The first token found is the one checked; each rule that found it
        # in one of its own locations may vouch for it.
        token = found[0][1].token
        try:
            jwt = parse_jwt(token)
        except JwtError as e:
            return self._deny(head, e)
        candidates = [c for c, e in found if e.token == token]
        configured = next((c for c in candidates if c.rule.issuer == jwt.issuer), candidates[0])
        where = [e for c, e in found if c is configured and e.token == token]
        try:
            # Envoy's order: the cheap checks first, the keys last.
            check_algorithm(jwt)
            check_time(jwt, self._stream.clock.seconds(), config.clock_skew)
            check_claims(jwt, configured.rule.issuer, configured.rule.audiences)
        except JwtError as e:
            return self._deny(head, e)
        if configured.keys is not None:
            return self._verify(configured.keys.keys, head, jwt, configured, where, None)
        source = self._factory.remote_source(configured.rule.jwks_uri or "", config, self._stream.clock)
        if source.keys is not None:
            return self._verify(source.keys, head, jwt, configured, where, source)
        # First request before the first fetch finished: wait for it, bounded.
        d = source.wait_for_keys(config.fetch_timeout)
        return self._wait(d, lambda keys: self._verify(keys, head, jwt, configured, where, None, source))

    def _wait(self, d: Deferred, then: Any) -> Deferred:
        # Set before the callbacks: they clear it, even when d has fired.
        self._pending = d
        d.addCallback(then)
        d.addErrback(self._cancelled)
        return d

    def _cancelled(self, failure: Failure) -> Any:
        self._pending = None
        if failure.check(CancelledError):
            # stream_complete cancelled the wait: the chain ignores what a
            # hook of a finished stream resolves to.
            return None
        return failure

    def _verify(
        self,
        keys: KeySet | None,
        head: RequestHead,
        jwt: Jwt,
        configured: ConfiguredRule,
        where: list[ExtractedToken],
        refetch_from: RemoteJwks | None,
        failed_from: RemoteJwks | None = None,
    ) -> Any:
        """
        @param refetch_from: the remote source to refetch from once if the
            token's C{kid} is unknown (C{None}: no refetch).
        @param failed_from: the remote source to blame if C{keys} is C{None}.
        """
        self._pending = None
        if keys is None:
            source = failed_from or refetch_from
            return self._deny(head, JwksUnavailable(detail=source.error if source is not None else None))
        try:
            verify_signature(jwt, keys)
        except UnknownKid as e:
            retry = refetch_from.refetch_for_unknown_kid() if refetch_from is not None else None
            if retry is None:
                return self._deny(head, e)
            return self._wait(retry, lambda k: self._verify(k, head, jwt, configured, where, None, refetch_from))
        except JwtError as e:
            return self._deny(head, e)
        self._accept(head, result_of(jwt), configured.rule, where)
        return None

    def _accept(self, head: RequestHead, result: JwtAuthResult, rule: JwtRule, where: list[ExtractedToken]) -> None:
        stream = self._stream
        stream.metadata[METADATA_KEY] = result.as_metadata()
        headers = head.headers
        wrote = False
        for output in rule.output_claim_to_headers:
            value = claim_value(result.claims, output.claim)
            if value is None or any(c in value for c in "\r\n\0"):
                continue
            headers.set(output.header.encode("latin-1"), value.encode("utf-8"))
            wrote = True
        if rule.output_payload_to_header:
            headers.set(rule.output_payload_to_header.lower().encode("latin-1"), result.raw_payload.encode("ascii"))
            wrote = True
        if not rule.forward_original_token:
            for extracted in where:
                if extracted.header is not None:
                    headers.remove(extracted.header)
                    wrote = True
        if wrote:
            # Routes may match on the headers just written.
            stream.clear_route_cache()

    def _deny(self, head: RequestHead, error: JwtError) -> LocalReply:
        self._pending = None
        self.log.debug(
            "jwt: {request_id} denied: {error}",
            request_id=self._stream.request_id, error=str(error),
        )
        if self._config is not None and self._config.audit is not None:
            self._audit(head, error)
        path = head.path_only[:MAX_REALM_PATH]
        realm = b'Bearer realm="' + head.scheme + b"://" + head.authority + path + b'", error="invalid_token"'
        return LocalReply(
            error.status, error.reason.encode("utf-8"), headers=((b"www-authenticate", realm),),
        )

    def _audit(self, head: RequestHead, error: JwtError) -> None:
        stream = self._stream
        peer = stream.downstream_address
        request_id = stream.request_id
        self._config.audit.write(AuditRecord(
            time=stream.clock.seconds(),
            source_principal=stream.downstream_principal,
            source_ip=getattr(peer, "host", None),
            host=head.authority.decode("latin-1"),
            port=stream.downstream_port,
            method=head.method.decode("latin-1"),
            path=head.path_only.decode("latin-1"),
            policy="jwt",
            decision="DENY",
            action=None,
            request_id=request_id.decode("latin-1") if isinstance(request_id, bytes) else request_id,
            reason=error.reason,
        ))

    def stream_complete(self) -> None:
        d, self._pending = self._pending, None
        if d is not None:
            d.cancel()


@implementer(IHTTPFilterFactory)
class JwtAuthnFactory:
    """
    The C{jwt} filter: verify JSON Web Tokens, as Istio's
    C{RequestAuthentication}.

    The factory owns the fetched key sets (one L{RemoteJwks} per
    C{jwks_uri}), so they survive config reloads.
    """

    name = "jwt"

    def __init__(
        self,
        reactor: Any = None,
        client: Any = None,
        clock: Any = None,
        min_refetch_interval: float = DEFAULT_MIN_REFETCH_INTERVAL,
    ):
        """
        @param reactor: what fetches connect with (by default the stream's
            clock when it is a reactor, else the global reactor).
        @param client: a treq-like client for fetches (tests pass
            L{treq.testing.StubTreq} or a fake).
        @param clock: what key refreshes run on (by default the first
            stream's clock).
        @param min_refetch_interval: the least number of seconds between two
            fetches requests cause (unknown C{kid}, no keys yet).
        """
        self._reactor = reactor
        self._client = client
        self._clock = clock
        self._min_refetch_interval = min_refetch_interval
        self._sources: dict[tuple[str, float, float], RemoteJwks] = {}
        self._audit_logs = AuditLogs()

    def parse_config(self, raw: Mapping[str, Any]) -> JwtAuthnConfig:
        """
        @param raw: C{rules} (a list of rules, see the module docstring) and
            optional C{clock_skew}, C{jwks_cache_duration},
            C{jwks_fetch_timeout} durations.
        @raise FilterConfigError: naming the offending field.
        """
        _known(raw, _FIELDS, "")
        rules_raw = raw.get("rules")
        if not isinstance(rules_raw, list) or not rules_raw:
            raise FilterConfigError("rules", "expected a non-empty list of rules")
        rules = tuple(_rule(r, f"rules[{i}]") for i, r in enumerate(rules_raw))
        output: set[bytes] = set()
        for configured in rules:
            output |= configured.rule.output_headers
        return JwtAuthnConfig(
            rules=rules,
            clock_skew=_duration(raw, "clock_skew", DEFAULT_LEEWAY, zero_ok=True),
            cache_duration=_duration(raw, "jwks_cache_duration", DEFAULT_REFRESH_INTERVAL),
            fetch_timeout=_duration(raw, "jwks_fetch_timeout", DEFAULT_FETCH_TIMEOUT),
            output_headers=frozenset(output),
            audit=self._audit_logs.from_config(raw.get("audit")),
        )

    def create_filter(self, config: JwtAuthnConfig | None, stream: Any) -> JwtAuthnFilter:
        return JwtAuthnFilter(config, stream, self)

    def remote_source(self, url: str, config: JwtAuthnConfig, clock: Any) -> RemoteJwks:
        """
        @return: the started L{RemoteJwks} for C{url} with C{config}'s
            timings, made on first use.
        """
        key = (url, config.cache_duration, config.fetch_timeout)
        source = self._sources.get(key)
        if source is None:
            timer = self._clock if self._clock is not None else clock
            source = RemoteJwks(
                url, timer, client=self._client, reactor=self._connect_reactor(timer),
                refresh_interval=config.cache_duration, fetch_timeout=config.fetch_timeout,
                min_refetch_interval=self._min_refetch_interval,
            )
            self._sources[key] = source
            source.start()
        return source

    def _connect_reactor(self, clock: Any) -> Any:
        if self._reactor is not None or self._client is not None:
            return self._reactor
        from twisted.internet.interfaces import IReactorTCP

        if IReactorTCP.providedBy(clock):
            return clock
        from twisted.internet import reactor

        return reactor

    def stop(self) -> None:
        """
        Stop refreshing every fetched key set.
        """
        for source in self._sources.values():
            source.stop()


def _known(raw: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    if not isinstance(raw, Mapping):
        raise FilterConfigError(where, "expected a mapping")
    for key in raw:
        if key not in fields:
            raise FilterConfigError(f"{where}.{key}" if where else str(key),
                                    f"unknown field (expected one of: {', '.join(fields)})")


def _duration(raw: Mapping[str, Any], field: str, default: float, zero_ok: bool = False) -> float:
    if raw.get(field) is None:
        return default
    try:
        value = parse_duration(raw[field])
    except ValueError as e:
        raise FilterConfigError(field, str(e)) from None
    if value <= 0 and not zero_ok:
        raise FilterConfigError(field, "must be greater than zero")
    return value


def _string(raw: Mapping[str, Any], field: str, where: str, required: bool = False) -> str | None:
    value = raw.get(field)
    if value is None:
        if required:
            raise FilterConfigError(f"{where}.{field}", "is required")
        return None
    if not isinstance(value, str) or not value:
        raise FilterConfigError(f"{where}.{field}", f"expected a non-empty string, got {value!r}")
    return value


def _strings(raw: Mapping[str, Any], field: str, where: str) -> tuple[str, ...]:
    value = raw.get(field)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise FilterConfigError(f"{where}.{field}", f"expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _rule(raw: Any, where: str) -> ConfiguredRule:
    _known(raw, _RULE_FIELDS, where)
    issuer = _string(raw, "issuer", where, required=True)
    sources = [f for f in ("jwks_uri", "jwks", "jwks_file") if raw.get(f) is not None]
    if len(sources) != 1:
        raise FilterConfigError(where, "give exactly one of jwks_uri, jwks, jwks_file")
    jwks_uri = _string(raw, "jwks_uri", where)
    jwks_file = _string(raw, "jwks_file", where)
    jwks_inline = raw.get("jwks")
    keys: StaticJwks | None = None
    try:
        if jwks_uri is not None:
            if not jwks_uri.startswith(("http://", "https://")):
                raise FilterConfigError(f"{where}.jwks_uri", f"expected an http:// or https:// URL, got {jwks_uri!r}")
        elif jwks_file is not None:
            keys = StaticJwks.from_file(jwks_file)
        elif isinstance(jwks_inline, str):
            keys = StaticJwks.from_json(jwks_inline)
        elif isinstance(jwks_inline, Mapping):
            keys = StaticJwks(KeySet.from_dict(dict(jwks_inline)))
        else:
            raise FilterConfigError(f"{where}.jwks", "expected a JWKS as a JSON string or a mapping")
    except JwksError as e:
        raise FilterConfigError(f"{where}.{sources[0]}", str(e)) from None
    from_headers = []
    headers_raw = raw.get("from_headers") or []
    if not isinstance(headers_raw, list):
        raise FilterConfigError(f"{where}.from_headers", "expected a list of {name, prefix}")
    for i, h in enumerate(headers_raw):
        at = f"{where}.from_headers[{i}]"
        if isinstance(h, str):
            h = {"name": h}
        _known(h, ("name", "prefix"), at)
        prefix = h.get("prefix", "")
        if not isinstance(prefix, str):
            raise FilterConfigError(f"{at}.prefix", f"expected a string, got {prefix!r}")
        from_headers.append(HeaderLocation(_string(h, "name", at, required=True) or "", prefix))
    claims = []
    claims_raw = raw.get("output_claim_to_headers") or []
    if not isinstance(claims_raw, list):
        raise FilterConfigError(f"{where}.output_claim_to_headers", "expected a list of {header, claim}")
    for i, c in enumerate(claims_raw):
        at = f"{where}.output_claim_to_headers[{i}]"
        _known(c, ("header", "claim"), at)
        claims.append(ClaimToHeader(_string(c, "header", at, required=True) or "",
                                    _string(c, "claim", at, required=True) or ""))
    forward = raw.get("forward_original_token", False)
    if not isinstance(forward, bool):
        raise FilterConfigError(f"{where}.forward_original_token", f"expected true or false, got {forward!r}")
    rule = JwtRule(
        issuer=issuer or "",
        audiences=_strings(raw, "audiences", where),
        jwks_uri=jwks_uri,
        jwks=jwks_inline if isinstance(jwks_inline, str) else None,
        jwks_file=jwks_file,
        from_headers=tuple(from_headers),
        from_params=_strings(raw, "from_params", where),
        output_payload_to_header=_string(raw, "output_payload_to_header", where),
        output_claim_to_headers=tuple(claims),
        forward_original_token=forward,
    )
    return ConfiguredRule(rule, keys)
