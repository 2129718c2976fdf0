"""
A per-connection request rate limit: a token bucket, pure (the time is
passed in).  A client that sends requests faster than the listener's
C{max_requests_per_second} on one connection gets C{429} with flag C{RL}
for the excess, as Envoy's local rate limit answers, while its other
requests are served.
"""

from __future__ import annotations

import attrs

__all__ = ["RequestRate"]


@attrs.define
class RequestRate:
    """
    A token bucket of one connection's requests.

    @ivar rate: requests per second allowed on average.
    @ivar burst: requests allowed at once after a quiet spell (the bucket's
        size); one second's worth by default.
    """

    rate: float
    burst: float = 0.0
    _tokens: float = attrs.field(init=False, default=-1.0)
    _last: float = attrs.field(init=False, default=0.0)

    def __attrs_post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be positive, not {self.rate!r}")
        if self.burst <= 0:
            self.burst = max(self.rate, 1.0)

    def allow(self, now: float) -> bool:
        """
        @param now: the current time, in seconds.
        @return: whether a request arriving now is within the limit (it
            takes a token if so).
        """
        if self._tokens < 0:
            self._tokens = self.burst
        else:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
