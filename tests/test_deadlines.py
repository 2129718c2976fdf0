"""
L{DeadlineWheel}: deadlines fire once, never early, at most one tick late,
and cancelled ones never fire.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txmesh.proxy.deadlines import DeadlineWheel


class DeadlineWheelTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.wheel = DeadlineWheel(self.clock, resolution=0.01)
        self.fired = []

    def test_fires_not_early_and_within_a_tick(self):
        self.wheel.add("a", 1.0, lambda: self.fired.append(("a", self.clock.seconds())))
        self.clock.advance(0.995)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.02)
        self.assertEqual(len(self.fired), 1)
        self.assertGreaterEqual(self.fired[0][1], 1.0)
        self.assertLessEqual(self.fired[0][1], 1.0 + 0.0101 + 0.02)

    def test_cancelled_never_fires(self):
        tick = self.wheel.add("a", 0.5, lambda: self.fired.append("a"))
        self.wheel.add("b", 0.5, lambda: self.fired.append("b"))
        self.wheel.cancel("a", tick)
        self.clock.advance(1)
        self.assertEqual(self.fired, ["b"])

    def test_one_timer_for_many_deadlines(self):
        for i in range(1000):
            self.wheel.add(i, 5 + i * 0.001, lambda i=i: self.fired.append(i))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for _ in range(700):
            self.clock.advance(0.01)
        self.assertEqual(sorted(self.fired), list(range(1000)))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_earlier_deadline_reschedules(self):
        self.wheel.add("late", 10, lambda: self.fired.append("late"))
        self.wheel.add("early", 1, lambda: self.fired.append("early"))
        self.clock.advance(1.02)
        self.assertEqual(self.fired, ["early"])
        self.clock.advance(9)
        self.assertEqual(self.fired, ["early", "late"])

    def test_callback_may_add(self):
        def again():
            self.fired.append("first")
            self.wheel.add("second", 1, lambda: self.fired.append("second"))

        self.wheel.add("first", 1, again)
        self.clock.advance(1.01)
        self.clock.advance(1.01)
        self.assertEqual(self.fired, ["first", "second"])
        self.assertEqual(len(self.wheel), 0)

    def test_stop_cancels_timer(self):
        """
        L{DeadlineWheel.stop} leaves no timer behind (services call it when
        they stop) and forgets pending deadlines.
        """
        self.wheel.add("a", 1, lambda: self.fired.append("a"))
        self.wheel.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(2)
        self.assertEqual(self.fired, [])
        self.wheel.add("c", 1, lambda: self.fired.append("c"))
        self.clock.advance(1.01)
        self.assertEqual(self.fired, ["c"])
