"""
Report finished spans to a Zipkin collector (the v2 JSON API,
C{POST /api/v2/spans}).

L{ZipkinReporter} never makes a request wait: a span is a C{dict} appended
to a bounded in-memory queue, and batches go out in the background, either
when C{batch_size} spans are queued or C{flush_interval} seconds after the
first span of a batch was queued, whichever comes first.

The collector may be slow or down; the data path must not care:

  - at most one POST is in flight; spans queue behind it;
  - each POST is bounded by C{timeout} seconds, then cancelled;
  - when the queue holds C{max_queue} spans, new spans are dropped and
    counted (L{ZipkinReporter.dropped});
  - a failed POST (error, timeout, non-2xx) is counted and its spans are
    lost, not retried, as Zipkin's own reporters do: a retry would only
    compete with the spans queued behind it.  They are counted as dropped
    too (L{ZipkinReporter.spans_dropped}): a span a collector never got is
    dropped, whether it was refused by the queue or lost in a POST.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

DEFAULT_MAX_QUEUE = 1000
DEFAULT_BATCH_SIZE = 100
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_TIMEOUT = 5.0


@attrs.frozen
class ReporterSettings:
    """
    The bounds of a L{ZipkinReporter}.

    @ivar max_queue: spans held at most; more are dropped.
    @ivar batch_size: spans per POST at most; a full batch is sent at once.
    @ivar flush_interval: seconds a queued span waits at most for its batch
        to fill.
    @ivar timeout: seconds one POST may take before it is cancelled.
    """

    max_queue: int = DEFAULT_MAX_QUEUE
    batch_size: int = DEFAULT_BATCH_SIZE
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    timeout: float = DEFAULT_TIMEOUT

    def __attrs_post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, not {self.max_queue}")
        if not 1 <= self.batch_size <= self.max_queue:
            raise ValueError(f"batch_size must be between 1 and max_queue ({self.max_queue}), not {self.batch_size}")
        if self.flush_interval <= 0:
            raise ValueError(f"flush_interval must be greater than zero, not {self.flush_interval}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be greater than zero, not {self.timeout}")


class ZipkinReporter:
    """
    A bounded queue of Zipkin v2 spans, POSTed in batches to one collector.

    Counters (monotonic, for metrics):

    @ivar queued: spans accepted into the queue.
    @ivar dropped: spans refused because the queue was full
        (C{txmesh_tracing_spans_dropped_total}).
    @ivar sent: spans in POSTs the collector accepted (2xx).
    @ivar failures: POSTs that failed (connection error, timeout, non-2xx).
    @ivar failed_spans: spans lost in failed POSTs.
    @ivar requests: POSTs started.
    @ivar spans_dropped: every span the collector will never get
        (C{dropped} plus C{failed_spans}), exported as
        C{txmesh_tracing_spans_dropped_total}.
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        clock: Any,
        settings: ReporterSettings = ReporterSettings(),
        client: Any = None,
        reactor: Any = None,
    ):
        """
        @param url: the collector's v2 endpoint, e.g.
            C{http://zipkin:9411/api/v2/spans}.
        @param clock: an C{IReactorTime} for the flush timer and timeouts.
        @param settings: the queue and batch bounds.
        @param client: an object with treq's C{post(url, data=, headers=)}
            whose responses have C{code} and C{content()} (C{treq},
            L{treq.testing.StubTreq}, a L{treq.client.HTTPClient}); by
            default an C{HTTPClient} over an L{twisted.web.client.Agent} on
            C{reactor}.
        @param reactor: what the default client connects with.
        """
        self.url = url
        self.settings = settings
        self._clock = clock
        self._client = client
        self._reactor = reactor
        self._pool: Any = None
        self._queue: deque[dict[str, Any]] = deque()
        self._timer: Any = None
        self._inflight: Deferred | None = None
        self._failing = False
        self._stopped = False
        self.queued = 0
        self.dropped = 0
        self.sent = 0
        self.failures = 0
        self.failed_spans = 0
        self.requests = 0

    @property
    def pending(self) -> int:
        """
        @return: spans queued and not yet in a POST.
        """
        return len(self._queue)

    @property
    def spans_dropped(self) -> int:
        """
        @return: spans lost for good: refused (queue full, or the reporter
            stopped) or in a failed POST.
        """
        return self.dropped + self.failed_spans

    @property
    def in_flight(self) -> bool:
        """
        @return: whether a POST is under way.
        """
        return self._inflight is not None

    def report(self, span: dict[str, Any]) -> bool:
        """
        Queue one finished span; never blocks and never raises for a full
        queue or a broken collector.

        @param span: a Zipkin v2 span, ready for C{json.dumps}.
        @return: whether the span was queued (C{False}: dropped).
        """
        settings = self.settings
        if self._stopped or len(self._queue) >= settings.max_queue:
            self.dropped += 1
            return False
        self._queue.append(span)
        self.queued += 1
        if len(self._queue) >= settings.batch_size:
            self.flush()
        elif self._timer is None and self._inflight is None:
            self._timer = self._clock.callLater(settings.flush_interval, self._tick)
        return True

    def flush(self) -> Deferred | None:
        """
        Send the next batch now, unless a POST is already in flight (the
        queue then goes out when it ends).

        @return: a L{Deferred} firing (with C{None}, never failing) when the
            POST started here ends, or C{None} if none was started.
        """
        self._cancel_timer()
        if self._inflight is not None or not self._queue or self._stopped:
            return None
        count = min(len(self._queue), self.settings.batch_size)
        batch = [self._queue.popleft() for _ in range(count)]
        body = json.dumps(batch, separators=(",", ":")).encode("utf-8")
        self.requests += 1
        try:
            d = self._http().post(
                self.url, data=body, headers={b"content-type": [b"application/json"]},
            )
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addCallback(self._read)
        d.addTimeout(self.settings.timeout, self._clock, onTimeoutCancel=self._timed_out)
        d.addCallbacks(self._sent, self._failed, callbackArgs=(count,), errbackArgs=(count,))
        done: Deferred = Deferred()
        # Set before the callbacks run: a synchronous client ends the POST
        # inside this call, and _done clears it.
        self._inflight = d
        d.addBoth(self._done, done)
        return done

    def stop(self) -> Deferred | None:
        """
        Stop sending: cancel the timer and any POST in flight, drop what is
        queued (counted in C{dropped}) and refuse later spans.

        @return: when the reporter made its own client, a L{Deferred} that
            fires once its idle connections are closed; else C{None}.
        """
        self._stopped = True
        self._cancel_timer()
        self.dropped += len(self._queue)
        self._queue.clear()
        d = self._inflight
        if d is not None:
            d.cancel()
        pool, self._pool = self._pool, None
        return pool.closeCachedConnections() if pool is not None else None

    def _http(self) -> Any:
        if self._client is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor as default_reactor

                reactor = default_reactor
            # One connection kept open to the collector: batches are frequent.
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 1
            self._client = HTTPClient(Agent(reactor, pool=self._pool))
        return self._client

    def _read(self, response: Any) -> Any:
        code = response.code
        # Read the body whatever the code, so the connection is released.
        d = response.content()

        def check(_: bytes) -> None:
            if not 200 <= code < 300:
                raise CollectorError(f"HTTP {code}")

        d.addCallback(check)
        return d

    def _timed_out(self, result: Any, timeout: float) -> Failure:
        # Whatever the cancelled request failed with, the cause was the timeout.
        return Failure(TimeoutError(f"no answer in {timeout:g}s"))

    def _sent(self, _: Any, count: int) -> None:
        self.sent += count
        if self._failing:
            self._failing = False
            self.log.info("zipkin collector {url} is accepting spans again", url=self.url)

    def _failed(self, failure: Failure, count: int) -> None:
        self.failures += 1
        self.failed_spans += count
        if not self._failing:
            # Log the change, not every failure: a down collector would
            # otherwise log once per batch.
            self._failing = True
            self.log.warn(
                "zipkin collector {url} failed ({error}); {count} spans lost",
                url=self.url, error=str(failure.value) or failure.type.__name__, count=count,
            )

    def _done(self, _: Any, done: Deferred) -> None:
        self._inflight = None
        if self._queue and not self._stopped:
            if len(self._queue) >= self.settings.batch_size:
                # The next turn, not now: a client that fails at once would
                # otherwise recurse once per batch.
                self._cancel_timer()
                self._timer = self._clock.callLater(0, self._tick)
            elif self._timer is None:
                self._timer = self._clock.callLater(self.settings.flush_interval, self._tick)
        done.callback(None)

    def _tick(self) -> None:
        self._timer = None
        self.flush()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


class CollectorError(Exception):
    """
    The collector answered with a status other than 2xx.
    """
