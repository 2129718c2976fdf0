"""
Retry decisions, pure: which outcomes may be retried under a policy, how
long to back off, and whether the cluster's retry budget allows another.

Conditions follow Envoy's C{x-envoy-retry-on} vocabulary, which Istio's
C{retryOn} uses: C{5xx}, C{gateway-error}, C{reset}, C{connect-failure},
C{retriable-4xx}, C{refused-stream}, C{retriable-status-codes} (with the
numeric codes listed in the policy), and the gRPC status names
C{cancelled}, C{deadline-exceeded}, C{internal}, C{resource-exhausted},
C{unavailable}.
"""

from __future__ import annotations

import random

import attrs

from txmesh.config.model import RetryPolicy

GRPC_STATUS_NAMES = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}

HTTP_CONDITIONS = frozenset({
    "5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
    "retriable-status-codes",
})

KNOWN_CONDITIONS = HTTP_CONDITIONS | frozenset(GRPC_STATUS_NAMES)


class Outcome:
    """
    How one try ended, short of a response.
    """

    CONNECT_FAILURE = "connect-failure"
    RESET = "reset"
    TIMEOUT = "per-try-timeout"
    REFUSED_STREAM = "refused-stream"


def retriable_codes(policy: RetryPolicy) -> frozenset[int]:
    """
    @return: the numeric status codes named in C{retry_on}.
    """
    return frozenset(int(c) for c in policy.retry_on if c.isdigit())


def should_retry(
    policy: RetryPolicy,
    status: int | None = None,
    outcome: str | None = None,
    grpc_status: int | None = None,
) -> bool:
    """
    Whether a try that ended this way may be retried under C{policy}.

    @param status: the response status, if a response head arrived.
    @param outcome: an L{Outcome} when no response arrived.
    @param grpc_status: the C{grpc-status} of a trailers-only response.
    """
    on = policy.retry_on
    if outcome is not None:
        if outcome == Outcome.CONNECT_FAILURE:
            return bool(on & {"connect-failure", "5xx", "gateway-error", "reset"})
        if outcome == Outcome.REFUSED_STREAM:
            return bool(on & {"refused-stream", "5xx"})
        # Resets and per-try timeouts.
        return bool(on & {"reset", "5xx", "gateway-error"})
    if grpc_status is not None and grpc_status != 0:
        for name, code in GRPC_STATUS_NAMES.items():
            if code == grpc_status and name in on:
                return True
    if status is None:
        return False
    if status >= 500 and "5xx" in on:
        return True
    if status in (502, 503, 504) and "gateway-error" in on:
        return True
    if status == 409 and "retriable-4xx" in on:
        return True
    return str(status) in on


def backoff_delay(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """
    Jittered exponential backoff, as Envoy's: a uniform draw from
    C{[0, base * 2**(n-1))}, capped at C{backoff_max}.

    @param retry_number: 1 for the first retry.
    """
    ceiling = min(policy.backoff_base * (2 ** max(0, retry_number - 1)), policy.backoff_max)
    return rng.uniform(0, ceiling)


@attrs.define
class RetryBudget:
    """
    Limits retries in flight to a share of the requests in flight, so that
    retries cannot multiply load during an outage (Envoy's retry budget).

    @ivar percent: retries in flight may be this share of active requests.
    @ivar min_concurrency: retries always allowed up to this many.
    @ivar active_retries: retries in flight now.
    @ivar overflows: retries refused by the budget.
    """

    percent: float = 20.0
    min_concurrency: int = 3
    active_retries: int = 0
    overflows: int = 0

    def try_start(self, active_requests: int) -> bool:
        """
        @return: whether one more retry may start; if so it is counted until
            L{finish}.
        """
        limit = max(self.min_concurrency, int(active_requests * self.percent / 100))
        if self.active_retries >= limit:
            self.overflows += 1
            return False
        self.active_retries += 1
        return True

    def finish(self) -> None:
        """
        A retry counted by L{try_start} ended.
        """
        if self.active_retries > 0:
            self.active_retries -= 1
