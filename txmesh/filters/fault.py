"""
The C{fault} filter: fault injection, as Istio's C{VirtualService.fault}
and Envoy's fault filter do it.

For each request the filter takes the matched route's L{FaultPolicy}
(C{route.fault}), or, when the route has none, the filter's own
listener-level default.  It then:

  - delays the request by C{delay} seconds with probability
    C{delay_percent}/100 (response flag C{DI}), then
  - aborts it with probability C{abort_percent}/100 (response flag C{FI}):
    an HTTP C{abort_status} reply, or, when C{abort_grpc_status} is set, a
    gRPC trailers-only reply (HTTP 200, C{grpc-status}, C{grpc-message}).

As in Envoy, the abort, when both apply, comes after the delay.  The coin
flips come from a L{random.Random} given to the factory, so tests can seed
it; the default one is seeded from C{os.urandom}.

Listener config (every field optional; a fault given without its percent
applies to every request)::

    http_filters:
      - name: fault
        config: {delay: 2s, delay_percent: 10, abort_status: 503, abort_percent: 5}
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from txmesh.config.durations import parse_duration
from txmesh.config.errors import FilterConfigError
from txmesh.config.model import FaultPolicy
from txmesh.filters.api import HTTPFilter, IHTTPFilterFactory, LocalReply
from txmesh.proxy.stream import RequestHead

DELAY_INJECTED = "DI"
"""
Envoy's response flag for a request the fault filter delayed.
"""

FAULT_INJECTED = "FI"
"""
Envoy's response flag for a request the fault filter aborted.
"""

ABORT_MESSAGE = b"fault filter abort"

_FIELDS = ("delay", "delay_percent", "abort_status", "abort_grpc_status", "abort_percent")


class FaultFilter(HTTPFilter):
    """
    One stream's fault decision: delay, abort, both or neither.
    """

    _delay: Deferred | None = None

    def __init__(self, policy: FaultPolicy | None, stream: Any, rng: random.Random):
        self._policy = policy
        self._stream = stream
        self._rng = rng

    def request_headers(self, head: RequestHead, end_stream: bool) -> Any:
        route = self._stream.route
        policy = route.fault if route is not None and route.fault is not None else self._policy
        if policy is None:
            return None
        # Always flip the delay coin before the abort coin, so a seeded
        # generator gives the same decisions for the same requests.
        delay = policy.delay > 0 and _chance(self._rng, policy.delay_percent)
        reply = _abort_reply(policy) if _chance(self._rng, policy.abort_percent) else None
        if not delay:
            return reply
        stream = self._stream
        stream.add_response_flag(DELAY_INJECTED)
        d = deferLater(stream.clock, policy.delay, lambda: reply)
        d.addBoth(self._delay_over)
        self._delay = d
        return d

    def _delay_over(self, result: Any) -> Any:
        self._delay = None
        if isinstance(result, Failure) and result.check(CancelledError):
            # stream_complete cancelled it: the chain ignores what a hook
            # of a finished stream resolves to, so resolve quietly.
            return None
        return result

    def stream_complete(self) -> None:
        d = self._delay
        if d is not None:
            d.cancel()


def _chance(rng: random.Random, percent: float) -> bool:
    """
    @return: true with probability C{percent}/100 (never for 0, always for 100).
    """
    return percent > 0 and rng.random() * 100.0 < percent


def _abort_reply(policy: FaultPolicy) -> LocalReply | None:
    if policy.abort_grpc_status is not None:
        # A gRPC "trailers-only" response: the status rides in the headers
        # of an HTTP 200 with no body.
        return LocalReply(200, b"", headers=(
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(policy.abort_grpc_status).encode("ascii")),
            (b"grpc-message", ABORT_MESSAGE),
        ), flag=FAULT_INJECTED)
    if policy.abort_status:
        return LocalReply(policy.abort_status, ABORT_MESSAGE, flag=FAULT_INJECTED)
    return None


@implementer(IHTTPFilterFactory)
class FaultFactory:
    """
    The C{fault} filter: inject delays and aborts into a share of requests.
    """

    name = "fault"

    def __init__(self, rng: random.Random | None = None):
        """
        @param rng: where the filter's coin flips come from; by default a
            generator seeded from C{os.urandom}.
        """
        self.rng = rng if rng is not None else random.Random(os.urandom(32))

    def parse_config(self, raw: Mapping[str, Any]) -> FaultPolicy | None:
        """
        @param raw: optional C{delay} (a duration), C{delay_percent},
            C{abort_status} (200..599) or C{abort_grpc_status} (1..16), and
            C{abort_percent}; percents are 0..100 and default to 100 when
            their fault is given.
        @return: the listener-level default L{FaultPolicy}, or C{None} when
            C{raw} configures no fault (routes may still carry their own).
        @raise FilterConfigError: naming the offending field.
        """
        for key in raw:
            if key not in _FIELDS:
                raise FilterConfigError(str(key), f"unknown field (expected one of: {', '.join(_FIELDS)})")
        delay = 0.0
        if raw.get("delay") is not None:
            try:
                delay = parse_duration(raw["delay"])
            except ValueError as e:
                raise FilterConfigError("delay", str(e)) from None
            if delay <= 0:
                raise FilterConfigError("delay", "must be greater than zero")
        abort_status = 0
        if raw.get("abort_status") is not None:
            abort_status = _integer(raw, "abort_status", 200, 599)
        abort_grpc_status = None
        if raw.get("abort_grpc_status") is not None:
            abort_grpc_status = _integer(raw, "abort_grpc_status", 1, 16)
            if abort_status:
                raise FilterConfigError("abort_grpc_status", "give abort_status or abort_grpc_status, not both")
        delay_percent = _percent(raw, "delay_percent", "delay", delay > 0)
        abort = bool(abort_status) or abort_grpc_status is not None
        abort_percent = _percent(raw, "abort_percent", "abort_status or abort_grpc_status", abort)
        if not delay and not abort:
            return None
        return FaultPolicy(
            delay=delay, delay_percent=delay_percent, abort_status=abort_status,
            abort_grpc_status=abort_grpc_status, abort_percent=abort_percent,
        )

    def create_filter(self, config: FaultPolicy | None, stream: Any) -> FaultFilter:
        return FaultFilter(config, stream, self.rng)


def _integer(raw: Mapping[str, Any], field: str, low: int, high: int) -> int:
    value = raw[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise FilterConfigError(field, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise FilterConfigError(field, f"must be between {low} and {high}, got {value}")
    return value


def _percent(raw: Mapping[str, Any], field: str, needs: str, enabled: bool) -> float:
    value = raw.get(field)
    if value is None:
        return 100.0 if enabled else 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FilterConfigError(field, f"must be a number of percent, got {value!r}")
    if not 0 <= value <= 100:
        raise FilterConfigError(field, f"must be between 0 and 100, got {value}")
    if not enabled:
        raise FilterConfigError(field, f"has no effect without {needs}")
    return float(value)
