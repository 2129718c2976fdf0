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
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmesh.config.model import ClusterConfig, Endpoint
from txmesh.proxy.http1_client import HTTP1ClientConnection

log = Logger()


class NoHealthyUpstream(Exception):
    """
    The cluster has no endpoint to send to (Envoy's C{UH}).
    """


class UpstreamConnectError(Exception):
    """
    Connecting to the chosen endpoint failed or timed out (Envoy's C{UF}).
    """


class RoundRobin:
    """
    Each endpoint in turn.
    """

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None = None):
        self._endpoints = tuple(endpoints)
        # Start at a random offset so many proxies do not march in step.
        self._next = (rng or random.Random()).randrange(len(endpoints)) if endpoints else 0

    def pick(self, active: Callable[[Endpoint], int]) -> Endpoint | None:
        endpoints = self._endpoints
        if not endpoints:
            return None
        i = self._next % len(endpoints)
        self._next = i + 1
        return endpoints[i]


class RandomChoice:
    """
    A uniformly random endpoint.
    """

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None = None):
        self._endpoints = tuple(endpoints)
        self._rng = rng or random.Random()

    def pick(self, active: Callable[[Endpoint], int]) -> Endpoint | None:
        if not self._endpoints:
            return None
        return self._rng.choice(self._endpoints)


class LeastRequest:
    """
    Power of two choices: of two random endpoints, the one with fewer
    requests in flight (Envoy's default least-request behaviour).
    """

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None = None):
        self._endpoints = tuple(endpoints)
        self._rng = rng or random.Random()

    def pick(self, active: Callable[[Endpoint], int]) -> Endpoint | None:
        endpoints = self._endpoints
        if not endpoints:
            return None
        if len(endpoints) == 1:
            return endpoints[0]
        a, b = self._rng.sample(endpoints, 2)
        return a if active(a) <= active(b) else b


LOAD_BALANCERS = {"round_robin": RoundRobin, "random": RandomChoice, "least_request": LeastRequest}


class _ConnectFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: EndpointPool, deferred: Deferred):
        self._pool = pool
        self._deferred = deferred

    def buildProtocol(self, addr: Any) -> HTTP1ClientConnection:
        conn = HTTP1ClientConnection(self._pool, self._pool.endpoint)
        conn.factory = self
        return conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        d, self._deferred = self._deferred, None
        if d is not None:
            d.errback(UpstreamConnectError(f"{self._pool.endpoint}: {reason.getErrorMessage()}"))

    def connected(self, conn: HTTP1ClientConnection) -> None:
        d, self._deferred = self._deferred, None
        if d is not None:
            d.callback(conn)


class EndpointPool:
    """
    Keep-alive HTTP/1.1 connections to one endpoint.

    @ivar active_requests: exchanges in flight on this endpoint.
    @ivar connections: open connections, idle or busy.
    """

    def __init__(self, endpoint: Endpoint, config: ClusterConfig, reactor: Any, writes: Any = None):
        """
        @param writes: a L{WriteCoalescer} for the connections' writes, or
            C{None} for plain C{transport.write}.
        """
        self.endpoint = endpoint
        self._config = config
        self._reactor = reactor
        self._writes = writes
        self._idle: deque[HTTP1ClientConnection] = deque()
        self.active_requests = 0
        self.connections = 0
        self.total_connections = 0
        self.connect_failures = 0
        self.closed = False

    def acquire(self) -> HTTP1ClientConnection | Deferred:
        """
        @return: an idle connection, or a L{Deferred} firing with a new one
            (or failing with L{UpstreamConnectError}).
        """
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.connected:
                conn.reused = True
                return conn
        d: Deferred = Deferred()
        factory = _ConnectFactory(self, d)
        self.connections += 1
        self.total_connections += 1
        connector = self._reactor.connectTCP(
            self.endpoint.host, self.endpoint.port, factory, timeout=self._config.connect_timeout)

        def cancel(d: Deferred) -> None:
            if factory._deferred is not None:
                factory._deferred = None
                self.connections -= 1
                connector.disconnect()

        result: Deferred = Deferred(cancel)
        d.addCallbacks(self._connected, self._connect_failed)
        d.chainDeferred(result)
        return result

    def _connected(self, conn: HTTP1ClientConnection) -> HTTP1ClientConnection:
        return conn

    def _connect_failed(self, failure: Failure) -> Failure:
        self.connections -= 1
        self.connect_failures += 1
        return failure

    def writer_for(self, transport: Any) -> Callable[[bytes], None]:
        """
        @return: how a connection of this pool writes to C{transport}.
        """
        if self._writes is None:
            return transport.write
        return self._writes.writer_for(transport)

    def release(self, conn: HTTP1ClientConnection) -> None:
        """
        Take back a connection whose exchange finished cleanly.
        """
        if self.closed or len(self._idle) >= self._config.max_idle_per_endpoint:
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


class Cluster:
    """
    A cluster at run time: its config, its load balancer and its pools.
    """

    def __init__(self, config: ClusterConfig, reactor: Any, rng: random.Random | None = None,
                 writes: Any = None):
        self.config = config
        self.name = config.name
        self._pools = {ep: EndpointPool(ep, config, reactor, writes) for ep in config.endpoints}
        self._lb = LOAD_BALANCERS[config.lb_policy](config.endpoints, rng)
        self.upstream_requests = 0

    def _active(self, endpoint: Endpoint) -> int:
        return self._pools[endpoint].active_requests

    def pick(self) -> EndpointPool:
        """
        @return: the pool of the endpoint chosen by the load balancer.
        @raise NoHealthyUpstream: if there is none.
        """
        endpoint = self._lb.pick(self._active)
        if endpoint is None:
            raise NoHealthyUpstream(self.name)
        return self._pools[endpoint]

    def pools(self) -> list[EndpointPool]:
        return list(self._pools.values())

    def sweep(self, now: float) -> None:
        for pool in self._pools.values():
            pool.sweep(now)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


class ClusterManager:
    """
    Every cluster of the proxy; survives config reloads, keeping the pools
    of clusters whose definition did not change.
    """

    def __init__(self, reactor: Any, sweep_interval: float = 5.0, writes: Any = None):
        """
        @param writes: a L{WriteCoalescer} shared by every upstream connection.
        """
        self._reactor = reactor
        self._writes = writes
        self._clusters: dict[str, Cluster] = {}
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor
        self._sweep_interval = sweep_interval

    def start(self) -> None:
        if not self._sweeper.running:
            self._sweeper.start(self._sweep_interval, now=False)

    def stop(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        for c in self._clusters.values():
            c.close()

    def update(self, configs: Sequence[ClusterConfig]) -> ClusterSet:
        """
        Install a new set of cluster definitions.

        @return: the L{ClusterSet} that new streams should use; streams
            already running keep the set they started with.
        """
        new: dict[str, Cluster] = {}
        for cfg in configs:
            old = self._clusters.get(cfg.name)
            new[cfg.name] = (old if old is not None and old.config == cfg
                             else Cluster(cfg, self._reactor, writes=self._writes))
        for name, old in self._clusters.items():
            if new.get(name) is not old:
                old.close()
        self._clusters = new
        return ClusterSet(dict(new))

    def _sweep(self) -> None:
        now = self._reactor.seconds()
        for c in self._clusters.values():
            c.sweep(now)

    def clusters(self) -> list[Cluster]:
        return list(self._clusters.values())


class ClusterSet:
    """
    An immutable view: the clusters of one config version.
    """

    def __init__(self, clusters: dict[str, Cluster]):
        self._clusters = clusters

    def get(self, name: str) -> Cluster | None:
        """
        @return: the cluster called C{name}, or C{None}.
        """
        return self._clusters.get(name)

    def __iter__(self):
        return iter(self._clusters.values())
