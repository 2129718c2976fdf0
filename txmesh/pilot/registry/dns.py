"""
A registry of names resolved through DNS (C{twisted.names}): A and AAAA
records give addresses on a configured port, SRV records give targets with
their own ports and weights. Each name is resolved again when its records'
TTL runs out (clamped to C{[min_ttl, max_ttl]}); a failed lookup keeps the
last endpoints and is retried after C{min_ttl}.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.names import dns
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.config import values
from txmesh.config.errors import ConfigError
from txmesh.config.model import Endpoint
from txmesh.pilot.registry.base import (
    PROTOCOLS,
    IRegistry,
    RegistryState,
    ServiceEndpoints,
    ServicePort,
    StateBackedRegistry,
    merge,
)

KINDS = ("A", "AAAA", "SRV")


@attrs.frozen
class DNSName:
    """
    One name to resolve.

    @ivar host: the service host the endpoints belong to.
    @ivar port: the service port; for A and AAAA also the endpoints' port.
    @ivar kind: C{A}, C{AAAA} or C{SRV}.
    @ivar name: the DNS name to query (C{host} by default; for SRV
        typically C{_http._tcp.host}).
    @ivar protocol: the service port's protocol.
    """

    host: str
    port: int
    kind: str
    name: str
    protocol: str = "TCP"


def parse_names(names: Iterable[Mapping[str, Any]], source: str = "dns registry") -> list[DNSName]:
    """
    Read the registry's list of names.

    @param names: mappings with C{host}, C{port}, C{kind} and optionally
        C{name} and C{protocol}.
    @return: the names.
    @raise ConfigError: naming the entry and field.
    """
    readers: dict[str, Callable[[Any], Any]] = {
        "host": values.string,
        "port": values.int_in(1, 65535),
        "kind": values.one_of(KINDS),
        "name": values.string,
        "protocol": values.one_of(PROTOCOLS),
    }
    out = []
    for i, entry in enumerate(names):
        if not isinstance(entry, Mapping):
            raise ConfigError(source, f"names[{i}]", f"expected a mapping, got {values.kind_of(entry)}")
        read: dict[str, Any] = {}
        for key, value in entry.items():
            if key not in readers:
                raise ConfigError(
                    source, f"names[{i}].{key}", f"unknown field (expected one of {', '.join(sorted(readers))})"
                )
            try:
                read[key] = readers[key](value)
            except ValueError as e:
                raise ConfigError(source, f"names[{i}].{key}", str(e)) from None
        for key in ("host", "port", "kind"):
            if key not in read:
                raise ConfigError(source, f"names[{i}].{key}", "is required")
        read.setdefault("name", read["host"])
        out.append(DNSName(**read))
    return out


def endpoints_from(entry: DNSName, answers: Iterable[dns.RRHeader]) -> tuple[tuple[Endpoint, ...], int | None]:
    """
    Turn a lookup's answers into endpoints.

    @return: the endpoints (in answer order, duplicates dropped) and the
        smallest TTL among the records used (C{None} when none).
    """
    wanted = {"A": dns.A, "AAAA": dns.AAAA, "SRV": dns.SRV}[entry.kind]
    found: list[Endpoint] = []
    ttl: int | None = None
    for rr in answers:
        if rr.type != wanted:
            # CNAMEs on the way to the answer, and anything unasked for.
            continue
        payload = rr.payload
        if wanted == dns.A:
            endpoint = Endpoint(host=payload.dottedQuad(), port=entry.port)
        elif wanted == dns.AAAA:
            endpoint = Endpoint(host=socket.inet_ntop(socket.AF_INET6, payload.address), port=entry.port)
        else:
            endpoint = Endpoint(host=str(payload.target).rstrip("."), port=payload.port, weight=max(payload.weight, 1))
        if endpoint not in found:
            found.append(endpoint)
        ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)
    return tuple(found), ttl


@implementer(IRegistry)
class DNSRegistry(StateBackedRegistry):
    """
    Services from DNS names, re-resolved on their TTL.
    """

    def __init__(
        self,
        names: Iterable[Mapping[str, Any]],
        resolver: Any,
        clock: IReactorTime,
        min_ttl: float = 1,
        max_ttl: float = 300,
    ):
        """
        @param names: what to resolve; see L{parse_names}.
        @param resolver: a C{twisted.names} resolver (C{lookupAddress},
            C{lookupIPV6Address}, C{lookupService} returning Deferreds of
            C{(answers, authority, additional)}).
        @param clock: schedules the re-resolution.
        @param min_ttl: the shortest wait between lookups of a name, and the
            wait before retrying a failed one.
        @param max_ttl: the longest wait between lookups of a name.
        @raise ConfigError: when C{names} is invalid.
        """
        if not 0 < min_ttl <= max_ttl:
            raise ConfigError("dns registry", "min_ttl", f"must be > 0 and <= max_ttl ({max_ttl}), got {min_ttl}")
        self.names = parse_names(names)
        self.name = "dns:" + ",".join(sorted({n.name for n in self.names}))
        self._resolver = resolver
        self._clock = clock
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._state = RegistryState(self.name, clock)
        self._results: dict[int, tuple[Endpoint, ...]] = {}
        self._errors: dict[int, str] = {}
        self._calls: dict[int, IDelayedCall] = {}
        self._running = False

    def _lookup(self, entry: DNSName) -> defer.Deferred[Any]:
        method = {
            "A": self._resolver.lookupAddress,
            "AAAA": self._resolver.lookupIPV6Address,
            "SRV": self._resolver.lookupService,
        }[entry.kind]
        return defer.maybeDeferred(method, entry.name)

    def _resolve(self, index: int) -> None:
        self._calls.pop(index, None)
        entry = self.names[index]
        d = self._lookup(entry)
        d.addCallbacks(self._resolved, self._failed, callbackArgs=(index,), errbackArgs=(index,))
        d.addErrback(lambda f: self._state.log.failure("registry {name}: internal error", failure=f, name=self.name))

    def _resolved(self, result: Any, index: int) -> None:
        if not self._running:
            return
        entry = self.names[index]
        try:
            answers = result[0]
            found, ttl = endpoints_from(entry, answers)
        except Exception as e:
            self._failed(Failure(ValueError(f"unreadable answer: {e!r}")), index)
            return
        if not found:
            self._failed(Failure(ValueError(f"no {entry.kind} records")), index)
            return
        wait = self._max_ttl if ttl is None else min(max(ttl, self._min_ttl), self._max_ttl)
        self._results[index] = found
        self._errors.pop(index, None)
        self._schedule(index, wait)
        self._publish()

    def _failed(self, failure: Failure, index: int) -> None:
        if not self._running:
            return
        entry = self.names[index]
        reason = failure.getErrorMessage() or failure.type.__name__
        self._errors[index] = f"{entry.kind} {entry.name}: {failure.type.__name__}: {reason}"
        self._schedule(index, self._min_ttl)
        self._state.fail(self._error_text() or reason)

    def _schedule(self, index: int, wait: float) -> None:
        old = self._calls.pop(index, None)
        if old is not None and old.active():
            old.cancel()
        self._calls[index] = self._clock.callLater(wait, self._resolve, index)

    def _publish(self) -> None:
        views = []
        for index, entry in enumerate(self.names):
            if index not in self._results:
                # Never resolved: no endpoints to keep, nothing to claim.
                continue
            port = ServicePort(f"{entry.protocol.lower()}-{entry.port}", entry.port, entry.protocol)
            views.append({entry.host: ServiceEndpoints(entry.host, (port,), self._results[index])})
        # Names that failed since still count against the status.
        self._state.update(self, merge(views), self._error_text())

    def _error_text(self) -> str | None:
        return "; ".join(self._errors[i] for i in sorted(self._errors)) or None

    def start(self) -> None:
        """
        Resolve every name now; each is resolved again on its TTL.
        """
        if self._running:
            return
        self._running = True
        for index in range(len(self.names)):
            self._resolve(index)

    def stop(self) -> None:
        """
        Cancel the pending lookups; answers still in flight are ignored.
        """
        self._running = False
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
