"""
JSON Web Token request authentication, as Istio's C{RequestAuthentication}
and Envoy's C{jwt_authn} filter do it, without I/O.

This module holds the pieces the C{jwt} filter (L{txmesh.filters.jwt_authn})
is built from:

  - the rule model (L{JwtRule}, L{HeaderLocation}, L{ClaimToHeader}), one
    per Istio C{jwtRules} entry;
  - token extraction from headers and query parameters (L{extract_tokens});
  - parsing (L{parse_jwt}) and validation (L{validate}) against a L{KeySet}
    at a time the caller supplies, so tests need no real clock;
  - the result, L{JwtAuthResult} (principal C{iss/sub}, claims, audiences,
    presenter), and typed errors (L{JwtError} and its subclasses) whose
    C{reason} is the text Envoy answers with.

Only asymmetric algorithms are accepted (RS*, PS*, ES*, EdDSA): a JWKS is a
set of public keys, so C{none} and the HMAC algorithms are refused, and
C{oct} keys in a key set are ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import attrs
import jwt as pyjwt
from jwt import PyJWK

ALLOWED_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512",
    "EdDSA",
})
"""
The signature algorithms a token may use: every asymmetric one Envoy supports.
"""

DEFAULT_LEEWAY = 60.0
"""
Seconds of clock skew allowed on C{exp} and C{nbf} (Envoy's default
C{clock_skew_seconds}).
"""

DEFAULT_PARAM = "access_token"
"""
The query parameter searched when a rule names no location.
"""

_EC_CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


# -- errors -------------------------------------------------------------------


class JwtError(Exception):
    """
    A token that fails validation.

    @ivar reason: what is wrong, in Envoy's words (the 401 body).
    @ivar status: the HTTP status Envoy answers with (401, or 403 for
        audiences).
    """

    status = 401
    default_reason = "Jwt verification fails"

    def __init__(self, reason: str | None = None, detail: str | None = None):
        """
        @param reason: overrides the class's Envoy text.
        @param detail: more context for logs (never sent to the client).
        """
        self.reason = reason or self.default_reason
        self.detail = detail
        super().__init__(self.reason if detail is None else f"{self.reason} ({detail})")


class MalformedJwt(JwtError):
    """
    The token is not three base64url sections of JSON, or a registered claim
    has the wrong type.
    """

    default_reason = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"


class AlgorithmNotAllowed(JwtError):
    """
    The header's C{alg} is missing, C{none}, HMAC, or otherwise unsupported.
    """

    default_reason = "Jwt header [alg] is not supported"


class UnknownKid(JwtError):
    """
    No key in the key set matches the token's C{kid} and C{alg}.
    """

    default_reason = "Jwks doesn't have key to match kid or alg from Jwt"


class BadSignature(JwtError):
    """
    The signature does not verify with any matching key.
    """

    default_reason = "Jwt verification fails"


class JwtExpired(JwtError):
    """
    C{exp} is in the past (beyond the leeway).
    """

    default_reason = "Jwt is expired"


class JwtNotYetValid(JwtError):
    """
    C{nbf} is in the future (beyond the leeway).
    """

    default_reason = "Jwt not yet valid"


class WrongIssuer(JwtError):
    """
    No rule is configured for the token's C{iss}.
    """

    default_reason = "Jwt issuer is not configured"


class WrongAudience(JwtError):
    """
    None of the token's C{aud} values is allowed by the rule.
    """

    status = 403
    default_reason = "Audiences in Jwt are not allowed"


class JwksUnavailable(JwtError):
    """
    The rule's key set could not be fetched, so no token can be verified.
    """

    default_reason = "Jwks remote fetch is failed"


class JwksError(ValueError):
    """
    A JSON Web Key Set document that cannot be used (bad JSON, no C{keys},
    no usable public key).
    """


# -- rules ----------------------------------------------------------------------


def _nonempty(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name}: must not be empty")


@attrs.frozen
class HeaderLocation:
    """
    A header a token may arrive in (Istio's C{fromHeaders} entry).

    @ivar name: the header name, lower-case.
    @ivar prefix: stripped before decoding (e.g. C{"Bearer "}); a value that
        does not start with it carries no token.
    """

    name: str = attrs.field(converter=str.lower, validator=_nonempty)
    prefix: str = ""


@attrs.frozen
class ClaimToHeader:
    """
    Copy a claim of a verified token into a request header (Istio's
    C{outputClaimToHeaders} entry).

    @ivar header: the header to set.
    @ivar claim: the claim name; a dotted name (C{a.b}) reaches into an
        object claim.
    """

    header: str = attrs.field(converter=str.lower, validator=_nonempty)
    claim: str = attrs.field(validator=_nonempty)


DEFAULT_HEADER = HeaderLocation("authorization", "Bearer ")
"""
The header searched when a rule names no location.
"""


@attrs.frozen
class JwtRule:
    """
    One issuer the workload accepts tokens from (an Istio C{jwtRules} entry).

    The key source (C{jwks_uri}, inline C{jwks} or C{jwks_file}) is kept as
    configured; the filter turns it into keys.

    @ivar issuer: the required C{iss}.
    @ivar audiences: allowed C{aud} values; empty means any.
    @ivar from_headers: header locations; with C{from_params} empty too, the
        default C{Authorization: Bearer} header and C{access_token} parameter.
    @ivar from_params: query parameter names.
    @ivar output_payload_to_header: a header to receive the payload
        (base64url, as in the token), or C{None}.
    @ivar output_claim_to_headers: claims to copy into headers.
    @ivar forward_original_token: keep the header the token came in.
    """

    issuer: str = attrs.field(validator=_nonempty)
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks: str | None = None
    jwks_file: str | None = None
    from_headers: tuple[HeaderLocation, ...] = ()
    from_params: tuple[str, ...] = ()
    output_payload_to_header: str | None = None
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    forward_original_token: bool = False

    @property
    def header_locations(self) -> tuple[HeaderLocation, ...]:
        """
        @return: the headers searched, defaults applied.
        """
        if self.from_headers or self.from_params:
            return self.from_headers
        return (DEFAULT_HEADER,)

    @property
    def param_locations(self) -> tuple[str, ...]:
        """
        @return: the query parameters searched, defaults applied.
        """
        if self.from_headers or self.from_params:
            return self.from_params
        return (DEFAULT_PARAM,)

    @property
    def output_headers(self) -> frozenset[bytes]:
        """
        @return: every header this rule writes on success (lower-case bytes).
        """
        names = {c.header for c in self.output_claim_to_headers}
        if self.output_payload_to_header:
            names.add(self.output_payload_to_header.lower())
        return frozenset(n.encode("latin-1") for n in names)


# -- extraction -----------------------------------------------------------------


@attrs.frozen
class ExtractedToken:
    """
    A token found in a request.

    @ivar token: the token text.
    @ivar header: the header it came from (lower-case bytes), or C{None}.
    @ivar param: the query parameter it came from, or C{None}.
    """

    token: str
    header: bytes | None = None
    param: str | None = None


def extract_tokens(rule: JwtRule, headers: Any, path: bytes) -> list[ExtractedToken]:
    """
    Find the tokens C{rule} looks for in a request, headers first, in the
    rule's order.

    @param headers: the request's L{txmesh.proxy.stream.Headers} (anything
        with C{get_all(name) -> list[bytes]}).
    @param path: the request target, query included.
    @return: the tokens found (possibly none).
    """
    found: list[ExtractedToken] = []
    for location in rule.header_locations:
        name = location.name.encode("latin-1")
        prefix = location.prefix
        for raw in headers.get_all(name):
            value = raw.decode("latin-1").strip()
            if prefix:
                # Auth schemes are case-insensitive (RFC 7235), so is the prefix.
                if value[:len(prefix)].lower() != prefix.lower():
                    continue
                value = value[len(prefix):].strip()
            if value:
                found.append(ExtractedToken(value, header=name))
    if rule.param_locations:
        query = _query(path)
        for param in rule.param_locations:
            for key, value in query:
                if key == param and value:
                    found.append(ExtractedToken(value, param=param))
                    break
    return found


def _query(path: bytes) -> list[tuple[str, str]]:
    q = path.find(b"?")
    if q < 0:
        return []
    return parse_qsl(path[q + 1:].decode("latin-1"), keep_blank_values=True)


# -- parsing --------------------------------------------------------------------


@attrs.frozen
class Jwt:
    """
    A parsed, not yet verified, token.

    @ivar header: the JOSE header.
    @ivar payload: the claims.
    @ivar signing_input: C{header.payload} as sent, the bytes signed.
    @ivar signature: the decoded signature.
    @ivar raw_payload: the payload section as sent (base64url).
    """

    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    signing_input: bytes
    signature: bytes
    raw_payload: str

    @property
    def alg(self) -> Any:
        return self.header.get("alg")

    @property
    def kid(self) -> Any:
        return self.header.get("kid")

    @property
    def issuer(self) -> Any:
        return self.payload.get("iss")


def _b64decode(section: str) -> bytes:
    padded = section + "=" * (-len(section) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


def parse_jwt(token: str) -> Jwt:
    """
    Split and decode a compact-serialized JWS, checking the registered
    claims' types.

    @raise MalformedJwt: with Envoy's text for the first problem found.
    @raise AlgorithmNotAllowed: for a missing or non-string C{alg}.
    """
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise MalformedJwt()
    header_b64, payload_b64, signature_b64 = parts
    header = _json_section(header_b64, "header")
    payload = _json_section(payload_b64, "payload")
    try:
        signature = _b64decode(signature_b64)
    except (binascii.Error, ValueError):
        raise MalformedJwt("Jwt signature is an invalid Base64url encoded") from None
    if not isinstance(header.get("alg"), str):
        raise AlgorithmNotAllowed("Jwt header [alg] field is required and must be a string")
    if "kid" in header and not isinstance(header["kid"], str):
        raise MalformedJwt("Jwt header [kid] field is not a string")
    for claim in ("iss", "sub", "jti"):
        if claim in payload and not isinstance(payload[claim], str):
            raise MalformedJwt(f"Jwt payload [{claim}] field is not a string")
    for claim in ("iat", "nbf", "exp"):
        if claim in payload:
            value = payload[claim]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MalformedJwt(f"Jwt payload [{claim}] field is not an integer")
            if value < 0:
                raise MalformedJwt(f"Jwt payload [{claim}] field is not a positive integer")
    _audiences(payload)
    return Jwt(header, payload, f"{header_b64}.{payload_b64}".encode("ascii"), signature, payload_b64)


def _json_section(section: str, what: str) -> dict[str, Any]:
    try:
        raw = _b64decode(section)
    except (binascii.Error, ValueError):
        raise MalformedJwt(f"Jwt {what} is an invalid Base64url encoded") from None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise MalformedJwt(f"Jwt {what} is an invalid JSON") from None
    if not isinstance(value, dict):
        raise MalformedJwt(f"Jwt {what} is an invalid JSON")
    return value


def _audiences(payload: Mapping[str, Any]) -> tuple[str, ...]:
    aud = payload.get("aud")
    if aud is None:
        return ()
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return tuple(aud)
    raise MalformedJwt("Jwt payload [aud] field is not a string or string list")


# -- keys -----------------------------------------------------------------------


@attrs.frozen
class KeySet:
    """
    The usable public keys of a JSON Web Key Set.

    @ivar keys: C{(jwk, key)} pairs: the JWK's JSON object and PyJWT's
        parsed key.
    @ivar skipped: why each unusable JWK was left out.
    """

    keys: tuple[tuple[Mapping[str, Any], PyJWK], ...]
    skipped: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, text: str | bytes) -> KeySet:
        """
        @raise JwksError: if C{text} is not JSON or has no usable key.
        """
        try:
            document = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise JwksError(f"Jwks is an invalid JSON: {e}") from None
        return cls.from_dict(document)

    @classmethod
    def from_dict(cls, document: Any) -> KeySet:
        """
        @param document: a parsed JWKS (C{{"keys": [...]}}).
        @raise JwksError: if it has no usable public key.
        """
        if not isinstance(document, dict) or "keys" not in document:
            raise JwksError("Jwks does not have [keys] field")
        entries = document["keys"]
        if not isinstance(entries, list):
            raise JwksError("[keys] in Jwks is not an array")
        keys: list[tuple[Mapping[str, Any], PyJWK]] = []
        skipped: list[str] = []
        for i, jwk in enumerate(entries):
            if not isinstance(jwk, dict):
                skipped.append(f"keys[{i}]: not an object")
                continue
            kty = jwk.get("kty")
            if kty not in ("RSA", "EC", "OKP"):
                # oct (HMAC) keys are shared secrets: never accepted from a JWKS.
                skipped.append(f"keys[{i}]: kty {kty!r} is not a public key type")
                continue
            alg = jwk.get("alg")
            if alg is not None and alg not in ALLOWED_ALGORITHMS:
                skipped.append(f"keys[{i}]: alg {alg!r} is not allowed")
                continue
            if jwk.get("use", "sig") != "sig":
                skipped.append(f"keys[{i}]: use {jwk.get('use')!r} is not sig")
                continue
            try:
                keys.append((jwk, PyJWK(jwk)))
            except (pyjwt.PyJWTError, ValueError, TypeError, KeyError) as e:
                skipped.append(f"keys[{i}]: {e}")
        if not keys:
            detail = f": {'; '.join(skipped)}" if skipped else ""
            raise JwksError(f"Jwks doesn't have any valid public key{detail}")
        return cls(tuple(keys), tuple(skipped))

    def matching(self, alg: str, kid: str | None) -> list[PyJWK]:
        """
        @return: the keys that can verify a token signed with C{alg}: those
            with the token's C{kid} when it has one, else every key fitting
            C{alg}.
        """
        return [key for jwk, key in self.keys
                if (kid is None or jwk.get("kid") == kid) and _fits(jwk, alg)]

    def kids(self) -> frozenset[str]:
        """
        @return: the key ids in the set.
        """
        return frozenset(jwk["kid"] for jwk, _ in self.keys if isinstance(jwk.get("kid"), str))


def _fits(jwk: Mapping[str, Any], alg: str) -> bool:
    if jwk.get("alg") is not None and jwk["alg"] != alg:
        return False
    kty = jwk.get("kty")
    if kty == "RSA":
        return alg[:2] in ("RS", "PS")
    if kty == "EC":
        return _EC_CURVE_ALGORITHMS.get(jwk.get("crv", "")) == alg
    if kty == "OKP":
        return alg == "EdDSA"
    return False


# -- validation -----------------------------------------------------------------


@attrs.frozen
class JwtAuthResult:
    """
    A verified token.

    @ivar principal: C{iss/sub}, Istio's C{request.auth.principal}.
    @ivar issuer: C{iss}.
    @ivar subject: C{sub} (C{""} when absent).
    @ivar audiences: the C{aud} values.
    @ivar presenter: C{azp}, or C{None}.
    @ivar claims: the whole payload.
    @ivar raw_payload: the payload section as sent (base64url).
    """

    principal: str
    issuer: str
    subject: str
    audiences: tuple[str, ...]
    presenter: str | None
    claims: Mapping[str, Any]
    raw_payload: str

    def as_metadata(self) -> dict[str, Any]:
        """
        @return: the value the filter stores as C{stream.metadata["request.auth"]}.
        """
        return {
            "principal": self.principal,
            "claims": dict(self.claims),
            "audiences": list(self.audiences),
            "presenter": self.presenter,
        }


def _normalize_audience(aud: str) -> str:
    # As jwt_verify_lib: "https://x/" and "x" name the same audience.
    for scheme in ("http://", "https://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme):]
            break
    return aud.rstrip("/")


def check_algorithm(token: Jwt) -> str:
    """
    @return: the token's C{alg}.
    @raise AlgorithmNotAllowed: for C{none}, HMAC and anything else outside
        L{ALLOWED_ALGORITHMS}.
    """
    alg = token.alg
    if alg not in ALLOWED_ALGORITHMS:
        raise AlgorithmNotAllowed(detail=f"alg {alg!r}")
    return alg


def check_time(token: Jwt, now: float, leeway: float = DEFAULT_LEEWAY) -> None:
    """
    @param now: the current POSIX time, from the caller's clock.
    @raise JwtExpired: if C{exp + leeway < now}.
    @raise JwtNotYetValid: if C{nbf - leeway > now}.
    """
    exp = token.payload.get("exp")
    if exp is not None and now > exp + leeway:
        raise JwtExpired(detail=f"exp {exp}, now {now}")
    nbf = token.payload.get("nbf")
    if nbf is not None and nbf > now + leeway:
        raise JwtNotYetValid(detail=f"nbf {nbf}, now {now}")


def check_claims(token: Jwt, issuer: str, audiences: Sequence[str]) -> None:
    """
    @raise WrongIssuer: if C{iss} is not C{issuer}.
    @raise WrongAudience: if C{audiences} is not empty and shares no value
        with the token's C{aud}.
    """
    if token.issuer != issuer:
        raise WrongIssuer(detail=f"iss {token.issuer!r}")
    if audiences:
        allowed = {_normalize_audience(a) for a in audiences}
        if not any(_normalize_audience(a) in allowed for a in _audiences(token.payload)):
            raise WrongAudience(detail=f"aud {list(_audiences(token.payload))!r}")


def verify_signature(token: Jwt, keys: KeySet) -> None:
    """
    Check the signature with the keys that match the token's C{kid}/C{alg}.

    @raise AlgorithmNotAllowed: if C{alg} is not allowed.
    @raise UnknownKid: if no key matches.
    @raise BadSignature: if no matching key verifies the signature.
    """
    alg = check_algorithm(token)
    candidates = keys.matching(alg, token.kid)
    if not candidates:
        raise UnknownKid(detail=f"kid {token.kid!r}, alg {alg}")
    algorithm = pyjwt.get_algorithm_by_name(alg)
    for key in candidates:
        try:
            if algorithm.verify(token.signing_input, key.key, token.signature):
                return
        except (pyjwt.PyJWTError, ValueError, TypeError):
            continue
    raise BadSignature()


def validate(
    token: Jwt,
    rule: JwtRule,
    keys: KeySet | None,
    now: float,
    leeway: float = DEFAULT_LEEWAY,
) -> JwtAuthResult:
    """
    Validate a parsed token against a rule, in Envoy's order: algorithm,
    time, issuer, audiences, then the signature.

    @param keys: the rule's key set, or C{None} if it could not be fetched.
    @param now: the current POSIX time, from an injected clock.
    @param leeway: seconds of clock skew allowed on C{exp}/C{nbf}.
    @raise JwtError: the first check that fails (a L{JwksUnavailable} when
        C{keys} is C{None}).
    """
    check_algorithm(token)
    check_time(token, now, leeway)
    check_claims(token, rule.issuer, rule.audiences)
    if keys is None:
        raise JwksUnavailable()
    verify_signature(token, keys)
    return result_of(token)


def result_of(token: Jwt) -> JwtAuthResult:
    """
    @return: the identity a verified token carries.
    """
    payload = token.payload
    iss = payload.get("iss", "")
    sub = payload.get("sub", "")
    azp = payload.get("azp")
    return JwtAuthResult(
        principal=f"{iss}/{sub}", issuer=iss, subject=sub,
        audiences=_audiences(payload), presenter=azp if isinstance(azp, str) else None,
        claims=payload, raw_payload=token.raw_payload,
    )


def claim_value(claims: Mapping[str, Any], name: str) -> str | None:
    """
    The header value for a claim, as Envoy's C{claim_to_headers} writes it.

    @param name: a claim name, or a dotted path into object claims.
    @return: strings as they are, numbers and booleans as JSON, lists of
        those joined with commas; C{None} for a missing claim or one of
        another type (no header is written).
    """
    value: Any = claims
    if name in claims:
        value = claims[name]
    else:
        for part in name.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
    return _scalar(value) if not isinstance(value, list) else _joined(value)


def _scalar(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return None


def _joined(values: Iterable[Any]) -> str | None:
    parts = [_scalar(v) for v in values]
    if any(p is None for p in parts):
        return None
    return ",".join(p for p in parts if p is not None)
