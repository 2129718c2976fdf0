"""
L{ProxyService}: a running txmesh-proxy -- its listeners, clusters, admin
endpoint and config reloads -- as a Twisted service.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from txmesh.capture.listener import CaptureFactory
from txmesh.capture.original_dst import OriginalDestinationFactory
from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader, watched_mtimes
from txmesh.config.model import ClusterConfig, Endpoint, ListenerConfig, ListenerTLS, ProxyConfig
from txmesh.filters.access_log import TCPAccessLog
from txmesh.filters.registry import FilterRegistry
from txmesh.observability.metrics import ProxyMetrics
from txmesh.proxy.admin import AdminResource, AdminSite
from txmesh.proxy.cluster import PASSTHROUGH_CLUSTER, ClusterManager, ClusterSet, NoHealthyUpstream, upstream_tls
from txmesh.proxy.connection_manager import HTTPConnectionManager, ProxyContext
from txmesh.proxy.deadlines import DeadlineWheel
from txmesh.proxy.http1_server import HTTP1ServerFactory, RefusedConnection
from txmesh.proxy.listener import HTTPListenerFactory
from txmesh.proxy.mesh_tls import MeshServerCreator, PermissiveFactory
from txmesh.proxy.open_set import OpenSet
from txmesh.proxy.overload import OverloadManager
from txmesh.proxy.pilot_client import PilotClient
from txmesh.proxy.pilot_link import PilotLink
from txmesh.proxy.reuseport import listener_endpoint
from txmesh.proxy.sni_router import SNIRouterFactory
from txmesh.proxy.tcp import TCPProxyFactory
from txmesh.proxy.tls import TLSListenerFactory, add_server_name_certificates, select_by_server_name, server_options
from txmesh.proxy.workload_identity import WorkloadIdentity

log = Logger()


class ListenerPortFactory(Factory):
    """
    The factory a port listens with; it hands each connection to the
    listener's current inner factory, so a reload changes what new
    connections get without closing the port.  While the overload manager
    refuses connections, it closes new ones at once, whatever the
    listener's protocol (HTTP, TCP, capture).
    """

    noisy = False

    def __init__(self, inner: Factory, overload: OverloadManager | None = None):
        self.inner = inner
        self._overload = overload

    def buildProtocol(self, addr: Any) -> Any:
        overload = self._overload
        if overload is not None and overload.refuse_connections:
            overload.count_refused_connection()
            return RefusedConnection()
        return self.inner.buildProtocol(addr)


class _Listener:
    def __init__(self, config: ListenerConfig, factory: ListenerPortFactory):
        self.config = config
        self.factory = factory
        self.port: Any = None
        # Set when the listener terminates TLS: it wraps self.factory.
        self.tls: TLSListenerFactory | None = None


class ProxyService(Service):
    """
    txmesh-proxy running from a static config file.

    With a C{pilot} section in the file, the file is a bootstrap: after the
    service starts, a L{PilotClient} connects to the pilot and every push is
    applied as the file's C{node}, C{admin} and static C{listeners} and
    C{clusters} plus the pushed ones, the same way a reload is; a refused push, or a pilot
    that cannot be reached, leaves the last applied config serving. The
    proxy tells the pilot its C{pilot.inbound_port} and C{pilot.app_port} as
    the node labels C{txmesh.io/inbound-port} and C{txmesh.io/app-port}
    (decimal strings).

    @ivar config: the live L{ProxyConfig}.
    @ivar version: increases with every config applied.
    """

    def __init__(
        self,
        config_path: str,
        reactor: Any,
        registry: FilterRegistry | None = None,
        watch_interval: float = 0.0,
        drain_timeout: float = 5.0,
        pilot_backoff_base: float = 0.5,
        pilot_backoff_max: float = 15.0,
        document: dict | None = None,
        reuse_port: bool = False,
        identity: WorkloadIdentity | None = None,
    ):
        """
        @param config_path: the YAML file to run from (a name for messages
            when C{document} is given).
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
        @param registry: filter factories (default: installed plugins).
        @param watch_interval: seconds between checks of the file for
            changes; 0 reloads only on C{SIGHUP} or L{reload}.
        @param drain_timeout: seconds in-flight requests get at shutdown.
        @param pilot_backoff_base: seconds; ceiling of the first wait before
            reconnecting to the pilot (see L{PilotClient}).
        @param pilot_backoff_max: seconds; cap of those waits.
        @param document: the config document to run from instead of the
            file's (a bootstrap made from the command line, see
            L{txmesh.proxy.bootstrap}); relative paths in it are relative
            to C{config_path}'s directory.
        @param reuse_port: listen with C{SO_REUSEPORT}, as the worker
            processes of C{--concurrency} do (see L{txmesh.proxy.workers}).
        @param identity: a workload identity kept up to date by someone
            else (a worker's parent, which holds the pilot channel), for
            the mutual TLS of a config without a C{pilot} section.
        """
        self._path = config_path
        self._document = document
        self._reuse_port = reuse_port
        self._reactor = reactor
        self._loader = ConfigLoader(registry or FilterRegistry.from_plugins())
        self._watch_interval = watch_interval
        self._drain_timeout = drain_timeout
        self._pilot_backoff = (pilot_backoff_base, pilot_backoff_max)
        self._deadlines = DeadlineWheel(reactor)
        self._clusters = ClusterManager(reactor)
        self._listeners: dict[str, _Listener] = {}
        # Factories of removed or replaced listeners whose connections drain.
        self._retired: set[HTTP1ServerFactory] = set()
        # Every open L4 session, of any TCP or capture listener, for the drain.
        self._tcp_sessions: OpenSet = OpenSet()
        self._admin_port: Any = None
        self._watcher: LoopingCall | None = None
        self._mtime: float | None = None
        self._ready = False
        self._old_sighup: Any = None
        self.version = 0
        self.loaded_at = 0.0
        self.config: ProxyConfig | None = None
        self.metrics: ProxyMetrics | None = None
        self._cluster_set: ClusterSet | None = None
        self.pilot: PilotClient | None = None
        self.identity: WorkloadIdentity | None = identity
        self._link: PilotLink | None = None
        # Built from the config the service starts with (its overload
        # section); changes to that section need a restart.
        self.overload: OverloadManager | None = None

    def load_initial(self) -> ProxyConfig:
        """
        Load and validate the config before the service starts, so twistd
        can refuse to start with a clear message.

        @raise ConfigError: if the file is invalid.
        """
        if self._document is not None:
            self.config = self._loader.load_document(self._document, self._path)
        else:
            self.config = self._loader.load_file(self._path)
        self._mtime = self._file_mtime()
        self._log_warnings(self.config)
        return self.config

    def _log_warnings(self, config: ProxyConfig) -> None:
        for warning in config.warnings:
            # Not "warning=": trial and the stdlib bridge read that key as a
            # Python warnings.warn() event.
            log.warn("config warning: {text}", text=warning)

    @inlineCallbacks
    def startService(self) -> Any:
        Service.startService(self)
        if self.config is None:
            self.load_initial()
        config = self.config
        self.metrics = ProxyMetrics(config.node)
        self.metrics.watch(clusters=self._clusters.clusters, config_version=lambda: self.version,
                           pilot_status=self.pilot_status, filter_factories=self._loader.registry.http_factories)
        if config.pilot is not None:
            self._link = PilotLink(config, self._reactor, self._apply_pushed, self._pilot_backoff)
            self.identity = self._link.identity
        self._clusters.identity = self.identity
        self.metrics.set_identity(self.identity)
        self._check_identity(config, self._path)
        if config.overload is not None:
            self.overload = OverloadManager(config.overload, self._reactor)
            self.metrics.watch_overload(self.overload)
            self.overload.start()
        self._clusters.start()
        self._apply_clusters(config)
        for listener in config.listeners:
            yield self._open_listener(listener)
        if config.admin_address:
            site = AdminSite(AdminResource(self))
            self._admin_port = yield serverFromString(self._reactor, config.admin_address).listen(site)
        self.version = 1
        self.loaded_at = self._reactor.seconds()
        self._ready = True
        self._install_sighup()
        if self._watch_interval > 0:
            self._watcher = LoopingCall(self._check_file)
            self._watcher.clock = self._reactor
            self._watcher.start(self._watch_interval, now=False)
        log.info("txmesh-proxy ready: {n} listener(s) from {path}", n=len(config.listeners), path=self._path)
        if self._link is not None:
            self._link.start()
            self.pilot = self._link.client

    def stopService(self) -> Deferred:
        Service.stopService(self)
        self._ready = False
        if self.pilot is not None:
            self.pilot.stop()
        if self._watcher is not None and self._watcher.running:
            self._watcher.stop()
        if self.overload is not None:
            self.overload.stop()
        self._restore_sighup()
        return self._drain()

    @inlineCallbacks
    def _drain(self) -> Any:
        stops = [maybeDeferred(entry.port.stopListening) for entry in self._listeners.values()
                 if entry.port is not None]
        if self._admin_port is not None:
            stops.append(maybeDeferred(self._admin_port.stopListening))
        yield DeferredList(stops)
        http = [entry.factory.inner for entry in self._listeners.values()
                if isinstance(entry.factory.inner, HTTP1ServerFactory)] + list(self._retired)
        for f in http:
            f.drain()
        # L4 sessions have no way to be told to end: like Envoy's, they get
        # the drain time to end by themselves.
        idle = DeferredList([f.when_idle() for f in http] + [self._tcp_sessions.when_empty()], consumeErrors=True)
        idle.addTimeout(self._drain_timeout, self._reactor)
        try:
            yield idle
        except defer.TimeoutError:
            log.info("drain timeout: aborting connections still open")
        for f in http:
            for conn in list(f.connections):
                conn.transport.abortConnection()
        for session in list(self._tcp_sessions):
            session.abort()
        self._clusters.stop()
        self._deadlines.stop()

    @inlineCallbacks
    def _retire(self, entry: _Listener) -> Any:
        """
        Drain the connections of a listener that a new config removed or
        replaced (it has stopped listening): they were set up under the old
        listener (its TLS, its mutual TLS mode) and must not keep serving
        under it.  Idle HTTP connections close now, busy ones after their
        response (C{Connection: close}, or GOAWAY for HTTP/2); what is left
        after the drain timeout is aborted.
        """
        inner = entry.factory.inner
        if not isinstance(inner, HTTP1ServerFactory) or not inner.connections:
            return
        inner.drain()
        log.info("listener {name} replaced: draining {n} connection(s)", name=entry.config.name,
                 n=len(inner.connections))
        self._retired.add(inner)
        idle = inner.when_idle()
        idle.addTimeout(self._drain_timeout, self._reactor)
        try:
            yield idle
        except defer.TimeoutError:
            for conn in list(inner.connections):
                conn.transport.abortConnection()
        finally:
            self._retired.discard(inner)

    # Config application

    def _apply_clusters(self, config: ProxyConfig) -> None:
        self._clusters.local_locality = config.node.locality
        self._cluster_set = self._clusters.update(config.clusters)

    def _check_identity(self, config: ProxyConfig, source: str) -> None:
        """
        @raise ConfigError: C{config} asks for mutual TLS but this proxy has
            no workload identity (it gets one from a pilot).
        """
        if self.identity is not None:
            return
        for i, listener in enumerate(config.listeners):
            if listener.mtls is not None:
                raise ConfigError(source, f"listeners[{i}].mtls",
                                  "mutual TLS needs a workload certificate, which comes from a pilot "
                                  "(a pilot section without insecure)")
        for i, cluster in enumerate(config.clusters):
            if cluster.tls is not None and cluster.tls.mode == "ISTIO_MUTUAL":
                raise ConfigError(source, f"clusters[{i}].tls.mode",
                                  "ISTIO_MUTUAL needs a workload certificate, which comes from a pilot "
                                  "(a pilot section without insecure)")

    def _proxy_context(self, config: ProxyConfig) -> ProxyContext:
        return ProxyContext(config.node, self._reactor, self.metrics, self._deadlines,
                            identity=self.identity, overload=self.overload)

    def _inner_factory(self, listener: ListenerConfig, config: ProxyConfig) -> Factory:
        if listener.protocol == "tcp":
            if listener.cluster is not None and not listener.sni_routes:
                return self._tcp_proxy(listener, listener.cluster)
            relays: dict[str, TCPProxyFactory] = {}
            routes = [(route.server_names, route.cluster) for route in listener.sni_routes]

            def route(sni: str | None) -> TCPProxyFactory | None:
                name = select_by_server_name(routes, sni) or listener.cluster
                if name is None:
                    return None
                relay = relays.get(name)
                if relay is None:
                    relay = relays[name] = self._tcp_proxy(listener, name)
                return relay

            return SNIRouterFactory(route, self._reactor, listener_name=listener.name)
        return HTTPListenerFactory(HTTPConnectionManager(listener, self._cluster_set, self._proxy_context(config)))

    def _tcp_proxy(self, listener: ListenerConfig, cluster_name: str) -> TCPProxyFactory:
        """
        @return: the L4 proxy of C{listener}'s connections to the cluster
            called C{cluster_name}.
        """
        cluster = self._cluster_set.get(cluster_name)
        reactor = self._reactor
        timeout = cluster.config.connect_timeout

        def pick() -> Any:
            try:
                return cluster.pick().endpoint
            except NoHealthyUpstream:
                return None

        identity = self.identity

        def connector(ep: Any) -> Any:
            endpoint = TCP4ClientEndpoint(reactor, ep.host, ep.port, timeout=timeout)
            tls = upstream_tls(cluster.config, ep, None, identity)
            return endpoint if tls is None else wrapClientTLS(tls, endpoint)

        return TCPProxyFactory(
            listener_name=listener.name,
            pick_endpoint=pick,
            connector=connector,
            clock=reactor,
            idle_timeout=listener.idle_timeout,
            filters=listener.network_filters,
            observer=self.metrics.tcp_listener(
                listener.name, cluster_name, listener.mtls,
                upstream_mtls=cluster.config.tls is not None and cluster.config.tls.mode == "ISTIO_MUTUAL"),
            on_connection_closed=(TCPAccessLog(listener.access_log, cluster_name)
                                  if listener.access_log is not None else None),
            sessions=self._tcp_sessions,
        )

    def _capture_relay(self, listener_name: str, destination: tuple[str, int]) -> TCPProxyFactory:
        """
        @return: the L4 relay of one captured connection to its original
            destination (Istio's C{PassthroughCluster} for TCP).
        """
        reactor = self._reactor
        host, port = destination
        timeout = ClusterConfig(PASSTHROUGH_CLUSTER, ()).connect_timeout
        client = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        return TCPProxyFactory(
            listener_name=listener_name,
            pick_endpoint=lambda: Endpoint(host, port),
            connector=lambda ep: client(reactor, ep.host, ep.port, timeout=timeout),
            clock=reactor,
            idle_timeout=self._listeners[listener_name].config.idle_timeout,
            observer=self.metrics.tcp_listener(listener_name, PASSTHROUGH_CLUSTER),
            sessions=self._tcp_sessions,
        )

    def _tls_options(self, listener: ListenerConfig, inner: Factory) -> Any:
        """
        @return: the TLS options of C{listener} (its own certificate, or the
            workload certificate for mutual TLS), offering in ALPN only the
            protocols its (inner) factory speaks.
        """
        spoken = getattr(inner, "alpn_protocols", None)
        if spoken is None and isinstance(inner, HTTP1ServerFactory):
            # Offering h2 to a server that only speaks HTTP/1.1 would make
            # every h2-capable client (curl, browsers) fail.
            spoken = (b"http/1.1",)
        if listener.mtls is not None:
            alpn = [p for p in (b"h2", b"http/1.1") if spoken is not None and p in spoken]
            return MeshServerCreator(self.identity, alpn, require_peer=True)
        tls = listener.tls
        alpn = [p for p in tls.alpn if spoken is None or p in spoken]

        def options(t: ListenerTLS) -> Any:
            return server_options(t.certificate_pem, t.private_key_pem, alpn, tls.min_version,
                                  client_ca_pem=t.client_ca_pem or None)

        return add_server_name_certificates(options(tls), [(t.server_names, options(t)) for t in tls.sni])

    @inlineCallbacks
    def _open_listener(self, listener: ListenerConfig) -> Any:
        entry = _Listener(listener, ListenerPortFactory(self._inner_factory(listener, self.config), self.overload))
        factory: Factory = entry.factory
        if listener.tls is not None or listener.mtls is not None:
            entry.tls = factory = TLSListenerFactory(
                self._tls_options(listener, entry.factory.inner), entry.factory, clock=self._reactor)
            if listener.mtls == "PERMISSIVE":
                factory = PermissiveFactory(entry.tls, entry.factory)
        if listener.capture is not None:
            capture = CaptureFactory(lambda: entry.factory.inner,
                                     lambda destination: self._capture_relay(listener.name, destination),
                                     self._reactor)
            factory = OriginalDestinationFactory(capture, require=True, name=listener.name)
        endpoint = listener_endpoint(self._reactor, listener.address, self._reuse_port)
        entry.port = yield endpoint.listen(factory)
        self._listeners[listener.name] = entry
        log.info("listener {name} ({protocol}) on {address}", name=listener.name,
                 protocol=listener.protocol, address=listener.address)

    def reload(self) -> Deferred:
        """
        Re-read the config file and apply it if valid; if not, log why and
        keep serving the current config. With a pilot the file is only the
        bootstrap: nothing is reloaded (changes need a restart).

        @return: a L{Deferred} firing with C{True} if the new config was
            applied, C{False} if it was refused.
        """
        return self._reload()

    @inlineCallbacks
    def _reload(self) -> Any:
        self._mtime = self._file_mtime()
        if self.pilot is not None:
            # The file is only a bootstrap now: applying it would drop the
            # listeners and clusters the pilot pushed.
            log.warn("{path} changed; it is the pilot bootstrap, so changes need a restart", path=self._path)
            return False
        try:
            new = self._loader.load_file(self._path)
        except ConfigError as e:
            log.error("config reload refused, still serving version {version}: {error}",
                      version=self.version, error=str(e))
            self.metrics.config_reloads.labels("rejected").inc()
            return False
        try:
            yield self._apply_config(new, self._path, after_swap=self._remember_mtime)
        except ConfigError as e:
            log.error("config reload refused, still serving version {version}: {error}",
                      version=self.version, error=str(e))
            self.metrics.config_reloads.labels("rejected").inc()
            return False
        return True

    @inlineCallbacks
    def apply_document(self, document: dict, source: str) -> Any:
        """
        Apply a config document read and validated elsewhere: a worker
        process of C{--concurrency} applies its parent's this way (see
        L{txmesh.proxy.workers}), with the same validation as a reload.

        @param source: the file it came from (relative paths in it are
            relative to that file's directory).
        @return: a L{Deferred} firing with C{None} if it was applied, or
            with the L{ConfigError} message that refused it.
        """
        try:
            new = self._loader.load_document(document, source)
            yield self._apply_config(new, source)
        except ConfigError as e:
            log.error("config refused, still serving version {version}: {error}",
                      version=self.version, error=str(e))
            self.metrics.config_reloads.labels("rejected").inc()
            return str(e)
        return None

    def _remember_mtime(self) -> None:
        self._mtime = self._file_mtime()

    @inlineCallbacks
    def _apply_config(self, new: ProxyConfig, source: str, after_swap: Any = None) -> Any:
        """
        Make C{new} the running config: clusters, then listeners (opened,
        closed or given new routes in place).

        @param source: where C{new} came from, for the log.
        @param after_swap: called once C{self.config} is C{new}.
        @raise ConfigError: (as a failure) if C{new}'s clusters cannot be
            built; nothing has changed then.
        """
        old = self.config
        self._check_identity(new, source)
        try:
            # Clusters are built before anything is swapped: if one cannot
            # be (a load balancer refusing its endpoints, say), the running
            # config stays whole.
            self._apply_clusters(new)
        except ValueError as e:
            raise ConfigError(source, "", str(e)) from None
        self._log_warnings(new)
        self.config = new
        if after_swap is not None:
            after_swap()
        wanted = {listener.name: listener for listener in new.listeners}
        for name, entry in list(self._listeners.items()):
            cfg = wanted.get(name)
            if (cfg is None or cfg.address != entry.config.address or cfg.protocol != entry.config.protocol
                    or (cfg.tls is None) != (entry.config.tls is None) or cfg.mtls != entry.config.mtls
                    or (cfg.capture is None) != (entry.config.capture is None)):
                del self._listeners[name]
                yield maybeDeferred(entry.port.stopListening)
                # Not waited for: the new listener opens while they drain.
                self._retire(entry)
        for listener in new.listeners:
            entry = self._listeners.get(listener.name)
            if entry is None:
                try:
                    yield self._open_listener(listener)
                except Exception as e:
                    log.error("listener {name} could not open on {address}: {error}",
                              name=listener.name, address=listener.address, error=str(e))
                continue
            entry.config = listener
            inner = entry.factory.inner
            if isinstance(inner, HTTP1ServerFactory):
                inner.manager = HTTPConnectionManager(listener, self._cluster_set, self._proxy_context(new))
            else:
                entry.factory.inner = self._inner_factory(listener, new)
            if entry.tls is not None:
                # Rebuilt on every reload: a renewed certificate file is
                # read by the loader and used by new connections.
                entry.tls.set_options(self._tls_options(listener, entry.factory.inner))
        if old is not None and old.admin_address != new.admin_address:
            log.warn("admin address changes need a restart; still on {address}", address=old.admin_address)
        self.version += 1
        self.loaded_at = self._reactor.seconds()
        self.metrics.config_reloads.labels("applied").inc()
        log.info("config version {version} applied from {path}", version=self.version, path=source)

    # The pilot

    def _apply_pushed(self, document: dict, source: str) -> Deferred:
        """
        Apply a document pushed by the pilot, merged with the bootstrap
        (see L{txmesh.proxy.pilot_link.merge_pushed}).

        @raise ConfigError: if it is not a valid config; the running config
            is unchanged.
        """
        try:
            new = self._loader.load_document(document, source)
        except ConfigError:
            self.metrics.config_reloads.labels("rejected").inc()
            raise
        new = attrs.evolve(new, pilot=self._link.bootstrap.pilot)

        def rejected(failure: Any) -> Any:
            self.metrics.config_reloads.labels("rejected").inc()
            return failure

        return self._apply_config(new, source).addErrback(rejected)

    def pilot_status(self) -> dict | None:
        """
        @return: the pilot channel's status (see L{PilotClient.status}), or
            C{None} when the proxy runs without a pilot.
        """
        return self.pilot.status() if self.pilot is not None else None

    def _file_mtime(self) -> tuple[float | None, ...]:
        """
        @return: the modification times of the config file and the files it
            includes (its Istio documents), which C{--watch} compares.
        """
        return watched_mtimes(self._path, self.config)

    def _check_file(self) -> None:
        if self._file_mtime() != self._mtime:
            self.reload()

    def _install_sighup(self) -> None:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
            return
        reactor = self._reactor

        def on_sighup(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.reload)

        self._old_sighup = signal.signal(signal.SIGHUP, on_sighup)

    def _restore_sighup(self) -> None:
        if self._old_sighup is not None:
            signal.signal(signal.SIGHUP, self._old_sighup)
            self._old_sighup = None

    # What the admin endpoint shows

    def is_ready(self) -> bool:
        return self._ready

    def listening_port(self, name: str) -> Any:
        """
        @return: the listening port object of listener C{name} (tests use
            it to learn the port number when listening on port 0).
        """
        return self._listeners[name].port

    def admin_port(self) -> Any:
        return self._admin_port

    def config_dump(self) -> dict:
        return {
            "version": self.version,
            "source": self._path,
            "loaded_at": self.loaded_at,
            "config": self.config.raw if self.config is not None else None,
        }

    def clusters_dump(self) -> dict:
        out = {}
        now = self._reactor.seconds()
        for cluster in self._clusters.clusters():
            outlier = cluster.outlier
            out[cluster.name] = {
                "lb_policy": cluster.config.lb_policy,
                "upstream_requests": cluster.upstream_requests,
                "circuit_breaker": cluster.breaker.stats(),
                "retry_budget": {"active_retries": cluster.retry_budget.active_retries,
                                 "overflows": cluster.retry_budget.overflows},
                "outlier_detection": outlier.stats() if outlier is not None else None,
                "endpoints": [
                    {
                        "address": str(pool.endpoint),
                        "labels": dict(pool.endpoint.labels),
                        "healthy": pool.endpoint not in cluster.unhealthy,
                        "ejected": outlier is not None and outlier.is_ejected(pool.endpoint, now),
                        "active_requests": pool.active_requests,
                        "connections": pool.connections,
                        "idle_connections": pool.idle_count,
                        "waiting_requests": pool.waiting,
                        "total_connections": pool.total_connections,
                        "connect_failures": pool.connect_failures,
                    }
                    for pool in cluster.pools()
                ],
            }
        return out

    def metrics_text(self) -> tuple[str, bytes]:
        return self.metrics.exposition()
