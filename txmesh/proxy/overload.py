"""
The overload manager (Envoy's name): the proxy watches its own memory and
how late its event loop runs, and sheds load before it falls over.

Two measures, each with two thresholds, give three states:

  - L{NORMAL}: nothing is shed;
  - L{SHED_REQUESTS}: new HTTP requests get a local C{503} with response
    flag C{OL} (and body C{overloaded}), and HTTP/1 responses close their
    connection (keep-alive is off);
  - L{REFUSE_CONNECTIONS}: new connections to HTTP listeners are also
    closed as soon as they are accepted.

The state is the highest one either measure calls for.  It ends with
hysteresis: only once every measure is below L{RECOVER_FRACTION} of that
state's thresholds, and C{cooldown} seconds after the last measurement that
called for it.

L{OverloadState} is the pure state machine: measurements in, state out, no
clock of its own.  L{OverloadManager} is the Twisted part: a C{LoopingCall}
on the injected reactor that measures the event-loop lag (how much later
than scheduled it runs) and the memory (from an injected reader,
L{rss_bytes} by default), feeds the state machine and tells subscribers
(the HTTP listeners) when the state changes.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable
from typing import Any
from weakref import WeakSet

import attrs
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from txmesh.config.model import OverloadConfig

log = Logger()

NORMAL = 0
SHED_REQUESTS = 1
REFUSE_CONNECTIONS = 2

STATE_NAMES = ("normal", "shedding_requests", "refusing_connections")
"""
Each state's name, by its number (as in C{/overload} and the logs).
"""

RECOVER_FRACTION = 0.9
"""
A state ends only once every measure is below this fraction of the
state's threshold (the hysteresis band).
"""

OVERLOADED_BODY = b"overloaded\n"
"""
The body of the C{503 OL} reply.
"""

# Buckets of the txmesh_event_loop_lag_seconds histogram (seconds).
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# The pure core


@attrs.frozen
class Thresholds:
    """
    One measure's two thresholds, in the measure's unit (bytes, seconds).

    @ivar shed_requests: from this value on, new requests are shed.
    @ivar refuse_connections: from this value on, new connections are
        refused too; at least C{shed_requests}.
    """

    shed_requests: float
    refuse_connections: float

    def __attrs_post_init__(self) -> None:
        if not self.shed_requests > 0:
            raise ValueError(f"shed_requests must be positive, not {self.shed_requests!r}")
        if self.refuse_connections < self.shed_requests:
            raise ValueError("refuse_connections must be at least shed_requests")

    def level(self, value: float, fraction: float = 1.0) -> int:
        """
        @param value: a measurement.
        @param fraction: scales both thresholds (L{RECOVER_FRACTION} to ask
            whether a state may go on).
        @return: the state C{value} calls for.
        """
        if value >= self.refuse_connections * fraction:
            return REFUSE_CONNECTIONS
        if value >= self.shed_requests * fraction:
            return SHED_REQUESTS
        return NORMAL


def thresholds_of(config: OverloadConfig) -> tuple[Thresholds | None, Thresholds | None]:
    """
    @return: the memory thresholds (bytes) and the event-loop lag
        thresholds (seconds) of C{config}; C{None} for a measure that never
        sheds load.
    """
    memory = None
    if config.memory_limit is not None:
        memory = Thresholds(config.memory_limit * config.memory_shed_requests,
                            config.memory_limit * config.memory_refuse_connections)
    lag = None
    if config.lag_shed_requests is not None:
        lag = Thresholds(config.lag_shed_requests, config.lag_refuse_connections)
    return memory, lag


class OverloadState:
    """
    The overload state machine, without I/O: feed it measurements with
    L{update}, it answers the state.

    A state holds while some measure is above L{RECOVER_FRACTION} of the
    state's threshold, and for C{cooldown} seconds after the last such
    measurement; a higher state starts at once.

    @ivar state: L{NORMAL}, L{SHED_REQUESTS} or L{REFUSE_CONNECTIONS}.
    """

    def __init__(self, memory: Thresholds | None, lag: Thresholds | None, cooldown: float,
                 recover_fraction: float = RECOVER_FRACTION):
        """
        @param memory: the memory thresholds, in bytes, or C{None}.
        @param lag: the event-loop lag thresholds, in seconds, or C{None}.
        @param cooldown: seconds a state outlives the last measurement that
            called for it.
        @param recover_fraction: the hysteresis band (see L{RECOVER_FRACTION}).
        """
        self.memory = memory
        self.lag = lag
        self.cooldown = cooldown
        self.recover_fraction = recover_fraction
        self.state = NORMAL
        # When each state (by number) was last called for; [0] is unused.
        self._called_for: list[float | None] = [None, None, None]

    @classmethod
    def from_config(cls, config: OverloadConfig) -> OverloadState:
        memory, lag = thresholds_of(config)
        return cls(memory, lag, config.cooldown)

    def update(self, now: float, memory: float | None, lag: float | None) -> int:
        """
        Take one round of measurements.

        @param now: the time of the measurements, in seconds.
        @param memory: the process's memory in bytes, or C{None} if unknown.
        @param lag: the event-loop lag in seconds, or C{None} if unknown.
        @return: the new state.
        """
        enter = stay = NORMAL
        for value, thresholds in ((memory, self.memory), (lag, self.lag)):
            if value is None or thresholds is None:
                continue
            enter = max(enter, thresholds.level(value))
            stay = max(stay, thresholds.level(value, self.recover_fraction))
        called_for = self._called_for
        for level in (SHED_REQUESTS, REFUSE_CONNECTIONS):
            if enter >= level or (self.state >= level and stay >= level):
                called_for[level] = now
        state = NORMAL
        for level in (REFUSE_CONNECTIONS, SHED_REQUESTS):
            since = called_for[level]
            if since is not None and now - since <= self.cooldown:
                state = level
                break
        self.state = state
        return state


# Measuring

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(path: str = "/proc/self/statm") -> int | None:
    """
    @return: the process's resident set size in bytes (Linux's
        C{/proc/self/statm}), or C{None} where it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


class _Normal:
    """
    The overload manager of a proxy without one: never overloaded.  The
    request path checks C{shed_requests} on whichever it has, so a proxy
    without an C{overload} section pays the same one attribute check.
    """

    state = NORMAL
    shed_requests = False
    refuse_connections = False


NEVER_OVERLOADED: Any = _Normal()


class OverloadManager:
    """
    Measures the process every C{interval} and keeps the overload state.

    Subscribers (L{subscribe}) are told each new state by a call to their
    C{overload_changed(state)} method; they are held weakly, so a listener
    that goes away needs no unsubscribing.

    @ivar state: the current state.
    @ivar shed_requests: the state is at least L{SHED_REQUESTS}.
    @ivar refuse_connections: the state is L{REFUSE_CONNECTIONS}.
    @ivar memory_bytes: the last memory measurement, or C{None}.
    @ivar lag_seconds: the last event-loop lag measurement.
    @ivar requests_shed: requests answered C{503 OL} so far.
    @ivar connections_refused: connections refused so far.
    @ivar lag_buckets: per-bucket (not cumulative) counts of lag
        measurements, by L{LAG_BUCKETS}, the last one C{+Inf}.
    """

    def __init__(self, config: OverloadConfig, clock: Any,
                 read_memory: Callable[[], int | None] = rss_bytes):
        """
        @param config: thresholds and timing.
        @param clock: the reactor's C{IReactorTime}.
        @param read_memory: returns the process's memory in bytes, or
            C{None} when it cannot tell.
        """
        self.config = config
        self._clock = clock
        self._read_memory = read_memory
        self._machine = OverloadState.from_config(config)
        self._subscribers: WeakSet = WeakSet()
        self._loop: LoopingCall | None = None
        self._last = 0.0
        self.state = NORMAL
        self.shed_requests = False
        self.refuse_connections = False
        self.changed_at: float | None = None
        self.memory_bytes: int | None = None
        self.lag_seconds = 0.0
        self.requests_shed = 0
        self.connections_refused = 0
        self.lag_buckets = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0
        self.lag_count = 0

    def start(self) -> None:
        """
        Measure every C{config.interval} seconds from now on.
        """
        if self._loop is not None:
            return
        self.memory_bytes = self._read_memory()
        if self.memory_bytes is None and self.config.memory_limit is not None:
            log.warn("overload: the process's memory cannot be read here; memory never sheds load")
        self._last = self._clock.seconds()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self.config.interval, now=False).addErrback(
            lambda f: log.failure("overload: measuring failed; the state stays {state}", f,
                                  state=STATE_NAMES[self.state]))

    def stop(self) -> None:
        """
        Stop measuring; the state stays as it is.
        """
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def subscribe(self, subscriber: Any) -> None:
        """
        Tell C{subscriber} the state now, and each time it changes.
        """
        self._subscribers.add(subscriber)
        subscriber.overload_changed(self.state)

    def count_shed_request(self) -> None:
        self.requests_shed += 1

    def count_refused_connection(self) -> None:
        self.connections_refused += 1

    def _tick(self) -> None:
        now = self._clock.seconds()
        lag = max(0.0, now - self._last - self.config.interval)
        self._last = now
        memory = self._read_memory()
        self.memory_bytes = memory
        self.lag_seconds = lag
        self.lag_buckets[bisect_left(LAG_BUCKETS, lag)] += 1
        self.lag_sum += lag
        self.lag_count += 1
        state = self._machine.update(now, memory, lag)
        if state != self.state:
            self._change(state, now, memory, lag)

    def _change(self, state: int, now: float, memory: int | None, lag: float) -> None:
        before = self.state
        self.state = state
        self.shed_requests = state >= SHED_REQUESTS
        self.refuse_connections = state >= REFUSE_CONNECTIONS
        self.changed_at = now
        if state > before:
            log.warn("overload: {state} (memory {memory} bytes, event-loop lag {lag:.3f}s)",
                     state=STATE_NAMES[state], memory=memory, lag=lag)
        else:
            log.info("overload: back to {state} (memory {memory} bytes, event-loop lag {lag:.3f}s)",
                     state=STATE_NAMES[state], memory=memory, lag=lag)
        for subscriber in list(self._subscribers):
            subscriber.overload_changed(state)

    def status(self) -> dict:
        """
        @return: what the admin endpoint's C{/overload} shows.
        """
        config = self.config
        memory, lag = thresholds_of(config)
        return {
            "state": self.state,
            "state_name": STATE_NAMES[self.state],
            "changed_at": self.changed_at,
            "memory_bytes": self.memory_bytes,
            "event_loop_lag_seconds": self.lag_seconds,
            "thresholds": {
                "memory_bytes": attrs.asdict(memory) if memory is not None else None,
                "event_loop_lag_seconds": attrs.asdict(lag) if lag is not None else None,
            },
            "interval_seconds": config.interval,
            "cooldown_seconds": config.cooldown,
            "shed": {"request": self.requests_shed, "connection": self.connections_refused},
        }
