"""
Tests for L{txmesh.policy.jwt}: token parsing, extraction and validation,
with keys made by C{cryptography}.  No clock: the time is an argument.
"""

from __future__ import annotations

import base64
import functools
import json
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.trial.unittest import SynchronousTestCase

from txmesh.policy.jwt import (
    AlgorithmNotAllowed,
    BadSignature,
    ClaimToHeader,
    HeaderLocation,
    JwksError,
    JwksUnavailable,
    JwtError,
    JwtExpired,
    JwtNotYetValid,
    JwtRule,
    KeySet,
    MalformedJwt,
    UnknownKid,
    WrongAudience,
    WrongIssuer,
    claim_value,
    extract_tokens,
    parse_jwt,
    validate,
)
from txmesh.proxy.stream import Headers

ISSUER = "https://issuer.example.com"
NOW = 1_800_000_000.0


@functools.cache
def rsa_key(name: str = "rsa") -> rsa.RSAPrivateKey:
    """
    @return: an RSA key, made once per name for the test run.
    """
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(name: str = "ec") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk(private: Any, kid: str | None, alg: str | None = None) -> dict[str, Any]:
    """
    @return: the public JWK of C{private}, with C{kid} and C{alg}.
    """
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        d = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        d = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        d = OKPAlgorithm.to_jwk(public, as_dict=True)
    d = dict(d)
    if kid is not None:
        d["kid"] = kid
    if alg is not None:
        d["alg"] = alg
    return d


def jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def default_jwks() -> dict[str, Any]:
    """
    @return: a JWKS with the RSA key as C{rsa-1} and the EC key as C{ec-1}.
    """
    return jwks(jwk(rsa_key(), "rsa-1", "RS256"), jwk(ec_key(), "ec-1", "ES256"))


def claims(**overrides: Any) -> dict[str, Any]:
    """
    @return: a valid payload for L{ISSUER} around L{NOW}; C{None} values
        remove a claim.
    """
    base: dict[str, Any] = {
        "iss": ISSUER, "sub": "alice", "aud": ["bookstore"], "azp": "web-app",
        "iat": int(NOW) - 10, "nbf": int(NOW) - 10, "exp": int(NOW) + 3600,
        "groups": ["admin", "dev"], "email": "alice@example.com",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(payload: dict[str, Any] | None = None, key: Any = None, alg: str = "RS256",
          kid: str | None = "rsa-1", headers: dict[str, Any] | None = None) -> str:
    """
    @return: a signed token (the RSA key, C{rsa-1}, by default).
    """
    if key is None:
        key = ec_key() if alg.startswith("ES") else rsa_key()
    extra = dict(headers or {})
    if kid is not None:
        extra["kid"] = kid
    return pyjwt.encode(payload if payload is not None else claims(), key, algorithm=alg, headers=extra)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"sig") -> str:
    """
    @return: a token with any header, e.g. C{alg: none}.
    """
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)))


RULE = JwtRule(issuer=ISSUER, audiences=("bookstore",), jwks_uri="https://issuer.example.com/jwks")


class ValidTokenTests(SynchronousTestCase):
    """
    Tokens that pass, and what they yield.
    """

    def setUp(self) -> None:
        self.keys = KeySet.from_dict(default_jwks())

    def check(self, tok: str, rule: JwtRule = RULE, now: float = NOW) -> Any:
        return validate(parse_jwt(tok), rule, self.keys, now)

    def test_rs256(self) -> None:
        result = self.check(token())
        self.assertEqual(result.principal, f"{ISSUER}/alice")
        self.assertEqual(result.audiences, ("bookstore",))
        self.assertEqual(result.presenter, "web-app")
        self.assertEqual(result.claims["email"], "alice@example.com")

    def test_es256(self) -> None:
        result = self.check(token(alg="ES256", kid="ec-1"))
        self.assertEqual(result.principal, f"{ISSUER}/alice")

    def test_ps256(self) -> None:
        keys = KeySet.from_dict(jwks(jwk(rsa_key(), "rsa-1")))
        result = validate(parse_jwt(token(alg="PS256")), RULE, keys, NOW)
        self.assertEqual(result.subject, "alice")

    def test_eddsa(self) -> None:
        private = ed25519.Ed25519PrivateKey.generate()
        keys = KeySet.from_dict(jwks(jwk(private, "ed")))
        result = validate(parse_jwt(token(key=private, alg="EdDSA", kid="ed")), RULE, keys, NOW)
        self.assertEqual(result.subject, "alice")

    def test_no_kid_tries_every_fitting_key(self) -> None:
        other = jwk(rsa_key("other"), "other", "RS256")
        self.keys = KeySet.from_dict(jwks(other, jwk(rsa_key(), "rsa-1", "RS256")))
        self.assertEqual(self.check(token(kid=None)).subject, "alice")

    def test_key_without_alg(self) -> None:
        self.keys = KeySet.from_dict(jwks(jwk(rsa_key(), "rsa-1")))
        self.assertEqual(self.check(token(alg="RS384")).subject, "alice")

    def test_audience_string(self) -> None:
        self.assertEqual(self.check(token(claims(aud="bookstore"))).audiences, ("bookstore",))

    def test_audience_any_of(self) -> None:
        self.check(token(claims(aud=["other", "bookstore"])))

    def test_audience_normalized(self) -> None:
        rule = JwtRule(issuer=ISSUER, audiences=("https://bookstore.example.com/",), jwks="{}")
        self.check(token(claims(aud="bookstore.example.com")), rule)

    def test_no_audiences_configured(self) -> None:
        rule = JwtRule(issuer=ISSUER, jwks="{}")
        result = self.check(token(claims(aud=None)), rule)
        self.assertEqual(result.audiences, ())

    def test_no_presenter(self) -> None:
        self.assertIsNone(self.check(token(claims(azp=None))).presenter)

    def test_no_sub(self) -> None:
        self.assertEqual(self.check(token(claims(sub=None))).principal, f"{ISSUER}/")

    def test_no_exp(self) -> None:
        self.check(token(claims(exp=None)))

    def test_exp_within_leeway(self) -> None:
        self.check(token(claims(exp=int(NOW) - 59)))

    def test_nbf_within_leeway(self) -> None:
        self.check(token(claims(nbf=int(NOW) + 59)))

    def test_metadata(self) -> None:
        md = self.check(token()).as_metadata()
        self.assertEqual(set(md), {"principal", "claims", "audiences", "presenter"})
        self.assertEqual(md["audiences"], ["bookstore"])
        self.assertEqual(md["claims"]["groups"], ["admin", "dev"])


class InvalidTokenTests(SynchronousTestCase):
    """
    Every error, with Envoy's words.
    """

    def setUp(self) -> None:
        self.keys: KeySet | None = KeySet.from_dict(default_jwks())

    def fails(self, error: type[JwtError], tok: str, reason: str, rule: JwtRule = RULE, now: float = NOW) -> JwtError:
        def run() -> None:
            validate(parse_jwt(tok), rule, self.keys, now)

        e = self.assertRaises(error, run)
        self.assertEqual(e.reason, reason)
        return e

    def test_malformed_table(self) -> None:
        good = token()
        h, p, s = good.split(".")
        bad_format = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
        table = [
            ("garbage", bad_format),
            ("a.b", bad_format),
            ("a.b.c.d", bad_format),
            ("", bad_format),
            (f"{h}.{p}.{s}é", bad_format),
            (f"!!.{p}.{s}", "Jwt header is an invalid Base64url encoded"),
            (f"{b64(b'not json')}.{p}.{s}", "Jwt header is an invalid JSON"),
            (f"{b64(b'[1]')}.{p}.{s}", "Jwt header is an invalid JSON"),
            (f"{h}.!!.{s}", "Jwt payload is an invalid Base64url encoded"),
            (f"{h}.{b64(b'{')}.{s}", "Jwt payload is an invalid JSON"),
            (f"{h}.{p}.!!", "Jwt signature is an invalid Base64url encoded"),
        ]
        for tok, reason in table:
            e = self.assertRaises(MalformedJwt, parse_jwt, tok)
            self.assertEqual(e.reason, reason, tok)
            self.assertEqual(e.status, 401)

    def test_claim_types(self) -> None:
        table = [
            ({"iss": 7}, "Jwt payload [iss] field is not a string"),
            ({"sub": ["a"]}, "Jwt payload [sub] field is not a string"),
            ({"exp": "tomorrow"}, "Jwt payload [exp] field is not an integer"),
            ({"nbf": True}, "Jwt payload [nbf] field is not an integer"),
            ({"iat": -1}, "Jwt payload [iat] field is not a positive integer"),
            ({"aud": [1]}, "Jwt payload [aud] field is not a string or string list"),
        ]
        for override, reason in table:
            e = self.assertRaises(MalformedJwt, parse_jwt, unsigned({"alg": "RS256"}, claims(**override)))
            self.assertEqual(e.reason, reason, override)

    def test_kid_not_string(self) -> None:
        e = self.assertRaises(MalformedJwt, parse_jwt, unsigned({"alg": "RS256", "kid": 1}, claims()))
        self.assertEqual(e.reason, "Jwt header [kid] field is not a string")

    def test_alg_none(self) -> None:
        self.fails(AlgorithmNotAllowed, unsigned({"alg": "none"}, claims(), b""), "Jwt header [alg] is not supported")

    def test_alg_hmac(self) -> None:
        # An HS256 token "signed" with the public key: the classic confusion attack.
        tok = unsigned({"alg": "HS256", "kid": "rsa-1"}, claims())
        self.fails(AlgorithmNotAllowed, tok, "Jwt header [alg] is not supported")

    def test_alg_missing(self) -> None:
        e = self.assertRaises(AlgorithmNotAllowed, parse_jwt, unsigned({"typ": "JWT"}, claims()))
        self.assertEqual(e.reason, "Jwt header [alg] field is required and must be a string")

    def test_unknown_kid(self) -> None:
        self.fails(UnknownKid, token(kid="rotated"), "Jwks doesn't have key to match kid or alg from Jwt")

    def test_alg_without_fitting_key(self) -> None:
        self.keys = KeySet.from_dict(jwks(jwk(rsa_key(), "rsa-1", "RS256")))
        self.fails(UnknownKid, token(alg="ES256", kid=None), "Jwks doesn't have key to match kid or alg from Jwt")

    def test_key_alg_mismatch(self) -> None:
        # rsa-1 is declared RS256: an RS512 token with that kid finds no key.
        self.fails(UnknownKid, token(alg="RS512"), "Jwks doesn't have key to match kid or alg from Jwt")

    def test_bad_signature(self) -> None:
        self.fails(BadSignature, token(key=rsa_key("attacker")), "Jwt verification fails")

    def test_tampered_payload(self) -> None:
        h, _, s = token().split(".")
        forged = f"{h}.{b64(json.dumps(claims(sub='root')).encode())}.{s}"
        self.fails(BadSignature, forged, "Jwt verification fails")

    def test_bad_es256_signature(self) -> None:
        self.fails(BadSignature, token(alg="ES256", kid="ec-1", key=ec_key("attacker")), "Jwt verification fails")

    def test_expired(self) -> None:
        self.fails(JwtExpired, token(claims(exp=int(NOW) - 61)), "Jwt is expired")

    def test_expired_no_leeway(self) -> None:
        def run() -> None:
            validate(parse_jwt(token(claims(exp=int(NOW) - 1))), RULE, self.keys, NOW, leeway=0)

        self.assertRaises(JwtExpired, run)

    def test_not_yet_valid(self) -> None:
        self.fails(JwtNotYetValid, token(claims(nbf=int(NOW) + 61)), "Jwt not yet valid")

    def test_wrong_issuer(self) -> None:
        self.fails(WrongIssuer, token(claims(iss="https://evil.example.com")), "Jwt issuer is not configured")

    def test_no_issuer(self) -> None:
        self.fails(WrongIssuer, token(claims(iss=None)), "Jwt issuer is not configured")

    def test_wrong_audience(self) -> None:
        e = self.fails(WrongAudience, token(claims(aud="other")), "Audiences in Jwt are not allowed")
        self.assertEqual(e.status, 403)

    def test_missing_audience(self) -> None:
        self.fails(WrongAudience, token(claims(aud=None)), "Audiences in Jwt are not allowed")

    def test_no_keys(self) -> None:
        self.keys = None
        self.fails(JwksUnavailable, token(), "Jwks remote fetch is failed")

    def test_order_time_before_signature(self) -> None:
        # As Envoy: time, issuer and audiences are checked before the keys.
        self.fails(JwtExpired, token(claims(exp=int(NOW) - 100), key=rsa_key("attacker")), "Jwt is expired")


class KeySetTests(SynchronousTestCase):
    """
    L{KeySet}: what a JWKS document may hold.
    """

    def test_from_json(self) -> None:
        keys = KeySet.from_json(json.dumps(default_jwks()))
        self.assertEqual(keys.kids(), {"rsa-1", "ec-1"})

    def test_garbage(self) -> None:
        e = self.assertRaises(JwksError, KeySet.from_json, b"<html>")
        self.assertIn("Jwks is an invalid JSON", str(e))

    def test_no_keys_field(self) -> None:
        self.assertRaises(JwksError, KeySet.from_dict, {"kids": []})
        self.assertRaises(JwksError, KeySet.from_dict, [])

    def test_keys_not_array(self) -> None:
        e = self.assertRaises(JwksError, KeySet.from_dict, {"keys": {}})
        self.assertEqual(str(e), "[keys] in Jwks is not an array")

    def test_hmac_keys_refused(self) -> None:
        oct_key = {"kty": "oct", "kid": "h", "k": b64(b"secret"), "alg": "HS256"}
        e = self.assertRaises(JwksError, KeySet.from_dict, jwks(oct_key))
        self.assertIn("Jwks doesn't have any valid public key", str(e))
        keys = KeySet.from_dict(jwks(oct_key, jwk(rsa_key(), "rsa-1")))
        self.assertEqual(keys.kids(), {"rsa-1"})
        self.assertEqual(len(keys.skipped), 1)

    def test_hs256_alg_on_rsa_key_refused(self) -> None:
        keys = KeySet.from_dict(jwks(jwk(rsa_key(), "bad", "HS256"), jwk(rsa_key(), "rsa-1")))
        self.assertEqual(keys.kids(), {"rsa-1"})

    def test_broken_key_skipped(self) -> None:
        keys = KeySet.from_dict(jwks({"kty": "RSA", "kid": "x", "n": "@@"}, "nonsense", jwk(ec_key(), "ec-1")))
        self.assertEqual(keys.kids(), {"ec-1"})
        self.assertEqual(len(keys.skipped), 2)

    def test_encryption_keys_skipped(self) -> None:
        enc = dict(jwk(rsa_key(), "enc"), use="enc")
        self.assertRaises(JwksError, KeySet.from_dict, jwks(enc))


class ExtractionTests(SynchronousTestCase):
    """
    L{extract_tokens}: where a rule looks.
    """

    def tokens(self, rule: JwtRule, headers: list[tuple[bytes, bytes]], path: bytes = b"/") -> list[Any]:
        return extract_tokens(rule, Headers(headers), path)

    def test_default_bearer(self) -> None:
        found = self.tokens(RULE, [(b"authorization", b"Bearer abc.def.ghi")])
        self.assertEqual([(t.token, t.header) for t in found], [("abc.def.ghi", b"authorization")])

    def test_default_bearer_case_insensitive(self) -> None:
        self.assertEqual(self.tokens(RULE, [(b"authorization", b"bearer t")])[0].token, "t")

    def test_default_not_bearer(self) -> None:
        self.assertEqual(self.tokens(RULE, [(b"authorization", b"Basic dXNlcjpwYXNz")]), [])

    def test_default_param(self) -> None:
        found = self.tokens(RULE, [], b"/x?a=1&access_token=tok")
        self.assertEqual([(t.token, t.param) for t in found], [("tok", "access_token")])

    def test_header_then_param(self) -> None:
        found = self.tokens(RULE, [(b"authorization", b"Bearer h")], b"/?access_token=p")
        self.assertEqual([t.token for t in found], ["h", "p"])

    def test_custom_header_prefix(self) -> None:
        rule = JwtRule(issuer=ISSUER, jwks="{}", from_headers=(HeaderLocation("X-Jwt", "Token "),))
        self.assertEqual(self.tokens(rule, [(b"x-jwt", b"Token t1")])[0].token, "t1")
        self.assertEqual(self.tokens(rule, [(b"x-jwt", b"t1")]), [])
        # Explicit locations replace the defaults.
        self.assertEqual(self.tokens(rule, [(b"authorization", b"Bearer t")], b"/?access_token=t"), [])

    def test_custom_header_no_prefix(self) -> None:
        rule = JwtRule(issuer=ISSUER, jwks="{}", from_headers=(HeaderLocation("x-goog-iap-jwt-assertion"),))
        self.assertEqual(self.tokens(rule, [(b"x-goog-iap-jwt-assertion", b"t")])[0].token, "t")

    def test_params(self) -> None:
        rule = JwtRule(issuer=ISSUER, jwks="{}", from_params=("token", "jwt"))
        found = self.tokens(rule, [(b"authorization", b"Bearer ignored")], b"/p?jwt=b&token=a%2Eb")
        self.assertEqual([t.token for t in found], ["a.b", "b"])

    def test_empty_values(self) -> None:
        self.assertEqual(self.tokens(RULE, [(b"authorization", b"Bearer ")], b"/?access_token="), [])


class ClaimValueTests(SynchronousTestCase):
    """
    L{claim_value}: claims as header values.
    """

    def test_table(self) -> None:
        c = {"s": "x", "i": 3, "b": True, "l": ["a", "b"], "o": {"k": {"v": "deep"}}, "mixed": ["a", {}],
             "dotted.name": "d"}
        table = [("s", "x"), ("i", "3"), ("b", "true"), ("l", "a,b"), ("o.k.v", "deep"), ("o", None),
                 ("mixed", None), ("missing", None), ("o.missing", None), ("dotted.name", "d")]
        for name, expected in table:
            self.assertEqual(claim_value(c, name), expected, name)


class RuleTests(SynchronousTestCase):
    """
    L{JwtRule} defaults and validation.
    """

    def test_defaults(self) -> None:
        self.assertEqual(RULE.header_locations, (HeaderLocation("authorization", "Bearer "),))
        self.assertEqual(RULE.param_locations, ("access_token",))

    def test_output_headers(self) -> None:
        rule = JwtRule(issuer=ISSUER, jwks="{}", output_payload_to_header="X-Payload",
                       output_claim_to_headers=(ClaimToHeader("X-Sub", "sub"),))
        self.assertEqual(rule.output_headers, {b"x-payload", b"x-sub"})

    def test_empty_issuer(self) -> None:
        self.assertRaises(ValueError, JwtRule, issuer="")
