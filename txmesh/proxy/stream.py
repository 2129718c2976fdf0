"""
The protocol-neutral request/response stream that filters and the router see.

Both HTTP codecs (HTTP/1.1 today, HTTP/2 later) turn wire bytes into the
values defined here, and everything above the codecs -- the filter chain, the
router, retries, metrics -- sees only these values.  Header names are
lower-case C{bytes}, as in h2 and h11; header values are C{bytes}.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs

HeaderInput = str | bytes


def _b(value: HeaderInput) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode("latin-1")


class Headers:
    """
    An ordered, multi-valued header list with lower-case C{bytes} names.

    Lookups are linear: real requests carry a dozen headers, and a list of
    pairs is cheaper to build per request than any mapping.  Methods accept
    C{str} or C{bytes} for names and values and always return C{bytes}.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[bytes, bytes]] | None = None):
        """
        @param items: C{(name, value)} pairs; names must already be
            lower-case C{bytes} (codecs guarantee this).  A C{list} is
            adopted, not copied: codecs hand over lists they built.
        """
        if type(items) is list:
            self._items: list[tuple[bytes, bytes]] = items
        else:
            self._items = list(items) if items else []

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[HeaderInput, HeaderInput]]) -> Headers:
        """
        Build from user-supplied pairs, lower-casing names.
        """
        return cls([(_b(n).lower(), _b(v)) for n, v in pairs])

    def get(self, name: HeaderInput, default: bytes | None = None) -> bytes | None:
        """
        @return: the first value of C{name}, or C{default}.
        """
        # Names are nearly always bytes already: no call to _b for them.
        key = name.lower() if isinstance(name, bytes) else _b(name).lower()
        for n, v in self._items:
            if n == key:
                return v
        return default

    def get_all(self, name: HeaderInput) -> list[bytes]:
        """
        @return: every value of C{name}, in order.
        """
        key = _b(name).lower()
        return [v for n, v in self._items if n == key]

    def add(self, name: HeaderInput, value: HeaderInput) -> None:
        """
        Append a value, keeping existing values of the same name.
        """
        self._items.append((_b(name).lower(), _b(value)))

    def set(self, name: HeaderInput, value: HeaderInput) -> None:
        """
        Replace every value of C{name} with the single C{value}.
        """
        key = _b(name).lower()
        self._items = [(n, v) for n, v in self._items if n != key]
        self._items.append((key, _b(value)))

    def remove(self, name: HeaderInput) -> None:
        """
        Remove every value of C{name}; absent names are ignored.
        """
        key = _b(name).lower()
        self._items = [(n, v) for n, v in self._items if n != key]

    def remove_many(self, names: frozenset[bytes] | set[bytes]) -> None:
        """
        Remove every header whose lower-case name is in C{names}.
        """
        self._items = [(n, v) for n, v in self._items if n not in names]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (str, bytes)):
            return False
        return self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[bytes, bytes]]:
        """
        @return: the underlying C{(name, value)} list (not a copy).
        """
        return self._items

    def copy(self) -> Headers:
        """
        @return: an independent copy.
        """
        return Headers(list(self._items))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._items == other._items
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@attrs.define(slots=True)
class RequestHead:
    """
    The start of a request: method, target, protocol version and headers.

    @ivar method: e.g. C{b"GET"}.
    @ivar path: the request target in origin form (path and query).
    @ivar authority: the C{Host} (HTTP/1.1) or C{:authority} (HTTP/2).
    @ivar scheme: C{b"http"} or C{b"https"}: what the downstream used.
    @ivar version: C{b"1.0"}, C{b"1.1"} or C{b"2"}.
    @ivar headers: the remaining headers (C{host} is kept here too for
        HTTP/1.1 so it round-trips unchanged).
    @ivar absolute_form: the client sent an absolute-form target
        (C{GET http://host/path}) to a forward-proxy listener; C{authority}
        and C{path} were taken from it.
    """

    method: bytes
    path: bytes
    authority: bytes
    headers: Headers
    scheme: bytes = b"http"
    version: bytes = b"1.1"
    absolute_form: bool = False

    @property
    def path_only(self) -> bytes:
        """
        @return: the path without its query string.
        """
        q = self.path.find(b"?")
        return self.path if q < 0 else self.path[:q]


@attrs.define(slots=True)
class ResponseHead:
    """
    The start of a response.

    @ivar status: the status code, e.g. C{200}.
    @ivar headers: response headers.
    @ivar reason: the HTTP/1 reason phrase, if the upstream sent one.
    """

    status: int
    headers: Headers
    reason: bytes = b""
    version: bytes = b"1.1"


class ResponseFlag:
    """
    Envoy's response flags: short codes that say why a response is what it
    is, carried in the C{x-txmesh-flags} response header and the access log.
    """

    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"
    NO_ROUTE = "NR"
    UPSTREAM_RETRY_LIMIT = "URX"
    UPSTREAM_TIMEOUT = "UT"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    UPSTREAM_PROTOCOL_ERROR = "UPE"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    LOCAL_REPLY = "LR"
    RBAC_DENIED = "RBACD"
    STREAM_IDLE_TIMEOUT = "SI"
    OVERLOAD = "OL"
    RATE_LIMITED = "RL"


FLAGS_HEADER = b"x-txmesh-flags"
