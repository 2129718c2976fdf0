"""
The pilot: watches Istio documents and service registrations, builds each
connected proxy's snapshot and pushes it over the channel
(L{txmesh.pilot.server}), and serves a small JSON operator API.

Layout of the config directory::

    CONFIG_DIR/istio/*.yaml      Istio documents (several per file allowed)
    CONFIG_DIR/services/*.yaml   service registrations (optional, see
                                 L{txmesh.pilot.registry.file})

Both are watched by polling.  A change is debounced, then every connected
proxy's snapshot is rebuilt and pushed if its version changed.  An invalid
change is refused as a whole: the last good config keeps being served and
C{GET /status} shows the error.  If the config is invalid when the pilot
starts, proxies get an empty snapshot until it is fixed.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import yaml
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Site

from txmesh.config.errors import ConfigError
from txmesh.config.istio import translate
from txmesh.pilot.api import OperatorAPI
from txmesh.pilot.registry.file import FileRegistry
from txmesh.pilot.server import PilotChannelFactory, PilotChannelProtocol
from txmesh.pilot.snapshot import MeshConfig, Snapshot, build_snapshot


def load_istio_documents(directory: str) -> list[tuple[str, int, Any]]:
    """
    Read every C{*.yaml}/C{*.yml} file of C{directory}, in name order.

    @return: C{(file, number, document)} for each non-empty document.
    @raise ConfigError: a file cannot be read or is not valid YAML.
    """
    documents: list[tuple[str, int, Any]] = []
    for name in _yaml_files(directory):
        try:
            with open(name, encoding="utf-8") as f:
                docs = list(yaml.safe_load_all(f))
        except OSError as e:
            raise ConfigError(name, "", f"cannot read: {e.strerror or e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(name, "", f"not valid YAML: {e}") from None
        documents += [(name, i, d) for i, d in enumerate(docs, start=1) if d is not None]
    return documents


def _yaml_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(
        os.path.join(directory, n)
        for n in os.listdir(directory)
        if n.endswith((".yaml", ".yml")) and not n.startswith(".")
    )


def _signature(directory: str) -> object:
    stamp = []
    try:
        for name in _yaml_files(directory):
            st = os.stat(name)
            stamp.append((name, st.st_mtime_ns, st.st_size))
    except OSError as e:
        return ("error", str(e))
    return tuple(stamp)


class PilotService(Service):
    """
    The pilot as a Twisted service.

    @ivar channel_port: the channel's listening port, once started.
    @ivar api_port: the operator API's listening port, or C{None}.
    @ivar config_error: why the last config change was refused, or C{None}.
    """

    log = Logger()
    debounce = 0.1

    def __init__(
        self,
        config_dir: str,
        reactor: Any,
        listen: str,
        api: str | None,
        poll_interval: float = 0.2,
        mesh_defaults: MeshConfig | None = None,
    ):
        """
        @param config_dir: the directory holding C{istio/} and C{services/}.
        @param reactor: the reactor to listen on and schedule polling with.
        @param listen: server endpoint string of the channel.
        @param api: server endpoint string of the operator API, or C{None}.
        @param mesh_defaults: the mesh settings snapshots are built with
            (listener addresses, domain suffix...); the documents and the
            registry view come from C{config_dir}.
        @param poll_interval: seconds between checks of the files.
        """
        self.config_dir = config_dir
        self._reactor = reactor
        self._listen = listen
        self._api = api
        self._poll_interval = poll_interval
        self._istio_dir = os.path.join(config_dir, "istio")
        services_dir = os.path.join(config_dir, "services")
        self.registry: FileRegistry | None = (
            FileRegistry(services_dir, reactor, poll_interval) if os.path.isdir(services_dir) else None
        )
        self._mesh_defaults = mesh_defaults or MeshConfig()
        self.mesh = self._mesh_defaults
        self._documents: list[tuple[str, int, Any]] = []
        self.config_error: str | None = None
        self.config_version = 0
        self.channels: list[PilotChannelProtocol] = []
        self._stamp: object = None
        self._poll: LoopingCall | None = None
        self._pending: IDelayedCall | None = None
        self.channel_port: IListeningPort | None = None
        self.api_port: IListeningPort | None = None

    # --- config ---------------------------------------------------------------

    def _registry_view(self) -> dict[str, Any]:
        if self.registry is None:
            return {}
        return {host: svc.endpoints for host, svc in self.registry.services().items()}

    def reload(self) -> bool:
        """
        Read the config again and, if valid, push changed snapshots.

        @return: whether the new config was taken.
        """
        try:
            documents = load_istio_documents(self._istio_dir)
            mesh = attrs.evolve(self._mesh_defaults, documents=documents, registry=self._registry_view())
            translate(mesh.documents, mesh.default_namespace, mesh.domain_suffix, registry=mesh.registry)
            snapshots = [(c, build_snapshot(mesh, c.node)) for c in self.channels if c.node is not None]
        except ConfigError as e:
            self.config_error = str(e)
            self.log.error("pilot config refused, keeping the last good one: {error}", error=self.config_error)
            return False
        self.mesh = mesh
        self.config_error = None
        self.config_version += 1
        for channel, snapshot in snapshots:
            channel.push(snapshot)
        return True

    def _check(self) -> None:
        stamp = _signature(self._istio_dir)
        if stamp != self._stamp:
            self._stamp = stamp
            self._schedule()

    def _schedule(self, registry: object = None) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.reset(self.debounce)
        else:
            self._pending = self._reactor.callLater(self.debounce, self._debounced)

    def _debounced(self) -> None:
        self._pending = None
        self.reload()

    # --- channels (PilotBackend) -------------------------------------------------

    def register(self, channel: PilotChannelProtocol) -> Snapshot | None:
        """
        A proxy said hello: track it and return its snapshot.
        """
        self.channels.append(channel)
        self.log.info("proxy {node} connected", node=channel.node.id)
        return self.snapshot_for(channel)

    def unregister(self, channel: PilotChannelProtocol) -> None:
        """
        A proxy's channel closed.
        """
        if channel in self.channels:
            self.channels.remove(channel)

    def snapshot_for(self, channel: PilotChannelProtocol) -> Snapshot | None:
        """
        @return: the channel's snapshot from the current config, or C{None}
            if it cannot be built (logged).
        """
        try:
            return build_snapshot(self.mesh, channel.node)
        except ConfigError as e:
            self.log.error("no snapshot for proxy {node}: {error}", node=channel.node.id, error=str(e))
            return None

    # --- lifecycle ----------------------------------------------------------------

    @defer.inlineCallbacks
    def startService(self) -> Any:
        Service.startService(self)
        if self.registry is not None:
            self.registry.subscribe(self._schedule)
            self.registry.start()
        self._stamp = _signature(self._istio_dir)
        if self._pending is not None and self._pending.active():
            # The registry's first view is read already.
            self._pending.cancel()
            self._pending = None
        self.reload()
        self._poll = LoopingCall(self._check)
        self._poll.clock = self._reactor
        self._poll.start(self._poll_interval, now=False)
        self.channel_port = yield serverFromString(self._reactor, self._listen).listen(PilotChannelFactory(self))
        if self._api is not None:
            site = Site(OperatorAPI(self))
            self.api_port = yield serverFromString(self._reactor, self._api).listen(site)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        if self.registry is not None:
            yield self.registry.stop()
        for port in (self.channel_port, self.api_port):
            if port is not None:
                yield port.stopListening()
        for channel in list(self.channels):
            channel.transport.abortConnection()

    # --- operator view -------------------------------------------------------------

    def proxies(self) -> list[dict[str, Any]]:
        """
        @return: each connected proxy's sync state, JSON-ready.
        """
        out = []
        for channel in self.channels:
            sync = channel.sync
            out.append({
                "id": sync.node_id,
                "status": sync.status.value,
                "acked_version": sync.acked_version,
                "pushed_version": sync.pushed_version,
                "nacked_version": sync.nacked_version,
                "last_nack_error": sync.last_nack_error,
            })
        return out

    def status(self) -> dict[str, Any]:
        """
        @return: the config's and the registry's health, JSON-ready.
        """
        return {
            "config": {"ok": self.config_error is None, "error": self.config_error,
                       "documents": len(self.mesh.documents), "generation": self.config_version},
            "registry": self.registry.status() if self.registry is not None else None,
            "proxies": len(self.channels),
        }

    def services(self) -> dict[str, Any]:
        """
        @return: the registry's view, JSON-ready.
        """
        if self.registry is None:
            return {}
        return {
            host: {
                "ports": [{"name": p.name, "number": p.number, "protocol": p.protocol} for p in svc.ports],
                "endpoints": [{"address": e.host, "port": e.port, "labels": dict(e.labels), "weight": e.weight,
                               "locality": e.locality} for e in svc.endpoints],
                "healthy": svc.healthy,
            }
            for host, svc in sorted(self.registry.services().items())
        }
