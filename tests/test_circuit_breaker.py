"""
Tests for L{txmesh.proxy.circuit_breaker}: the per-cluster limits.
"""

from __future__ import annotations

from twisted.trial import unittest

from txmesh.config.model import CircuitBreakerConfig
from txmesh.proxy.circuit_breaker import CircuitBreaker, OverflowKind


class RequestLimitTests(unittest.TestCase):
    """
    C{max_requests}: requests in flight.
    """

    def test_limit_and_release(self) -> None:
        breaker = CircuitBreaker(CircuitBreakerConfig(max_requests=2))
        self.assertEqual([breaker.try_start_request() for _ in range(4)], [True, True, False, False])
        self.assertEqual(breaker.active_requests, 2)
        self.assertEqual(breaker.overflows[OverflowKind.REQUESTS], 2)
        breaker.finish_request()
        self.assertTrue(breaker.try_start_request())
        self.assertFalse(breaker.try_start_request())
        breaker.finish_request()
        breaker.finish_request()
        self.assertEqual(breaker.active_requests, 0)
        self.assertEqual(breaker.overflows[OverflowKind.REQUESTS], 3)

    def test_unlimited(self) -> None:
        breaker = CircuitBreaker(CircuitBreakerConfig())
        self.assertTrue(all(breaker.try_start_request() for _ in range(10_000)))
        self.assertTrue(all(breaker.try_add_pending() for _ in range(10_000)))
        self.assertTrue(breaker.can_open_connection(10_000))
        self.assertFalse(breaker.connection_exhausted(10_000))
        self.assertEqual(breaker.overflows, {"requests": 0, "pending": 0, "connections": 0})

    def test_unbalanced_release_is_an_error(self) -> None:
        breaker = CircuitBreaker(CircuitBreakerConfig(max_requests=1))
        self.assertRaises(RuntimeError, breaker.finish_request)
        self.assertRaises(RuntimeError, breaker.remove_pending)
        self.assertEqual((breaker.active_requests, breaker.pending_requests), (0, 0))


class PendingLimitTests(unittest.TestCase):
    """
    C{max_pending_requests}: requests waiting for a connection.
    """

    def test_limit_and_release(self) -> None:
        breaker = CircuitBreaker(CircuitBreakerConfig(max_pending_requests=1))
        self.assertTrue(breaker.try_add_pending())
        self.assertFalse(breaker.try_add_pending())
        self.assertEqual(breaker.overflows[OverflowKind.PENDING], 1)
        breaker.remove_pending()
        self.assertTrue(breaker.try_add_pending())
        self.assertEqual(breaker.pending_requests, 1)

    def test_independent_of_requests(self) -> None:
        breaker = CircuitBreaker(CircuitBreakerConfig(max_requests=1, max_pending_requests=2))
        self.assertTrue(breaker.try_start_request())
        self.assertFalse(breaker.try_start_request())
        self.assertTrue(breaker.try_add_pending())
        self.assertTrue(breaker.try_add_pending())
        self.assertFalse(breaker.try_add_pending())
        self.assertEqual(breaker.overflows, {"requests": 1, "pending": 1, "connections": 0})


class ConnectionLimitTests(unittest.TestCase):
    """
    C{max_connections} and C{max_requests_per_connection}.
    """

    def test_can_open_connection(self) -> None:
        breaker = CircuitBreaker(CircuitBreakerConfig(max_connections=3))
        # (open connections, may open one more)
        table = [(0, True), (2, True), (3, False), (7, False)]
        for open_connections, expected in table:
            self.assertEqual(breaker.can_open_connection(open_connections), expected, open_connections)
        self.assertEqual(breaker.overflows[OverflowKind.CONNECTIONS], 2)

    def test_connection_exhausted(self) -> None:
        table = [
            # (max_requests_per_connection, requests served, exhausted)
            (0, 0, False),
            (0, 1_000_000, False),
            (1, 0, False),
            (1, 1, True),
            (100, 99, False),
            (100, 100, True),
            (100, 101, True),
        ]
        for limit, served, expected in table:
            breaker = CircuitBreaker(CircuitBreakerConfig(max_requests_per_connection=limit))
            self.assertEqual(breaker.connection_exhausted(served), expected, (limit, served))


class StatsTests(unittest.TestCase):
    def test_stats(self) -> None:
        breaker = CircuitBreaker(CircuitBreakerConfig(max_requests=2, max_connections=1))
        breaker.try_start_request()
        breaker.try_start_request()
        breaker.try_start_request()
        breaker.try_add_pending()
        breaker.can_open_connection(1)
        self.assertEqual(breaker.stats(), {
            "rq_active": 2,
            "rq_pending_active": 1,
            "upstream_rq_overflow": 1,
            "upstream_rq_pending_overflow": 0,
            "upstream_cx_overflow": 1,
            "remaining_rq": 0,
            "remaining_pending": None,
        })
        breaker.finish_request()
        self.assertEqual(breaker.remaining(), {"remaining_rq": 1, "remaining_pending": None})
