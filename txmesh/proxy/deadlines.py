"""
Per-request deadlines without a reactor timer per request.

Every request arms a timeout (the route timeout, later per-try timeouts) and
almost every one is cancelled before it fires.  A C{callLater} per request
costs a C{DelayedCall} and a heap operation each way; L{DeadlineWheel} files
deadlines into buckets of C{resolution} seconds and keeps one reactor timer
for the earliest bucket, so arming and cancelling are a dict insert and a
dict delete.  Deadlines fire up to one C{resolution} late, never early.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any


class DeadlineWheel:
    """
    Deadlines grouped into ticks of C{resolution} seconds.
    """

    def __init__(self, clock: Any, resolution: float = 0.01):
        """
        @param clock: an C{IReactorTime}.
        @param resolution: bucket width in seconds; deadlines fire at most
            this much late.
        """
        self._clock = clock
        self._resolution = resolution
        self._buckets: dict[int, dict[object, Callable[[], None]]] = {}
        self._ticks: list[int] = []  # heap of the buckets' ticks
        self._timer: Any = None
        self._timer_tick = 0

    def add(self, key: object, delay: float, callback: Callable[[], None]) -> int:
        """
        Call C{callback()} once C{delay} seconds have passed, unless
        L{cancel} is called first.

        @param key: identifies the deadline (any hashable; one deadline per key).
        @return: a tick to pass to L{cancel}.
        """
        tick = math.ceil((self._clock.seconds() + delay) / self._resolution)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
            heapq.heappush(self._ticks, tick)
            if self._timer is None or tick < self._timer_tick:
                self._schedule(tick)
        bucket[key] = callback
        return tick

    def cancel(self, key: object, tick: int) -> None:
        """
        Forget the deadline of C{key} filed at C{tick}; unknown keys are ignored.
        """
        # Emptied buckets stay until their tick comes: re-arming the timer
        # for every request on an idle proxy would cost more than it saves.
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.pop(key, None)

    def stop(self) -> None:
        """
        Cancel the wheel's timer and forget every deadline.
        """
        self._buckets.clear()
        self._ticks.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def _schedule(self, tick: int) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_tick = tick
        delay = max(0.0, tick * self._resolution - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now_tick = math.floor(self._clock.seconds() / self._resolution + 1e-9)
        ticks = self._ticks
        while ticks and ticks[0] <= now_tick:
            bucket = self._buckets.pop(heapq.heappop(ticks), None)
            if bucket is None:
                continue  # emptied by cancel()
            for callback in list(bucket.values()):
                callback()
        if ticks and self._timer is None:
            self._schedule(ticks[0])
