"""
What a proxy whose bootstrap has a C{pilot} section needs in order to be
configured by its pilot: a workload identity for the pilot to certify, the
channel client (L{PilotClient}), and the merging of each push with the
bootstrap's static resources.

Two owners share it: a single proxy (L{txmesh.proxy.service.ProxyService})
applies the merged documents itself; the parent of C{--concurrency} workers
(L{txmesh.proxy.workers.WorkerPool}) validates them and passes them, and the
identity, to its workers, so N processes are still one proxy with one
channel to the pilot.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from txmesh.config.errors import ConfigError
from txmesh.config.model import ProxyConfig
from txmesh.pilot.messages import Node
from txmesh.proxy.pilot_client import PilotClient, pilot_tls_options
from txmesh.proxy.workload_identity import WorkloadIdentity, token_service_account

__all__ = ["PilotLink", "merge_pushed", "workload_identity_for"]

log = Logger()

STATIC_TYPES = ("listeners", "clusters")
"""The resource types a bootstrap may hold statically beside pushed ones."""


def merge_pushed(bootstrap: Any, document: dict, source: str) -> dict:
    """
    The config document a push makes: the bootstrap's C{node} and C{admin},
    and its own (static) C{listeners} and C{clusters} followed by the pushed
    (dynamic) ones, as Envoy's static and dynamic resources.

    @param bootstrap: the bootstrap's raw document.
    @param document: the pushed C{{"listeners": [...], "clusters": [...]}}.
    @param source: where the push came from, for errors.
    @raise ConfigError: a pushed resource has a static one's name.
    """
    raw = bootstrap if isinstance(bootstrap, dict) else {}
    full = {key: raw[key] for key in ("node", "admin") if raw.get(key) is not None}
    for rtype in STATIC_TYPES:
        static = raw.get(rtype) or []
        pushed = document.get(rtype, [])
        names = {item.get("name") for item in static if isinstance(item, dict)}
        clash = sorted(str(item.get("name")) for item in pushed if item.get("name") in names)
        if clash:
            raise ConfigError(source, rtype, f"pushed {', '.join(clash)} clash with the bootstrap's static {rtype}")
        full[rtype] = [*static, *pushed]
    return full


def workload_identity_for(config: ProxyConfig, now: float) -> WorkloadIdentity | None:
    """
    The workload identity a proxy asks its pilot to certify:
    C{spiffe://<trust domain>/ns/<namespace>/sa/<service account>}, with the
    key and certificate kept in C{pilot.identity_dir} taken if still valid.

    @return: C{None} without a pilot, or with a plaintext (insecure) one.
    """
    pilot = config.pilot
    if pilot is None or pilot.insecure:
        return None
    account = pilot.service_account or token_service_account(pilot.token) or "default"
    namespace = config.node.namespace or "default"
    identity = WorkloadIdentity(f"spiffe://{pilot.trust_domain}/ns/{namespace}/sa/{account}", pilot.identity_dir)
    if identity.load(now):
        log.info("workload certificate for {identity} taken from {dir}", identity=identity.spiffe_id,
                 dir=pilot.identity_dir)
    return identity


class PilotLink:
    """
    One proxy's link to its pilot.

    @ivar bootstrap: the config the proxy started from (with its C{pilot}).
    @ivar identity: the workload identity, or C{None} on a plaintext
        channel.
    @ivar client: the channel client, once L{start}ed.
    """

    def __init__(self, bootstrap: ProxyConfig, reactor: Any, apply: Callable[[dict, str], Any],
                 backoff: tuple[float, float] = (0.5, 15.0)):
        """
        @param bootstrap: a config with a C{pilot} section.
        @param reactor: provides C{IReactorTime} and what the pilot
            addresses' endpoints need.
        @param apply: called with each push merged into a whole document
            (see L{merge_pushed}) and where it came from; returns, or fires
            a L{Deferred}, once applied, or raises or fails with
            L{ConfigError} to refuse it (the pilot is told why).
        @param backoff: seconds: the default ceiling of the first reconnect
            wait and the cap of any, when the C{pilot} section gives none.
        """
        self.bootstrap = bootstrap
        self._reactor = reactor
        self._apply = apply
        self._backoff = backoff
        self.identity = workload_identity_for(bootstrap, reactor.seconds())
        self.client: PilotClient | None = None

    def start(self) -> None:
        """
        Connect to the pilot (and keep doing so until L{stop}).
        """
        config = self.bootstrap
        pilot = config.pilot
        node = config.node
        labels = dict(node.labels)
        if pilot.inbound_port is not None:
            labels["txmesh.io/inbound-port"] = str(pilot.inbound_port)
        if pilot.app_port is not None:
            labels["txmesh.io/app-port"] = str(pilot.app_port)
        if pilot.outbound_address is not None:
            labels["txmesh.io/outbound-address"] = pilot.outbound_address
        self.client = PilotClient(
            list(pilot.addresses),
            Node(id=node.id, workload=node.workload, namespace=node.namespace or "default", app=node.app,
                 version=node.version, labels=labels, locality=node.locality),
            self._reactor,
            self._pushed,
            random.Random(),
            backoff_base=pilot.backoff_base if pilot.backoff_base is not None else self._backoff[0],
            backoff_max=pilot.backoff_max if pilot.backoff_max is not None else self._backoff[1],
            credential=pilot.token,
            keepalive=(pilot.keepalive_interval, pilot.keepalive_timeout),
            tls=None if pilot.insecure else self._tls,
            identity=self.identity,
        )
        self.client.start()

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()

    def status(self) -> dict | None:
        """
        @return: the channel's status (L{PilotClient.status}), or C{None}
            before L{start}.
        """
        return self.client.status() if self.client is not None else None

    @property
    def source(self) -> str:
        """
        @return: where pushes come from, for messages: C{pilot ADDRESS}.
        """
        address = self.client.connected_address if self.client is not None else None
        return f"pilot {address}" if address else "pilot"

    def _tls(self, address: str) -> Any:
        pilot = self.bootstrap.pilot
        return pilot_tls_options(pilot.server_name, pilot.ca_pem, address, self.identity, self._reactor.seconds())

    def _pushed(self, document: dict) -> Any:
        source = self.source
        return self._apply(merge_pushed(self.bootstrap.raw, document, source), source)
