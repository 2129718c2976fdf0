"""
Errors a user can hit in configuration, each naming the file, the field and
the reason, so the message alone says what to fix.
"""

from __future__ import annotations


class ConfigError(Exception):
    """
    A configuration document is invalid.

    @ivar source: the file (or other source) the document came from.
    @ivar field: a dotted path to the offending field, e.g.
        C{listeners[0].routes[2].cluster}.
    @ivar reason: what is wrong, in words a person can act on.
    @ivar document: in a multi-document file (Istio YAML), the document's
        number, counting from 1; C{None} for single-document sources.
    """

    def __init__(self, source: str | None, field: str, reason: str, document: int | None = None):
        self.source = source
        self.field = field
        self.reason = reason
        self.document = document
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        which = f"document {self.document}: " if self.document is not None else ""
        what = f"{self.field}: " if self.field else ""
        return f"{where}{which}{what}{self.reason}"


class FilterConfigError(ValueError):
    """
    Raised by a filter factory's C{parse_config}; the loader turns it into a
    L{ConfigError} with the file and the full field path.

    @ivar field: the field inside the filter's own config (may be empty).
    @ivar reason: what is wrong.
    """

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)
