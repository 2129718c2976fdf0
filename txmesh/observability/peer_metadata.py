"""
Peer metadata exchange: how the two sidecars of a request learn who is on
the other end, for the workload labels of Istio's metrics.

Istio's proxies exchange node metadata in the C{x-envoy-peer-metadata}
header (a base64 protobuf C{Struct}), which the receiving side reads and
removes.  txmesh does the same, simplified and bounded: the C{x-txmesh-peer}
header carries four short fields,

    x-txmesh-peer: w=reviews-v1;n=default;a=reviews;v=v1

(workload, namespace, app, version).  The client side's proxy adds it to the
request; the server side's proxy reads and removes it and adds its own to
the response, which the client side reads and removes, so applications
never see it.

The values are claims, not proofs: only the principals (from mutual TLS)
are verified.  Decoding is total: any input -- too long, not ASCII,
unknown keys, bad characters -- gives C{"unknown"} for the fields it cannot
vouch for, and never raises.
"""

from __future__ import annotations

import re

import attrs

PEER_HEADER = b"x-txmesh-peer"
"""
The header, request and response, carrying a proxy's own metadata.
"""

MAX_HEADER_LENGTH = 512
"""
Longer values are not parsed at all (every field is C{"unknown"}).
"""

MAX_VALUE_LENGTH = 128
"""
Longer field values read as C{"unknown"}.
"""

UNKNOWN = "unknown"

_VALUE = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")  # 128: MAX_VALUE_LENGTH

_KEYS = {"w": "workload", "n": "namespace", "a": "app", "v": "version"}


@attrs.frozen
class PeerMetadata:
    """
    What one proxy tells the other about its workload.  Every field is a
    value of at most L{MAX_VALUE_LENGTH} characters of C{[A-Za-z0-9._-]}, or
    C{"unknown"}.
    """

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN


NO_PEER = PeerMetadata()
"""
The metadata of a peer that sent none.
"""


def clean(value: object) -> str:
    """
    @return: C{value} if it is a string that may be a label value here,
        else C{"unknown"}.
    """
    if isinstance(value, str) and _VALUE.match(value):
        return value
    return UNKNOWN


def encode(workload: str, namespace: str, app: str, version: str) -> bytes:
    """
    @return: the header value for this metadata; values that may not be
        sent (see L{clean}) are sent as C{"unknown"}.
    """
    return (f"w={clean(workload)};n={clean(namespace)};a={clean(app)};v={clean(version)}").encode("ascii")


def decode(raw: bytes | str | None) -> PeerMetadata:
    """
    Read a header value made by L{encode} (or by anyone else).

    @return: the metadata; L{NO_PEER} for C{None}, an over-long or
        undecodable value; fields missing or invalid are C{"unknown"}, and
        unknown keys are ignored.  Never raises.
    """
    if not isinstance(raw, (bytes, str)) or len(raw) > MAX_HEADER_LENGTH:
        return NO_PEER
    if isinstance(raw, bytes):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return NO_PEER
    else:
        text = raw
    fields: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        name = _KEYS.get(key)
        if not sep or name is None or name in fields:
            continue
        fields[name] = clean(value)
    if not fields:
        return NO_PEER
    return PeerMetadata(**fields)
