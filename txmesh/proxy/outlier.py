"""
Outlier detection: passive health checking from the results of real
requests, with Envoy's semantics (Istio's C{outlierDetection}).

Pure: no reactor, no clock.  The caller passes the time in (C{now}, in
seconds, from its C{IReactorTime}), reports every upstream result with
L{OutlierDetector.record_result}, asks L{OutlierDetector.is_ejected} when
load balancing, and calls L{OutlierDetector.sweep} every
C{config.interval} seconds.

Semantics, as Envoy's C{Upstream::Outlier::DetectorImpl} (with
C{split_external_local_origin_errors} off, its default):

  - a reset or connect failure (status C{None}) counts as a 5xx and as a
    gateway error, as Envoy maps local-origin errors to 503;
  - a 5xx adds to C{consecutive_5xx}; a 502/503/504 also adds to
    C{consecutive_gateway_errors}, any other 5xx resets that counter;
    anything below 500 resets both;
  - reaching a threshold ejects the host at once if
    C{(ejected + 1) / hosts * 100 <= max_ejection_percent}; either way the
    counter that fired starts again from zero, so a host whose ejection
    overflowed is tried again after another full run of errors;
  - the n-th ejection in a row lasts C{base_ejection_time * n}, capped at
    C{max_ejection_time}; the multiplier goes down by one at every sweep
    that finds the host in service for at least an interval, so a host
    that recovered for good is soon back to short ejections;
  - hosts come back only at a sweep (which also resets their counters), but
    L{OutlierDetector.is_ejected} already answers C{False} once the
    ejection time has passed, so a late sweep does not keep a host out.
    Results reported for a host that is still ejected are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

from txmesh.config.model import Endpoint, OutlierDetectionConfig

GATEWAY_ERRORS = frozenset({502, 503, 504})

DEFAULT_MAX_EJECTION_TIME = 300.0
"""
Seconds; Envoy's default C{max_ejection_time}.
"""

# Float sums of intervals (0.1 + 0.2 ...) must not make a sweep that is due
# look early.
_EPSILON = 1e-9


class EjectionKind:
    """
    Why a host was ejected; the names are Envoy's stat suffixes.
    """

    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"


@attrs.define
class HostOutlierState:
    """
    What the detector knows about one host.

    @ivar consecutive_5xx: 5xx results (and resets) in a row.
    @ivar consecutive_gateway_errors: 502/503/504 results (and resets) in a row.
    @ivar ejected: whether the host is out of the load balancing set (until
        a sweep brings it back; see L{OutlierDetector.is_ejected}).
    @ivar ejected_until: when the current ejection ends.
    @ivar multiplier: the current ejection lasts this many base ejection
        times (Envoy's C{eject_time_backoff}).
    @ivar times_ejected: ejections over the host's lifetime.
    @ivar last_ejection_kind: an L{EjectionKind} value, or C{None}.
    @ivar last_unejected_at: when the last ejection ended, or C{None}.
    """

    consecutive_5xx: int = 0
    consecutive_gateway_errors: int = 0
    ejected: bool = False
    ejected_at: float = 0.0
    ejected_until: float = 0.0
    multiplier: int = 0
    times_ejected: int = 0
    last_ejection_kind: str | None = None
    last_unejected_at: float | None = None

    def reset_counters(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway_errors = 0


class OutlierDetector:
    """
    Ejects the hosts of one cluster that fail in a row, for a while.

    @ivar config: the L{OutlierDetectionConfig} in force.
    """

    def __init__(
        self,
        config: OutlierDetectionConfig,
        endpoints: Iterable[Endpoint],
        on_change: Callable[[Endpoint, bool], None] | None = None,
        max_ejection_time: float = DEFAULT_MAX_EJECTION_TIME,
        always_eject_one_host: bool = False,
    ):
        """
        @param config: thresholds and times.
        @param endpoints: the cluster's hosts.
        @param on_change: called with C{(endpoint, True)} when a host is
            ejected and C{(endpoint, False)} when it comes back, in addition
            to the return values of L{record_result} and L{sweep}.
        @param max_ejection_time: seconds; no ejection lasts longer (but
            never shorter than C{config.base_ejection_time}).
        @param always_eject_one_host: allow one ejection even when
            C{max_ejection_percent} would not (Envoy's option of that name).
        """
        self.config = config
        self._on_change = on_change
        self._max_ejection_time = max(max_ejection_time, config.base_ejection_time)
        self._always_eject_one = always_eject_one_host
        self._hosts: dict[Endpoint, HostOutlierState] = {ep: HostOutlierState() for ep in endpoints}
        self._ejected = 0
        self._stats: dict[str, int] = {
            "ejections_enforced_total": 0,
            "ejections_overflow": 0,
            "ejections_detected_" + EjectionKind.CONSECUTIVE_5XX: 0,
            "ejections_enforced_" + EjectionKind.CONSECUTIVE_5XX: 0,
            "ejections_detected_" + EjectionKind.CONSECUTIVE_GATEWAY_FAILURE: 0,
            "ejections_enforced_" + EjectionKind.CONSECUTIVE_GATEWAY_FAILURE: 0,
        }

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._hosts)

    def update_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """
        Follow a change of the cluster's hosts: hosts that stay keep their
        state (an ejected host stays ejected), new hosts start clean.
        No change events are sent for removed hosts.
        """
        old = self._hosts
        self._hosts = {ep: old.get(ep) or HostOutlierState() for ep in endpoints}
        self._ejected = sum(1 for s in self._hosts.values() if s.ejected)

    @property
    def ejected_count(self) -> int:
        """
        Hosts currently ejected (as of the last L{record_result} or L{sweep}).
        """
        return self._ejected

    def host_state(self, endpoint: Endpoint) -> HostOutlierState | None:
        """
        @return: the detector's state of C{endpoint} (to read, not to
            change), or C{None} for an unknown host.
        """
        return self._hosts.get(endpoint)

    def is_ejected(self, endpoint: Endpoint, now: float) -> bool:
        """
        @return: whether C{endpoint} must not be picked at C{now}.
        """
        state = self._hosts.get(endpoint)
        return state is not None and state.ejected and now < state.ejected_until

    def record_result(self, endpoint: Endpoint, status: int | None, now: float) -> bool:
        """
        Account for the outcome of one request to C{endpoint}.

        @param status: the response status, or C{None} for a connect
            failure, a reset or a timeout before a response.
        @param now: the current time, in seconds.
        @return: C{True} if this result ejected the host.
        """
        state = self._hosts.get(endpoint)
        if state is None or state.ejected:
            return False
        config = self.config
        if status is not None and status < 500:
            state.consecutive_5xx = 0
            state.consecutive_gateway_errors = 0
            return False
        # Envoy checks the gateway-error counter first.
        if status is None or status in GATEWAY_ERRORS:
            state.consecutive_gateway_errors += 1
            threshold = config.consecutive_gateway_errors
            if threshold > 0 and state.consecutive_gateway_errors >= threshold:
                state.consecutive_gateway_errors = 0
                if self._try_eject(endpoint, state, EjectionKind.CONSECUTIVE_GATEWAY_FAILURE, now):
                    return True
        else:
            state.consecutive_gateway_errors = 0
        state.consecutive_5xx += 1
        threshold = config.consecutive_5xx
        if threshold > 0 and state.consecutive_5xx >= threshold:
            state.consecutive_5xx = 0
            return self._try_eject(endpoint, state, EjectionKind.CONSECUTIVE_5XX, now)
        return False

    def _try_eject(self, endpoint: Endpoint, state: HostOutlierState, kind: str, now: float) -> bool:
        stats = self._stats
        stats["ejections_detected_" + kind] += 1
        total = len(self._hosts)
        percent = 100.0 * (self._ejected + 1) / total
        if percent > min(self.config.max_ejection_percent, 100) and not (self._always_eject_one and
                                                                         self._ejected == 0):
            stats["ejections_overflow"] += 1
            return False
        base = self.config.base_ejection_time
        if state.multiplier * base < self._max_ejection_time:
            state.multiplier += 1
        state.ejected = True
        state.ejected_at = now
        state.ejected_until = now + min(base * state.multiplier, self._max_ejection_time)
        state.times_ejected += 1
        state.last_ejection_kind = kind
        state.reset_counters()
        self._ejected += 1
        stats["ejections_enforced_total"] += 1
        stats["ejections_enforced_" + kind] += 1
        if self._on_change is not None:
            self._on_change(endpoint, True)
        return True

    def sweep(self, now: float) -> list[Endpoint]:
        """
        The periodic pass (every C{config.interval} seconds): bring back
        hosts whose ejection time has passed, and lower the ejection
        multiplier of hosts that stayed in service for an interval.

        @return: the hosts brought back, in no particular order.
        """
        back = []
        interval = self.config.interval
        for endpoint, state in self._hosts.items():
            if state.ejected:
                if now + _EPSILON >= state.ejected_until:
                    state.ejected = False
                    state.last_unejected_at = now
                    # Counters may hold results that raced the ejection.
                    state.reset_counters()
                    self._ejected -= 1
                    back.append(endpoint)
            elif (state.multiplier and state.last_unejected_at is not None
                  and now - state.last_unejected_at + _EPSILON >= interval):
                state.multiplier -= 1
        if self._on_change is not None:
            for endpoint in back:
                self._on_change(endpoint, False)
        return back

    def stats(self) -> dict[str, Any]:
        """
        @return: counters (Envoy's C{outlier_detection.*} names) and each
            host's state, for the admin endpoints.
        """
        result: dict[str, Any] = dict(self._stats)
        result["ejections_active"] = self._ejected
        result["hosts"] = {
            str(ep): {
                "ejected": s.ejected,
                "ejected_until": s.ejected_until if s.ejected else None,
                "consecutive_5xx": s.consecutive_5xx,
                "consecutive_gateway_errors": s.consecutive_gateway_errors,
                "ejection_multiplier": s.multiplier,
                "times_ejected": s.times_ejected,
                "last_ejection_kind": s.last_ejection_kind,
            }
            for ep, s in self._hosts.items()
        }
        return result
