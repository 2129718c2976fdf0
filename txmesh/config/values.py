"""
Readers of single config values, shared by every config format (txmesh's
own YAML, Istio documents): each returns the value in the model's type or
raises C{ValueError} with a reason a person can act on; the caller adds
the file and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.endpoints import clientFromString, serverFromString

_CTL_EXCEPT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def kind_of(value: Any) -> str:
    """
    @return: what C{value} is, in words ("a mapping", "a list", ...).
    """
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number",
            float: "a number", bool: "a boolean", type(None): "nothing"}.get(type(value), type(value).__name__)


def string(value: Any) -> str:
    """
    A non-empty string.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {kind_of(value)}")
    return value


def text(value: Any) -> str:
    """
    Any string, empty included.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {kind_of(value)}")
    return value


def utf8(value: Any) -> bytes:
    """
    A non-empty string, as UTF-8 bytes.
    """
    return string(value).encode("utf-8")


def boolean(value: Any) -> bool:
    """
    C{true} or C{false}; no truthy strings.
    """
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {kind_of(value)}")
    return value


def int_in(lo: int, hi: int) -> Callable[[Any], int]:
    """
    @return: a reader of integers from C{lo} to C{hi}.
    """
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {kind_of(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value
    return convert


def one_of(choices: Iterable[str]) -> Callable[[Any], str]:
    """
    @return: a reader of one of C{choices}.
    """
    choices = tuple(choices)

    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return convert


def percent(value: Any) -> float:
    """
    A number from 0 to 100.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {kind_of(value)}")
    if not 0 <= value <= 100:
        raise ValueError(f"must be between 0 and 100, got {value}")
    return float(value)


def regex(value: Any) -> re.Pattern[bytes]:
    """
    A regular expression that compiles (matched against bytes).
    """
    try:
        return re.compile(utf8(value))
    except re.error as e:
        raise ValueError(f"invalid regular expression {value!r}: {e}") from None


def header_value(value: Any) -> bytes:
    """
    A header value: a string (numbers are taken as written) with no control
    characters but tab, as UTF-8 bytes.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    value = text(value)
    if _CTL_EXCEPT_TAB.search(value) is not None:
        # CR or LF here would write extra headers into every request.
        raise ValueError(f"control characters are not allowed in a header value: {value!r}")
    return value.encode("utf-8")


def labels(value: Any) -> tuple[tuple[str, str], ...]:
    """
    A mapping of label names to string values, as sorted pairs.
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of label name to value, got {kind_of(value)}")
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"label names must be non-empty strings, got {k!r}")
        if not isinstance(v, str):
            raise ValueError(f"label {k!r}: values must be strings (quote them), got {kind_of(v)}")
    return tuple(sorted(value.items()))


def _endpoint(value: Any, parse: Callable[[Any, str], object], kind: str) -> str:
    desc = string(value)
    try:
        # Parsing only: an endpoint does nothing with its reactor until
        # listen() or connect() is called.
        parse(None, desc)
    except Exception as e:
        raise ValueError(f"not a valid Twisted {kind} endpoint string ({e})") from None
    return desc


def server_endpoint(value: Any) -> str:
    """
    @return: C{value}, a valid Twisted server endpoint string.
    """
    return _endpoint(value, serverFromString, "server")


def client_endpoint(value: Any) -> str:
    """
    @return: C{value}, a valid Twisted client endpoint string.
    """
    return _endpoint(value, clientFromString, "client")
