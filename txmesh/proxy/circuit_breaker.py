"""
Circuit breaking: per-cluster limits on connections, pending requests and
requests in flight (Istio's C{connectionPool}, Envoy's C{circuit_breakers}).

Pure counters, no I/O.  A limit of 0 means unlimited.

How the caller answers an overflow (as Envoy does):

  - C{try_start_request} or C{try_add_pending} returning C{False} means the
    request must be answered at once, locally, with 503 and the response
    flag C{UO} (L{txmesh.proxy.stream.ResponseFlag.UPSTREAM_OVERFLOW}); it
    is not queued, and it is not retried against the same cluster: the
    breaker is open because the cluster is saturated, and waiting or
    retrying would only add load.
  - C{can_open_connection} returning C{False} is not an error by itself:
    the request waits for a connection to free up as a pending request
    (C{try_add_pending}), and only if the pending queue is full too is it
    answered 503 C{UO}.
  - C{connection_exhausted} returning C{True} means the connection must be
    closed after its current exchange instead of going back to the pool.

Every successful C{try_*} call must be matched by exactly one release
(C{finish_request}, C{remove_pending}), whatever the request's outcome,
or the breaker leaks capacity and ends up refusing everything.
"""

from __future__ import annotations

from typing import Any

from txmesh.config.model import CircuitBreakerConfig


class OverflowKind:
    """
    Which limit overflowed; the keys of L{CircuitBreaker.overflows}.
    """

    REQUESTS = "requests"
    PENDING = "pending"
    CONNECTIONS = "connections"


class CircuitBreaker:
    """
    The limits of one cluster and what currently counts against them.

    @ivar config: the limits.
    @ivar active_requests: requests in flight.
    @ivar pending_requests: requests waiting for a connection.
    @ivar overflows: by L{OverflowKind}, how often a limit refused something
        (Envoy's C{upstream_rq_overflow}/C{upstream_rq_pending_overflow}/
        C{upstream_cx_overflow}).
    """

    def __init__(self, config: CircuitBreakerConfig):
        self.config = config
        self.active_requests = 0
        self.pending_requests = 0
        self.overflows: dict[str, int] = {
            OverflowKind.REQUESTS: 0,
            OverflowKind.PENDING: 0,
            OverflowKind.CONNECTIONS: 0,
        }

    def try_start_request(self) -> bool:
        """
        Count a request in flight, if C{max_requests} allows.

        @return: C{False} if the limit is reached (answer 503 C{UO}); the
            request was then not counted.
        """
        limit = self.config.max_requests
        if limit and self.active_requests >= limit:
            self.overflows[OverflowKind.REQUESTS] += 1
            return False
        self.active_requests += 1
        return True

    def finish_request(self) -> None:
        """
        A request counted by L{try_start_request} ended (in any way).

        @raise RuntimeError: if no request is in flight (a release without
            a matching start is a bug in the caller).
        """
        if self.active_requests <= 0:
            raise RuntimeError("finish_request without a started request")
        self.active_requests -= 1

    def try_add_pending(self) -> bool:
        """
        Count a request waiting for a connection, if
        C{max_pending_requests} allows.

        @return: C{False} if the queue is full (answer 503 C{UO}); the
            request was then not counted.
        """
        limit = self.config.max_pending_requests
        if limit and self.pending_requests >= limit:
            self.overflows[OverflowKind.PENDING] += 1
            return False
        self.pending_requests += 1
        return True

    def remove_pending(self) -> None:
        """
        A request counted by L{try_add_pending} got its connection, failed
        or was cancelled.

        @raise RuntimeError: if no request is pending.
        """
        if self.pending_requests <= 0:
            raise RuntimeError("remove_pending without a pending request")
        self.pending_requests -= 1

    def can_open_connection(self, open_connections: int) -> bool:
        """
        @param open_connections: connections the cluster has open (or is
            opening) now, across its endpoints.
        @return: whether one more may be opened under C{max_connections};
            C{False} is counted as a connection overflow, and the request
            should wait as pending.
        """
        limit = self.config.max_connections
        if limit and open_connections >= limit:
            self.overflows[OverflowKind.CONNECTIONS] += 1
            return False
        return True

    def connection_exhausted(self, requests_served: int) -> bool:
        """
        @param requests_served: requests a connection has carried so far.
        @return: whether it has reached C{max_requests_per_connection} and
            must be closed rather than reused.
        """
        limit = self.config.max_requests_per_connection
        return bool(limit) and requests_served >= limit

    def remaining(self) -> dict[str, int | None]:
        """
        @return: how many more requests and pending requests the limits
            allow (C{None} for unlimited), as Envoy's C{remaining_rq} and
            C{remaining_pending} gauges.
        """
        config = self.config
        return {
            "remaining_rq": (max(config.max_requests - self.active_requests, 0)
                             if config.max_requests else None),
            "remaining_pending": (max(config.max_pending_requests - self.pending_requests, 0)
                                  if config.max_pending_requests else None),
        }

    def stats(self) -> dict[str, Any]:
        """
        @return: counters and gauges for the admin endpoints.
        """
        result: dict[str, Any] = {
            "rq_active": self.active_requests,
            "rq_pending_active": self.pending_requests,
            "upstream_rq_overflow": self.overflows[OverflowKind.REQUESTS],
            "upstream_rq_pending_overflow": self.overflows[OverflowKind.PENDING],
            "upstream_cx_overflow": self.overflows[OverflowKind.CONNECTIONS],
        }
        result.update(self.remaining())
        return result
