"""
L{Section}: a mapping of a config document being validated, which knows its
file and field path so that every error names both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from txmesh.config.errors import ConfigError
from txmesh.config.values import kind_of

T = TypeVar("T")


class Section:
    """
    A mapping being validated, with its field path, so every error knows
    where it is.
    """

    def __init__(self, source: str | None, path: str, value: Any):
        self.source = source
        self.path = path
        if not isinstance(value, Mapping):
            raise self.error(f"expected a mapping, got {kind_of(value)}", path)
        self.value = value
        self.seen: set[str] = set()

    def error(self, reason: str, field: str | None = None) -> ConfigError:
        return ConfigError(self.source, self.path if field is None else field, reason)

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, convert: Callable[[Any], T], default: Any = None, required: bool = False) -> T:
        self.seen.add(key)
        if key not in self.value or self.value[key] is None:
            if required:
                raise self.error("is required", self.field(key))
            return default
        try:
            return convert(self.value[key])
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise self.error(str(e), self.field(key)) from None

    def sub(self, key: str) -> Section | None:
        self.seen.add(key)
        if self.value.get(key) is None:
            return None
        return Section(self.source, self.field(key), self.value[key])

    def items(self, key: str, required: bool = False) -> list[tuple[str, Any]]:
        self.seen.add(key)
        value = self.value.get(key)
        if value is None:
            if required:
                raise self.error("is required", self.field(key))
            return []
        if not isinstance(value, list):
            raise self.error(f"expected a list, got {kind_of(value)}", self.field(key))
        return [(f"{self.field(key)}[{i}]", v) for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(map(str, self.value)) - self.seen)
        if unknown:
            raise self.error(f"unknown field (known: {', '.join(sorted(self.seen))})", self.field(unknown[0]))
