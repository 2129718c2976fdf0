"""
Where the C{jwt} filter gets its public keys: a JSON Web Key Set given
inline, read from a file, or fetched from a URL.

L{StaticJwks} holds keys given in config (inline or from a file, read once
when the config is loaded).  L{RemoteJwks} fetches a C{jwks_uri} with treq
(or any client with treq's C{get}), caches the keys, refreshes them every
C{refresh_interval} seconds, and refetches early, at most once per
C{min_refetch_interval}, when a token names a key id it does not know (a
key rotation).  When the URL is down or answers garbage it keeps the last
good keys, records the problem in C{error} and retries after
C{retry_interval}.  Every wait uses the injected clock and nothing blocks:
callers that need keys before the first fetch completes get a L{Deferred}
(L{RemoteJwks.wait_for_keys}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmesh.policy.jwt import JwksError, KeySet

DEFAULT_REFRESH_INTERVAL = 600.0
"""
Seconds between refreshes of a fetched key set (Envoy's default JWKS
C{cache_duration}, 10 minutes).
"""

DEFAULT_FETCH_TIMEOUT = 5.0
"""
Seconds one fetch of a C{jwks_uri} may take.
"""

DEFAULT_RETRY_INTERVAL = 5.0
"""
Seconds before a failed fetch is retried.
"""

DEFAULT_MIN_REFETCH_INTERVAL = 60.0
"""
The least number of seconds between two fetches that requests cause (a
token with an unknown C{kid}, or a request while there are no keys): a
flood of forged key ids cannot turn into a flood of fetches.
"""


class StaticJwks:
    """
    Keys given in config: they never change and are always there.

    @ivar keys: the L{KeySet}.
    @ivar error: always C{None}.
    """

    error: str | None = None

    def __init__(self, keys: KeySet):
        self.keys = keys

    @classmethod
    def from_json(cls, text: str | bytes) -> StaticJwks:
        """
        @raise JwksError: if C{text} is not a usable JWKS.
        """
        return cls(KeySet.from_json(text))

    @classmethod
    def from_file(cls, path: str) -> StaticJwks:
        """
        Read a JWKS file (at config load time, like Envoy's C{local_jwks}).

        @raise JwksError: if the file cannot be read or is not a usable JWKS.
        """
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise JwksError(f"cannot read {path}: {e.strerror}") from None
        return cls.from_json(text)


class RemoteJwks:
    """
    A key set fetched from a URL, cached and refreshed.

    @ivar url: the C{jwks_uri}.
    @ivar keys: the last good L{KeySet}, or C{None} before the first
        successful fetch.
    @ivar error: why the latest fetch failed, or C{None} if it succeeded.
    @ivar fetches: how many fetches were started (for tests and stats).
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        client: Any = None,
        reactor: Any = None,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        min_refetch_interval: float = DEFAULT_MIN_REFETCH_INTERVAL,
    ):
        """
        @param clock: what every timer (refresh, retry, timeout) runs on.
        @param client: an object with treq's C{get(url) -> Deferred[response]}
            whose responses have C{code} and C{content()}: C{treq},
            L{treq.testing.StubTreq}, or a L{treq.client.HTTPClient}.  By
            default an C{HTTPClient} over an L{twisted.web.client.Agent} on
            C{reactor}.
        @param reactor: the reactor the default client connects with
            (C{clock} when omitted).
        """
        if refresh_interval <= 0 or fetch_timeout <= 0 or retry_interval <= 0 or min_refetch_interval < 0:
            raise ValueError("JWKS intervals and timeouts must be positive")
        self.url = url
        self._clock = clock
        self._client = client
        self._reactor = reactor if reactor is not None else clock
        self.refresh_interval = refresh_interval
        self.fetch_timeout = fetch_timeout
        self.retry_interval = retry_interval
        self.min_refetch_interval = min_refetch_interval
        self.keys: KeySet | None = None
        self.error: str | None = None
        self.fetches = 0
        self._started = False
        self._last_attempt: float | None = None
        self._inflight: Deferred | None = None
        self._timer: IDelayedCall | None = None
        self._waiters: list[Deferred] = []

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """
        Start the first fetch (and with it the refresh cycle); idempotent.
        """
        if not self._started:
            self._started = True
            self._fetch()

    def stop(self) -> None:
        """
        Stop refreshing; a fetch in flight is cancelled and waiters get the
        keys there are.
        """
        self._started = False
        self._cancel_timer()
        if self._inflight is not None:
            self._inflight.cancel()

    # -- asking for keys ---------------------------------------------------------

    def wait_for_keys(self, timeout: float | None = None) -> Deferred:
        """
        Keys now if there are any; otherwise wait for a fetch, at most
        C{timeout} seconds.  A fetch is started unless one is in flight or
        the last one was less than C{min_refetch_interval} ago.

        @param timeout: the bound on the wait (default C{fetch_timeout}).
        @return: a L{Deferred} firing with the L{KeySet}, or C{None} if
            there are still no keys; cancelling it only stops the wait.
        """
        if self.keys is not None:
            return succeed(self.keys)
        self._started = True
        if self._inflight is None:
            if self._rate_limited():
                return succeed(None)
            self._fetch()
            if self._inflight is None:
                # The fetch finished synchronously (a stub client).
                return succeed(self.keys)
        return self._waiter(self.fetch_timeout if timeout is None else timeout)

    def refetch_for_unknown_kid(self) -> Deferred | None:
        """
        A token named a key id the cached set lacks: fetch again unless the
        last fetch was too recent.

        @return: a L{Deferred} firing with the keys after the fetch (the old
            ones if it failed), or C{None} if rate-limited.
        """
        if self._inflight is None:
            if self._rate_limited():
                return None
            self._fetch()
            if self._inflight is None:
                return succeed(self.keys)
        return self._waiter(self.fetch_timeout)

    def settled(self) -> Deferred:
        """
        @return: a L{Deferred} firing with the keys (or C{None}) once no
            fetch is in flight: at once if none is.
        """
        if self._inflight is None:
            return succeed(self.keys)
        waiter: Deferred = Deferred(canceller=lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiter)
        return waiter

    def _rate_limited(self) -> bool:
        last = self._last_attempt
        return last is not None and self._clock.seconds() - last < self.min_refetch_interval

    def _waiter(self, timeout: float) -> Deferred:
        def cancel(d: Deferred) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        waiter: Deferred = Deferred(canceller=cancel)
        self._waiters.append(waiter)

        def expire() -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                waiter.callback(self.keys)

        timer = self._clock.callLater(timeout, expire)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        waiter.addBoth(done)
        return waiter

    # -- fetching -----------------------------------------------------------------

    def _fetch(self) -> None:
        self._cancel_timer()
        self._last_attempt = self._clock.seconds()
        self.fetches += 1
        d = maybeDeferred(self._http().get, self.url)
        self._inflight = d
        d.addCallback(self._body)
        d.addTimeout(self.fetch_timeout, self._clock, onTimeoutCancel=_timed_out)
        d.addCallback(KeySet.from_json)
        d.addCallbacks(self._fetched, self._failed)

    def _http(self) -> Any:
        if self._client is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent

            self._client = HTTPClient(Agent(self._reactor))
        return self._client

    def _body(self, response: Any) -> Any:
        code = response.code
        d = response.content()
        if code != 200:
            # Read the error page anyway, so the connection is released.
            def refuse(_: bytes) -> None:
                raise JwksError(f"HTTP {code}")

            d.addCallback(refuse)
        return d

    def _fetched(self, keys: KeySet) -> None:
        self._inflight = None
        had = self.keys is not None
        self.keys = keys
        self.error = None
        self.log.info(
            "JWKS {url} {what}: {count} keys{skipped}",
            url=self.url, what="refreshed" if had else "fetched", count=len(keys.keys),
            skipped=f" ({len(keys.skipped)} skipped: {'; '.join(keys.skipped)})" if keys.skipped else "",
        )
        self._schedule(self.refresh_interval)
        self._notify()

    def _failed(self, failure: Failure) -> None:
        self._inflight = None
        if failure.check(TimeoutError):
            reason = f"timed out after {self.fetch_timeout:g}s"
        elif failure.check(CancelledError):
            reason = "cancelled"
        else:
            reason = str(failure.value) or failure.type.__name__
        self.error = f"GET {self.url}: {reason}"
        self.log.warn(
            "JWKS {url} fetch failed ({error}); {keeping}",
            url=self.url, error=reason,
            keeping="keeping the last good keys" if self.keys is not None else "no keys yet",
        )
        self._schedule(min(self.retry_interval, self.refresh_interval))
        self._notify()

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.keys)

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        if self._started:
            self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._inflight is None:
            self._fetch()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


def _timed_out(result: Any, timeout: float) -> Failure:
    # Whatever the cancelled request failed with (treq wraps the
    # CancelledError in ResponseNeverReceived), the cause was the timeout.
    return Failure(TimeoutError(timeout, "JWKS fetch"))
