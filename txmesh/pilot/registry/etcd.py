"""
A registry of services kept in etcd (v3), read through etcd's JSON gateway
(C{/v3/kv/range}, C{/v3/watch}) with C{treq}.

One key per service under a prefix (C{/txmesh/services/} by default); the
value is one service entry in the file registry's shape, as YAML or JSON::

    etcdctl put /txmesh/services/reviews \\
      '{host: reviews.default.svc.cluster.local,
        ports: [{name: http, number: 9080, protocol: HTTP}],
        endpoints: [{address: 10.0.0.7, port: 9080, labels: {version: v1}}]}'

The registry reads the whole prefix, then watches it from the next
revision. A lost stream is resumed from the last revision seen (changes made
meanwhile arrive as events); when etcd has compacted that history away the
prefix is read again. A value that does not parse keeps that key's previous
service (or none) and is reported in C{status()} and the log; the other keys
are unaffected. While etcd cannot be reached the last view stays and the
registry retries with a growing delay, going round the endpoints given.

With L{Credentials} (etcd's user/password authentication) the registry asks
C{/v3/auth/authenticate} for a token and sends it in the C{Authorization}
header of every range and watch; when etcd rejects the token (it expired,
or etcd restarted) the registry authenticates again at once, reading the
password file again, and retries.

The pure parts (L{WatchStreamParser}, L{read_watch_message},
L{ServiceTable}) take and return plain values; L{EtcdRegistry} is the shell
that does the I/O.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs
import yaml
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from txmesh.config import values
from txmesh.config.errors import ConfigError
from txmesh.pilot.registry.base import IRegistry, RegistryState, ServiceEndpoints, StateBackedRegistry
from txmesh.pilot.registry.file import parse_service

DEFAULT_PREFIX = "/txmesh/services/"


class EtcdError(Exception):
    """
    etcd answered with an error, or with something that is not an etcd
    answer.
    """


class TokenRejected(EtcdError):
    """
    etcd did not accept the auth token (it expired, or etcd restarted and
    forgot it): authenticate again.
    """


# --- keys ----------------------------------------------------------------


def prefix_range_end(prefix: bytes) -> bytes:
    """
    The end of the key range holding every key that starts with C{prefix}
    (as etcd's C{clientv3.GetPrefixRangeEnd}).

    @return: C{prefix} with its last byte below 0xff incremented and what
        follows dropped; C{b"\\0"} (to the end of the keyspace) when there is
        none.
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise EtcdError(f"{what}: expected base64 text, got {values.kind_of(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as e:
        raise EtcdError(f"{what}: not base64: {e}") from None


def _key_text(key: bytes) -> str:
    # Injective, so a PUT and a later DELETE of the same bytes meet.
    return key.decode("utf-8", "backslashreplace")


def _int(value: Any, what: str) -> int:
    # The gateway writes int64 fields as JSON strings.
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EtcdError(f"{what}: expected an integer, got {value!r}") from None


# --- the watch stream ------------------------------------------------------


class WatchStreamParser:
    """
    Split the body of a streaming gateway response into JSON values.

    The gateway writes one JSON object per line; an object may arrive in any
    number of pieces, and several may arrive in one. Feed the body as it
    comes; each call returns the values completed by that piece.
    """

    def __init__(self, max_message: int = 16 * 1024 * 1024):
        """
        @param max_message: the longest message accepted, in characters;
            a longer one is an error rather than a growing buffer.
        """
        self._max = max_message
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._json = json.JSONDecoder()

    def feed(self, data: bytes) -> list[Any]:
        """
        @param data: the next piece of the body.
        @return: the JSON values completed by C{data}, in order.
        @raise EtcdError: when the stream is not JSON (it cannot be
            resynchronised, so the caller drops the stream).
        """
        try:
            self._buffer += self._decoder.decode(data)
        except UnicodeDecodeError as e:
            raise EtcdError(f"watch stream is not UTF-8: {e}") from None
        out: list[Any] = []
        while True:
            line, newline, rest = self._buffer.partition("\n")
            if not newline:
                break
            self._buffer = rest
            out.extend(self._values(line))
        if len(self._buffer) > self._max:
            raise EtcdError(f"watch stream message longer than {self._max} characters")
        return out

    def _values(self, line: str) -> list[Any]:
        out = []
        pos = 0
        while True:
            while pos < len(line) and line[pos] in " \t\r":
                pos += 1
            if pos == len(line):
                return out
            try:
                value, pos = self._json.raw_decode(line, pos)
            except json.JSONDecodeError as e:
                raise EtcdError(f"watch stream is not JSON: {e}: {line[:200]!r}") from None
            out.append(value)


@attrs.frozen
class WatchEvent:
    """
    One change to one key.

    @ivar kind: C{PUT} or C{DELETE}.
    @ivar key: the key, as text.
    @ivar value: the new value (empty for C{DELETE}).
    @ivar revision: the revision of the change.
    """

    kind: Literal["PUT", "DELETE"]
    key: str
    value: bytes
    revision: int


@attrs.frozen
class WatchMessage:
    """
    One message of a watch stream.

    @ivar revision: the store revision in the message's header (0 if none).
    @ivar created: the watch was set up.
    @ivar canceled: etcd ended the watch.
    @ivar compact_revision: when canceled because the start revision was
        compacted, the compaction's revision; otherwise 0.
    @ivar cancel_reason: etcd's reason for ending the watch, if it gave one.
    @ivar events: the changes, oldest first.
    """

    revision: int = 0
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: tuple[WatchEvent, ...] = ()


def read_watch_message(message: Any) -> WatchMessage:
    """
    Interpret one JSON value of a C{/v3/watch} stream.

    @param message: C{{"result": WatchResponse}} or C{{"error": ...}}.
    @return: the message.
    @raise EtcdError: for an error message or a value of the wrong shape.
    """
    if not isinstance(message, Mapping):
        raise EtcdError(f"watch stream: expected an object, got {values.kind_of(message)}")
    if "error" in message:
        error = message["error"]
        if isinstance(error, Mapping):
            error = error.get("message") or error.get("error") or json.dumps(error)
        raise EtcdError(f"watch failed: {error}")
    result = message.get("result")
    if not isinstance(result, Mapping):
        raise EtcdError(f"watch stream: no result in {json.dumps(message)[:200]}")
    header = result.get("header") or {}
    events = []
    for i, event in enumerate(result.get("events") or ()):
        where = f"watch event {i}"
        if not isinstance(event, Mapping) or not isinstance(event.get("kv"), Mapping):
            raise EtcdError(f"{where}: expected an object with a kv")
        kind = event.get("type", "PUT")
        if kind not in ("PUT", "DELETE"):
            raise EtcdError(f"{where}: unknown type {kind!r}")
        kv = event["kv"]
        events.append(
            WatchEvent(
                kind,
                _key_text(_unb64(kv.get("key"), f"{where}.key")),
                _unb64(kv.get("value"), f"{where}.value") if kind == "PUT" else b"",
                _int(kv.get("mod_revision"), f"{where}.mod_revision"),
            )
        )
    return WatchMessage(
        revision=_int(header.get("revision") if isinstance(header, Mapping) else None, "header.revision"),
        created=bool(result.get("created", False)),
        canceled=bool(result.get("canceled", False)),
        compact_revision=_int(result.get("compact_revision"), "compact_revision"),
        cancel_reason=str(result.get("cancel_reason") or ""),
        events=tuple(events),
    )


def read_range_response(body: Any) -> tuple[int, list[tuple[str, bytes]]]:
    """
    Interpret a C{/v3/kv/range} answer.

    @return: the store revision and the C{(key, value)} pairs.
    @raise EtcdError: for an answer of the wrong shape.
    """
    if not isinstance(body, Mapping) or not isinstance(body.get("header"), Mapping):
        raise EtcdError(f"range: not an etcd answer: {json.dumps(body)[:200]}")
    revision = _int(body["header"].get("revision"), "range header.revision")
    if revision <= 0:
        raise EtcdError("range: no revision in the answer")
    kvs = []
    for i, kv in enumerate(body.get("kvs") or ()):
        if not isinstance(kv, Mapping):
            raise EtcdError(f"range kvs[{i}]: expected an object")
        kvs.append((_key_text(_unb64(kv.get("key"), f"range kvs[{i}].key")), _unb64(kv.get("value"), "value")))
    return revision, kvs


# --- authentication ----------------------------------------------------------


def read_password(path: str) -> str:
    """
    Read a password file: its text, without the line break that ends it.

    @return: the password.
    @raise ValueError: when the file cannot be read, is not UTF-8 or holds
        no password; the reason names the file, never the password.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        # Editors and `echo >` end the file with a line break; a password
        # may hold spaces, so only line breaks are stripped.
        password = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not password:
        raise ValueError(f"{path} holds no password (it is empty)")
    return password


@attrs.frozen
class Credentials:
    """
    A user to authenticate to etcd as (etcd's C{--user}).

    @ivar username: the etcd user.
    @ivar password_file: the file holding the password; read each time the
        registry authenticates, so a rotated password needs no restart.
    """

    username: str
    password_file: str

    def request(self) -> dict[str, str]:
        """
        @return: the body of a C{/v3/auth/authenticate} request, with the
            password as the file holds it now.
        @raise EtcdError: when the password file cannot be read.
        """
        try:
            password = read_password(self.password_file)
        except ValueError as e:
            raise EtcdError(f"password_file: {e}") from None
        return {"name": self.username, "password": password}


def read_authenticate_response(body: Any) -> str:
    """
    Interpret a C{/v3/auth/authenticate} answer.

    @return: the token.
    @raise EtcdError: for an answer without one.
    """
    token = body.get("token") if isinstance(body, Mapping) else None
    if not isinstance(token, str) or not token:
        # The body is not quoted: it would be a token if it held one.
        raise EtcdError("authenticate: no token in the answer")
    return token


def token_rejected(reason: str) -> bool:
    """
    @param reason: why etcd ended a watch (its C{cancel_reason}) or failed
        a request (its error message).
    @return: whether the reason is that the auth token is not valid: gRPC's
        C{Unauthenticated} (an expired token, or one etcd forgot when it
        restarted).
    """
    return "code = Unauthenticated" in reason or "invalid auth token" in reason


# --- keys to services ------------------------------------------------------


def parse_entry(key: str, value: bytes) -> ServiceEndpoints:
    """
    Read one key's value: a service entry in the file registry's shape
    (see L{txmesh.pilot.registry.file.parse_service}), as YAML or JSON.

    @raise ConfigError: naming the key, the field and the reason.
    """
    source = f"etcd key {key}"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, "", f"not UTF-8: {e}") from None
    try:
        # JSON first: what programs write, and not all of it is YAML.
        return parse_service(json.loads(text), source)
    except ValueError:
        pass
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"not valid YAML or JSON: {e}") from None
    return parse_service(doc, source)


class ServiceTable:
    """
    What the registry knows of the keys under its prefix: the last good
    service of each key and the keys whose current value is bad.
    """

    def __init__(self) -> None:
        self.entries: dict[str, ServiceEndpoints] = {}
        self.errors: dict[str, str] = {}

    def put(self, key: str, value: bytes) -> str | None:
        """
        Take a key's new value; a bad one leaves the key's last good
        service in place.

        @return: the reason the value is bad, or C{None}.
        """
        try:
            self.entries[key] = parse_entry(key, value)
        except ConfigError as e:
            self.errors[key] = str(e)
            return str(e)
        except Exception as e:
            # Whatever a value does to the parser, the other keys stand.
            self.errors[key] = f"etcd key {key}: cannot parse: {e!r}"
            return self.errors[key]
        self.errors.pop(key, None)
        return None

    def delete(self, key: str) -> None:
        """
        Forget a key.
        """
        self.entries.pop(key, None)
        self.errors.pop(key, None)

    def reset(self, kvs: Iterable[tuple[str, bytes]]) -> list[str]:
        """
        Replace the table with a full read; a key whose value is now bad
        keeps the service it had, keys not read are forgotten.

        @return: the reasons of the bad values.
        """
        kvs = list(kvs)
        present = {key for key, _ in kvs}
        for key in list(self.entries):
            if key not in present:
                del self.entries[key]
        self.errors.clear()
        return [reason for key, value in kvs if (reason := self.put(key, value)) is not None]

    def view(self) -> tuple[dict[str, ServiceEndpoints], list[str]]:
        """
        @return: host name to service, and the conflicts: a host registered
            under two keys belongs to the first key in key order.
        """
        view: dict[str, ServiceEndpoints] = {}
        owner: dict[str, str] = {}
        conflicts = []
        for key in sorted(self.entries):
            svc = self.entries[key]
            if svc.host in view:
                conflicts.append(f"etcd key {key}: host {svc.host} is also registered under {owner[svc.host]}")
                continue
            view[svc.host] = svc
            owner[svc.host] = key
        return view, conflicts


# --- config ----------------------------------------------------------------


def from_config(
    source: str, field: str, body: Mapping[str, Any], reactor: Any, config_dir: str | None = None
) -> EtcdRegistry:
    """
    Build an etcd registry from its entry in the mesh config's
    C{registries} list::

        type: etcd
        endpoints: [https://10.0.0.5:2379]
        prefix: /txmesh/services/     # the default
        ca_file: etcd/ca.pem          # https: the CAs the server's certificate is checked with
        cert_file: etcd/client.pem    # https: a client certificate (etcd's --client-cert-auth)
        key_file: etcd/client-key.pem #   and its key
        username: txmesh              # etcd's user/password authentication:
        password_file: etcd/password  #   the file holding the user's password

    (C{type} is the caller's.)  Without C{ca_file} an C{https} server is
    checked against the system's roots. C{username} and C{password_file}
    go together; the password file is read here, to report a missing or
    empty one now, and again each time the registry authenticates.

    @param source: the config file, for errors.
    @param field: the entry's path in it, e.g. C{registries[1]}.
    @param reactor: the reactor (time and TCP) the registry runs on.
    @param config_dir: the directory relative C{ca_file}, C{cert_file},
        C{key_file} and C{password_file} paths are taken from (the pilot's
        C{CONFIG_DIR}); C{None} leaves them relative to the working
        directory.
    @raise ConfigError: naming the field (C{field.endpoints},
        C{field.cert_file}, C{field.password_file}, ...) and the reason.
    """
    known = {"type", "endpoints", "prefix", "ca_file", "cert_file", "key_file", "username", "password_file"}
    if not isinstance(body, Mapping):
        raise ConfigError(source, field, f"expected a mapping, got {values.kind_of(body)}")
    for key in body:
        if key not in known:
            raise ConfigError(source, f"{field}.{key}", f"unknown field (expected one of {', '.join(sorted(known))})")
    if "endpoints" not in body:
        raise ConfigError(source, f"{field}.endpoints", "is required (a list of URLs like http://127.0.0.1:2379)")
    endpoints = body["endpoints"]
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list) or not endpoints:
        raise ConfigError(
            source, f"{field}.endpoints", f"expected a non-empty list of URLs, got {values.kind_of(endpoints)}"
        )
    urls = []
    for i, url in enumerate(endpoints):
        try:
            urls.append(check_endpoint(url))
        except ValueError as e:
            raise ConfigError(source, f"{field}.endpoints[{i}]", str(e)) from None
    prefix = body.get("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or not prefix:
        raise ConfigError(source, f"{field}.prefix", f"expected a non-empty string, got {values.kind_of(prefix)}")
    pems: dict[str, bytes] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        if key not in body:
            continue
        try:
            name = values.string(body[key])
        except ValueError as e:
            raise ConfigError(source, f"{field}.{key}", str(e)) from None
        # os.path.join keeps an absolute path as it is.
        name = os.path.join(config_dir, name) if config_dir is not None else name
        try:
            with open(name, "rb") as f:
                pems[key] = f.read()
        except OSError as e:
            raise ConfigError(source, f"{field}.{key}", f"cannot read {name}: {e.strerror or e}") from None
    if pems and not any(url.startswith("https:") for url in urls):
        key = sorted(pems)[0]
        raise ConfigError(source, f"{field}.{key}", "only used with https:// endpoints")
    if ("cert_file" in pems) != ("key_file" in pems):
        given, missing = ("cert_file", "key_file") if "cert_file" in pems else ("key_file", "cert_file")
        raise ConfigError(source, f"{field}.{missing}", f"is required with {given}")
    tls = None
    if pems:
        try:
            tls = TLSPolicy.from_pem(pems.get("ca_file", b""), pems.get("cert_file", b""), pems.get("key_file", b""))
        except _BadPEM as e:
            raise ConfigError(source, f"{field}.{e.key}", e.reason) from None
    credentials = _credentials(source, field, body, config_dir)
    return EtcdRegistry(urls, reactor, prefix=prefix, tls=tls, credentials=credentials)


def _credentials(source: str, field: str, body: Mapping[str, Any], config_dir: str | None) -> Credentials | None:
    for given, missing in (("username", "password_file"), ("password_file", "username")):
        if given in body and missing not in body:
            raise ConfigError(source, f"{field}.{missing}", f"is required with {given}")
    if "username" not in body:
        return None
    given: dict[str, str] = {}
    for key in ("username", "password_file"):
        try:
            given[key] = values.string(body[key])
        except ValueError as e:
            raise ConfigError(source, f"{field}.{key}", str(e)) from None
    username = given["username"]
    # os.path.join keeps an absolute path as it is.
    name = os.path.join(config_dir, given["password_file"]) if config_dir is not None else given["password_file"]
    try:
        read_password(name)
    except ValueError as e:
        raise ConfigError(source, f"{field}.password_file", str(e)) from None
    return Credentials(username, name)


class _BadPEM(Exception):
    def __init__(self, key: str, reason: str):
        super().__init__(key, reason)
        self.key = key
        self.reason = reason


@implementer(IPolicyForHTTPS)
class TLSPolicy:
    """
    How the registry's HTTP client makes TLS connections to etcd: the
    server's certificate checked against C{trust} (the system's roots when
    C{None}) for the endpoint's host, and C{client} presented when etcd asks
    for a certificate (C{--client-cert-auth}).
    """

    def __init__(self, trust: Any = None, client: Any = None):
        """
        @param trust: an C{IOpenSSLTrustRoot}, or C{None} for the system's.
        @param client: a L{twisted.internet.ssl.PrivateCertificate}, or
            C{None} to present none.
        """
        self._trust = trust
        self._client = client

    @classmethod
    def from_pem(cls, ca_pem: bytes = b"", cert_pem: bytes = b"", key_pem: bytes = b"") -> TLSPolicy:
        """
        @param ca_pem: PEM certificates to trust; empty for the system's.
        @param cert_pem: the client certificate chain (leaf first), or empty.
        @param key_pem: its private key (required with C{cert_pem}).
        @raise _BadPEM: naming the config key (C{ca_file}, ...) of the
            input that does not parse.
        """
        from OpenSSL import crypto
        from twisted.internet import ssl

        trust = None
        if ca_pem:
            blocks = _PEM_CERT.findall(ca_pem)
            if not blocks:
                raise _BadPEM("ca_file", "holds no PEM certificate")
            try:
                trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
            except Exception as e:
                raise _BadPEM("ca_file", f"holds a certificate that cannot be loaded: {e}") from None
        client = None
        if cert_pem:
            blocks = _PEM_CERT.findall(cert_pem)
            if not blocks:
                raise _BadPEM("cert_file", "holds no PEM certificate")
            try:
                key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
            except Exception as e:
                raise _BadPEM("key_file", f"holds no PEM private key that can be loaded: {e}") from None
            try:
                leaf = ssl.Certificate.loadPEM(blocks[0])
            except Exception as e:
                raise _BadPEM("cert_file", f"holds a certificate that cannot be loaded: {e}") from None
            try:
                client = ssl.PrivateCertificate.fromCertificateAndKeyPair(leaf, key)
            except Exception:
                raise _BadPEM("key_file", "is not the key of the certificate in cert_file") from None
        return cls(trust, client)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """
        @return: the client TLS options for one etcd endpoint.
        """
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust, clientCertificate=self._client)


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def check_endpoint(url: Any) -> str:
    """
    @return: C{url}, an etcd client URL, without a trailing slash.
    @raise ValueError: when it is not an C{http} or C{https} URL with a
        host and no path.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"expected a URL like http://127.0.0.1:2379, got {values.kind_of(url)}")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise ValueError(f"{url!r} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:2379)")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r} has a path; give the client URL only (e.g. http://127.0.0.1:2379)")
    return f"{parts.scheme}://{parts.netloc}"


# --- the registry ----------------------------------------------------------


def describe(failure: Failure) -> str:
    """
    @return: a one-line reason for a failed request: an L{EtcdError}'s
        message, or the error's type and message (for Twisted's wrapped
        client errors, the first underlying one's).
    """
    if failure.check(EtcdError):
        return failure.getErrorMessage()
    reasons = getattr(failure.value, "reasons", None)
    if reasons and isinstance(reasons[0], Failure):
        failure = reasons[0]
    if failure.check(ResponseDone):
        return "etcd closed it"
    return f"{failure.type.__name__}: {failure.getErrorMessage()}".rstrip(": ")


class _WatchBody(Protocol):
    """
    Receives a watch response's body and hands it to the registry.
    """

    def __init__(self, registry: EtcdRegistry, attempt: int):
        self._registry = registry
        self._attempt = attempt
        self.closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._registry._watch_data(self._attempt, data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self._registry._watch_ended(self._attempt, reason)
        self.lost.callback(None)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.loseConnection()  # type: ignore[attr-defined]


Phase = Literal["stopped", "authenticating", "ranging", "watching", "waiting"]


@implementer(IRegistry)
class EtcdRegistry(StateBackedRegistry):
    """
    Services from the keys under a prefix in etcd, kept current by a watch.

    @ivar revision: the etcd revision the view reflects (C{None} before the
        first read, or after a compaction until the next one).
    @ivar phase: C{stopped}, C{authenticating} (asking etcd for a token),
        C{ranging} (reading the prefix), C{watching}, or C{waiting} (to
        retry after an error).
    """

    log = Logger()

    def __init__(
        self,
        endpoints: Sequence[str],
        reactor: Any,
        prefix: str = DEFAULT_PREFIX,
        http: Any = None,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        request_timeout: float = 10.0,
        tls: IPolicyForHTTPS | None = None,
        credentials: Credentials | None = None,
    ):
        """
        @param endpoints: etcd client URLs (C{http://127.0.0.1:2379});
            tried in turn, moving on after each failure.
        @param reactor: the clock for retries and C{status()}; also the
            reactor the default HTTP client connects with.
        @param prefix: the key prefix the services are under.
        @param http: a treq-like client: an object with treq's C{post}
            (C{treq.client.HTTPClient}, C{treq.testing.StubTreq}); by
            default a non-persistent C{HTTPClient} on C{reactor}.
        @param min_backoff: seconds before the first retry after an error.
        @param max_backoff: the longest wait between retries; the wait
            doubles after each failure in a row.
        @param request_timeout: seconds to wait for a response's head.
        @param tls: how the default HTTP client makes C{https} connections
            (e.g. a L{TLSPolicy}); by default Twisted's, with the system's
            roots and no client certificate.
        @param credentials: the etcd user to authenticate as, or C{None}
            to send no token.
        @raise ValueError: for no endpoints, a bad URL, an empty prefix or
            bad backoffs.
        """
        if not endpoints:
            raise ValueError("endpoints: at least one etcd URL is required")
        if not prefix:
            raise ValueError("prefix: must not be empty")
        if not 0 < min_backoff <= max_backoff:
            raise ValueError(f"min_backoff: must be > 0 and <= max_backoff ({max_backoff}), got {min_backoff}")
        self.endpoints = [check_endpoint(url) for url in endpoints]
        self.prefix = prefix
        self.name = f"etcd:{','.join(self.endpoints)}{prefix if prefix.startswith('/') else '/' + prefix}"
        self._reactor: IReactorTime = reactor
        if http is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent

            # Agent's own pool is not persistent: nothing lingers after stop().
            http = HTTPClient(Agent(reactor) if tls is None else Agent(reactor, contextFactory=tls))
        self._http = http
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._timeout = request_timeout
        self._state = RegistryState(self.name, reactor)
        self._table = ServiceTable()
        self._key = prefix.encode("utf-8")
        self._range_end = prefix_range_end(self._key)
        self.revision: int | None = None
        self.phase: Phase = "stopped"
        # Every attempt (a range or a watch) has a number; answers to an
        # attempt that is no longer current are ignored.
        self._attempt = 0
        self._index = 0
        self._failures = 0
        self._connection_error: str | None = None
        self._logged: dict[str, str] = {}
        self._request: defer.Deferred[Any] | None = None
        self._body: _WatchBody | None = None
        self._parser = WatchStreamParser()
        self._retry: IDelayedCall | None = None
        self._credentials = credentials
        # None: authenticate before the next request; "": etcd has
        # authentication off, send no token.
        self._token: str | None = None
        # The token has not yet been accepted by etcd: if etcd rejects it,
        # authenticating again at once would only loop.
        self._token_fresh = False

    # IRegistry

    def start(self) -> None:
        """
        Read the prefix now, then watch it.
        """
        if self.phase != "stopped":
            return
        self._connect()

    def stop(self) -> defer.Deferred[None]:
        """
        Drop the watch and any request in flight; no subscriber is called
        after this.

        @return: a L{Deferred} that fires when the watch's connection is
            closed.
        """
        self.phase = "stopped"
        body = self._body
        self._abandon()
        if body is None or body.closed:
            return defer.succeed(None)
        return body.lost

    def status(self) -> dict[str, Any]:
        """
        @return: see L{IRegistry.status}; also C{revision} and C{phase}.
            C{error} joins the connection's error and every bad key's.
        """
        status = super().status()
        status["revision"] = self.revision
        status["phase"] = self.phase
        return status

    # the attempts

    def _abandon(self) -> None:
        self._attempt += 1
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        request, self._request = self._request, None
        if request is not None:
            request.cancel()
        body, self._body = self._body, None
        if body is not None:
            body.close()

    def _endpoint(self) -> str:
        return self.endpoints[self._index % len(self.endpoints)]

    def _post(self, path: str, payload: Mapping[str, Any], unbuffered: bool = False) -> defer.Deferred[Any]:
        # etcd's gateway takes the bare token, without "Bearer".
        headers = {"Authorization": [self._token]} if self._token else None
        d = self._http.post(
            self._endpoint() + path,
            json=dict(payload),
            headers=headers,
            unbuffered=unbuffered,
            timeout=self._timeout,
            reactor=self._reactor,
        )
        self._request = d
        return d

    def _connect(self) -> None:
        self._abandon()
        if self._credentials is not None and self._token is None:
            self._authenticate()
        else:
            self._read()

    def _read(self) -> None:
        if self.revision is None:
            self._range()
        else:
            self._watch()

    def _authenticate(self) -> None:
        self.phase = "authenticating"
        attempt = self._attempt
        assert self._credentials is not None
        try:
            # Read now, not at start: a rotated password file takes effect.
            request = self._credentials.request()
        except EtcdError:
            self._failed(Failure(), attempt)
            return
        d = self._post("/v3/auth/authenticate", request)
        d.addCallback(self._json_answer, f"authenticate as {self._credentials.username}")
        d.addCallback(read_authenticate_response)
        d.addErrback(self._auth_not_enabled)
        d.addCallback(self._authenticated, attempt)
        d.addErrback(self._failed, attempt)

    def _auth_not_enabled(self, failure: Failure) -> Any:
        # As etcd's own client does: go on without a token, so the users can
        # be set up before etcd's authentication is turned on.
        if failure.check(EtcdError) and "authentication is not enabled" in failure.getErrorMessage():
            return ""
        return failure

    def _authenticated(self, token: str, attempt: int) -> None:
        if attempt != self._attempt:
            return
        self._request = None
        self._token = token
        self._token_fresh = True
        assert self._credentials is not None
        if token:
            self.log.info("registry {name}: authenticated to etcd as {user}",
                          name=self.name, user=self._credentials.username)
        else:
            self.log.info("registry {name}: etcd has authentication off; going on without a token", name=self.name)
        self._read()

    def _range(self) -> None:
        self.phase = "ranging"
        attempt = self._attempt
        d = self._post("/v3/kv/range", {"key": _b64(self._key), "range_end": _b64(self._range_end)})
        d.addCallback(self._json_answer, "range")
        d.addCallback(self._ranged, attempt)
        d.addErrback(self._failed, attempt)

    @defer.inlineCallbacks
    def _json_answer(self, response: Any, what: str) -> Any:
        body = yield response.content()
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if response.code != 200:
            detail = doc.get("message") or doc.get("error") if isinstance(doc, Mapping) else body[:200]
            # 401 is gRPC's Unauthenticated: the token expired or etcd forgot it.
            error = TokenRejected if response.code == 401 else EtcdError
            raise error(f"{what}: HTTP {response.code}: {detail!r}{self._auth_hint(str(detail))}")
        if doc is None:
            raise EtcdError(f"{what}: the answer is not JSON: {body[:200]!r}")
        return doc

    def _ranged(self, body: Any, attempt: int) -> None:
        if attempt != self._attempt:
            return
        self._request = None
        revision, kvs = read_range_response(body)
        self._table.reset(kvs)
        self.revision = revision
        self._connection_error = None
        self._token_fresh = False
        self._publish()
        self._watch()

    def _watch(self) -> None:
        self.phase = "watching"
        attempt = self._attempt
        assert self.revision is not None
        self._parser = WatchStreamParser()
        d = self._post(
            "/v3/watch",
            {
                "create_request": {
                    "key": _b64(self._key),
                    "range_end": _b64(self._range_end),
                    "start_revision": str(self.revision + 1),
                }
            },
            unbuffered=True,
        )
        d.addCallback(self._watch_response, attempt)
        d.addErrback(self._failed, attempt)

    def _watch_response(self, response: Any, attempt: int) -> Any:
        if attempt != self._attempt:
            return None
        self._request = None
        if response.code != 200:
            return self._json_answer(response, "watch")
        self._body = _WatchBody(self, attempt)
        response.deliverBody(self._body)
        return None

    def _watch_data(self, attempt: int, data: bytes) -> None:
        if attempt != self._attempt:
            return
        try:
            for message in self._parser.feed(data):
                self._watch_message(read_watch_message(message))
                if attempt != self._attempt:
                    # The message ended this watch (a compaction).
                    return
        except Exception:
            self._failed(Failure(), attempt)

    def _watch_message(self, message: WatchMessage) -> None:
        if message.canceled:
            if message.compact_revision > 0:
                self.log.info(
                    "registry {name}: revisions up to {compacted} were compacted; reading {prefix} again",
                    name=self.name,
                    compacted=message.compact_revision,
                    prefix=self.prefix,
                )
                self.revision = None
                self._connect()
                return
            reason = message.cancel_reason or "no reason given"
            # An expired token does not end a watch, but a new watch (after
            # a lost stream, or etcd restarting) with one is canceled at once.
            error = TokenRejected if token_rejected(reason) else EtcdError
            raise error(f"watch canceled by etcd: {reason}{self._auth_hint(reason)}")
        if message.created:
            self._failures = 0
            self._token_fresh = False
            if self._connection_error is not None:
                self.log.info("registry {name}: watching again from revision {revision}",
                              name=self.name, revision=(self.revision or 0) + 1)
            self._connection_error = None
        for event in message.events:
            if event.kind == "DELETE":
                self._table.delete(event.key)
            else:
                self._table.put(event.key, event.value)
            self.revision = max(self.revision or 0, event.revision)
        self._publish()

    def _watch_ended(self, attempt: int, reason: Failure | None) -> None:
        if attempt != self._attempt:
            return
        self._body = None
        text = describe(reason) if reason is not None else "etcd closed it"
        self._failed(Failure(EtcdError(f"watch stream ended: {text}")), attempt)

    def _auth_hint(self, reason: str) -> str:
        if "user name is empty" in reason and self._credentials is None:
            return " (etcd has authentication enabled: set username and password_file)"
        if "permission denied" in reason and self._credentials is not None:
            return f" (etcd user {self._credentials.username} may not read {self.prefix})"
        return ""

    def _failed(self, failure: Failure, attempt: int) -> None:
        if attempt != self._attempt:
            return
        if failure.check(TokenRejected) and self._credentials is not None:
            fresh, self._token, self._token_fresh = self._token_fresh, None, False
            if not fresh:
                # A token that worked has expired, or etcd restarted: one
                # new token at once, with no error shown; a new token that
                # is rejected too is an error, retried after the backoff.
                self.log.info("registry {name}: etcd rejected the auth token ({reason}); authenticating again",
                              name=self.name, reason=describe(failure))
                self._connect()
                return
        elif self._token == "":
            # etcd had authentication off; it may be on by the next try.
            self._token = None
        endpoint = self._endpoint()
        reason = describe(failure)
        self._connection_error = f"{endpoint}: {reason}"
        self._abandon()
        self._state.fail(self._error_text() or reason)
        delay = min(self._max_backoff, self._min_backoff * 2 ** min(self._failures, 30))
        self._failures += 1
        self._index += 1
        self.phase = "waiting"
        self._retry = self._reactor.callLater(delay, self._connect)

    # the view

    def _publish(self) -> None:
        view, conflicts = self._table.view()
        problems = dict(self._table.errors)
        for conflict in conflicts:
            problems[conflict] = conflict
        for key, reason in problems.items():
            if self._logged.get(key) != reason:
                self.log.warn("registry {name}: {reason}; keeping the rest", name=self.name, reason=reason)
        self._logged = problems
        self._state.update(self, view, self._error_text(conflicts))

    def _error_text(self, conflicts: list[str] | None = None) -> str | None:
        if conflicts is None:
            conflicts = self._table.view()[1]
        parts = [] if self._connection_error is None else [self._connection_error]
        parts += [self._table.errors[key] for key in sorted(self._table.errors)]
        parts += conflicts
        return "; ".join(parts) or None
