"""
The registry interface, the values it deals in, the bookkeeping every
registry shares (subscribers, status) and L{CombinedRegistry}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from txmesh.config.model import Endpoint

PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "HTTPS", "TLS", "TCP")


@attrs.frozen
class ServicePort:
    """
    A port a service is reached on.

    @ivar name: the port's name (C{http}, C{grpc-web}, ...).
    @ivar number: the port clients connect to.
    @ivar protocol: one of L{PROTOCOLS}.
    """

    name: str
    number: int
    protocol: str = "TCP"


@attrs.frozen
class ServiceEndpoints:
    """
    One service as a registry sees it.

    @ivar host: the service's fully qualified host name.
    @ivar ports: the ports it is reached on.
    @ivar endpoints: the addresses that serve it.
    @ivar healthy: C{False} when the source marks the service unhealthy.
    """

    host: str
    ports: tuple[ServicePort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    healthy: bool = True


class IRegistry(Interface):
    """
    A source of services and their endpoints.
    """

    name = Attribute("A short name for logs and status, e.g. C{file:/etc/txmesh/services}.")

    def start() -> None:
        """
        Begin watching the source; the first view may arrive later.
        """

    def stop() -> defer.Deferred[None] | None:
        """
        Stop watching; no subscriber is called after this.

        @return: C{None}, or a L{Deferred} that fires when stopped.
        """

    def services() -> Mapping[str, ServiceEndpoints]:
        """
        @return: the current view, host name to L{ServiceEndpoints}; the last
            good view when the source is failing.
        """

    def subscribe(callback: Callable[[IRegistry], object]) -> None:
        """
        Call C{callback(registry)} each time the view changes.
        """

    def status() -> dict[str, Any]:
        """
        @return: a JSON-able dict: C{name}, C{ok}, C{error} (the last error,
            or C{None}), C{last_update} (clock seconds of the last good view,
            or C{None}) and C{services} (how many).
        """


class RegistryState:
    """
    What every registry keeps: its view, its subscribers and its health.

    @ivar view: the current (last good) view.
    @ivar error: the last error, cleared by the next good view.
    @ivar last_update: when the last good view was taken, in clock seconds.
    """

    log = Logger()

    def __init__(self, name: str, clock: IReactorTime):
        """
        @param name: the registry's name, for logs and status.
        @param clock: the time source for C{last_update}.
        """
        self.name = name
        self._clock = clock
        self._subscribers: list[Callable[[Any], object]] = []
        self.view: dict[str, ServiceEndpoints] = {}
        self.error: str | None = None
        self.last_update: float | None = None

    def subscribe(self, callback: Callable[[Any], object]) -> None:
        """
        Add a subscriber.
        """
        self._subscribers.append(callback)

    def update(self, registry: object, view: Mapping[str, ServiceEndpoints], error: str | None = None) -> bool:
        """
        Record a good view; notify subscribers when it differs from the last.

        @param registry: what subscribers are called with.
        @param error: an error that still stands (part of the view is
            stale), or C{None}.
        @return: whether the view changed.
        """
        view = dict(view)
        self.error = error
        self.last_update = self._clock.seconds()
        if view == self.view:
            return False
        self.view = view
        for callback in list(self._subscribers):
            try:
                callback(registry)
            except Exception:
                self.log.failure("registry {name}: subscriber failed", name=self.name)
        return True

    def fail(self, reason: str) -> None:
        """
        Record an error; the view stays as it was.
        """
        if reason != self.error:
            self.log.warn(
                "registry {name}: {reason}; keeping the last known endpoints ({count} services)",
                name=self.name,
                reason=reason,
                count=len(self.view),
            )
        self.error = reason

    def status(self) -> dict[str, Any]:
        """
        @return: see L{IRegistry.status}.
        """
        return {
            "name": self.name,
            "ok": self.error is None,
            "error": self.error,
            "last_update": self.last_update,
            "services": len(self.view),
        }


class StateBackedRegistry:
    """
    The C{IRegistry} methods every registry that keeps a L{RegistryState}
    in C{self._state} answers the same way.
    """

    _state: RegistryState

    def services(self) -> Mapping[str, ServiceEndpoints]:
        """
        @return: the last good view; what failed keeps its last endpoints.
        """
        return self._state.view

    def subscribe(self, callback: Callable[[IRegistry], object]) -> None:
        """
        Call C{callback(self)} when the view changes.
        """
        self._state.subscribe(callback)

    def status(self) -> dict[str, Any]:
        """
        @return: see L{IRegistry.status}; C{error} says what failed last.
        """
        return self._state.status()


def merge(views: Iterable[Mapping[str, ServiceEndpoints]]) -> dict[str, ServiceEndpoints]:
    """
    Merge views in order: a host seen again gains the later endpoints and
    any port number it did not have; it is healthy if any source says so.

    @return: the merged view.
    """
    out: dict[str, ServiceEndpoints] = {}
    for view in views:
        for host, svc in view.items():
            have = out.get(host)
            if have is None:
                out[host] = svc
                continue
            numbers = {p.number for p in have.ports}
            ports = have.ports + tuple(p for p in svc.ports if p.number not in numbers)
            endpoints = have.endpoints + tuple(e for e in svc.endpoints if e not in have.endpoints)
            out[host] = ServiceEndpoints(host, ports, endpoints, have.healthy or svc.healthy)
    return out


@implementer(IRegistry)
class CombinedRegistry:
    """
    Several registries seen as one, merged in the order given (see
    L{merge}). A registry whose C{services()} raises is represented by the
    last view it gave.
    """

    log = Logger()

    def __init__(self, registries: Iterable[IRegistry], clock: IReactorTime | None = None):
        """
        @param registries: the registries, earliest first.
        @param clock: the time source for C{last_update}; the global reactor
            when C{None}.
        """
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.registries = list(registries)
        self.name = "combined"
        self._state = RegistryState(self.name, clock)
        self._last: dict[int, Mapping[str, ServiceEndpoints]] = {}
        self._broken: dict[int, str] = {}
        for registry in self.registries:
            registry.subscribe(self._changed)

    def start(self) -> None:
        """
        Start every registry.
        """
        for registry in self.registries:
            registry.start()

    def stop(self) -> defer.Deferred[None]:
        """
        Stop every registry.

        @return: a L{Deferred} that fires when all have stopped.
        """
        ds = [defer.maybeDeferred(registry.stop) for registry in self.registries]
        return defer.gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)

    def _view_of(self, index: int, registry: IRegistry) -> Mapping[str, ServiceEndpoints]:
        try:
            view = dict(registry.services())
        except Exception as e:
            reason = f"services() failed: {e!r}"
            if self._broken.get(index) != reason:
                self.log.failure("registry {name}: services() failed; keeping its last known view", name=registry.name)
            self._broken[index] = reason
            return self._last.get(index, {})
        self._broken.pop(index, None)
        self._last[index] = view
        return view

    def _changed(self, registry: object = None) -> None:
        self._state.update(self, self._merged())

    def _merged(self) -> dict[str, ServiceEndpoints]:
        return merge(self._view_of(i, r) for i, r in enumerate(self.registries))

    def services(self) -> Mapping[str, ServiceEndpoints]:
        """
        @return: the merged view of every registry.
        """
        return self._merged()

    def subscribe(self, callback: Callable[[IRegistry], object]) -> None:
        """
        Call C{callback(self)} when any registry's view changes the merge.
        """
        self._state.subscribe(callback)

    def status(self) -> dict[str, Any]:
        """
        @return: C{ok} only when every registry is; C{registries} holds each
            one's own status.
        """
        parts = []
        for i, registry in enumerate(self.registries):
            try:
                part = dict(registry.status())
            except Exception as e:
                part = {"name": registry.name, "ok": False, "error": f"status() failed: {e!r}"}
            if i in self._broken:
                part["ok"] = False
                part["error"] = self._broken[i]
            parts.append(part)
        errors = [f"{p['name']}: {p['error']}" for p in parts if not p.get("ok")]
        return {
            "name": self.name,
            "ok": not errors,
            "error": "; ".join(errors) or None,
            "last_update": self._state.last_update,
            "services": len(self._merged()),
            "registries": parts,
        }
