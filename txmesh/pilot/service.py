"""
The pilot: watches Istio documents and service registrations, builds each
connected proxy's snapshot and pushes it over the channel
(L{txmesh.pilot.server}), and serves a small JSON operator API.

Layout of the config directory::

    CONFIG_DIR/mesh.yaml         the pilot's settings and registries (optional,
                                 see L{txmesh.pilot.mesh_config})
    CONFIG_DIR/istio/*.yaml      Istio documents (several per file allowed)
    CONFIG_DIR/services/*.yaml   service registrations (optional, see
                                 L{txmesh.pilot.registry.file})
    CONFIG_DIR/ca/               the CA and the join-token key (see
                                 L{txmesh.pilot.channel_security})

C{mesh.yaml}, the documents and the registries are watched.  A change is
debounced (at most L{PilotService.debounce_max} after the first pending
one), then every connected proxy's snapshot is rebuilt and pushed if its
version changed.  An invalid change is refused as a whole: the last good
config keeps being served and C{GET /status} shows the error.  If the
documents are invalid when the pilot starts, proxies get an empty snapshot
until they are fixed; an invalid C{mesh.yaml} at start stops the pilot.

A valid change to C{mesh.yaml} takes effect at once for what snapshots are
built from (addresses pushed to proxies, telemetry, audit log, outbound
traffic policy, namespaces...) and for C{registries} (the old registries
are stopped, the new ones started); what the CA and the channel's
credential check were made with at start (C{trust_domain},
C{workload_cert_ttl}, C{kubernetes_auth}) is logged as needing a restart
and shown in C{GET /status} (C{mesh.restart_needed}).
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmesh.config.errors import ConfigError
from txmesh.config.gateway import parse_gateways
from txmesh.observability.audit import AuditLog, AuditRecord
from txmesh.pilot.api import operator_site
from txmesh.pilot.ca import CAError
from txmesh.pilot.channel_security import Admission, CertificateRefused, ChannelSecurity
from txmesh.pilot.credentials import credentials_signature, load_credentials
from txmesh.pilot.documents import Document, istio_files, load_istio_documents
from txmesh.pilot.gateways import build_gateway_snapshot, gateway_view, is_router, selected_gateways
from txmesh.pilot.mesh_config import (
    MESH_FILE,
    build_registries,
    load_pilot_settings,
    mesh_changes,
    restart_needed,
)
from txmesh.pilot.messages import (
    ROOT_CA_SECRET,
    SECRETS,
    CertificateDenied,
    CertificateIssued,
    CertificateRequest,
    Hello,
    Message,
)
from txmesh.pilot.metrics import PilotMetrics, metrics_site
from txmesh.pilot.registry.base import CombinedRegistry, IRegistry
from txmesh.pilot.server import PilotChannelFactory, PilotChannelProtocol
from txmesh.pilot.snapshot import (
    MeshConfig,
    Node,
    Snapshot,
    build_snapshot,
    check_documents,
    content_hash,
    namespace_view,
)
from txmesh.proxy.tls import TLSListenerFactory


def _signature(directory: str) -> object:
    stamp = []
    try:
        for name in istio_files(directory):
            st = os.stat(os.path.join(directory, name))
            stamp.append((name, st.st_mtime_ns, st.st_size))
    except OSError as e:
        return ("error", str(e))
    return tuple(stamp)


def _file_signature(path: str) -> object:
    """
    @return: what changes when the file at C{path} is written, created or
        removed.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return ("error", str(e))
    return (st.st_mtime_ns, st.st_size)


class PilotService(Service):
    """
    The pilot as a Twisted service.

    @ivar channel_port: the channel's listening port, once started.
    @ivar api_port: the operator API's listening port, or C{None}.
    @ivar config_error: why the last config change was refused, or C{None}.
    @ivar mesh_error: why the last change to C{mesh.yaml} was refused, or
        C{None}.
    @ivar restart_needed: the C{mesh.yaml} fields whose change takes effect
        only when the pilot restarts.
    @ivar debounce: seconds of quiet after a change before the push.
    @ivar debounce_max: the longest a pending change waits for quiet, so
        that constant churn cannot hold pushes back for ever.
    @ivar metrics: the pilot's L{PilotMetrics}.
    @ivar metrics_port: the metrics' listening port, or C{None}.
    """

    log = Logger()
    debounce = 0.1
    # Istio's PILOT_DEBOUNCE_MAX idea, within the mesh's 1 s convergence goal.
    debounce_max = 1.0

    def __init__(
        self,
        config_dir: str,
        reactor: Any,
        listen: str,
        api: str | None,
        poll_interval: float = 0.2,
        mesh_defaults: MeshConfig | None = None,
        security: ChannelSecurity | None = None,
        api_token: str | None = None,
        keepalive: tuple[float, float] | None = (15.0, 45.0),
        audit: AuditLog | None = None,
        api_tls: bool = False,
        api_admins: tuple[str, ...] = (),
        metrics_listen: str | None = None,
    ):
        """
        @param config_dir: the directory holding C{mesh.yaml}, C{istio/} and
            C{services/}.
        @param reactor: the reactor to listen on and schedule polling with.
        @param listen: server endpoint string of the channel.
        @param api: server endpoint string of the operator API, or C{None}.
        @param mesh_defaults: the mesh settings snapshots are built with
            (listener addresses, domain suffix...) where C{mesh.yaml} does not
            say; the documents and the registry view come from C{config_dir}.
        @param poll_interval: seconds between checks of the files.
        @param security: the channel's TLS and credential check; C{None}
            for a plaintext channel that admits any proxy (development only).
        @param api_token: the bearer token the operator API requires, or
            C{None} (then the API must listen on loopback only).
        @param keepalive: C{(interval, timeout)} of each channel's keepalive
            in seconds, or C{None}.
        @param audit: where refused proxies and every certificate decision
            are recorded, or C{None}.
        @param api_tls: serve the operator API over TLS with the pilot's
            certificate (needs C{security}); clients may present a
            certificate from the mesh CA.
        @param api_admins: SPIFFE IDs of operators whose client certificate
            is enough without the token (with C{api_tls}).
        @param metrics_listen: server endpoint string serving Prometheus
            metrics at C{GET /metrics}, or C{None} for none (they are kept
            in L{metrics} either way).
        @raise ConfigError: C{mesh.yaml} is invalid.
        @raise ValueError: C{api} listens beyond loopback and no
            C{api_token} is given.
        """
        self.config_dir = config_dir
        self._reactor = reactor
        self._listen = listen
        self._api = api
        self._api_token = api_token
        # Built now so that an API open beyond loopback without a token is
        # refused before anything starts.
        if (api_tls or api_admins) and security is None:
            raise ValueError("--api-tls and operators' certificates need the pilot's CA (not --insecure)")
        if api_admins and not api_tls:
            raise ValueError("operators' certificates (--api-admins) need --api-tls")
        self._api_tls = api_tls
        self._api_tls_factory: TLSListenerFactory | None = None
        self._site = operator_site(self, api, api_token, tuple(api_admins)) if api is not None else None
        self._poll_interval = poll_interval
        self._istio_dir = os.path.join(config_dir, "istio")
        self._credentials_dir = os.path.join(config_dir, "credentials")
        self.security = security
        self.audit = audit
        self._keepalive = keepalive
        self._mesh_path = os.path.join(config_dir, MESH_FILE)
        # Taken before the read, so that a write during it is seen next time.
        self._mesh_stamp = _file_signature(self._mesh_path)
        settings = load_pilot_settings(config_dir, mesh_defaults)
        registries = build_registries(settings, reactor, config_dir, poll_interval)
        self.registry: CombinedRegistry | None = CombinedRegistry(registries, reactor) if registries else None
        self._stopping: list[defer.Deferred[None]] = []
        self._mesh_base = mesh_defaults
        # What the CA and the credential check were made with (by the plugin,
        # from the same file): changing it later needs a restart.
        self._started_settings = settings
        self._settings = settings
        self.mesh_error: str | None = None
        self.restart_needed: tuple[str, ...] = ()
        self._mesh_defaults = settings.mesh
        self.mesh = self._mesh_defaults
        self._views: dict[Any, Any] = {}
        self._documents: list[tuple[str, int, Any]] = []
        self.config_error: str | None = None
        self.config_version = 0
        self.certificates_signed = 0
        self._ca_stamp: object = None
        self._tls_factory: TLSListenerFactory | None = None
        self.channels: list[PilotChannelProtocol] = []
        self._stamp: object = None
        self._poll: LoopingCall | None = None
        self._pending: IDelayedCall | None = None
        self._first_pending: float | None = None
        self.channel_port: IListeningPort | None = None
        self.api_port: IListeningPort | None = None
        self.metrics = PilotMetrics(self._registry_statuses)
        self._metrics_listen = metrics_listen
        self.metrics_port: IListeningPort | None = None

    # --- config ---------------------------------------------------------------

    def _registry_view(self) -> dict[str, Any]:
        if self.registry is None:
            return {}
        return {host: svc.endpoints for host, svc in self.registry.services().items()}

    def _registry_ports(self) -> dict[str, Any]:
        if self.registry is None:
            return {}
        return {host: tuple((p.name, p.number, p.protocol) for p in svc.ports)
                for host, svc in self.registry.services().items()}

    def _registry_statuses(self) -> list[dict[str, Any]]:
        """
        @return: each service registry's own status, for the metrics.
        """
        if self.registry is None:
            return []
        return self.registry.status()["registries"]

    def reload(self) -> bool:
        """
        Read the config again and, if valid, push changed snapshots.

        @return: whether the new config was taken.
        """
        taken = self._reactor.seconds()
        try:
            mesh, views, _ = self.prepare(load_istio_documents(self._istio_dir))
            snapshots = [(c, self._build(mesh, views, c.node)) for c in self.channels if c.node is not None]
        except ConfigError as e:
            self.config_error = str(e)
            self.metrics.config_rejected.inc()
            self.log.error("pilot config refused, keeping the last good one: {error}", error=self.config_error)
            return False
        self.mesh = mesh
        self._views = views
        self.config_error = None
        self.config_version += 1
        self.metrics.config_generation.set(self.config_version)
        for channel, snapshot in snapshots:
            if channel.push(snapshot):
                self.metrics.push_duration.observe(self._reactor.seconds() - taken)
        return True

    def prepare(self, documents: list[Document]) -> tuple[MeshConfig, dict[Any, Any], list[str]]:
        """
        Check C{documents} as the pilot would take them, changing nothing:
        translated for the mesh's default namespace and for the namespace of
        every connected proxy.

        @return: the mesh config they make, the namespace views built, and
            the translation's warnings.
        @raise ConfigError: they are invalid, or a connected proxy's
            snapshot cannot be built from them.
        """
        # With a CA every proxy has a workload certificate: mutual TLS on.
        mesh = attrs.evolve(self._mesh_defaults, documents=documents, registry=self._registry_view(),
                            registry_ports=self._registry_ports(),
                            mtls=self.security is not None,
                            credentials=load_credentials(self._credentials_dir))
        warnings = check_documents(mesh)
        views: dict[Any, Any] = {}
        for channel in self.channels:
            if channel.node is not None:
                self._build(mesh, views, channel.node)
        return mesh, views, warnings

    def _build(self, mesh: MeshConfig, views: dict[Any, Any], node: Node) -> Snapshot:
        """
        Build C{node}'s snapshot, translating its namespace's view (or, for
        a gateway proxy, its Gateways' view) only once per config (C{views}
        caches them), with the mesh trust bundle as the C{secrets} resource
        when the pilot has a CA.
        """
        namespace = node.namespace or mesh.default_namespace
        if is_router(node):
            # Read once per config and namespace, shared by its gateway proxies.
            parsed = views.get(("parsed-gateways", namespace))
            if parsed is None:
                parsed = views[("parsed-gateways", namespace)] = parse_gateways(mesh.documents, namespace)
            gateways = selected_gateways(mesh, node, parsed)
            key = ("gateways", namespace, tuple(g.key for g in gateways))
            gateway = views.get(key)
            if gateway is None:
                gateway = views[key] = gateway_view(mesh, namespace, gateways)
            snapshot = build_gateway_snapshot(mesh, node, gateway)
        else:
            view = views.get(namespace)
            if view is None:
                view = views[namespace] = namespace_view(mesh, namespace)
            snapshot = build_snapshot(mesh, node, view)
        if self.security is None:
            return snapshot
        secrets = [{"name": ROOT_CA_SECRET, "trust_bundle": self.security.root_pem.decode("ascii")}]
        secrets_version = content_hash(secrets)
        return attrs.evolve(
            snapshot,
            resources={**snapshot.resources, SECRETS: secrets},
            per_type_versions={**snapshot.per_type_versions, SECRETS: secrets_version},
            version=content_hash({"snapshot": snapshot.version, SECRETS: secrets_version}),
        )

    def _check(self) -> None:
        mesh_stamp = _file_signature(self._mesh_path)
        if mesh_stamp != self._mesh_stamp:
            self._mesh_stamp = mesh_stamp
            self.reload_mesh()
        stamp = self._config_signature()
        if stamp != self._stamp:
            self._stamp = stamp
            self._schedule()
        if self.security is not None:
            self._check_ca()

    def _config_signature(self) -> object:
        return (_signature(self._istio_dir), credentials_signature(self._credentials_dir))

    def _check_ca(self) -> None:
        """
        Take a rotated root (or the end of a rotation's overlap): a new
        serving certificate for new channels, and the new trust bundle
        pushed to every proxy.
        """
        stamp = self.security.ca_signature()
        if stamp == self._ca_stamp:
            return
        self._ca_stamp = stamp
        try:
            security = self.security.reload()
        except CAError as e:
            self.log.error("the CA directory changed but cannot be used, keeping the old CA: {error}", error=str(e))
            return
        self.security = security
        for factory in (self._tls_factory, self._api_tls_factory):
            if factory is not None:
                factory.set_options(security.server_options)
        self.log.info("CA reloaded: trust bundle of {n} root(s)", n=1 + len(security.ca.previous_roots))
        self._schedule()

    def reload_mesh(self) -> bool:
        """
        Read C{mesh.yaml} again and, if valid, take what can change while
        the pilot runs: the mesh settings snapshots are built from and the
        registries (the old ones are stopped, the new ones started); then
        schedule a push.  What the CA and the credential check were made
        with keeps its value from the start and is logged as needing a
        restart.

        @return: whether the file was taken.
        """
        try:
            settings = load_pilot_settings(self.config_dir, self._mesh_base)
            registries = None
            if settings.registries != self._settings.registries:
                # Built (not started) before anything changes, so that a bad
                # registry section refuses the whole file.
                registries = build_registries(settings, self._reactor, self.config_dir, self._poll_interval)
        except ConfigError as e:
            self.mesh_error = str(e)
            self.metrics.config_rejected.inc()
            self.log.error("{file} refused, keeping the last good mesh settings: {error}",
                           file=self._mesh_path, error=self.mesh_error)
            return False
        self.mesh_error = None
        started = self._started_settings
        restart = restart_needed(started, settings)
        if restart != self.restart_needed and restart:
            self.log.warn("{file}: {fields} changed; this needs a restart of the pilot, which keeps the "
                          "value it started with until then", file=self._mesh_path, fields=", ".join(restart))
        self.restart_needed = restart
        mesh = attrs.evolve(settings.mesh, trust_domain=started.mesh.trust_domain)
        changed = list(mesh_changes(self._mesh_defaults, mesh))
        self._settings = settings
        self._mesh_defaults = mesh
        if registries is not None:
            self._swap_registry(registries)
            changed.append("registries")
        if changed:
            self.log.info("{file} changed ({fields}): pushing to the proxies", file=self._mesh_path,
                          fields=", ".join(changed))
            self._schedule()
        return True

    def _swap_registry(self, registries: list[IRegistry]) -> None:
        """
        Serve from C{registries} instead of the current ones.
        """
        old = self.registry
        self.registry = CombinedRegistry(registries, self._reactor) if registries else None
        if self.running and self.registry is not None:
            # Started before the old ones stop: a file registry's first view
            # is read at once, so the view has no gap.
            self.registry.subscribe(self._registry_changed)
            self.registry.start()
        if old is not None:
            stopping = old.stop()
            self._stopping.append(stopping)

            def stopped(result: object) -> None:
                self._stopping.remove(stopping)
                if isinstance(result, Failure):
                    self.log.failure("stopping the replaced registries failed", result)

            stopping.addBoth(stopped)

    def _registry_changed(self, registry: object) -> None:
        # A replaced registry may still report while it stops.
        if registry is self.registry:
            self._schedule()

    def _schedule(self) -> None:
        now = self._reactor.seconds()
        if self._pending is not None and self._pending.active():
            # Each change restarts the quiet period, but never past
            # debounce_max after the first pending change.
            first = self._first_pending if self._first_pending is not None else now
            self._pending.reset(max(0.0, min(self.debounce, first + self.debounce_max - now)))
        else:
            self._first_pending = now
            self._pending = self._reactor.callLater(self.debounce, self._debounced)

    def _debounced(self) -> None:
        self._pending = None
        self._first_pending = None
        self.reload()

    # --- channels (PilotBackend) -------------------------------------------------

    def register(self, channel: PilotChannelProtocol) -> Snapshot | None:
        """
        A proxy said hello: track it and return its snapshot.
        """
        self.channels.append(channel)
        self.metrics.proxies_connected.set(len(self.channels))
        self.log.info("proxy {node} connected", node=channel.node.id)
        return self.snapshot_for(channel)

    def unregister(self, channel: PilotChannelProtocol) -> None:
        """
        A proxy's channel closed.
        """
        if channel in self.channels:
            self.channels.remove(channel)
            self.metrics.proxies_connected.set(len(self.channels))
            self.log.info("proxy {node} disconnected", node=channel.node.id)

    def authenticate(self, hello: Hello, peer_identity: str | None) -> Admission | defer.Deferred[Admission]:
        """
        @return: the identity of the proxy saying C{hello}, or why it is
            refused; a plaintext pilot admits everyone without an identity.
            A Deferred of that when the credential is a Kubernetes
            service-account token (the API server reviews it); it fails
            only if cancelled.
        """
        if self.security is None:
            return Admission()

        def audited(admission: Admission) -> Admission:
            if admission.refusal is not None:
                self._audit("HELLO", hello.node.id, peer_identity, "DENY", admission.refusal)
            return admission

        def failed(failure: Failure) -> Admission | Failure:
            if failure.check(defer.CancelledError):
                return failure  # the proxy left before the answer
            self.log.failure("checking the credential of proxy {node} failed", failure, node=hello.node.id)
            return audited(Admission(refusal=f"the pilot could not check the credential: "
                                             f"{failure.getErrorMessage() or failure.type.__name__}"))

        admission = self.security.authenticate(hello, peer_identity)
        if isinstance(admission, defer.Deferred):
            return admission.addCallbacks(audited, failed)
        return audited(admission)

    def _audit(self, what: str, node: str, principal: str | None, decision: str, reason: str) -> None:
        """
        Record a credential or certificate decision in the audit log.
        """
        if self.audit is None:
            return
        self.audit.write(AuditRecord(
            time=self._reactor.seconds(), source_principal=principal, source_ip=None, host="txmesh-pilot",
            port=None, method=what, path=node, policy=None, decision=decision, action=None, request_id=None,
            reason=reason,
        ))

    def sign(self, channel: PilotChannelProtocol, request: CertificateRequest) -> Message:
        """
        Sign a proxy's CSR for the identity its channel proved.
        """
        node = channel.node.id if channel.node is not None else "?"
        if self.security is None or channel.identity is None:
            reason = "this pilot runs without a CA (--insecure) and signs no certificates"
        else:
            try:
                chain, roots = self.security.sign(request.csr.encode("ascii", "replace"), channel.identity)
            except CertificateRefused as e:
                reason = str(e)
            else:
                self.certificates_signed += 1
                self.metrics.certificates_signed.inc()
                self.log.info("signed a certificate for {identity} (proxy {node})", identity=channel.identity,
                              node=node)
                self._audit("CSR", node, channel.identity, "ALLOW", "certificate signed")
                return CertificateIssued(id=request.id, chain=chain.decode("ascii"), roots=roots.decode("ascii"))
        self.log.warn("refused to sign a certificate for proxy {node}: {reason}", node=node, reason=reason)
        self._audit("CSR", node, channel.identity, "DENY", reason)
        self.metrics.certificates_denied.inc()
        return CertificateDenied(id=request.id, reason=reason)

    def snapshot_for(self, channel: PilotChannelProtocol) -> Snapshot | None:
        """
        @return: the channel's snapshot from the current config, or C{None}
            if it cannot be built (logged).
        """
        try:
            return self._build(self.mesh, self._views, channel.node)
        except ConfigError as e:
            self.log.error("no snapshot for proxy {node}: {error}", node=channel.node.id, error=str(e))
            return None

    # --- lifecycle ----------------------------------------------------------------

    @defer.inlineCallbacks
    def startService(self) -> Any:
        Service.startService(self)
        if self.registry is not None:
            self.registry.subscribe(self._registry_changed)
            self.registry.start()
        self._stamp = self._config_signature()
        if self._pending is not None and self._pending.active():
            # The registry's first view is read already.
            self._pending.cancel()
            self._pending = None
        self.reload()
        self._poll = LoopingCall(self._check)
        self._poll.clock = self._reactor
        self._poll.start(self._poll_interval, now=False)
        factory: Any = PilotChannelFactory(self, self._reactor, self._keepalive, self.metrics)
        if self.security is not None:
            self._ca_stamp = self.security.ca_signature()
            factory = self._tls_factory = TLSListenerFactory(self.security.server_options, factory, self._reactor)
        else:
            self.log.warn("the pilot channel is plaintext and admits any proxy (--insecure): development only")
        self.channel_port = yield serverFromString(self._reactor, self._listen).listen(factory)
        if self._site is not None:
            site: Any = self._site
            if self._api_tls:
                site = self._api_tls_factory = TLSListenerFactory(self.security.server_options, site, self._reactor)
            self.api_port = yield serverFromString(self._reactor, self._api).listen(site)
        if self._metrics_listen is not None:
            self.metrics_port = yield serverFromString(self._reactor, self._metrics_listen).listen(
                metrics_site(self.metrics))

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        if self.registry is not None:
            yield self.registry.stop()
        yield defer.gatherResults(list(self._stopping), consumeErrors=True)
        for port in (self.channel_port, self.api_port, self.metrics_port):
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
        @return: the config's, C{mesh.yaml}'s and the registry's health,
            JSON-ready.
        """
        return {
            "config": {"ok": self.config_error is None, "error": self.config_error,
                       "documents": len(self.mesh.documents), "generation": self.config_version},
            "mesh": {"ok": self.mesh_error is None, "error": self.mesh_error,
                     "restart_needed": list(self.restart_needed)},
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
