"""
The C{fault} filter (L{txmesh.filters.fault}): delays held for exactly their
time on an injected clock, aborts with Envoy's flags, the gRPC abort shape,
percentages, the listener-level default, config errors and clean
cancellation when the stream ends during a delay.
"""

from __future__ import annotations

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txmesh.config.errors import FilterConfigError
from txmesh.config.model import FaultPolicy, Route, RouteMatch
from txmesh.filters.fault import FaultFactory
from txmesh.testing import FilterHarness


def _route(fault: FaultPolicy | None = None, **kw) -> Route:
    return Route(name="r", match=RouteMatch(), cluster="test", fault=fault, **kw)


class FaultFilterTests(SynchronousTestCase):
    def harness(self, fault: FaultPolicy | None = None, config: dict | None = None, seed: int = 7,
                **route_kw) -> FilterHarness:
        self.clock = Clock()
        factory = FaultFactory(random.Random(seed))
        return FilterHarness([(factory, config or {})], route=_route(fault, **route_kw), clock=self.clock)

    def test_no_fault_passes(self):
        """
        A route without a fault and no listener default: the request goes
        straight upstream, untouched and unflagged.
        """
        h = self.harness()
        r = h.request("GET", "/")
        self.assertEqual(r.status, 200)
        self.assertIsNotNone(r.upstream_request)
        self.assertEqual(r.flags, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_delay_holds_exactly(self):
        """
        A delayed request reaches the upstream when the configured time has
        passed, and not a moment before; the stream carries C{DI}.
        """
        h = self.harness(FaultPolicy(delay=2.0, delay_percent=100))
        r = h.request("GET", "/")
        self.assertEqual(r.flags, ["DI"])
        self.assertFalse(r.complete)
        self.clock.advance(2.0 - 0.001)
        self.assertEqual(h.upstream.requests, [])
        self.assertFalse(r.complete)
        self.clock.advance(0.001)
        self.assertEqual(self.clock.seconds(), 2.0)
        self.assertEqual(len(h.upstream.requests), 1)
        self.assertEqual(r.status, 200)
        self.assertTrue(r.complete)
        self.assertEqual(r.headers.get("x-txmesh-flags"), b"DI")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_delay_holds_body(self):
        """
        The request body waits behind the delayed head and reaches the
        upstream whole, in order.
        """
        h = self.harness(FaultPolicy(delay=1.0, delay_percent=100))
        stream, r = h.start("POST", "/upload", end_stream=False)
        stream.request_data(b"hello ", False)
        stream.request_data(b"world", True)
        self.assertEqual(h.upstream.requests, [])
        self.clock.advance(1.0)
        self.assertEqual(r.upstream_request.body, b"hello world")
        self.assertEqual(r.status, 200)

    def test_abort(self):
        """
        An abort answers locally with the configured status and Envoy's
        C{FI} flag; the upstream never sees the request.
        """
        h = self.harness(FaultPolicy(abort_status=503, abort_percent=100))
        r = h.request("GET", "/")
        self.assertEqual(r.status, 503)
        self.assertEqual(r.body, b"fault filter abort")
        self.assertEqual(r.flags, ["FI"])
        self.assertEqual(r.headers.get("x-txmesh-flags"), b"FI")
        self.assertIsNone(r.upstream_request)
        self.assertTrue(r.complete)

    def test_delay_then_abort(self):
        """
        With both faults, the abort comes after the delay (as in Envoy), and
        the stream carries both flags.
        """
        h = self.harness(FaultPolicy(delay=0.5, delay_percent=100, abort_status=429, abort_percent=100))
        r = h.request("GET", "/")
        self.assertEqual(r.status, 0)
        self.clock.advance(0.5)
        self.assertEqual(r.status, 429)
        self.assertEqual(r.flags, ["DI", "FI"])
        self.assertEqual(h.upstream.requests, [])

    def test_grpc_abort(self):
        """
        A gRPC abort is a trailers-only response: HTTP 200 with no body, the
        gRPC content type, and the status and message in the headers.
        """
        h = self.harness(FaultPolicy(abort_grpc_status=14, abort_percent=100))
        r = h.request("POST", "/pkg.Service/Method", headers={"content-type": "application/grpc"}, body=b"\0\0\0\0\0")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers.get_all("content-type"), [b"application/grpc"])
        self.assertEqual(r.headers.get("grpc-status"), b"14")
        self.assertEqual(r.headers.get("grpc-message"), b"fault filter abort")
        self.assertEqual(r.body, b"")
        self.assertTrue(r.complete)
        self.assertEqual(r.flags, ["FI"])
        self.assertIsNone(r.upstream_request)

    def test_percentages(self):
        """
        Over 10,000 requests the shares delayed and aborted are within two
        points of the configured percents, the two coins independent.
        """
        n = 10_000
        h = self.harness(FaultPolicy(delay=1.0, delay_percent=10, abort_status=503, abort_percent=25), seed=2024)
        responses = [h.request("GET", "/") for _ in range(n)]
        self.clock.advance(1.0)
        delayed = sum("DI" in r.flags for r in responses)
        aborted = sum(r.status == 503 for r in responses)
        both = sum(r.flags == ["DI", "FI"] for r in responses)
        self.assertTrue(all(r.complete for r in responses))
        self.assertEqual(sum(r.flags.count("FI") for r in responses), aborted)
        self.assertEqual(len(h.upstream.requests), n - aborted)
        self.assertApproximates(delayed * 100 / n, 10, 2)
        self.assertApproximates(aborted * 100 / n, 25, 2)
        self.assertApproximates(both * 100 / n, 2.5, 2)

    def test_zero_and_full_percent(self):
        """
        0% never injects and 100% always does.
        """
        h = self.harness(FaultPolicy(abort_status=500, abort_percent=0))
        self.assertTrue(all(h.request("GET", "/").status == 200 for _ in range(1000)))
        h = self.harness(FaultPolicy(abort_status=500, abort_percent=100))
        self.assertTrue(all(h.request("GET", "/").status == 500 for _ in range(1000)))

    def test_listener_default(self):
        """
        The listener-level config applies to routes without a fault of
        their own; its percents default to 100.
        """
        h = self.harness(config={"delay": "250ms", "abort_status": 429})
        r = h.request("GET", "/")
        self.clock.advance(0.249)
        self.assertEqual(r.status, 0)
        self.clock.advance(0.001)
        self.assertEqual(r.status, 429)
        self.assertEqual(r.flags, ["DI", "FI"])

    def test_route_fault_wins(self):
        """
        A route's own fault replaces the listener-level default entirely.
        """
        h = self.harness(FaultPolicy(abort_status=503, abort_percent=100),
                         config={"delay": 5, "abort_status": 429})
        r = h.request("GET", "/")
        self.assertEqual(r.status, 503)
        self.assertEqual(r.flags, ["FI"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_route_disables_filter(self):
        """
        A route that turns the filter off (C{filter_overrides} to C{None})
        is not faulted by the listener default.
        """
        h = self.harness(config={"abort_status": 503}, filter_overrides=(("fault", None),))
        self.assertEqual(h.request("GET", "/").status, 200)

    def test_parse_config(self):
        factory = FaultFactory(random.Random(0))
        self.assertIsNone(factory.parse_config({}))
        self.assertEqual(
            factory.parse_config({"delay": "1.5s", "delay_percent": 12.5, "abort_status": 503, "abort_percent": 1}),
            FaultPolicy(delay=1.5, delay_percent=12.5, abort_status=503, abort_percent=1.0),
        )
        self.assertEqual(factory.parse_config({"abort_grpc_status": 14}),
                         FaultPolicy(abort_grpc_status=14, abort_percent=100.0))

    def test_config_errors(self):
        """
        Invalid config is refused with a L{FilterConfigError} naming the field.
        """
        factory = FaultFactory(random.Random(0))
        cases = [
            ({"delays": "1s"}, "delays"),
            ({"delay": "soon"}, "delay"),
            ({"delay": -1}, "delay"),
            ({"delay": 0}, "delay"),
            ({"delay": "1s", "delay_percent": 150}, "delay_percent"),
            ({"delay": "1s", "delay_percent": -1}, "delay_percent"),
            ({"delay": "1s", "delay_percent": "ten"}, "delay_percent"),
            ({"delay": "1s", "delay_percent": True}, "delay_percent"),
            ({"delay": "1s", "delay_percent": float("nan")}, "delay_percent"),
            ({"delay_percent": 10}, "delay_percent"),
            ({"abort_status": 99}, "abort_status"),
            ({"abort_status": 600}, "abort_status"),
            ({"abort_status": "503"}, "abort_status"),
            ({"abort_status": True}, "abort_status"),
            ({"abort_status": 503, "abort_percent": 101}, "abort_percent"),
            ({"abort_percent": 10}, "abort_percent"),
            ({"abort_grpc_status": 17}, "abort_grpc_status"),
            ({"abort_grpc_status": 0}, "abort_grpc_status"),
            ({"abort_status": 503, "abort_grpc_status": 14}, "abort_grpc_status"),
        ]
        for raw, field in cases:
            e = self.assertRaises(FilterConfigError, factory.parse_config, raw)
            self.assertEqual(e.field, field, raw)
            self.assertTrue(e.reason, raw)

    def test_config_errors_reach_the_harness(self):
        self.assertRaises(FilterConfigError, FilterHarness, [(FaultFactory(), {"abort_status": 42})])

    def test_downstream_reset_cancels_delay(self):
        """
        The client going away during a delay cancels the timer: nothing is
        left pending on the clock, nothing reaches the upstream, and no
        error is logged.
        """
        h = self.harness(FaultPolicy(delay=3.0, delay_percent=100))
        stream, r = h.start("GET", "/")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        stream.downstream_reset()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(h.upstream.requests, [])
        self.assertEqual(r.flags, ["DI", "DC"])
        self.assertEqual(r.status, 0)

    def test_stream_reset_cancels_delay(self):
        """
        A stream reset by the proxy during a delay cancels the timer too.
        """
        h = self.harness(FaultPolicy(delay=3.0, delay_percent=100))
        stream, r = h.start("GET", "/")
        stream.reset()
        self.assertTrue(r.reset)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(h.upstream.requests, [])

    def test_default_random(self):
        """
        Without an injected generator, each factory gets its own, seeded
        from C{os.urandom}.
        """
        a, b = FaultFactory(), FaultFactory()
        self.assertIsInstance(a.rng, random.Random)
        self.assertNotEqual([a.rng.random() for _ in range(4)], [b.rng.random() for _ in range(4)])

    def test_registered_as_plugin(self):
        from txmesh.filters.registry import FilterRegistry

        factory = FilterRegistry.from_plugins().http("fault")
        self.assertIsInstance(factory, FaultFactory)
