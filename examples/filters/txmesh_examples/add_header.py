"""
C{add-header}: set fixed headers on requests and responses.

Config::

    - name: add-header
      config:
        request: {x-env: staging}
        response: {x-served-by: txmesh}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zope.interface import implementer

from txmesh.config.errors import FilterConfigError
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory


def _headers(raw: Any, field: str) -> tuple[tuple[bytes, bytes], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise FilterConfigError(field, "expected a mapping of header name to value")
    pairs = []
    for name, value in raw.items():
        if not isinstance(name, str) or not name or not isinstance(value, (str, int)):
            raise FilterConfigError(f"{field}.{name}", "header names and values must be strings")
        pairs.append((name.lower().encode("latin-1"), str(value).encode("latin-1")))
    return tuple(pairs)


class AddHeaderFilter(HTTPFilter):
    def __init__(self, config: tuple[tuple[tuple[bytes, bytes], ...], tuple[tuple[bytes, bytes], ...]]):
        self._request, self._response = config

    def request_headers(self, head, end_stream):
        for name, value in self._request:
            head.headers.set(name, value)

    def response_headers(self, head, end_stream):
        for name, value in self._response:
            head.headers.set(name, value)


@implementer(IHTTPFilterFactory)
class AddHeaderFactory:
    name = "add-header"

    def parse_config(self, raw: Mapping[str, Any]):
        unknown = set(raw) - {"request", "response"}
        if unknown:
            raise FilterConfigError(sorted(unknown)[0], "unknown field (known: request, response)")
        return _headers(raw.get("request"), "request"), _headers(raw.get("response"), "response")

    def create_filter(self, config, stream):
        return AddHeaderFilter(config)
