"""
Tests for L{txmesh.proxy.outlier}: Envoy's consecutive-error outlier
detection, driven with fake time (a L{Clock} where a sweep loop is needed).
"""

from __future__ import annotations

from twisted.internet.task import Clock, LoopingCall
from twisted.trial import unittest

from txmesh.config.model import Endpoint, OutlierDetectionConfig
from txmesh.proxy.outlier import EjectionKind, OutlierDetector

A = Endpoint("10.0.0.1", 80)
B = Endpoint("10.0.0.2", 80)
C = Endpoint("10.0.0.3", 80)
HOSTS = [Endpoint(f"10.0.1.{i}", 80) for i in range(10)]


def config(**kw) -> OutlierDetectionConfig:
    values = {"consecutive_5xx": 3, "consecutive_gateway_errors": 0, "interval": 10.0,
              "base_ejection_time": 30.0, "max_ejection_percent": 100}
    values.update(kw)
    return OutlierDetectionConfig(**values)


def feed(detector: OutlierDetector, endpoint: Endpoint, statuses, now: float = 0.0) -> list[bool]:
    return [detector.record_result(endpoint, s, now) for s in statuses]


class ConsecutiveErrorTests(unittest.TestCase):
    """
    Which results count, which reset, and when a run ejects.
    """

    # (name, config overrides, statuses, index of the ejecting result or None)
    TABLE = [
        ("three 5xx eject", {}, [500, 500, 500], 2),
        ("two 5xx do not", {}, [500, 500], None),
        ("any 5xx counts", {}, [500, 501, 599], 2),
        ("a reset counts as 5xx", {}, [None, 500, None], 2),
        ("2xx resets", {}, [500, 500, 200, 500, 500], None),
        ("3xx resets", {}, [500, 500, 302, 500, 500, 500], 5),
        ("4xx resets", {}, [500, 500, 404, 500, 500], None),
        ("5xx disabled", {"consecutive_5xx": 0}, [500] * 20, None),
        ("gateway errors", {"consecutive_5xx": 0, "consecutive_gateway_errors": 3}, [502, 503, 504], 2),
        ("resets are gateway errors", {"consecutive_5xx": 0, "consecutive_gateway_errors": 2}, [None, None], 1),
        ("other 5xx break a gateway run",
         {"consecutive_5xx": 0, "consecutive_gateway_errors": 3}, [502, 503, 500, 504, 502], None),
        ("2xx breaks a gateway run",
         {"consecutive_5xx": 0, "consecutive_gateway_errors": 2}, [503, 200, 503], None),
        ("gateway threshold first",
         {"consecutive_5xx": 5, "consecutive_gateway_errors": 2}, [500, 503, 503], 2),
        ("5xx threshold counts gateway errors too",
         {"consecutive_5xx": 3, "consecutive_gateway_errors": 5}, [503, 500, 503], 2),
        ("threshold of one", {"consecutive_5xx": 1}, [200, 500], 1),
    ]

    def test_table(self) -> None:
        for name, overrides, statuses, ejecting in self.TABLE:
            detector = OutlierDetector(config(**overrides), [A])
            results = feed(detector, A, statuses)
            expected = [i == ejecting for i in range(len(statuses))]
            self.assertEqual(results, expected, name)
            self.assertEqual(detector.is_ejected(A, 0.0), ejecting is not None, name)
            self.assertEqual(detector.ejected_count, int(ejecting is not None), name)

    def test_kind_recorded(self) -> None:
        detector = OutlierDetector(config(consecutive_5xx=5, consecutive_gateway_errors=2), [A, B])
        feed(detector, A, [503, 502])
        feed(detector, B, [500] * 5)
        self.assertEqual(detector.host_state(A).last_ejection_kind, EjectionKind.CONSECUTIVE_GATEWAY_FAILURE)
        self.assertEqual(detector.host_state(B).last_ejection_kind, EjectionKind.CONSECUTIVE_5XX)
        stats = detector.stats()
        self.assertEqual(stats["ejections_enforced_consecutive_gateway_failure"], 1)
        self.assertEqual(stats["ejections_enforced_consecutive_5xx"], 1)
        self.assertEqual(stats["ejections_enforced_total"], 2)
        self.assertEqual(stats["ejections_active"], 2)

    def test_hosts_counted_separately(self) -> None:
        detector = OutlierDetector(config(), [A, B])
        self.assertEqual(feed(detector, A, [500, 500]), [False, False])
        self.assertEqual(feed(detector, B, [500, 500]), [False, False])
        self.assertTrue(detector.record_result(A, 500, 0.0))
        self.assertFalse(detector.is_ejected(B, 0.0))

    def test_unknown_endpoint_ignored(self) -> None:
        detector = OutlierDetector(config(consecutive_5xx=1), [A])
        self.assertFalse(detector.record_result(B, 500, 0.0))
        self.assertFalse(detector.is_ejected(B, 0.0))

    def test_results_while_ejected_ignored(self) -> None:
        """
        Late results of requests that were in flight at the ejection neither
        eject again nor carry over to the host's return.
        """
        detector = OutlierDetector(config(), [A])
        feed(detector, A, [500, 500, 500])
        self.assertEqual(feed(detector, A, [500] * 5, now=1.0), [False] * 5)
        self.assertEqual(detector.host_state(A).times_ejected, 1)
        detector.sweep(30.0)
        self.assertEqual(feed(detector, A, [500, 500], now=31.0), [False, False])
        self.assertTrue(detector.record_result(A, 500, 31.0))


class MaxEjectionPercentTests(unittest.TestCase):
    """
    Envoy ejects only while C{(ejected + 1) / hosts * 100 <= max_ejection_percent}.
    """

    def eject_all(self, detector: OutlierDetector, hosts) -> list[bool]:
        return [feed(detector, h, [500, 500, 500])[-1] for h in hosts]

    def test_table(self) -> None:
        # (hosts, max_ejection_percent, how many of them end up ejected)
        table = [
            (10, 20, 2),
            (10, 10, 1),
            (10, 0, 0),
            (10, 100, 10),
            (3, 10, 0),      # Istio's default 10% ejects nothing in a small cluster
            (3, 34, 1),
            (3, 66, 1),      # 2/3 is 66.7% > 66
            (3, 67, 2),
            (1, 100, 1),     # a single host can be ejected when 100% is allowed
            (1, 99, 0),
            (2, 50, 1),
            (4, 150, 4),     # above 100 means 100
        ]
        for count, percent, ejected in table:
            hosts = HOSTS[:count]
            detector = OutlierDetector(config(max_ejection_percent=percent), hosts)
            results = self.eject_all(detector, hosts)
            self.assertEqual(results, [True] * ejected + [False] * (count - ejected), (count, percent))
            self.assertEqual(detector.ejected_count, ejected)
            self.assertEqual(detector.stats()["ejections_overflow"], count - ejected)
            self.assertEqual(detector.stats()["ejections_detected_consecutive_5xx"], count)

    def test_always_eject_one_host(self) -> None:
        hosts = [A, B, C]
        detector = OutlierDetector(config(max_ejection_percent=10), hosts, always_eject_one_host=True)
        self.assertEqual(self.eject_all(detector, hosts), [True, False, False])

    def test_room_frees_at_sweep(self) -> None:
        detector = OutlierDetector(config(max_ejection_percent=50), [A, B])
        self.assertEqual(self.eject_all(detector, [A, B]), [True, False])
        detector.sweep(30.0)
        self.assertTrue(feed(detector, B, [500, 500, 500], now=30.0)[-1])

    def test_overflow_needs_a_new_run(self) -> None:
        """
        As in Envoy, the counter that fired starts again after an ejection
        that overflowed: the host is tried again after another full run.
        """
        detector = OutlierDetector(config(max_ejection_percent=50), [A, B])
        feed(detector, A, [500, 500, 500])
        self.assertEqual(feed(detector, B, [500, 500, 500]), [False, False, False])
        self.assertEqual(detector.host_state(B).consecutive_5xx, 0)
        detector.sweep(30.0)
        self.assertEqual(feed(detector, B, [500, 500, 500], now=30.0), [False, False, True])


class EjectionTimeTests(unittest.TestCase):
    """
    How long ejections last, and how the multiplier decays.
    """

    def test_duration_grows_with_repeats(self) -> None:
        detector = OutlierDetector(config(base_ejection_time=30.0), [A])
        now = 0.0
        for n in (1, 2, 3, 4):
            self.assertTrue(feed(detector, A, [500] * 3, now=now)[-1])
            until = detector.host_state(A).ejected_until
            self.assertEqual(until - now, 30.0 * n)
            self.assertTrue(detector.is_ejected(A, until - 0.001))
            self.assertEqual(detector.sweep(until - 0.001), [])
            self.assertEqual(detector.sweep(until), [A])
            now = until  # fails again at once: no decay

    def test_capped(self) -> None:
        detector = OutlierDetector(config(base_ejection_time=100.0), [A], max_ejection_time=300.0)
        durations = []
        now = 0.0
        for _ in range(6):
            feed(detector, A, [500] * 3, now=now)
            until = detector.host_state(A).ejected_until
            durations.append(until - now)
            detector.sweep(until)
            now = until
        self.assertEqual(durations, [100.0, 200.0, 300.0, 300.0, 300.0, 300.0])
        # The multiplier stops growing at the cap, so decay starts from there.
        self.assertEqual(detector.host_state(A).multiplier, 3)

    def test_cap_never_below_base(self) -> None:
        detector = OutlierDetector(config(base_ejection_time=600.0), [A], max_ejection_time=300.0)
        feed(detector, A, [500] * 3)
        self.assertEqual(detector.host_state(A).ejected_until, 600.0)

    def test_is_ejected_follows_time(self) -> None:
        """
        Traffic comes back when the time is up even if the sweep is late;
        the sweep makes it official.
        """
        detector = OutlierDetector(config(), [A])
        feed(detector, A, [500] * 3, now=5.0)
        self.assertTrue(detector.is_ejected(A, 34.9))
        self.assertFalse(detector.is_ejected(A, 35.0))
        self.assertEqual(detector.ejected_count, 1)
        self.assertEqual(detector.sweep(40.0), [A])
        self.assertEqual(detector.ejected_count, 0)

    def test_multiplier_decays_while_healthy(self) -> None:
        clock = Clock()
        detector = OutlierDetector(config(interval=10.0, base_ejection_time=30.0), [A])
        sweeper = LoopingCall(lambda: detector.sweep(clock.seconds()))
        sweeper.clock = clock
        sweeper.start(10.0, now=False)
        self.addCleanup(sweeper.stop)

        def fail() -> float:
            feed(detector, A, [500] * 3, now=clock.seconds())
            return detector.host_state(A).ejected_until - clock.seconds()

        self.assertEqual(fail(), 30.0)
        clock.advance(30.0)                  # swept back at t=30
        self.assertFalse(detector.host_state(A).ejected)
        self.assertEqual(fail(), 60.0)       # second in a row
        clock.advance(60.0)                  # back at t=90
        self.assertEqual(detector.host_state(A).multiplier, 2)
        clock.advance(10.0)                  # healthy for an interval
        self.assertEqual(detector.host_state(A).multiplier, 1)
        self.assertEqual(fail(), 60.0)       # multiplier 1 + 1
        clock.advance(60.0)                  # back at t=160, multiplier 2
        clock.pump([10.0] * 2)               # healthy long enough to forget
        self.assertEqual(detector.host_state(A).multiplier, 0)
        self.assertEqual(fail(), 30.0)

    def test_no_decay_at_the_sweep_that_returns(self) -> None:
        detector = OutlierDetector(config(interval=10.0), [A])
        feed(detector, A, [500] * 3)
        detector.sweep(30.0)
        self.assertEqual(detector.host_state(A).multiplier, 1)
        detector.sweep(35.0)
        self.assertEqual(detector.host_state(A).multiplier, 1)
        detector.sweep(40.0)
        self.assertEqual(detector.host_state(A).multiplier, 0)

    def test_fractional_intervals(self) -> None:
        """
        Sums of float intervals do not make a due sweep look early.
        """
        detector = OutlierDetector(config(interval=0.1, base_ejection_time=0.3), [A])
        clock = Clock()
        feed(detector, A, [500] * 3, now=clock.seconds())
        for _ in range(3):
            clock.advance(0.1)
        self.assertEqual(detector.sweep(clock.seconds()), [A])


class EventTests(unittest.TestCase):
    """
    Callers learn of ejections and returns.
    """

    def test_on_change_and_sweep(self) -> None:
        events = []
        detector = OutlierDetector(config(), [A, B, C], on_change=lambda ep, ejected: events.append((ep, ejected)))
        feed(detector, A, [500] * 3, now=0.0)
        feed(detector, B, [None] * 3, now=5.0)
        self.assertEqual(events, [(A, True), (B, True)])
        self.assertEqual(detector.sweep(10.0), [])
        self.assertEqual(detector.sweep(30.0), [A])
        self.assertEqual(detector.sweep(40.0), [B])
        self.assertEqual(events, [(A, True), (B, True), (A, False), (B, False)])
        self.assertEqual(detector.ejected_count, 0)

    def test_sweep_resets_counters(self) -> None:
        detector = OutlierDetector(config(), [A])
        feed(detector, A, [500] * 3)
        detector.host_state(A).consecutive_5xx = 2  # as if results raced the ejection
        detector.sweep(30.0)
        self.assertEqual(detector.host_state(A).consecutive_5xx, 0)

    def test_stats(self) -> None:
        detector = OutlierDetector(config(), [A, B])
        feed(detector, A, [500] * 3, now=1.0)
        feed(detector, B, [500])
        stats = detector.stats()
        self.assertEqual(stats["ejections_active"], 1)
        self.assertEqual(stats["hosts"]["10.0.0.1:80"]["ejected"], True)
        self.assertEqual(stats["hosts"]["10.0.0.1:80"]["ejected_until"], 31.0)
        self.assertEqual(stats["hosts"]["10.0.0.1:80"]["times_ejected"], 1)
        self.assertEqual(stats["hosts"]["10.0.0.2:80"]["consecutive_5xx"], 1)
        self.assertEqual(stats["hosts"]["10.0.0.2:80"]["ejected_until"], None)

    def test_update_endpoints(self) -> None:
        detector = OutlierDetector(config(), [A, B])
        feed(detector, A, [500] * 3)
        feed(detector, B, [500] * 2)
        detector.update_endpoints([A, C])
        self.assertEqual(detector.endpoints, (A, C))
        self.assertTrue(detector.is_ejected(A, 1.0))
        self.assertEqual(detector.ejected_count, 1)
        self.assertIsNone(detector.host_state(B))
        detector.update_endpoints([B, C])
        self.assertEqual(detector.ejected_count, 0)
        self.assertEqual(detector.host_state(B).consecutive_5xx, 0)
