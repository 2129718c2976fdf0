"""
Clusters: named groups of upstream endpoints, with load balancing and a
pool of keep-alive connections per endpoint, shared by every downstream
connection of the proxy.

Load balancers are pure (they pick from a list); pools do the I/O through an
injected C{IReactorTCP} and C{IReactorTime}.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmesh.config.model import ClusterConfig, Endpoint
from txmesh.proxy.circuit_breaker import CircuitBreaker
from txmesh.proxy.connect import ConnectFactory, connect
from txmesh.proxy.health import HealthChecker
from txmesh.proxy.http1_client import HTTP1ClientConnection
from txmesh.proxy.http2_client import HTTP2EndpointPool
from txmesh.proxy.lb import PickContext, build_balancer
from txmesh.proxy.mesh_tls import MeshClientCreator
from txmesh.proxy.outlier import OutlierDetector
from txmesh.proxy.retry import RetryBudget
from txmesh.proxy.tls import client_options

log = Logger()

PASSTHROUGH_CLUSTER = "PassthroughCluster"
"""
The name (as Istio's) of the clusters a forward proxy makes on demand for
hosts no route matches: one per target, all reported under this name.
"""

# Passthrough clusters remembered at once; an idle one is forgotten at the
# next sweep, so this bounds only the targets in use together.
PASSTHROUGH_LIMIT = 4096


def passthrough_cluster_name(kind: str, host: str, port: int) -> str:
    """
    @param kind: C{"http"} (requests are pooled) or C{"connect"} (each
        connection is a tunnel).
    @return: the name a route gives to reach C{host:port} through
        L{ClusterManager.passthrough}.
    """
    return f"{PASSTHROUGH_CLUSTER}|{kind}|{host}|{port}"


class NoHealthyUpstream(Exception):
    """
    The cluster has no endpoint to send to (Envoy's C{UH}).
    """


def upstream_tls(config: ClusterConfig, endpoint: Endpoint, alpn: bytes | None, identity: Any = None) -> Any:
    """
    @param alpn: the protocol to offer, or C{None} for none (L4).
    @param identity: the proxy's workload identity, for C{ISTIO_MUTUAL}.
    @return: the TLS client options for connections to C{endpoint}, or
        C{None} when the cluster speaks cleartext.
    @raise ValueError: C{ISTIO_MUTUAL} without an identity.
    """
    tls = config.tls
    if tls is None:
        return None
    protocols = [alpn] if alpn is not None else []
    if tls.mode == "ISTIO_MUTUAL":
        if identity is None:
            raise ValueError(f"cluster {config.name}: ISTIO_MUTUAL needs a workload certificate (from a pilot)")
        return MeshClientCreator(identity, protocols, tls.subject_alt_names)
    return client_options(endpoint.host, protocols, tls.ca_certificate_pem, tls.sni, tls.client_certificate_pem,
                          tls.private_key_pem)


class UpstreamOverflow(Exception):
    """
    A circuit-breaker limit refused the request (Envoy's C{UO}).
    """


class EndpointPool:
    """
    Keep-alive HTTP/1.1 connections to one endpoint.

    When the cluster's circuit breaker allows no new connection, requests
    wait (as pending requests, themselves limited) for one to be released.

    @ivar active_requests: exchanges in flight on this endpoint.
    @ivar connections: open connections, idle or busy (and connecting).
    """

    def __init__(self, endpoint: Endpoint, config: ClusterConfig, reactor: Any, cluster: Cluster | None = None):
        """
        @param cluster: the owning cluster (its breaker and connection count).
        """
        self.endpoint = endpoint
        self._config = config
        self._reactor = reactor
        self._cluster = cluster
        self._tls = upstream_tls(config, endpoint, b"http/1.1", cluster.identity if cluster is not None else None)
        self._idle: deque[HTTP1ClientConnection] = deque()
        self._waiters: deque[Deferred] = deque()
        self.active_requests = 0
        self.connections = 0
        self.total_connections = 0
        self.connect_failures = 0
        self.closed = False

    def acquire(self) -> HTTP1ClientConnection | Deferred:
        """
        @return: an idle connection, or a L{Deferred} firing with one (new,
            or released by another request), failing with
            L{UpstreamConnectError}.
        @raise UpstreamOverflow: if the circuit breaker refuses both a new
            connection and another pending request.
        """
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.connected:
                conn.reused = True
                return conn
        cluster = self._cluster
        if cluster is None:
            return self._connect()
        breaker = cluster.breaker
        if not breaker.try_add_pending():
            raise UpstreamOverflow(self.endpoint)
        if breaker.can_open_connection(cluster.open_connections()):
            d = self._connect()
            d.addBoth(self._not_pending)
            return d
        waiter: Deferred = Deferred(self._cancel_waiter)
        self._waiters.append(waiter)
        # The limit is cluster-wide but idle connections are per endpoint:
        # one idling to another endpoint would hold the slot this request
        # waits for until its idle timeout.  Closing it serves the waiter.
        cluster.close_idle_elsewhere(self)
        return waiter

    def _not_pending(self, result: Any) -> Any:
        self._cluster.breaker.remove_pending()
        return result

    def _cancel_waiter(self, waiter: Deferred) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self._cluster.breaker.remove_pending()

    def _connect(self) -> Deferred:
        factory = ConnectFactory(self, HTTP1ClientConnection)
        d = factory.deferred
        self.connections += 1
        self.total_connections += 1
        connector = connect(self._reactor, self.endpoint.host, self.endpoint.port, factory,
                            self._config.connect_timeout, self._tls)

        def cancel(d: Deferred) -> None:
            if factory.deferred is not None:
                factory.deferred = None
                self.connections -= 1
                connector.disconnect()

        result: Deferred = Deferred(cancel)
        d.addErrback(self._connect_failed)
        d.chainDeferred(result)
        return result

    def _connect_failed(self, failure: Failure) -> Failure:
        self.connections -= 1
        self.connect_failures += 1
        return failure

    def release(self, conn: HTTP1ClientConnection) -> None:
        """
        Take back a connection whose exchange finished cleanly: hand it to a
        waiting request, keep it idle, or retire it.
        """
        conn.requests_served += 1
        cluster = self._cluster
        if self.closed or (cluster is not None and cluster.breaker.connection_exhausted(conn.requests_served)):
            conn.transport.loseConnection()
            return
        if self._waiters:
            waiter = self._waiters.popleft()
            cluster.breaker.remove_pending()
            conn.reused = True
            waiter.callback(conn)
            return
        if cluster is not None and cluster.breaker.pending_requests and cluster.waiting_elsewhere(self):
            # A request for another endpoint waits for a connection slot
            # (waiting requests count as pending: the check is cheap first).
            conn.transport.loseConnection()
            return
        if len(self._idle) >= self._config.max_idle_per_endpoint:
            conn.transport.loseConnection()
            return
        conn.idle_since = self._reactor.seconds()
        self._idle.append(conn)

    def connection_lost(self, conn: HTTP1ClientConnection) -> None:
        """
        A connection closed (idle or not).
        """
        self.connections -= 1
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        if self._cluster is not None:
            self._cluster.connection_closed()

    def serve_waiter(self) -> bool:
        """
        Open a connection for the oldest waiting request, if the breaker
        allows one now.

        @return: whether a waiter was served.
        """
        cluster = self._cluster
        if not self._waiters or not cluster.breaker.can_open_connection(cluster.open_connections()):
            return False
        waiter = self._waiters.popleft()
        cluster.breaker.remove_pending()
        self._connect().chainDeferred(waiter)
        return True

    def close_one_idle(self) -> bool:
        """
        Close the oldest idle connection, if there is one.

        @return: whether one was closed.
        """
        idle = self._idle
        while idle:
            conn = idle.popleft()
            if conn.connected:
                conn.transport.loseConnection()
                return True
        return False

    def sweep(self, now: float) -> None:
        """
        Close connections idle for longer than the cluster's idle timeout.
        """
        limit = now - self._config.idle_timeout
        idle = self._idle
        # Oldest first: released connections are appended on the right.
        while idle and idle[0].idle_since <= limit:
            idle.popleft().transport.loseConnection()

    def close(self) -> None:
        """
        Close idle connections and refuse to pool more.
        """
        self.closed = True
        while self._idle:
            self._idle.pop().transport.loseConnection()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)


def _subset_endpoints(config: ClusterConfig, labels: tuple[tuple[str, str], ...]) -> tuple[Endpoint, ...]:
    return tuple(ep for ep in config.endpoints if all(ep.label(k) == v for k, v in labels))


class Cluster:
    """
    A cluster at run time: its config, load balancers (one per subset),
    pools, circuit breaker, retry budget and outlier detector.
    """

    def __init__(self, config: ClusterConfig, reactor: Any, rng: random.Random | None = None,
                 local_locality: str = "", identity: Any = None):
        self.config = config
        # Read by the pools, made just below, for ISTIO_MUTUAL.
        self.identity = identity
        self.name = config.name
        self._reactor = reactor
        pool_class: Any = HTTP2EndpointPool if config.http2 else EndpointPool
        self._pools = {ep: pool_class(ep, config, reactor, cluster=self) for ep in config.endpoints}
        self.breaker = CircuitBreaker(config.circuit_breaker)
        self.retry_budget = RetryBudget(min_concurrency=config.circuit_breaker.max_retries)
        self.outlier = (OutlierDetector(config.outlier_detection, config.endpoints)
                        if config.outlier_detection is not None else None)
        self.unhealthy: set[Endpoint] = set()
        locality = local_locality if config.locality_failover else ""
        self._balancers = {None: build_balancer(config.lb_policy, config.endpoints, config.hash_policy,
                                                locality, rng)}
        for subset in config.subsets:
            self._balancers[subset.name] = build_balancer(
                subset.lb_policy or config.lb_policy, _subset_endpoints(config, subset.labels),
                config.hash_policy, locality, rng)
        self.upstream_requests = 0
        self._plain_context = PickContext(None, self._active, self._is_unhealthy)
        self._now = 0.0
        self._next_outlier_sweep = 0.0
        self.health: HealthChecker | None = None
        if config.health_check is not None:
            self.health = HealthChecker(config.health_check, config.endpoints, reactor, self.set_health, rng=rng)

    def _active(self, endpoint: Endpoint) -> int:
        return self._pools[endpoint].active_requests

    def _is_unhealthy(self, endpoint: Endpoint) -> bool:
        if endpoint in self.unhealthy:
            return True
        outlier = self.outlier
        return outlier is not None and outlier.is_ejected(endpoint, self._now)

    def pick(self, subset: str | None = None, hash_key: bytes | None = None,
             tried: frozenset | set = frozenset()) -> EndpointPool:
        """
        @param subset: a subset name (DestinationRule C{subsets}), or C{None}.
        @param hash_key: the request's key for consistent hashing.
        @param tried: endpoints earlier tries of this request used.
        @return: the pool of the endpoint chosen by the load balancer.
        @raise NoHealthyUpstream: if there is none.
        """
        balancer = self._balancers.get(subset)
        if balancer is None:
            raise NoHealthyUpstream(f"{self.name}: no subset {subset!r}")
        if self.outlier is not None:
            self._now = self._reactor.seconds()
        if hash_key is None and not tried:
            context = self._plain_context  # the common case allocates nothing
        else:
            context = PickContext(hash_key, self._active, self._is_unhealthy, tried.__contains__)
        endpoint = balancer.pick(context)
        if endpoint is None:
            raise NoHealthyUpstream(self.name)
        return self._pools[endpoint]

    def record_result(self, endpoint: Endpoint, status: int | None) -> None:
        """
        Tell outlier detection how a request to C{endpoint} ended: its
        status, or C{None} for a connect failure, reset or timeout.
        """
        outlier = self.outlier
        if outlier is not None:
            now = self._reactor.seconds()
            state = outlier.host_state(endpoint)
            if state is not None and state.ejected and not outlier.is_ejected(endpoint, now):
                # Its ejection is over and it takes traffic again, but until
                # a sweep brings it back the detector ignores its results:
                # a host still failing would not be ejected again until the
                # next periodic sweep.  Bring it back now.
                self._return_hosts(now)
            if outlier.record_result(endpoint, status, now):
                log.info("outlier detection ejected {endpoint} from {cluster}", endpoint=str(endpoint),
                         cluster=self.name)

    def _return_hosts(self, now: float) -> None:
        for endpoint in self.outlier.sweep(now):
            log.info("outlier detection returned {endpoint} to {cluster}", endpoint=str(endpoint),
                     cluster=self.name)

    def open_connections(self) -> int:
        """
        @return: connections open (or opening) to every endpoint.
        """
        return sum(pool.connections for pool in self._pools.values())

    def connection_closed(self) -> None:
        """
        A connection closed: a request waiting for a connection slot may
        now open one.
        """
        for pool in self._pools.values():
            if pool.waiting and pool.serve_waiter():
                return

    def waiting_elsewhere(self, pool: EndpointPool) -> bool:
        """
        @return: whether a request waits for a connection slot on an
            endpoint other than C{pool}'s.
        """
        for other in self._pools.values():
            if other is not pool and other.waiting:
                return True
        return False

    def close_idle_elsewhere(self, pool: EndpointPool) -> bool:
        """
        Close one idle connection of an endpoint other than C{pool}'s, to
        free a connection slot for a request waiting on C{pool}; the slot
        is handed over when the connection is lost (L{connection_closed}).

        @return: whether a connection was closed.
        """
        for other in self._pools.values():
            if other is not pool and other.close_one_idle():
                return True
        return False

    def set_health(self, endpoint: Endpoint, healthy: bool) -> None:
        """
        Active health checking's verdict on C{endpoint}.
        """
        if healthy:
            self.unhealthy.discard(endpoint)
        else:
            self.unhealthy.add(endpoint)

    def pools(self) -> list[EndpointPool]:
        return list(self._pools.values())

    def sweep(self, now: float) -> None:
        for pool in self._pools.values():
            pool.sweep(now)
        if self.outlier is not None and now >= self._next_outlier_sweep:
            self._next_outlier_sweep = now + self.config.outlier_detection.interval
            self._return_hosts(now)

    def start(self) -> None:
        """
        Start active health checking, if configured.
        """
        if self.health is not None and not self.health.running:
            self.health.start()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        if self.health is not None and self.health.running:
            self.health.stop()


class ClusterManager:
    """
    Every cluster of the proxy; survives config reloads, keeping the pools
    of clusters whose definition did not change.
    """

    def __init__(self, reactor: Any, sweep_interval: float = 1.0, local_locality: str = ""):
        self._reactor = reactor
        # The proxy's workload identity, for ISTIO_MUTUAL clusters.
        self.identity: Any = None
        self.local_locality = local_locality
        self._clusters: dict[str, Cluster] = {}
        self._passthrough: dict[str, Cluster] = {}
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor
        self._sweep_interval = sweep_interval

    def start(self) -> None:
        if not self._sweeper.running:
            self._sweeper.start(self._sweep_interval, now=False)
            for c in self._clusters.values():
                c.start()

    def stop(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        for c in self._clusters.values():
            c.close()
        for c in self._passthrough.values():
            c.close()
        self._passthrough.clear()

    def passthrough(self, name: str) -> Cluster | None:
        """
        The cluster of a forward proxy's target no route matched (Istio's
        C{ALLOW_ANY} C{PassthroughCluster}), made on first use.

        @param name: from L{passthrough_cluster_name}.
        @return: the cluster, or C{None} if C{name} is not such a name.
        """
        cluster = self._passthrough.get(name)
        if cluster is not None:
            return cluster
        parts = name.split("|")
        if len(parts) != 4 or parts[0] != PASSTHROUGH_CLUSTER or not parts[3].isdigit():
            return None
        config = ClusterConfig(PASSTHROUGH_CLUSTER, (Endpoint(parts[2], int(parts[3])),))
        cluster = Cluster(config, self._reactor)
        if len(self._passthrough) >= PASSTHROUGH_LIMIT:
            self._forget_idle_passthrough()
        if len(self._passthrough) < PASSTHROUGH_LIMIT:
            self._passthrough[name] = cluster
        return cluster

    def _forget_idle_passthrough(self) -> None:
        for name, cluster in list(self._passthrough.items()):
            if cluster.open_connections() == 0:
                del self._passthrough[name]
                cluster.close()

    def update(self, configs: Sequence[ClusterConfig]) -> ClusterSet:
        """
        Install a new set of cluster definitions.

        @return: the L{ClusterSet} that new streams should use; streams
            already running keep the set they started with.
        """
        new: dict[str, Cluster] = {}
        for cfg in configs:
            old = self._clusters.get(cfg.name)
            if old is not None and old.config == cfg:
                new[cfg.name] = old
            else:
                new[cfg.name] = Cluster(cfg, self._reactor, local_locality=self.local_locality,
                                        identity=self.identity)
                if self._sweeper.running:
                    new[cfg.name].start()
        for name, old in self._clusters.items():
            if new.get(name) is not old:
                old.close()
        self._clusters = new
        return ClusterSet(dict(new), self.passthrough)

    def _sweep(self) -> None:
        now = self._reactor.seconds()
        for c in self._clusters.values():
            c.sweep(now)
        for c in self._passthrough.values():
            c.sweep(now)
        self._forget_idle_passthrough()

    def clusters(self) -> list[Cluster]:
        return list(self._clusters.values())


class ClusterSet:
    """
    An immutable view: the clusters of one config version.
    """

    def __init__(self, clusters: dict[str, Cluster],
                 passthrough: Callable[[str], Cluster | None] | None = None):
        """
        @param passthrough: makes the clusters of forward-proxy targets
            (L{ClusterManager.passthrough}), or C{None}.
        """
        self._clusters = clusters
        self._passthrough = passthrough

    def get(self, name: str) -> Cluster | None:
        """
        @return: the cluster called C{name} (or, for a name from
            L{passthrough_cluster_name}, that target's), or C{None}.
        """
        cluster = self._clusters.get(name)
        if cluster is None and self._passthrough is not None and name.startswith(PASSTHROUGH_CLUSTER):
            return self._passthrough(name)
        return cluster

    def __iter__(self):
        return iter(self._clusters.values())
