"""
A registry of services written in YAML: one file, or a directory of
C{*.yaml} files, watched by polling their modification times.

    services:
      - host: reviews.default.svc.cluster.local
        ports: [{name: http, number: 9080, protocol: HTTP}]
        service_account: default/bookinfo-reviews
        endpoints:
          - {address: 127.0.0.1, port: 19083, labels: {version: v1}, weight: 1, locality: eu/a/1}
          - {address: 127.0.0.2, port: 19083, service_account: spiffe://cluster.local/ns/default/sa/legacy}

C{service_account} (of the service, the default of its endpoints, or of one
endpoint) is the workload's identity, C{<namespace>/<account>} or a whole
SPIFFE ID: with it the pilot's mutual TLS accepts only those identities for
the service (see C{docs/security.md}).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
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
)

_port_number = values.int_in(1, 65535)
_weight = values.int_in(1, 2**31 - 1)
_protocol = values.one_of(PROTOCOLS)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def service_account(value: Any) -> str:
    """
    Read a workload identity: C{<namespace>/<service account>} or a SPIFFE
    ID (C{spiffe://<trust domain>/<path>}).

    @return: it, as L{Endpoint.service_account} holds it.
    @raise ValueError: it is neither.
    """
    text = values.string(value)
    if text.startswith("spiffe://"):
        domain, _, path = text[len("spiffe://"):].partition("/")
        if not domain or not path:
            raise ValueError(f"expected a SPIFFE ID like spiffe://cluster.local/ns/NAMESPACE/sa/ACCOUNT, got {text!r}")
        return text
    namespace, slash, account = text.partition("/")
    if not slash or not _DNS_LABEL.fullmatch(namespace) or not _DNS_LABEL.fullmatch(account):
        raise ValueError(f"expected NAMESPACE/ACCOUNT (DNS labels) or a spiffe:// ID, got {text!r}")
    return text


def _read(
    source: str, field: str, body: Mapping[str, Any], key: str, convert: Callable[[Any], Any], default: Any = ...
) -> Any:
    if key not in body:
        if default is ...:
            raise ConfigError(source, f"{field}.{key}" if field else key, "is required")
        return default
    try:
        return convert(body[key])
    except ValueError as e:
        raise ConfigError(source, f"{field}.{key}" if field else key, str(e)) from None


def _mapping(source: str, field: str, body: Any, known: set[str]) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ConfigError(source, field, f"expected a mapping, got {values.kind_of(body)}")
    for key in body:
        if key not in known:
            raise ConfigError(
                source,
                f"{field}.{key}" if field else str(key),
                f"unknown field (expected one of {', '.join(sorted(known))})",
            )
    return body


def _list(source: str, field: str, body: Any) -> list[Any]:
    if not isinstance(body, list):
        raise ConfigError(source, field, f"expected a list, got {values.kind_of(body)}")
    return body


def _at(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def parse_service(body: Any, source: str, field: str = "") -> ServiceEndpoints:
    """
    Read one service registration (C{host}, C{ports}, C{endpoints},
    C{healthy}, C{service_account}); shared with the registries that keep one service per
    entry (etcd).

    @param body: the parsed entry.
    @param source: where it came from, for errors.
    @param field: the entry's path inside the source (C{services[2]}), or
        C{""} when the entry is the whole document.
    @return: the service.
    @raise ConfigError: naming the field and the reason.
    """
    svc = _mapping(source, field, body, {"host", "ports", "endpoints", "healthy", "service_account"})
    host = _read(source, field, svc, "host", values.string)
    account = _read(source, field, svc, "service_account", service_account, "")
    ports = []
    for j, pbody in enumerate(_list(source, _at(field, "ports"), svc.get("ports", []))):
        pfield = _at(field, f"ports[{j}]")
        p = _mapping(source, pfield, pbody, {"name", "number", "protocol"})
        number = _read(source, pfield, p, "number", _port_number)
        ports.append(
            ServicePort(
                _read(source, pfield, p, "name", values.string, str(number)),
                number,
                _read(source, pfield, p, "protocol", _protocol, "TCP"),
            )
        )
    endpoints = []
    for j, ebody in enumerate(_list(source, _at(field, "endpoints"), svc.get("endpoints", []))):
        efield = _at(field, f"endpoints[{j}]")
        e = _mapping(source, efield, ebody, {"address", "port", "labels", "weight", "locality", "service_account"})
        endpoints.append(
            Endpoint(
                host=_read(source, efield, e, "address", values.string),
                port=_read(source, efield, e, "port", _port_number),
                labels=_read(source, efield, e, "labels", values.labels, ()),
                weight=_read(source, efield, e, "weight", _weight, 1),
                locality=_read(source, efield, e, "locality", values.text, ""),
                service_account=_read(source, efield, e, "service_account", service_account, account),
            )
        )
    return ServiceEndpoints(
        host, tuple(ports), tuple(endpoints), _read(source, field, svc, "healthy", values.boolean, True)
    )


def parse_services(doc: Any, source: str) -> dict[str, ServiceEndpoints]:
    """
    Read one document of service registrations.

    @param doc: the parsed YAML (C{None} for an empty file: no services).
    @param source: the file name, for errors.
    @return: host name to L{ServiceEndpoints}.
    @raise ConfigError: naming the field and the reason.
    """
    if doc is None:
        return {}
    top = _mapping(source, "", doc, {"services"})
    out: dict[str, ServiceEndpoints] = {}
    for i, body in enumerate(_list(source, "services", top.get("services", []))):
        field = f"services[{i}]"
        svc = parse_service(body, source, field)
        if svc.host in out:
            raise ConfigError(source, f"{field}.host", f"{svc.host} is registered twice")
        out[svc.host] = svc
    return out


@implementer(IRegistry)
class FileRegistry(StateBackedRegistry):
    """
    Services from a YAML file or a directory of C{*.yaml} files.

    The files are read on L{start} and again whenever a file's modification
    time or size changes, or a file appears or goes. An invalid file leaves
    the last good view in place; C{status()} carries the L{ConfigError}
    message (file, field, reason) until a good read.
    """

    def __init__(self, path: str, clock: IReactorTime, poll_interval: float = 1.0):
        """
        @param path: a YAML file, or a directory of them.
        @param clock: schedules the polling.
        @param poll_interval: seconds between checks.
        """
        self.path = path
        self.name = f"file:{path}"
        self._clock = clock
        self._poll_interval = poll_interval
        self._state = RegistryState(self.name, clock)
        self._stamp: object = None
        self._loop: LoopingCall | None = None

    def _files(self) -> list[str]:
        if os.path.isdir(self.path):
            return sorted(
                os.path.join(self.path, n)
                for n in os.listdir(self.path)
                if n.endswith((".yaml", ".yml")) and not n.startswith(".")
            )
        return [self.path]

    def _signature(self) -> object:
        stamp = []
        try:
            for name in self._files():
                st = os.stat(name)
                stamp.append((name, st.st_mtime_ns, st.st_size))
        except OSError as e:
            return ("error", str(e))
        return tuple(stamp)

    def _load(self) -> dict[str, ServiceEndpoints]:
        view: dict[str, ServiceEndpoints] = {}
        for name in self._files():
            try:
                with open(name, encoding="utf-8") as f:
                    doc = yaml.safe_load(f)
            except OSError as e:
                raise ConfigError(name, "", f"cannot read: {e.strerror or e}") from None
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(name, "", f"not valid YAML: {e}") from None
            for host, svc in parse_services(doc, name).items():
                if host in view:
                    raise ConfigError(name, "services.host", f"{host} is also registered in another file")
                view[host] = svc
        return view

    def check(self) -> None:
        """
        Re-read the files if they changed since the last check.
        """
        stamp = self._signature()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            view = self._load()
        except ConfigError as e:
            self._state.fail(str(e))
            return
        except Exception as e:
            # Polling must survive anything a file can do to the parser.
            self._state.fail(f"{self.path}: cannot load: {e!r}")
            return
        self._state.update(self, view)

    def start(self) -> None:
        """
        Read the files now and poll them every C{poll_interval} seconds.
        """
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self._poll_interval, now=True)

    def stop(self) -> None:
        """
        Stop polling.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
