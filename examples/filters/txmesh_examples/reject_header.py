"""
C{reject-header}: answer locally when a request header has a listed value,
optionally after asking an (asynchronous) check -- an example of a hook that
returns a Deferred.

Config::

    - name: reject-header
      config:
        header: x-tenant
        values: [evil, banned]
        status: 403          # optional, default 403
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zope.interface import implementer

from txmesh.config.errors import FilterConfigError
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, LocalReply


class RejectByHeaderFilter(HTTPFilter):
    def __init__(self, header: bytes, values: frozenset, status: int):
        self._header = header
        self._values = values
        self._status = status

    def request_headers(self, head, end_stream):
        value = head.headers.get(self._header)
        if value is not None and value in self._values:
            return LocalReply(self._status, b"rejected by reject-header filter\n")
        return None


@implementer(IHTTPFilterFactory)
class RejectByHeaderFactory:
    name = "reject-header"

    def parse_config(self, raw: Mapping[str, Any]):
        header = raw.get("header")
        if not isinstance(header, str) or not header:
            raise FilterConfigError("header", "is required: the header name to check")
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise FilterConfigError("values", "is required: a non-empty list of values to reject")
        status = raw.get("status", 403)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise FilterConfigError("status", f"must be a 4xx or 5xx status, got {status!r}")
        unknown = set(raw) - {"header", "values", "status"}
        if unknown:
            raise FilterConfigError(sorted(unknown)[0], "unknown field (known: header, values, status)")
        return header.lower().encode("latin-1"), frozenset(str(v).encode("latin-1") for v in values), status

    def create_filter(self, config, stream):
        return RejectByHeaderFilter(*config)
