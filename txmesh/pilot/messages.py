"""
The message layer of the persistent pilot/proxy channel, sans-IO.

Like h2 and h11 this module owns no socket, reactor or clock: a
L{ChannelDecoder} is fed bytes and returns messages, and L{encode} turns a
message into bytes to write. The Twisted protocols around it (next to land)
only move bytes.

Framing: each message is a 4-byte big-endian unsigned length followed by that
many bytes of UTF-8 JSON, which must be an object with a C{"type"} key naming
one of the messages below. Semantics follow xDS state-of-the-world: the pilot
sends a L{Push} with a C{version} and a C{nonce}; the proxy answers with an
L{Ack} or a L{Nack} naming that nonce; L{ProxySyncState} keeps the pilot's
per-proxy record of it.

Anything a peer sends that cannot be framed, parsed or validated raises
L{ChannelProtocolError}; the caller closes that one channel. Unknown keys in
a message are ignored, so that a newer peer may add optional fields.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

__all__ = [
    "KNOWN_RESOURCE_TYPES",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "ChannelDecoder",
    "ChannelProtocolError",
    "Hello",
    "Message",
    "MessageValidationError",
    "Nack",
    "Node",
    "Ping",
    "Pong",
    "ProxySyncState",
    "Push",
    "Refused",
    "SyncStatus",
    "encode",
    "message_from_json",
    "unknown_resource_types",
]

PROTOCOL_VERSION = 1
"""The channel protocol version this code speaks, sent in L{Hello}."""

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Default bound on one message's body (the JSON after the length prefix)."""

SECRETS = "secrets"
"""The resource type of key material; the pilot pushes the mesh trust bundle in it."""

ROOT_CA_SECRET = "ROOTCA"
"""The C{secrets} entry holding the mesh trust bundle (C{trust_bundle}, PEM)."""

KNOWN_RESOURCE_TYPES = frozenset({"listeners", "routes", "clusters", "endpoints", "secrets", "policies"})
"""
Resource types this version understands. A L{Push} may carry others (a newer
pilot may add types); L{unknown_resource_types} lists them so a proxy can log
and skip them.
"""

_PREFIX = struct.Struct(">I")
_MAX_INT = 2**63 - 1


class ChannelProtocolError(Exception):
    """
    A peer sent something that breaks the channel protocol. The channel that
    carried it should be closed; no other channel is affected.

    @ivar reason: what was wrong, in words a person can act on.
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class MessageValidationError(ChannelProtocolError, ValueError):
    """
    A message, or a field of one, has an invalid value.

    @ivar field: dotted path of the offending field, e.g. C{node.labels}.
    @ivar detail: what is wrong with the field.
    @ivar message_type: the message's C{type}, when known.
    """

    def __init__(self, field: str, reason: str, message_type: str | None = None):
        self.field = field
        self.detail = reason
        self.message_type = message_type
        where = f"{message_type} message: " if message_type else ""
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{reason}")


# -- field checks ---------------------------------------------------------


def _str(field: str, value: object, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise MessageValidationError(field, f"must be a string, not {type(value).__name__}")
    if not empty and not value:
        raise MessageValidationError(field, "must not be empty")
    return value


def _int(field: str, value: object, minimum: int = 0) -> int:
    # bool is an int subclass; JSON true is never a valid number here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageValidationError(field, f"must be an integer, not {type(value).__name__}")
    if not minimum <= value <= _MAX_INT:
        raise MessageValidationError(field, f"must be between {minimum} and {_MAX_INT}, not {value}")
    return value


def _str_map(field: str, value: object, *, empty_values: bool = True) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise MessageValidationError(field, f"must be an object of strings, not {type(value).__name__}")
    out = {}
    for k, v in value.items():
        _str(f"{field}", k, empty=False)
        out[k] = _str(f"{field}.{k}", v, empty=empty_values)
    return out


def _validator(check):
    """
    Turn a C{check(field, value)} function into an attrs validator naming the
    attribute.
    """

    def validate(instance, attribute, value):
        check(attribute.name, value)

    return validate


def _non_empty_str(field: str, value: object) -> None:
    _str(field, value, empty=False)


def _nested(message_type: str, prefix: str, build):
    """
    Run C{build()}, re-raising a L{MessageValidationError} with the field path
    under C{prefix} and the message type set.
    """
    try:
        return build()
    except MessageValidationError as e:
        field = ".".join(part for part in (prefix, e.field) if part)
        raise MessageValidationError(field, e.detail, message_type) from None


def _require(message_type: str, obj: Mapping[str, Any], key: str) -> Any:
    if key not in obj:
        raise MessageValidationError(key, "is required", message_type)
    return obj[key]


# -- messages -------------------------------------------------------------


@attrs.frozen
class Node:
    """
    Who a proxy is, as it announces itself in L{Hello}.

    @ivar id: the proxy's node id, unique in the mesh (e.g. C{reviews-v1-7d9f.default}).
    @ivar workload: the workload (deployment, service account) it fronts.
    @ivar namespace: the workload's namespace.
    @ivar app: the C{app} label, the service name.
    @ivar version: the C{version} label (a subset such as C{v1}).
    @ivar labels: the workload's labels, string to string.
    @ivar locality: C{region/zone/subzone}, possibly empty.
    """

    id: str = attrs.field(validator=_validator(_non_empty_str))
    workload: str = attrs.field(default="", validator=_validator(_str))
    namespace: str = attrs.field(default="default", validator=_validator(_non_empty_str))
    app: str = attrs.field(default="", validator=_validator(_str))
    version: str = attrs.field(default="", validator=_validator(_str))
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=lambda v: _str_map("labels", v), hash=False)
    locality: str = attrs.field(default="", validator=_validator(_str))

    def to_json(self) -> dict[str, Any]:
        """
        @return: this node as a JSON-ready object.
        """
        return {
            "id": self.id,
            "workload": self.workload,
            "namespace": self.namespace,
            "app": self.app,
            "version": self.version,
            "labels": dict(self.labels),
            "locality": self.locality,
        }

    @classmethod
    def from_json(cls, obj: object) -> Node:
        """
        @param obj: a decoded JSON value.
        @return: the node it describes.
        @raise MessageValidationError: C{obj} is not a valid node; the error
            names the field.
        """
        if not isinstance(obj, Mapping):
            raise MessageValidationError("", f"must be an object, not {type(obj).__name__}")
        if "id" not in obj:
            raise MessageValidationError("id", "is required")
        known = ("id", "workload", "namespace", "app", "version", "labels", "locality")
        return cls(**{k: obj[k] for k in known if k in obj})


class _MessageBase:
    """
    What every message shares: a C{TYPE} and the C{type} key in its JSON.
    """

    TYPE: ClassVar[str]

    def _fields_json(self) -> dict[str, Any]:
        return {a.name: getattr(self, a.name) for a in attrs.fields(type(self))}

    def to_json(self) -> dict[str, Any]:
        """
        @return: this message as a JSON-ready object, C{type} included.
        """
        return {"type": self.TYPE, **self._fields_json()}

    @classmethod
    def _check_type(cls, obj: object) -> Mapping[str, Any]:
        if not isinstance(obj, Mapping):
            raise MessageValidationError("", f"a message must be a JSON object, not {type(obj).__name__}")
        if obj.get("type") != cls.TYPE:
            raise MessageValidationError("type", f"must be {cls.TYPE!r}, not {obj.get('type')!r}", cls.TYPE)
        return obj

    @classmethod
    def from_json(cls, obj: object):
        """
        @param obj: a decoded JSON value.
        @return: the message it describes.
        @raise MessageValidationError: C{obj} is not a valid message of this
            type; the error names the field.
        """
        obj = cls._check_type(obj)
        kwargs = {a.name: _require(cls.TYPE, obj, a.name) for a in attrs.fields(cls)}
        return _nested(cls.TYPE, "", lambda: cls(**kwargs))


@attrs.frozen
class Hello(_MessageBase):
    """
    Proxy to pilot, first on every connection.

    @ivar protocol_version: the channel protocol the proxy speaks
        (L{PROTOCOL_VERSION}); a pilot that does not speak it answers
        L{Refused}.
    @ivar node: who the proxy is.
    @ivar credential: the bootstrap credential (a join token or service
        account token); may be empty when the TLS client certificate is the
        credential.
    @ivar versions: resource type to the last version the proxy applied, so a
        reconnecting proxy resumes; empty on first start.
    """

    TYPE: ClassVar[str] = "hello"

    node: Node = attrs.field(validator=attrs.validators.instance_of(Node))
    credential: str = attrs.field(default="", validator=_validator(_str))
    versions: Mapping[str, str] = attrs.field(
        factory=dict, converter=lambda v: _str_map("versions", v, empty_values=False), hash=False
    )
    protocol_version: int = attrs.field(default=PROTOCOL_VERSION, validator=_validator(lambda f, v: _int(f, v, 1)))

    def _fields_json(self) -> dict[str, Any]:
        return {
            "protocol_version": self.protocol_version,
            "node": self.node.to_json(),
            "credential": self.credential,
            "versions": dict(self.versions),
        }

    @classmethod
    def from_json(cls, obj: object) -> Hello:
        """
        @param obj: a decoded JSON value.
        @return: the C{Hello} it describes.
        @raise MessageValidationError: C{obj} is not a valid C{Hello}; the
            error names the field, nested ones by path (C{node.labels.app}).
        """
        obj = cls._check_type(obj)
        node_json = _require(cls.TYPE, obj, "node")
        node = _nested(cls.TYPE, "node", lambda: Node.from_json(node_json))
        kwargs = {k: obj[k] for k in ("credential", "versions") if k in obj}
        return _nested(
            cls.TYPE,
            "",
            lambda: cls(node=node, protocol_version=_require(cls.TYPE, obj, "protocol_version"), **kwargs),
        )


def _resources(value: object) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(value, Mapping):
        raise MessageValidationError("resources", f"must be an object, not {type(value).__name__}")
    out = {}
    for rtype, items in value.items():
        _str("resources", rtype, empty=False)
        if not isinstance(items, list):
            raise MessageValidationError(f"resources.{rtype}", f"must be a list, not {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise MessageValidationError(f"resources.{rtype}[{i}]", f"must be an object, not {type(item).__name__}")
        out[rtype] = [dict(item) for item in items]
    return out


@attrs.frozen
class Push(_MessageBase):
    """
    Pilot to proxy: the complete current set of each resource type it carries
    (state of the world). Types absent from C{resources} are unchanged.

    @ivar version: the config version, opaque to the proxy; it echoes it in
        its L{Ack} or L{Nack}.
    @ivar nonce: unique per push on a connection; replies name it so the
        pilot can tell a reply to this push from one to an older push.
    @ivar resources: resource type (see L{KNOWN_RESOURCE_TYPES}) to a list of
        JSON objects.
    @ivar versions: resource type to the version of that type's content, for
        some or all of the types in C{resources}; a type it leaves out has
        C{version}.  The proxy records these and sends them back in its next
        L{Hello} so a pilot can skip what it already has.
    """

    TYPE: ClassVar[str] = "push"

    version: str = attrs.field(validator=_validator(_non_empty_str))
    nonce: str = attrs.field(validator=_validator(_non_empty_str))
    resources: Mapping[str, list[dict[str, Any]]] = attrs.field(factory=dict, converter=_resources, hash=False)
    versions: Mapping[str, str] = attrs.field(
        factory=dict, converter=lambda v: _str_map("versions", v, empty_values=False), hash=False
    )

    def __attrs_post_init__(self) -> None:
        for rtype in self.versions:
            if rtype not in self.resources:
                raise MessageValidationError(f"versions.{rtype}", "names a resource type the push does not carry")

    def type_version(self, rtype: str) -> str:
        """
        @return: the version of resource type C{rtype}'s content in this push.
        """
        return self.versions.get(rtype, self.version)

    def _fields_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "nonce": self.nonce,
            "resources": {k: list(v) for k, v in self.resources.items()},
        }
        if self.versions:
            out["versions"] = dict(self.versions)
        return out

    @classmethod
    def from_json(cls, obj: object) -> Push:
        """
        @param obj: a decoded JSON value.
        @return: the C{Push} it describes (C{versions} is optional).
        @raise MessageValidationError: C{obj} is not a valid C{Push}.
        """
        obj = cls._check_type(obj)
        kwargs = {k: _require(cls.TYPE, obj, k) for k in ("version", "nonce", "resources")}
        if "versions" in obj:
            kwargs["versions"] = obj["versions"]
        return _nested(cls.TYPE, "", lambda: cls(**kwargs))


def unknown_resource_types(push: Push) -> list[str]:
    """
    @param push: a received push.
    @return: the resource types in C{push} that this version does not know,
        sorted; a proxy logs and skips them rather than rejecting the push.
    """
    return sorted(set(push.resources) - KNOWN_RESOURCE_TYPES)


@attrs.frozen
class Ack(_MessageBase):
    """
    Proxy to pilot: the push with C{nonce} was applied.

    @ivar nonce: the nonce of the push being answered.
    @ivar version: the version now applied (the push's version).
    """

    TYPE: ClassVar[str] = "ack"

    nonce: str = attrs.field(validator=_validator(_non_empty_str))
    version: str = attrs.field(validator=_validator(_non_empty_str))


@attrs.frozen
class Nack(_MessageBase):
    """
    Proxy to pilot: the push with C{nonce} was rejected; the proxy keeps its
    previous config.

    @ivar nonce: the nonce of the push being answered.
    @ivar version: the rejected version.
    @ivar error: why, for the operator.
    """

    TYPE: ClassVar[str] = "nack"

    nonce: str = attrs.field(validator=_validator(_non_empty_str))
    version: str = attrs.field(validator=_validator(_non_empty_str))
    error: str = attrs.field(validator=_validator(_non_empty_str))


@attrs.frozen
class Refused(_MessageBase):
    """
    Pilot to proxy, after which the pilot closes the connection: the proxy
    was not accepted (bad credential, unsupported protocol version...).

    @ivar reason: why, for the operator.
    """

    TYPE: ClassVar[str] = "refused"

    reason: str = attrs.field(validator=_validator(_non_empty_str))


@attrs.frozen
class Ping(_MessageBase):
    """
    Keepalive, either direction; the peer answers with a L{Pong} of the same
    C{id}.

    @ivar id: chosen by the sender, echoed in the pong.
    """

    TYPE: ClassVar[str] = "ping"

    id: int = attrs.field(validator=_validator(_int))


@attrs.frozen
class Pong(_MessageBase):
    """
    Answer to a L{Ping}.

    @ivar id: the ping's C{id}.
    """

    TYPE: ClassVar[str] = "pong"

    id: int = attrs.field(validator=_validator(_int))


MAX_PEM_CHARS = 64 * 1024
"""Longest CSR or certificate chain a message may carry."""


def _pem(field: str, value: object) -> None:
    _non_empty_str(field, value)
    if len(value) > MAX_PEM_CHARS:  # type: ignore[arg-type]
        raise MessageValidationError(field, f"longer than {MAX_PEM_CHARS} characters")


@attrs.frozen
class CertificateRequest(_MessageBase):
    """
    Proxy to pilot: sign this CSR (the proxy's workload key never leaves
    it).  The pilot answers L{CertificateIssued} or L{CertificateDenied}
    with the same C{id}; a denial does not close the channel.

    @ivar id: chosen by the proxy, echoed in the answer.
    @ivar csr: a PEM certificate signing request naming the SPIFFE ID the
        proxy asks for as its only URI SAN.
    """

    TYPE: ClassVar[str] = "csr"

    id: int = attrs.field(validator=_validator(_int))
    csr: str = attrs.field(validator=_validator(_pem), repr=False)


@attrs.frozen
class CertificateIssued(_MessageBase):
    """
    Pilot to proxy: the signed certificate.

    @ivar id: the request's C{id}.
    @ivar chain: PEM, the leaf first, then any intermediates.
    @ivar roots: PEM, the mesh trust bundle (more than one root during a
        root rotation).
    """

    TYPE: ClassVar[str] = "certificate"

    id: int = attrs.field(validator=_validator(_int))
    chain: str = attrs.field(validator=_validator(_pem), repr=False)
    roots: str = attrs.field(validator=_validator(_pem), repr=False)


@attrs.frozen
class CertificateDenied(_MessageBase):
    """
    Pilot to proxy: the CSR with C{id} was not signed.

    @ivar id: the request's C{id}.
    @ivar reason: why, for the operator.
    """

    TYPE: ClassVar[str] = "certificate_denied"

    id: int = attrs.field(validator=_validator(_int))
    reason: str = attrs.field(validator=_validator(_non_empty_str))


Message = (
    Hello | Push | Ack | Nack | Refused | Ping | Pong | CertificateRequest | CertificateIssued | CertificateDenied
)
"""Any channel message."""

_MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (Hello, Push, Ack, Nack, Refused, Ping, Pong, CertificateRequest, CertificateIssued, CertificateDenied)
}


def message_from_json(obj: object) -> Message:
    """
    @param obj: a decoded JSON value.
    @return: the message it describes, chosen by its C{type}.
    @raise ChannelProtocolError: C{obj} is not an object, has no known
        C{type}, or fails validation (a L{MessageValidationError}).
    """
    if not isinstance(obj, Mapping):
        raise ChannelProtocolError(f"a message must be a JSON object, not {type(obj).__name__}")
    mtype = obj.get("type")
    cls = _MESSAGE_TYPES.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ChannelProtocolError(f"unknown message type {mtype!r}; known: {', '.join(sorted(_MESSAGE_TYPES))}")
    return cls.from_json(obj)


# -- framing --------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def encode(message: Message, max_message_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """
    Frame a message for the wire.

    @param message: the message to send.
    @param max_message_bytes: the bound the receiver enforces.
    @return: the length prefix and the JSON body.
    @raise ChannelProtocolError: the encoded body is larger than
        C{max_message_bytes} (the receiver would close the channel), or the
        message holds a value JSON cannot carry (e.g. NaN).
    """
    try:
        text = json.dumps(message.to_json(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ChannelProtocolError(f"{message.TYPE} message cannot be encoded as JSON: {e}") from None
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError as e:
        # A lone surrogate in a string: JSON text on the wire must be UTF-8.
        raise ChannelProtocolError(f"{message.TYPE} message cannot be encoded as UTF-8: {e}") from None
    if len(body) > max_message_bytes:
        raise ChannelProtocolError(
            f"{message.TYPE} message is {len(body)} bytes, over the limit of {max_message_bytes}"
        )
    return _PREFIX.pack(len(body)) + body


class ChannelDecoder:
    """
    Turns the bytes received on one channel into messages.

    Feed it whatever the transport delivers; frames may be split across calls
    and several may arrive in one. After it has raised
    L{ChannelProtocolError} the channel is broken and every later call raises
    the same error.

    @ivar max_message_bytes: the largest body accepted.
    """

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES):
        """
        @param max_message_bytes: the largest body accepted; a length prefix
            above it is refused as soon as its four bytes arrive.
        """
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._error: ChannelProtocolError | None = None

    @property
    def buffered(self) -> int:
        """
        @return: bytes received but not yet part of a complete message.
        """
        return len(self._buffer)

    def receive_data(self, data: bytes) -> list[Message]:
        """
        @param data: bytes received from the peer, any amount.
        @return: the messages completed by C{data}, in order; possibly none.
        @raise ChannelProtocolError: the peer broke the protocol; close the
            channel. Messages completed before the bad frame in the same call
            are lost with it, as the channel is closing anyway.
        """
        if self._error is not None:
            raise self._error
        self._buffer += data
        messages = []
        try:
            while len(self._buffer) >= _PREFIX.size:
                (length,) = _PREFIX.unpack_from(self._buffer)
                if length > self.max_message_bytes:
                    raise ChannelProtocolError(
                        f"message length {length} is over the limit of {self.max_message_bytes} bytes"
                    )
                end = _PREFIX.size + length
                if len(self._buffer) < end:
                    break
                body = bytes(self._buffer[_PREFIX.size : end])
                del self._buffer[:end]
                messages.append(self._parse(body))
        except ChannelProtocolError as e:
            self._error = e
            self._buffer.clear()
            raise
        return messages

    def _parse(self, body: bytes) -> Message:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ChannelProtocolError(f"message is not valid UTF-8: {e}") from None
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise ChannelProtocolError(f"message is not valid JSON: {e}") from None
        return message_from_json(obj)


# -- pilot-side bookkeeping -----------------------------------------------


class SyncStatus(enum.Enum):
    """
    Where one proxy stands with the pilot's config, as C{txmesh proxy-status}
    shows it.
    """

    NOT_SENT = "NOT SENT"
    """Nothing has been pushed on this connection yet."""
    STALE = "STALE"
    """A push is outstanding: sent, not yet ACKed or NACKed."""
    SYNCED = "SYNCED"
    """The last push was ACKed."""
    NACKED = "NACKED"
    """The last push was rejected; the proxy runs its previous config."""


@attrs.define
class ProxySyncState:
    """
    The pilot's record of one connected proxy's sync, pure bookkeeping fed by
    the pilot's channel protocol.

    Replies naming a nonce other than the last pushed one are stale (they
    answer an older push, overtaken by a newer one) and are ignored, as xDS
    does.

    @ivar node_id: the proxy's node id.
    @ivar status: the current L{SyncStatus}.
    @ivar pushed_version: version of the last push, or C{None}.
    @ivar pushed_nonce: nonce of the last push, or C{None}.
    @ivar acked_version: the last version the proxy ACKed, or C{None}.
    @ivar nacked_version: the last version the proxy rejected, or C{None}.
    @ivar last_nack_error: the error of the last NACK, or C{None}; kept after
        later pushes, for the operator.
    """

    node_id: str
    status: SyncStatus = SyncStatus.NOT_SENT
    pushed_version: str | None = None
    pushed_nonce: str | None = None
    acked_version: str | None = None
    nacked_version: str | None = None
    last_nack_error: str | None = None

    def pushed(self, version: str, nonce: str) -> None:
        """
        A push was sent; it supersedes any outstanding one.

        @param version: the push's version.
        @param nonce: the push's nonce.
        """
        self.pushed_version = version
        self.pushed_nonce = nonce
        self.status = SyncStatus.STALE

    def resumed(self, version: str) -> None:
        """
        The proxy said hello with the versions the pilot would push, so
        nothing is sent: it is in sync at C{version}.
        """
        self.acked_version = version
        self.status = SyncStatus.SYNCED

    def _current(self, nonce: str, version: str, what: str) -> bool:
        if self.pushed_nonce is None or nonce != self.pushed_nonce:
            return False
        if version != self.pushed_version:
            raise ChannelProtocolError(
                f"{what} for nonce {nonce!r} names version {version!r}, but {self.pushed_version!r} was pushed"
            )
        return True

    def acked(self, nonce: str, version: str) -> bool:
        """
        The proxy ACKed a push.

        @param nonce: the nonce the ACK names.
        @param version: the version the ACK names.
        @return: C{True} if it answered the last push and was recorded,
            C{False} if it was stale and ignored.
        @raise ChannelProtocolError: the nonce is the last push's but the
            version is not.
        """
        if not self._current(nonce, version, "ACK"):
            return False
        self.acked_version = version
        self.status = SyncStatus.SYNCED
        return True

    def nacked(self, nonce: str, version: str, error: str) -> bool:
        """
        The proxy rejected a push; it keeps its previous config, so
        C{acked_version} is unchanged.

        @param nonce: the nonce the NACK names.
        @param version: the rejected version.
        @param error: the proxy's reason.
        @return: C{True} if recorded, C{False} if stale and ignored.
        @raise ChannelProtocolError: the nonce is the last push's but the
            version is not.
        """
        if not self._current(nonce, version, "NACK"):
            return False
        self.nacked_version = version
        self.last_nack_error = error
        self.status = SyncStatus.NACKED
        return True
