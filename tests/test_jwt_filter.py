"""
Tests for the C{jwt} filter (L{txmesh.filters.jwt_authn}) through
L{txmesh.testing.FilterHarness}: no sockets, a L{task.Clock}, and a fake
treq-like client for C{jwks_uri}.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from tests.test_jwt import ISSUER, claims, default_jwks, jwk, jwks, rsa_key, token
from txmesh.config.errors import FilterConfigError
from txmesh.filters.api import IHTTPFilterFactory
from txmesh.filters.jwt_authn import METADATA_KEY, JwtAuthnFactory
from txmesh.testing import FilterHarness

JWKS_URI = "https://issuer.example.com/.well-known/jwks.json"
START = 1_800_000_000.0


class FakeResponse:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self._body = body

    def content(self) -> Deferred:
        return succeed(self._body)


class FakeClient:
    """
    A treq-like client: each C{get} waits until the test answers it.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, Deferred]] = []

    def get(self, url: str) -> Deferred:
        d: Deferred = Deferred()
        self.requests.append((url, d))
        return d

    def answer(self, document: Any, code: int = 200) -> None:
        url, d = self.requests[-1]
        d.callback(FakeResponse(code, json.dumps(document).encode()))


def rule(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"issuer": ISSUER, "audiences": ["bookstore"], "jwks": json.dumps(default_jwks())}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


class JwtFilterTests(SynchronousTestCase):
    """
    Tokens in, 401s or identities out.
    """

    def harness(self, *rules: dict[str, Any], factory: JwtAuthnFactory | None = None, **config: Any) -> FilterHarness:
        self.factory = factory or JwtAuthnFactory()
        h = FilterHarness([(self.factory, {"rules": list(rules) or [rule()], **config})])
        h.clock.advance(START)
        return h

    def bearer(self, tok: str) -> dict[str, str]:
        return {"authorization": f"Bearer {tok}"}

    def assertDenied(self, response: Any, status: int, body: bytes) -> None:
        self.assertTrue(response.complete)
        self.assertEqual(response.status, status)
        self.assertEqual(response.body, body)
        self.assertEqual(
            response.headers.get(b"www-authenticate"),
            b'Bearer realm="http://example.com/books", error="invalid_token"',
        )
        self.assertIsNone(response.upstream_request)

    def test_no_token_passes(self) -> None:
        stream, response = self.harness().start("GET", "/books")
        self.assertEqual(response.status, 200)
        self.assertIsNotNone(response.upstream_request)
        self.assertNotIn(METADATA_KEY, stream.metadata)

    def test_valid_token(self) -> None:
        h = self.harness(rule(output_claim_to_headers=[{"header": "x-jwt-sub", "claim": "sub"},
                                                       {"header": "x-jwt-groups", "claim": "groups"}]))
        stream, response = h.start("GET", "/books", headers=self.bearer(token()))
        self.assertEqual(response.status, 200)
        self.assertEqual(stream.metadata[METADATA_KEY], {
            "principal": f"{ISSUER}/alice",
            "claims": claims(),
            "audiences": ["bookstore"],
            "presenter": "web-app",
        })
        sent = response.upstream_request.head.headers
        self.assertEqual(sent.get(b"x-jwt-sub"), b"alice")
        self.assertEqual(sent.get(b"x-jwt-groups"), b"admin,dev")
        self.assertIsNone(sent.get(b"authorization"))

    def test_forward_original_token(self) -> None:
        tok = token()
        response = self.harness(rule(forward_original_token=True)).request("GET", "/", headers=self.bearer(tok))
        self.assertEqual(response.upstream_request.head.headers.get(b"authorization"), f"Bearer {tok}".encode())

    def test_output_payload_to_header(self) -> None:
        response = self.harness(rule(output_payload_to_header="x-jwt-payload")).request(
            "GET", "/", headers=self.bearer(token()))
        raw = response.upstream_request.head.headers.get(b"x-jwt-payload")
        self.assertEqual(json.loads(base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))), claims())

    def test_forged_claim_headers_removed(self) -> None:
        h = self.harness(rule(output_claim_to_headers=[{"header": "x-jwt-sub", "claim": "sub"}]))
        response = h.request("GET", "/", headers={"x-jwt-sub": "root"})
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.upstream_request.head.headers.get(b"x-jwt-sub"))

    def test_bad_signature(self) -> None:
        response = self.harness().request("GET", "/books?x=1", headers=self.bearer(token(key=rsa_key("attacker"))))
        self.assertDenied(response, 401, b"Jwt verification fails")

    def test_expired(self) -> None:
        response = self.harness().request("GET", "/books", headers=self.bearer(token(claims(exp=int(START) - 120))))
        self.assertDenied(response, 401, b"Jwt is expired")

    def test_expiry_follows_the_clock(self) -> None:
        h = self.harness()
        tok = token(claims(exp=int(START) + 100))
        self.assertEqual(h.request("GET", "/books", headers=self.bearer(tok)).status, 200)
        h.clock.advance(161)
        self.assertDenied(h.request("GET", "/books", headers=self.bearer(tok)), 401, b"Jwt is expired")

    def test_not_yet_valid(self) -> None:
        response = self.harness().request("GET", "/books", headers=self.bearer(token(claims(nbf=int(START) + 120))))
        self.assertDenied(response, 401, b"Jwt not yet valid")

    def test_wrong_audience(self) -> None:
        # Envoy answers 403 for this one.
        response = self.harness().request("GET", "/books", headers=self.bearer(token(claims(aud="other"))))
        self.assertDenied(response, 403, b"Audiences in Jwt are not allowed")

    def test_wrong_issuer(self) -> None:
        response = self.harness().request("GET", "/books", headers=self.bearer(token(claims(iss="https://evil"))))
        self.assertDenied(response, 401, b"Jwt issuer is not configured")

    def test_malformed(self) -> None:
        response = self.harness().request("GET", "/books", headers=self.bearer("not-a-jwt"))
        self.assertDenied(response, 401, b"Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")

    def test_refusals_audited(self) -> None:
        fd, path = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        self.addCleanup(os.remove, path)
        h = self.harness(audit={"path": path})
        response = h.request("GET", "/books?x=1", headers=self.bearer("not-a-jwt"))
        self.assertEqual(response.status, 401)
        self.assertEqual(h.request("GET", "/books").status, 200)  # no token: nothing to refuse
        with open(path) as f:
            [record] = [json.loads(line) for line in f]
        self.assertEqual((record["decision"], record["policy"], record["method"], record["path"]),
                         ("DENY", "jwt", "GET", "/books"))
        self.assertIn("Header.Payload.Signature", record["reason"])

    def test_alg_none(self) -> None:
        h, p, _ = token().split(".")
        none_header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
        response = self.harness().request("GET", "/books", headers=self.bearer(f"{none_header}.{p}."))
        self.assertDenied(response, 401, b"Jwt header [alg] is not supported")

    def test_from_headers_prefix(self) -> None:
        h = self.harness(rule(from_headers=[{"name": "x-auth", "prefix": "Token "}]))
        stream, response = h.start("GET", "/books", headers={"x-auth": f"Token {token()}"})
        self.assertEqual(response.status, 200)
        self.assertEqual(stream.metadata[METADATA_KEY]["principal"], f"{ISSUER}/alice")
        self.assertIsNone(response.upstream_request.head.headers.get(b"x-auth"))
        # The default Authorization header is not looked at any more.
        stream, response = h.start("GET", "/books", headers=self.bearer("garbage"))
        self.assertEqual(response.status, 200)
        self.assertNotIn(METADATA_KEY, stream.metadata)

    def test_from_params(self) -> None:
        h = self.harness(rule(from_params=["jwt"]))
        stream, response = h.start("GET", f"/books?jwt={token()}")
        self.assertEqual(response.status, 200)
        self.assertEqual(stream.metadata[METADATA_KEY]["principal"], f"{ISSUER}/alice")
        self.assertDenied(h.request("GET", "/books?jwt=bad"), 401,
                          b"Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")

    def test_default_access_token_param(self) -> None:
        stream, response = self.harness().start("GET", f"/books?access_token={token()}")
        self.assertEqual(stream.metadata[METADATA_KEY]["principal"], f"{ISSUER}/alice")

    def test_issuer_selects_rule(self) -> None:
        other = rule(issuer="https://other.example.com", audiences=None,
                     jwks=json.dumps(jwks(jwk(rsa_key("other"), "o-1"))))
        h = self.harness(rule(), other)
        tok = token(claims(iss="https://other.example.com", aud=None), key=rsa_key("other"), kid="o-1")
        stream, response = h.start("GET", "/", headers=self.bearer(tok))
        self.assertEqual(stream.metadata[METADATA_KEY]["principal"], "https://other.example.com/alice")

    def test_disabled(self) -> None:
        from txmesh.config.model import DISABLED, Route, RouteMatch

        route = Route(name="open", match=RouteMatch(), cluster="test", filter_overrides=(("jwt", DISABLED),))
        h = FilterHarness([(JwtAuthnFactory(), {"rules": [rule()]})], route=route)
        self.assertEqual(h.request("GET", "/", headers=self.bearer("garbage")).status, 200)


class RemoteJwksFilterTests(SynchronousTestCase):
    """
    The filter with a C{jwks_uri}: waiting on the first fetch, refetching on
    an unknown key id, and a key server that is down.
    """

    def setUp(self) -> None:
        self.client = FakeClient()
        self.factory = JwtAuthnFactory(client=self.client, min_refetch_interval=30)
        self.addCleanup(self.factory.stop)
        self.h = FilterHarness([(self.factory, {"rules": [rule(jwks=None, jwks_uri=JWKS_URI)],
                                                "jwks_fetch_timeout": "3s"})])
        self.h.clock.advance(START)

    def bearer(self, tok: str) -> dict[str, str]:
        return {"authorization": f"Bearer {tok}"}

    def test_waits_for_first_fetch(self) -> None:
        stream, response = self.h.start("GET", "/", headers=self.bearer(token()))
        self.assertFalse(response.complete)
        self.assertEqual([u for u, _ in self.client.requests], [JWKS_URI])
        self.client.answer(default_jwks())
        self.assertEqual(response.status, 200)
        self.assertEqual(stream.metadata[METADATA_KEY]["principal"], f"{ISSUER}/alice")
        # Later requests use the cache.
        self.assertEqual(self.h.request("GET", "/", headers=self.bearer(token())).status, 200)
        self.assertEqual(len(self.client.requests), 1)

    def test_no_token_does_not_fetch(self) -> None:
        self.assertEqual(self.h.request("GET", "/").status, 200)
        self.assertEqual(self.client.requests, [])

    def test_jwks_down_at_first_fetch(self) -> None:
        response = self.h.request("GET", "/books", headers=self.bearer(token()))
        self.assertFalse(response.complete)
        self.h.clock.advance(2.9)
        self.assertFalse(response.complete)
        self.h.clock.advance(0.1)  # the bounded wait is over
        self.assertTrue(response.complete)
        self.assertEqual(response.status, 401)
        self.assertEqual(response.body, b"Jwks remote fetch is failed")
        self.assertIsNone(response.upstream_request)

    def test_jwks_refused_at_first_fetch(self) -> None:
        client = FakeClient()
        client.get = lambda url: fail(ConnectionRefusedError())  # type: ignore[method-assign]
        factory = JwtAuthnFactory(client=client)
        h = FilterHarness([(factory, {"rules": [rule(jwks=None, jwks_uri=JWKS_URI)]})])
        h.clock.advance(START)
        response = h.request("GET", "/books", headers=self.bearer(token()))
        self.assertEqual(response.status, 401)
        self.assertEqual(response.body, b"Jwks remote fetch is failed")
        factory.stop()

    def test_jwks_down_audited(self) -> None:
        """
        A request refused because the key server is down is an audit
        record naming the reason; a request without a token is not.
        """
        fd, path = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        self.addCleanup(os.remove, path)
        client = FakeClient()
        client.get = lambda url: fail(ConnectionRefusedError())  # type: ignore[method-assign]
        factory = JwtAuthnFactory(client=client)
        self.addCleanup(factory.stop)
        h = FilterHarness([(factory, {"rules": [rule(jwks=None, jwks_uri=JWKS_URI)], "audit": {"path": path}})])
        h.clock.advance(START)
        self.assertEqual(h.request("GET", "/books", headers=self.bearer(token())).status, 401)
        self.assertEqual(h.request("GET", "/books").status, 200)
        with open(path) as f:
            [record] = [json.loads(line) for line in f]
        self.assertEqual((record["decision"], record["policy"], record["method"], record["path"]),
                         ("DENY", "jwt", "GET", "/books"))
        self.assertIn("Jwks remote fetch is failed", record["reason"])

    def test_unknown_kid_refetches(self) -> None:
        self.h.request("GET", "/", headers=self.bearer(token()))
        self.client.answer(default_jwks())
        rotated = token(key=rsa_key("next"), kid="rsa-2")
        # Right after the first fetch: rate-limited, so the token is refused.
        response = self.h.request("GET", "/", headers=self.bearer(rotated))
        self.assertEqual(response.body, b"Jwks doesn't have key to match kid or alg from Jwt")
        self.assertEqual(len(self.client.requests), 1)
        self.h.clock.advance(30)
        response = self.h.request("GET", "/", headers=self.bearer(rotated))
        self.assertFalse(response.complete)
        self.client.answer(jwks(jwk(rsa_key(), "rsa-1"), jwk(rsa_key("next"), "rsa-2")))
        self.assertEqual(response.status, 200)

    def test_stream_reset_while_waiting(self) -> None:
        stream, response = self.h.start("GET", "/", headers=self.bearer(token()))
        stream.reset()
        self.client.answer(default_jwks())
        self.assertIsNone(response.upstream_request)
        self.assertEqual(self.flushLoggedErrors(), [])


class ConfigTests(SynchronousTestCase):
    """
    C{parse_config} of the C{jwt} filter.
    """

    def parse(self, raw: Any) -> Any:
        return JwtAuthnFactory().parse_config(raw)

    def bad(self, raw: Any, field: str) -> None:
        e = self.assertRaises(FilterConfigError, self.parse, raw)
        self.assertEqual(e.field, field)

    def test_parsed(self) -> None:
        config = self.parse({"rules": [rule(from_headers=[{"name": "X-Auth", "prefix": "Bearer "}],
                                            output_claim_to_headers=[{"header": "X-Sub", "claim": "sub"}])],
                             "clock_skew": "10s"})
        self.assertEqual(config.clock_skew, 10.0)
        self.assertEqual(config.rules[0].rule.from_headers[0].name, "x-auth")
        self.assertEqual(config.output_headers, {b"x-sub"})
        self.assertEqual(config.rules[0].keys.keys.kids(), {"rsa-1", "ec-1"})

    def test_jwks_mapping_and_file(self) -> None:
        self.assertIsNotNone(self.parse({"rules": [rule(jwks=default_jwks())]}).rules[0].keys)
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(default_jwks(), f)
        self.assertIsNotNone(self.parse({"rules": [rule(jwks=None, jwks_file=path)]}).rules[0].keys)

    def test_errors(self) -> None:
        self.bad({}, "rules")
        self.bad({"rules": []}, "rules")
        self.bad({"rules": [rule()], "nope": 1}, "nope")
        self.bad({"rules": [rule(issuer=None)]}, "rules[0].issuer")
        self.bad({"rules": [rule(jwks=None)]}, "rules[0]")
        self.bad({"rules": [rule(jwks_uri=JWKS_URI)]}, "rules[0]")
        self.bad({"rules": [rule(jwks="garbage")]}, "rules[0].jwks")
        self.bad({"rules": [rule(jwks=None, jwks_uri="ftp://x")]}, "rules[0].jwks_uri")
        self.bad({"rules": [rule(jwks=None, jwks_file="/nonexistent/jwks.json")]}, "rules[0].jwks_file")
        self.bad({"rules": [rule(audiences="bookstore")]}, "rules[0].audiences")
        self.bad({"rules": [rule(from_headers=[{"prefix": "x"}])]}, "rules[0].from_headers[0].name")
        self.bad({"rules": [rule(output_claim_to_headers=[{"header": "x"}])]}, "rules[0].output_claim_to_headers[0].claim")
        self.bad({"rules": [rule(forward_original_token="yes")]}, "rules[0].forward_original_token")
        self.bad({"rules": [rule(fromHeaders=[])]}, "rules[0].fromHeaders")
        self.bad({"rules": [rule()], "jwks_fetch_timeout": "0s"}, "jwks_fetch_timeout")

    def test_plugin(self) -> None:
        names = {p.name: p for p in getPlugins(IHTTPFilterFactory)}
        self.assertIsInstance(names.get("jwt"), JwtAuthnFactory)
