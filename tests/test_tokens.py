"""
Tests for L{txmesh.pilot.tokens}: join tokens and their key file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import stat

from twisted.trial import unittest

from txmesh.pilot.tokens import (
    KEY_BYTES,
    InvalidCredential,
    TokenAuthority,
    TokenClaims,
    TokenKeyError,
    finish_key_rotation,
    key_id,
    load_or_create_key,
    load_previous_keys,
    rotate_key,
)

KEY = bytes(range(32))
NOW = 1_772_366_400.0  # 2026-03-01T12:00:00Z


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(payload: bytes, key: bytes = KEY) -> str:
    """
    A token with any payload, correctly signed: for payloads L{create}
    would never write.
    """
    signed = f"txm1.{_b64(payload)}"
    return f"{signed}.{_b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())}"


def _payload(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


class CreateTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.authority = TokenAuthority(KEY)

    def test_format(self) -> None:
        token = self.authority.create("default", "reviews", NOW, 3600, token_id="t-1")
        self.assertRegex(token, r"\Atxm1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}\Z")
        self.assertEqual(_payload(token), {"ns": "default", "sa": "reviews", "iat": 1_772_366_400,
                                           "exp": 1_772_370_000, "jti": "t-1", "kid": key_id(KEY)})
        prefix, body, signature = token.split(".")
        expected = hmac.new(KEY, f"{prefix}.{body}".encode(), hashlib.sha256).digest()
        self.assertEqual(signature, _b64(expected))

    def test_fractional_times_kept(self) -> None:
        token = self.authority.create("default", "reviews", NOW + 0.5, 1.25)
        self.assertEqual(_payload(token)["exp"], NOW + 1.75)

    def test_random_token_ids(self) -> None:
        ids = {_payload(self.authority.create("a", "b", NOW, 60))["jti"] for _ in range(20)}
        self.assertEqual(len(ids), 20)
        for token_id in ids:
            self.assertRegex(token_id, r"\A[0-9a-f]{32}\Z")

    def test_names_are_dns_labels(self) -> None:
        for ns, sa, field in [("Default", "b", "namespace"), ("", "b", "namespace"), ("a_b", "b", "namespace"),
                              ("a" * 64, "b", "namespace"), ("a", "-b", "service_account"),
                              ("a", "b.c", "service_account"), ("a", None, "service_account")]:
            e = self.assertRaises(ValueError, self.authority.create, ns, sa, NOW, 60)
            self.assertTrue(str(e).startswith(f"{field}:"), str(e))
        self.authority.create("a" * 63, "0-9", NOW, 60)

    def test_bad_times(self) -> None:
        for now, ttl, field in [(NOW, 0, "ttl"), (NOW, -5, "ttl"), (NOW, float("nan"), "ttl"),
                                (float("inf"), 60, "now"), ("soon", 60, "now"), (NOW, True, "ttl")]:
            e = self.assertRaises(ValueError, self.authority.create, "a", "b", now, ttl)
            self.assertTrue(str(e).startswith(f"{field}:"), str(e))

    def test_bad_token_id(self) -> None:
        for token_id in ["", "has space", "a" * 129, "é"]:
            e = self.assertRaises(ValueError, self.authority.create, "a", "b", NOW, 60, token_id)
            self.assertTrue(str(e).startswith("token_id:"), str(e))

    def test_key_checked(self) -> None:
        self.assertRaises(ValueError, TokenAuthority, b"short")
        self.assertRaises(TypeError, TokenAuthority, "a text key of enough length")
        self.assertNotIn(repr(KEY), repr(TokenAuthority(KEY)))


class VerifyTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.authority = TokenAuthority(KEY)
        self.token = self.authority.create("default", "reviews", NOW, 600, token_id="abc")

    def assertRefused(self, token: object, reason: str, now: float = NOW + 1,
                      authority: TokenAuthority | None = None) -> InvalidCredential:
        e = self.assertRaises(InvalidCredential, (authority or self.authority).verify, token, now)
        self.assertIn(reason, e.reason)
        self.assertEqual(str(e), e.reason)
        return e

    def test_round_trip(self) -> None:
        claims = self.authority.verify(self.token, NOW + 1)
        self.assertEqual(claims, TokenClaims(namespace="default", service_account="reviews", expires=NOW + 600,
                                             issued=NOW, token_id="abc", key_id=key_id(KEY)))

    def test_another_authority_with_the_same_key(self) -> None:
        self.assertEqual(TokenAuthority(bytes(KEY)).verify(self.token, NOW).token_id, "abc")

    def test_surrounding_whitespace(self) -> None:
        self.assertEqual(self.authority.verify(f"  {self.token}\n", NOW).namespace, "default")

    def test_wrong_key(self) -> None:
        other = TokenAuthority(b"k" * 32)
        self.assertRefused(self.token, f"join token signed by unknown key {key_id(KEY)}", authority=other)

    def test_tampered_payload(self) -> None:
        prefix, body, signature = self.token.split(".")
        payload = _payload(self.token)
        payload["ns"] = "kube-system"
        forged = f"{prefix}.{_b64(json.dumps(payload).encode())}.{signature}"
        self.assertRefused(forged, "bad signature")
        payload = _payload(self.token)
        payload["exp"] += 10**6
        self.assertRefused(f"{prefix}.{_b64(json.dumps(payload).encode())}.{signature}", "bad signature")

    def test_tampered_signature(self) -> None:
        prefix, body, signature = self.token.split(".")
        flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
        self.assertRefused(f"{prefix}.{body}.{flipped}", "bad signature")
        self.assertRefused(f"{prefix}.{body}.{signature[:-3]}", "bad signature")
        self.assertRefused(f"{prefix}.{body}.", "bad signature")

    def test_signature_compared_in_constant_time(self) -> None:
        calls = []
        real = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", spy)
        self.authority.verify(self.token, NOW)
        self.assertEqual(len(calls), 1)

    def test_one_encoding_per_token(self) -> None:
        prefix, body, signature = self.token.split(".")
        # The last of 43 characters carries 2 bits; its other 4 must be zero.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(signature[-1])
        variant = signature[:-1] + alphabet[last | 1]
        self.assertEqual(base64.urlsafe_b64decode(variant + "="), base64.urlsafe_b64decode(signature + "="))
        self.assertRefused(f"{prefix}.{body}.{variant}", "the signature is not canonical base64url")

    def test_version_prefix_is_signed(self) -> None:
        _, body, signature = self.token.split(".")
        self.assertRefused(f"txm2.{body}.{signature}", "unknown format 'txm2'")

    def test_expired(self) -> None:
        self.authority.verify(self.token, NOW + 599.9)
        e = self.assertRefused(self.token, "token expired at 2026-03-01T12:10:00Z", now=NOW + 600)
        self.assertIn("(0s ago)", e.reason)
        e = self.assertRefused(self.token, "token expired at 2026-03-01T12:10:00Z (3000s ago)", now=NOW + 3600)

    def test_not_yet_valid(self) -> None:
        # Within the default 60 s of clock skew: accepted.
        self.authority.verify(self.token, NOW - 60)
        e = self.assertRefused(self.token, "token not valid yet: issued at 2026-03-01T12:00:00Z", now=NOW - 3600)
        self.assertIn("3600s ahead of this clock (2026-03-01T11:00:00Z)", e.reason)
        strict = TokenAuthority(KEY, leeway=0)
        self.assertRefused(self.token, "not valid yet", now=NOW - 1, authority=strict)

    def test_malformed(self) -> None:
        for token, reason in [
            ("", "malformed token: empty"),
            ("   ", "malformed token: empty"),
            (None, "malformed token: expected text, got NoneType"),
            (self.token.encode(), "malformed token: expected text, got bytes"),
            ("txm1", "expected txm1.<payload>.<signature>"),
            ("txm1.abc", "expected txm1.<payload>.<signature>"),
            (self.token + ".x", "expected txm1.<payload>.<signature>"),
            ("txm1.é.abc", "expected txm1.<payload>.<signature>"),
            ("jwt.abc.def", "unknown format 'jwt'"),
            ("txm1.a+b/.abc", "the payload is not base64url"),
            ("txm1.abcde.abc", "the payload is not base64url"),
            ("txm1.abc.ab=c", "the signature is not base64url"),
            ("txm1." + "a" * 5000 + ".abc", "longer than 4096 characters"),
        ]:
            self.assertRefused(token, reason)

    def test_signed_but_malformed_payloads(self) -> None:
        good = {"ns": "a", "sa": "b", "exp": NOW + 60, "iat": NOW, "jti": "x"}
        for payload, reason in [
            (b"\xff\xfe", "the payload is not JSON"),
            (b"{not json", "the payload is not JSON"),
            (b"[1, 2]", "the payload is not a JSON object"),
            (json.dumps({"ns": "a"}).encode(), "the payload lacks exp, iat, jti, sa"),
            (json.dumps({**good, "ns": "A"}).encode(), "malformed token: ns: 'A' is not a DNS-1123 label"),
            (json.dumps({**good, "exp": "later"}).encode(), "malformed token: exp: must be a finite number"),
            (json.dumps({**good, "iat": None}).encode(), "malformed token: iat: must be a finite number"),
            (json.dumps({**good, "jti": 7}).encode(), "malformed token: jti: 7 is not a token id"),
        ]:
            self.assertRefused(_signed(payload), reason)
        self.assertEqual(self.authority.verify(_signed(json.dumps(good).encode()), NOW).namespace, "a")

    def test_reasons_hold_no_secret(self) -> None:
        e = self.assertRefused(self.token, "unknown key", authority=TokenAuthority(b"k" * 32))
        self.assertNotIn(self.token.split(".")[2], e.reason)
        prefix, body, signature = self.token.split(".")
        flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
        e = self.assertRefused(f"{prefix}.{body}.{flipped}", "bad signature")
        self.assertNotIn(signature, e.reason)


class KeyFileTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "token-key")

    def test_create_and_reload(self) -> None:
        key = load_or_create_key(self.path)
        self.assertEqual(len(key), KEY_BYTES)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.dir), ["token-key"])
        self.assertEqual(load_or_create_key(self.path), key)
        other = os.path.join(self.dir, "other-key")
        self.assertNotEqual(load_or_create_key(other), key)

    def test_tokens_survive_reload(self) -> None:
        token = TokenAuthority(load_or_create_key(self.path)).create("a", "b", NOW, 60)
        self.assertEqual(TokenAuthority(load_or_create_key(self.path)).verify(token, NOW).service_account, "b")

    def test_short_key_file(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"tiny")
        e = self.assertRaises(TokenKeyError, load_or_create_key, self.path)
        self.assertEqual(e.path, self.path)
        self.assertIn("holds 4 bytes", str(e))

    def test_missing_directory(self) -> None:
        path = os.path.join(self.dir, "nowhere", "token-key")
        e = self.assertRaises(TokenKeyError, load_or_create_key, path)
        self.assertEqual(e.path, path)
        self.assertTrue(re.search(r"cannot create the key \(.+\)", e.reason), e.reason)

    def test_unreadable(self) -> None:
        os.makedirs(self.path)
        e = self.assertRaises(TokenKeyError, load_or_create_key, self.path)
        self.assertIn("cannot read the key", e.reason)


OLD_KEY = b"o" * 32
NEW_KEY = b"n" * 32


class KeyIdTests(unittest.SynchronousTestCase):
    def test_derived_from_the_key(self) -> None:
        self.assertRegex(key_id(KEY), r"\A[0-9a-f]{16}\Z")
        self.assertEqual(key_id(bytes(KEY)), key_id(KEY))
        self.assertNotEqual(key_id(OLD_KEY), key_id(NEW_KEY))
        self.assertEqual(TokenAuthority(KEY).key_id, key_id(KEY))

    def test_previous_keys_checked_and_hidden(self) -> None:
        self.assertRaises(ValueError, TokenAuthority, KEY, previous=[b"short"])
        self.assertRaises(TypeError, TokenAuthority, KEY, previous=["a text key of enough length"])
        authority = TokenAuthority(NEW_KEY, previous=[OLD_KEY, NEW_KEY, OLD_KEY])
        self.assertEqual(authority.previous_key_ids, (key_id(OLD_KEY),))
        self.assertNotIn(repr(OLD_KEY), repr(authority))


class OverlapTests(unittest.SynchronousTestCase):
    """
    Verification during a key rotation's overlap, and after it ends.
    """

    def setUp(self) -> None:
        self.old = TokenAuthority(OLD_KEY)
        self.overlap = TokenAuthority(NEW_KEY, previous=[OLD_KEY])
        self.finished = TokenAuthority(NEW_KEY)

    def test_old_tokens_verify_during_overlap(self) -> None:
        token = self.old.create("default", "web", NOW, 600, token_id="old")
        claims = self.overlap.verify(token, NOW)
        self.assertEqual((claims.token_id, claims.key_id), ("old", key_id(OLD_KEY)))

    def test_new_tokens_carry_the_new_key_id(self) -> None:
        token = self.overlap.create("default", "web", NOW, 600)
        self.assertEqual(_payload(token)["kid"], key_id(NEW_KEY))
        prefix, body, signature = token.split(".")
        expected = hmac.new(NEW_KEY, f"{prefix}.{body}".encode(), hashlib.sha256).digest()
        self.assertEqual(signature, _b64(expected))
        self.assertEqual(self.finished.verify(token, NOW).key_id, key_id(NEW_KEY))
        self.assertRaises(InvalidCredential, self.old.verify, token, NOW)

    def test_finished_refuses_old_tokens_naming_the_key(self) -> None:
        token = self.old.create("default", "web", NOW, 600)
        e = self.assertRaises(InvalidCredential, self.finished.verify, token, NOW)
        self.assertTrue(e.reason.startswith(f"join token signed by unknown key {key_id(OLD_KEY)} "), e.reason)
        self.assertIn(f"signs with {key_id(NEW_KEY)}", e.reason)
        self.assertIn("finish-key-rotation", e.reason)
        e = self.assertRaises(InvalidCredential, self.overlap.verify,
                              TokenAuthority(KEY).create("default", "web", NOW, 600), NOW)
        self.assertIn(f"accepts {key_id(OLD_KEY)}", e.reason)

    def test_kid_picks_the_key(self) -> None:
        """
        A token is checked with the key its kid names only: the old key's
        signature under the new key's id is refused.
        """
        payload = {"ns": "a", "sa": "b", "exp": NOW + 60, "iat": NOW, "jti": "x", "kid": key_id(NEW_KEY)}
        e = self.assertRaises(InvalidCredential, self.overlap.verify,
                              _signed(json.dumps(payload).encode(), OLD_KEY), NOW)
        self.assertIn("bad signature", e.reason)

    def test_one_comparison_with_a_kid(self) -> None:
        calls = []
        real = hmac.compare_digest
        self.patch(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
        self.overlap.verify(self.old.create("a", "b", NOW, 60), NOW)
        self.assertEqual(len(calls), 1)

    def test_legacy_tokens_without_kid(self) -> None:
        legacy = {"ns": "a", "sa": "b", "exp": NOW + 60, "iat": NOW, "jti": "legacy"}
        current = _signed(json.dumps(legacy).encode(), NEW_KEY)
        self.assertEqual(self.finished.verify(current, NOW).key_id, None)
        self.assertEqual(self.overlap.verify(current, NOW).token_id, "legacy")
        previous = _signed(json.dumps(legacy).encode(), OLD_KEY)
        self.assertEqual(self.overlap.verify(previous, NOW).token_id, "legacy")
        e = self.assertRaises(InvalidCredential, self.finished.verify, previous, NOW)
        self.assertIn("bad signature", e.reason)

    def test_malformed_kid(self) -> None:
        good = {"ns": "a", "sa": "b", "exp": NOW + 60, "iat": NOW, "jti": "x"}
        for kid in [7, None, "", "has space", "k" * 65, "<script>"]:
            e = self.assertRaises(InvalidCredential, self.overlap.verify,
                                  _signed(json.dumps({**good, "kid": kid}).encode(), NEW_KEY), NOW)
            self.assertEqual(e.reason, "malformed token: kid: not a key id")


class RotateKeyTests(unittest.SynchronousTestCase):
    """
    L{rotate_key} and L{finish_key_rotation} on a key directory.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "token.key")
        self.previous = os.path.join(self.dir, "token-previous.keys")

    def authority(self) -> TokenAuthority:
        return TokenAuthority(load_or_create_key(self.path), previous=load_previous_keys(self.previous))

    def test_rotate_and_finish(self) -> None:
        before = self.authority()
        token = before.create("default", "web", NOW, 600)
        kid, previous = rotate_key(self.path, self.previous)
        self.assertEqual(previous, (before.key_id,))
        during = self.authority()
        self.assertEqual((during.key_id, during.previous_key_ids), (kid, (before.key_id,)))
        self.assertNotEqual(kid, before.key_id)
        self.assertEqual(during.verify(token, NOW).key_id, before.key_id)
        for path in (self.path, self.previous):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.dir)), ["token-previous.keys", "token.key"])

        self.assertEqual(finish_key_rotation(self.previous), (before.key_id,))
        after = self.authority()
        self.assertEqual((after.key_id, after.previous_key_ids), (kid, ()))
        e = self.assertRaises(InvalidCredential, after.verify, token, NOW)
        self.assertIn(f"join token signed by unknown key {before.key_id}", e.reason)
        self.assertEqual(finish_key_rotation(self.previous), ())

    def test_rotate_twice_keeps_both(self) -> None:
        first = self.authority().key_id
        second, _ = rotate_key(self.path, self.previous)
        third, previous = rotate_key(self.path, self.previous)
        self.assertEqual(previous, (second, first))
        self.assertEqual(self.authority().previous_key_ids, (second, first))
        self.assertEqual(finish_key_rotation(self.previous), (second, first))
        self.assertEqual(self.authority().key_id, third)

    def test_bad_previous_file(self) -> None:
        for content, reason in [(b"zz\n", "key 1 is not hex"), (KEY.hex().encode() + b"\nabcd\n", "key 2 has 2 bytes"),
                                (b"\xff", "cannot read the previous keys")]:
            with open(self.previous, "wb") as f:
                f.write(content)
            e = self.assertRaises(TokenKeyError, load_previous_keys, self.previous)
            self.assertEqual(e.path, self.previous)
            self.assertIn(reason, e.reason)

    def test_unwritable(self) -> None:
        load_or_create_key(self.path)
        os.makedirs(self.previous)
        e = self.assertRaises(TokenKeyError, rotate_key, self.path, self.previous)
        self.assertIn("cannot", e.reason)
