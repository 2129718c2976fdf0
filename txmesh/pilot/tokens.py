"""
Join tokens: the bootstrap credential a proxy shows the pilot before it has
a certificate (see C{docs/security.md}).

A token is stateless and HMAC-signed by a key that every pilot replica
shares::

    txm1.<base64url(JSON payload)>.<base64url(HMAC-SHA256)>

The payload is C{{"exp", "iat", "jti", "kid", "ns", "sa"}}: expiry and
issue time (POSIX seconds), a token id, the id of the key that signed it,
and the namespace and service account whose identity the token grants.
C{kid} is optional: tokens made before key rotation existed lack it and are
checked against every key the verifier holds.  The HMAC covers
C{txm1.<payload>}, so the version prefix is authenticated too.  base64url is
without padding.

Key rotation keeps the previous keys (one hex key a line, in a file beside
the current key) until the overlap is finished: L{rotate_key},
L{finish_key_rotation}.

No clock is read here: callers pass C{now} (POSIX seconds) from theirs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
from datetime import datetime, timezone

import attrs
from twisted.logger import Logger

from txmesh.pilot.ca import check_dns_label
from txmesh.pilot.private_files import write_private, write_temporary

TOKEN_PREFIX = "txm1"
"""
The first part of every token: format version 1.
"""

KEY_BYTES = 32
"""
The size of a key made by L{load_or_create_key}.
"""

MIN_KEY_BYTES = 16

MAX_TOKEN_LENGTH = 4096
"""
Longer input is refused before any decoding.
"""

DEFAULT_LEEWAY = 60.0
"""
Seconds by which a token's issue time may be ahead of the verifier's clock
(tokens are often made on an operator's machine, not on the pilot).
"""

_TOKEN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_B64URL = re.compile(r"[A-Za-z0-9_-]*\Z")


class InvalidCredential(Exception):
    """
    A credential was refused.

    @ivar reason: why, for a person (and for the proxy's log: it is safe to
        send back, it holds no secret).
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class TokenKeyError(Exception):
    """
    The token signing key file cannot be used.

    @ivar path: the key file.
    @ivar reason: what is wrong.
    """

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@attrs.frozen
class TokenClaims:
    """
    What a valid token grants.

    @ivar namespace: the workload's namespace.
    @ivar service_account: the workload's service account.
    @ivar expires: when the token stops being accepted (POSIX seconds).
    @ivar issued: when it was made (POSIX seconds).
    @ivar token_id: the token's id (C{jti}), for logs and audit.
    @ivar key_id: the id (C{kid}) of the key that signed it, or C{None} for
        a token made before tokens carried one.
    """

    namespace: str
    service_account: str
    expires: float
    issued: float
    token_id: str
    key_id: str | None = None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str, part: str) -> bytes:
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise InvalidCredential(f"malformed token: the {part} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - the checks above catch it first
        raise InvalidCredential(f"malformed token: the {part} is not base64url") from None
    # One encoding per token: unused low bits in the last character would
    # otherwise make several strings of the same token.
    if _b64encode(data) != text:
        raise InvalidCredential(f"malformed token: the {part} is not canonical base64url")
    return data


def _number(value: float) -> float | int:
    # Whole seconds as integers keep tokens short and readable.
    return int(value) if float(value).is_integer() else float(value)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _finite(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field}: must be a finite number, got {value!r}")
    return float(value)


def key_id(key: bytes) -> str:
    """
    The id a token names its key by: derived from the key, so every replica
    sharing the key file agrees on it without storing it, and a rotation
    needs no bookkeeping.  It is a hash, so it tells nothing of the key.

    @return: 16 hex digits.
    """
    return hashlib.sha256(b"txmesh join-token key id\0" + key).hexdigest()[:16]


def _write_private(path: str, data: bytes) -> None:
    """
    Replace C{path} with an owner-only file holding C{data}: a pilot
    reading the keys meanwhile sees the old file or the new one.

    @raise TokenKeyError: it could not be written.
    """
    try:
        write_private(path, data)
    except OSError as e:
        raise TokenKeyError(path, f"cannot write ({e.strerror})") from None


def load_previous_keys(path: str) -> tuple[bytes, ...]:
    """
    Read the keys a rotation kept for verification: one hex key a line.

    @return: the keys, newest first; none if there is no such file (no
        rotation in progress).
    @raise TokenKeyError: if the file cannot be read or a line is not a hex
        key of at least L{MIN_KEY_BYTES} bytes.
    """
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().split()
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenKeyError(path, f"cannot read the previous keys ({getattr(e, 'strerror', None) or e})") from None
    keys = []
    for number, line in enumerate(lines, 1):
        try:
            key = bytes.fromhex(line)
        except ValueError:
            raise TokenKeyError(path, f"key {number} is not hex") from None
        if len(key) < MIN_KEY_BYTES:
            raise TokenKeyError(path, f"key {number} has {len(key)} bytes; a key needs at least {MIN_KEY_BYTES}")
        keys.append(key)
    return tuple(keys)


def rotate_key(path: str, previous_path: str) -> tuple[str, tuple[str, ...]]:
    """
    Make a new signing key in C{path}, keeping the key it replaces (and any
    kept by an unfinished rotation) in C{previous_path} for verification:
    tokens already handed out stay good until L{finish_key_rotation}.

    @return: the new key's id, and the ids of the previous keys.
    @raise TokenKeyError: if a file cannot be read or written.
    """
    old = load_or_create_key(path)
    kept = [old, *(k for k in load_previous_keys(previous_path) if k != old)]
    # The old key is kept before the new one signs, so a pilot reading the
    # directory between the two renames never refuses a token it accepted.
    _write_private(previous_path, "".join(f"{k.hex()}\n" for k in kept).encode("ascii"))
    new = secrets.token_bytes(KEY_BYTES)
    _write_private(path, new)
    TokenAuthority._log.info("rotated the join-token key in {path}: new key {kid}; {n} previous key(s) accepted "
                             "until finish-key-rotation", path=path, kid=key_id(new), n=len(kept))
    return key_id(new), tuple(key_id(k) for k in kept)


def finish_key_rotation(previous_path: str) -> tuple[str, ...]:
    """
    End a key rotation's overlap: forget the previous keys, so tokens they
    signed are refused.

    @return: the ids of the keys dropped (none if no rotation was in
        progress).
    @raise TokenKeyError: if the file cannot be read or removed.
    """
    dropped = load_previous_keys(previous_path)
    if not dropped:
        return ()
    try:
        os.remove(previous_path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise TokenKeyError(previous_path, f"cannot remove ({e.strerror})") from None
    return tuple(key_id(k) for k in dropped)


def load_or_create_key(path: str) -> bytes:
    """
    Read the token signing key from C{path}, or, if there is no such file,
    write a new one there: L{KEY_BYTES} random bytes, mode 0600.  Pilot
    replicas that accept the same tokens must share this file.

    Creation is safe against another process creating the same file at
    the same moment: both end up with the key that was written first.

    @return: the key.
    @raise TokenKeyError: if the file cannot be read or written, or holds
        fewer than L{MIN_KEY_BYTES} bytes.
    """
    if not os.path.exists(path):
        key = secrets.token_bytes(KEY_BYTES)
        try:
            tmp = write_temporary(path, key)
            try:
                # link, unlike rename, fails if the name exists: a key
                # written meanwhile by another process wins.
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        except OSError as e:
            raise TokenKeyError(path, f"cannot create the key ({e.strerror})") from None
    try:
        with open(path, "rb") as f:
            key = f.read()
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as e:
        raise TokenKeyError(path, f"cannot read the key ({e.strerror})") from None
    if len(key) < MIN_KEY_BYTES:
        raise TokenKeyError(path, f"holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} "
                                  f"(remove the file to make a new {KEY_BYTES}-byte key)")
    if mode & 0o077:
        TokenAuthority._log.warn("the token key {path} is readable by others (mode {mode}); chmod 600 it",
                                 path=path, mode=oct(mode))
    return key


def _check_key(instance: object, attribute: object, value: object) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"key: must be bytes, got {type(value).__name__}")
    if len(value) < MIN_KEY_BYTES:
        raise ValueError(f"key: must be at least {MIN_KEY_BYTES} bytes, got {len(value)}")


def _check_keys(instance: object, attribute: object, value: tuple[object, ...]) -> None:
    for key in value:
        _check_key(instance, attribute, key)


@attrs.frozen
class TokenAuthority:
    """
    Makes join tokens with its current HMAC key, and checks them with that
    key or, during a key rotation's overlap, with a previous one.

    @ivar leeway: seconds by which a token's issue time may be ahead of
        C{now} in L{verify} (clock skew between the machine that made it
        and the verifier).  Expiry gets no leeway.
    @ivar key_id: the current key's id, which new tokens carry as C{kid}.
    """

    _log = Logger()

    _key: bytes = attrs.field(validator=_check_key, repr=False)
    leeway: float = attrs.field(default=DEFAULT_LEEWAY, converter=float)
    _previous: tuple[bytes, ...] = attrs.field(default=(), converter=tuple, validator=_check_keys, repr=False,
                                               alias="previous")
    key_id: str = attrs.field(init=False)
    _keys: dict[str, bytes] = attrs.field(init=False, repr=False, eq=False)

    @key_id.default
    def _key_id(self) -> str:
        return key_id(self._key)

    @_keys.default
    def _all_keys(self) -> dict[str, bytes]:
        # Current first: a token without a kid is most likely its.
        keys = {self.key_id: self._key}
        for key in self._previous:
            keys.setdefault(key_id(key), key)
        return keys

    @property
    def previous_key_ids(self) -> tuple[str, ...]:
        """
        @return: the ids of the keys still accepted but no longer signing.
        """
        return tuple(kid for kid in self._keys if kid != self.key_id)

    def _sign(self, signed_part: str, key: bytes | None = None) -> bytes:
        return hmac.new(key or self._key, signed_part.encode("ascii"), hashlib.sha256).digest()

    def create(self, namespace: str, service_account: str, now: float, ttl: float,
               token_id: str | None = None) -> str:
        """
        Make a token for the identity C{namespace}/C{service_account}.

        @param now: the current time (POSIX seconds); the token's C{iat}.
        @param ttl: seconds until the token expires; positive.
        @param token_id: the token's id; by default 32 random hex digits.
        @return: C{txm1.<payload>.<signature>}.
        @raise ValueError: naming the argument that is not valid
            (namespace and service account must be DNS-1123 labels; a
            token id is 1-128 characters of letters, digits, C{.}, C{_} and
            C{-}).
        """
        check_dns_label("namespace", namespace)
        check_dns_label("service_account", service_account)
        now = _finite("now", now)
        ttl = _finite("ttl", ttl)
        if ttl <= 0:
            raise ValueError(f"ttl: must be positive, got {ttl!r}")
        if token_id is None:
            token_id = secrets.token_hex(16)
        elif not isinstance(token_id, str) or not _TOKEN_ID.match(token_id):
            raise ValueError(f"token_id: {token_id!r} is not 1-128 characters of letters, digits, '.', '_' and '-'")
        payload = {"ns": namespace, "sa": service_account, "iat": _number(now), "exp": _number(now + ttl),
                   "jti": token_id, "kid": self.key_id}
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
        signed_part = f"{TOKEN_PREFIX}.{_b64encode(body)}"
        return f"{signed_part}.{_b64encode(self._sign(signed_part))}"

    def verify(self, token: str, now: float) -> TokenClaims:
        """
        Check a token made by L{create} with the current key or a previous
        one: the key its C{kid} names, or for a token without C{kid} any of
        them.

        Surrounding whitespace is ignored (tokens are often read from files).

        @param now: the current time (POSIX seconds).
        @return: what the token grants.
        @raise InvalidCredential: saying why the token is refused: it is
            malformed, it names a key this authority does not hold (one a
            finished rotation dropped, or another pilot's), its signature
            does not match (another key, or altered), it has expired (and
            when), or it is not valid yet.
        """
        if not isinstance(token, str):
            raise InvalidCredential(f"malformed token: expected text, got {type(token).__name__}")
        token = token.strip()
        if not token:
            raise InvalidCredential("malformed token: empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidCredential(f"malformed token: longer than {MAX_TOKEN_LENGTH} characters")
        parts = token.split(".")
        if len(parts) != 3 or not token.isascii():
            raise InvalidCredential("malformed token: expected txm1.<payload>.<signature>")
        prefix, payload_b64, signature_b64 = parts
        if prefix != TOKEN_PREFIX:
            raise InvalidCredential(f"malformed token: unknown format {prefix[:16]!r} (expected {TOKEN_PREFIX!r})")
        body = _b64decode(payload_b64, "payload")
        signature = _b64decode(signature_b64, "signature")
        # Only the key id is read before the signature is checked, to pick
        # the key; nothing else in the payload is believed until then.
        kid = _unverified_key_id(body)
        if kid is None:
            candidates = list(self._keys.values())
        elif kid in self._keys:
            candidates = [self._keys[kid]]
        else:
            raise InvalidCredential(f"join token signed by unknown key {kid} (this pilot signs with "
                                    f"{self.key_id}{self._also()}; a key dropped by "
                                    "'txmesh token finish-key-rotation', or another pilot's)")
        signed_part = f"{prefix}.{payload_b64}"
        if not any(hmac.compare_digest(signature, self._sign(signed_part, key)) for key in candidates):
            raise InvalidCredential("bad signature: the token was made with another key, or altered")
        claims = _claims(body)
        if now < claims.issued - self.leeway:
            raise InvalidCredential(f"token not valid yet: issued at {_when(claims.issued)}, which is "
                                    f"{claims.issued - now:.0f}s ahead of this clock ({_when(now)})")
        if now >= claims.expires:
            raise InvalidCredential(f"token expired at {_when(claims.expires)} "
                                    f"({now - claims.expires:.0f}s ago)")
        return claims

    def _also(self) -> str:
        previous = self.previous_key_ids
        return f" and accepts {', '.join(previous)}" if previous else ""


def _unverified_key_id(body: bytes) -> str | None:
    """
    The C{kid} of a payload whose signature is not checked yet, or C{None}
    when it has none (or is no JSON object: the signature check, then
    L{_claims}, refuse it then).

    @raise InvalidCredential: the C{kid} is not a key id (it is quoted in
        refusals, so only a plain id is).
    """
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(payload, dict) or "kid" not in payload:
        return None
    kid = payload["kid"]
    if not isinstance(kid, str) or not _KEY_ID.match(kid):
        raise InvalidCredential("malformed token: kid: not a key id")
    return kid


def _claims(body: bytes) -> TokenClaims:
    """
    The claims of a payload whose signature has been checked.  A payload
    this module did not write can still get here only if the key was used
    by something else, so the checks are strict but the messages short.
    """
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidCredential("malformed token: the payload is not JSON") from None
    if not isinstance(payload, dict):
        raise InvalidCredential("malformed token: the payload is not a JSON object")
    missing = sorted({"ns", "sa", "exp", "iat", "jti"} - payload.keys())
    if missing:
        raise InvalidCredential(f"malformed token: the payload lacks {', '.join(missing)}")
    try:
        check_dns_label("ns", payload["ns"])
        check_dns_label("sa", payload["sa"])
        expires = _finite("exp", payload["exp"])
        issued = _finite("iat", payload["iat"])
        if not isinstance(payload["jti"], str) or not _TOKEN_ID.match(payload["jti"]):
            raise ValueError(f"jti: {payload['jti']!r} is not a token id")
    except ValueError as e:
        raise InvalidCredential(f"malformed token: {e}") from None
    return TokenClaims(namespace=payload["ns"], service_account=payload["sa"], expires=expires, issued=issued,
                       token_id=payload["jti"], key_id=payload.get("kid"))


class UsedTokens:
    """
    The join tokens already exchanged for a certificate, so each works once.

    Kept in a file beside the token key (one C{<token id> <expiry>} line per
    token) so that a restarted pilot, or a replica sharing the directory,
    refuses a replay too; a token past its expiry is refused anyway, so its
    line is dropped when the file is next read.
    """

    def __init__(self, path: str):
        """
        @param path: the file (created when the first token is used).
        """
        self._path = path

    def _read(self, now: float) -> dict[str, float]:
        used: dict[str, float] = {}
        try:
            with open(self._path, encoding="ascii") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) != 2:
                        continue
                    try:
                        expires = float(parts[1])
                    except ValueError:
                        continue
                    if expires > now:
                        used[parts[0]] = expires
        except FileNotFoundError:
            pass
        return used

    def use(self, claims: TokenClaims, now: float) -> bool:
        """
        Record that C{claims}' token was used.  The file is read again each
        time, so a replica's use counts too.

        @param now: the current time (POSIX seconds).
        @return: C{False} if it had been used before (a replay).
        """
        used = self._read(now)
        if claims.token_id in used:
            return False
        used[claims.token_id] = claims.expires
        # Rewritten whole (expired lines dropped), then renamed into place.
        temp = f"{self._path}.tmp"
        with open(temp, "w", encoding="ascii") as f:
            f.writelines(f"{jti} {expires}\n" for jti, expires in used.items())
        os.replace(temp, self._path)
        return True
