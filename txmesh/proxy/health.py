"""
Active health checking: probe each endpoint of a cluster every interval and
take it out of (and back into) service after runs of failures (successes).

Two layers, as everywhere in txmesh:

  - L{HealthState}: the pure threshold state machine of one endpoint; it is
    told "success" or "failure" and says when the endpoint changes between
    healthy and unhealthy.
  - L{HealthChecker}: the thin Twisted shell, with an injected reactor
    (C{IReactorTCP} and C{IReactorTime}), that runs one probe per endpoint
    at a time: a TCP connect (C{kind: tcp}), C{GET path} over HTTP/1.1
    with C{connection: close} whose 2xx answer is a success (C{kind: http}),
    or gRPC's C{grpc.health.v1.Health/Check} over h2c whose C{SERVING}
    answer (with C{grpc-status: 0}) is a success (C{kind: grpc}, as
    Envoy's gRPC health checker), each within C{timeout}.  The next probe of an endpoint starts
    C{interval} seconds after the previous one was decided, as in Envoy;
    the first ones are spread over the first interval so that many proxies
    (and many endpoints) are not probed in step.

Hosts start healthy, so that a new cluster takes traffic at once; the checks
take them out if they fail.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmesh.config.model import ClusterConfig, Endpoint, HealthCheckConfig
from txmesh.proxy import grpc
from txmesh.proxy.http1 import ProtocolError, ResponseParser, encode_request_head
from txmesh.proxy.http2_client import HTTP2EndpointPool
from txmesh.proxy.stream import Headers, RequestHead, ResponseHead

log = Logger()

USER_AGENT = b"txmesh-health-check"

KINDS = frozenset({"http", "tcp", "grpc"})


class HealthState:
    """
    The threshold state machine of one endpoint, sans-IO.

    An unhealthy endpoint becomes healthy after C{healthy_threshold}
    successes in a row; a healthy one becomes unhealthy after
    C{unhealthy_threshold} failures in a row.  A result of the other kind
    breaks the run.

    @ivar healthy: the current verdict.
    @ivar successes: successes in a row (the current run).
    @ivar failures: failures in a row (the current run).
    """

    __slots__ = ("healthy", "successes", "failures", "_healthy_threshold", "_unhealthy_threshold")

    def __init__(self, healthy_threshold: int = 1, unhealthy_threshold: int = 3, healthy: bool = True):
        """
        @param healthy_threshold: successes in a row that make an unhealthy
            endpoint healthy (at least 1).
        @param unhealthy_threshold: failures in a row that make a healthy
            endpoint unhealthy (at least 1).
        @param healthy: the initial verdict.
        """
        self._healthy_threshold = max(healthy_threshold, 1)
        self._unhealthy_threshold = max(unhealthy_threshold, 1)
        self.healthy = healthy
        self.successes = 0
        self.failures = 0

    def record(self, success: bool) -> bool:
        """
        Account for one probe's result.

        @return: C{True} if this result changed L{healthy}.
        """
        if success:
            self.failures = 0
            self.successes += 1
            if not self.healthy and self.successes >= self._healthy_threshold:
                self.healthy = True
                self.successes = 0
                return True
        else:
            self.successes = 0
            self.failures += 1
            if self.healthy and self.failures >= self._unhealthy_threshold:
                self.healthy = False
                self.failures = 0
                return True
        return False


@attrs.define
class _EndpointRecord:
    state: HealthState
    checks: int = 0
    failed_checks: int = 0
    last_failure: str | None = None
    call: IDelayedCall | None = None


class _ProbeProtocol(Protocol):
    def __init__(self, probe: _Probe):
        self._probe = probe

    def connectionMade(self) -> None:
        self._probe.connected(self)

    def dataReceived(self, data: bytes) -> None:
        self._probe.data_received(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._probe.connection_lost(reason)


class _ProbeLifecycle:
    """
    What every probe shares: a timeout, a verdict given at most once (never
    after L{abort}), and a close reported once, whatever ended the probe.
    Subclasses provide C{start} and C{_drop} (close the connection or give
    up connecting).
    """

    def __init__(self, endpoint: Endpoint, timeout: float, reactor: Any,
                 decided: Callable[[Any, bool, str], None], closed: Callable[[Any], None]):
        self.endpoint = endpoint
        self._timeout = timeout
        self._reactor = reactor
        self._decided_cb: Callable[[Any, bool, str], None] | None = decided
        self._closed_cb = closed
        self._timer: IDelayedCall | None = None
        self._is_closed = False
        self._waiters: list[Deferred] = []

    def _drop(self) -> None:
        raise NotImplementedError

    def _decide(self, success: bool, reason: str) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        cb, self._decided_cb = self._decided_cb, None
        if cb is not None:
            cb(self, success, reason)

    def _close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self._closed_cb(self)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _timed_out(self) -> None:
        self._timer = None
        self._decide(False, f"timed out after {self._timeout}s")
        self._drop()

    def abort(self) -> Deferred:
        """
        Stop now, without a verdict.

        @return: a L{Deferred} that fires once the connection is closed.
        """
        self._decided_cb = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._is_closed:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiters.append(d)
        self._drop()
        return d


class _Probe(_ProbeLifecycle, ClientFactory):
    """
    One health check of one endpoint: connect, maybe ask, decide, close.

    The verdict goes to C{decided(probe, success, reason)} once, unless the
    probe was aborted first; C{closed(probe)} is called once the connection
    attempt or the connection is gone for good, in every case.
    """

    noisy = False

    def __init__(
        self,
        endpoint: Endpoint,
        request: bytes | None,
        timeout: float,
        reactor: Any,
        decided: Callable[[_Probe, bool, str], None],
        closed: Callable[[_Probe], None],
    ):
        """
        @param request: the HTTP request to send, or C{None} for a TCP check.
        """
        super().__init__(endpoint, timeout, reactor, decided, closed)
        self._request = request
        self._connector: Any = None
        self._protocol: _ProbeProtocol | None = None
        self._parser: ResponseParser | None = None
        self._status = 0

    def start(self) -> None:
        self._timer = self._reactor.callLater(self._timeout, self._timed_out)
        self._connector = self._reactor.connectTCP(
            self.endpoint.host, self.endpoint.port, self, timeout=self._timeout)

    def _drop(self) -> None:
        """
        Close the connection, or give up connecting.
        """
        if self._protocol is not None:
            self._protocol.transport.abortConnection()
        elif self._connector is not None:
            try:
                # Synchronous: clientConnectionFailed runs before this returns.
                self._connector.stopConnecting()
            except NotConnectingError:
                pass

    # ClientFactory

    def buildProtocol(self, addr: Any) -> _ProbeProtocol:
        protocol = _ProbeProtocol(self)
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._decide(False, f"connect failed: {reason.getErrorMessage()}")
        self._close()

    # The connection

    def connected(self, protocol: _ProbeProtocol) -> None:
        self._protocol = protocol
        if self._decided_cb is None:
            # Timed out or aborted while the connection was being set up.
            protocol.transport.abortConnection()
            return
        if self._request is None:
            self._decide(True, "connected")
            protocol.transport.loseConnection()
            return
        self._parser = ResponseParser(self)
        self._parser.expect_response(head_request=False)
        protocol.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._decided_cb is None:
            return
        try:
            parser.receive_data(data)
        except ProtocolError as e:
            self._decide(False, e.reason)
            self._drop()

    def connection_lost(self, reason: Failure | None) -> None:
        if self._decided_cb is not None:
            parser = self._parser
            if parser is None or not parser.connection_lost():
                self._decide(False, "connection closed before a complete response")
        self._close()

    # ResponseSink (the HTTP check)

    def response_informational(self, head: ResponseHead) -> None:
        pass

    def response_head(self, head: ResponseHead, end_stream: bool) -> None:
        self._status = head.status
        if head.status == 101:
            self._decide(False, "upstream switched protocols")
            self._drop()
        elif end_stream:
            self._response_complete()

    def response_data(self, data: bytes) -> None:
        pass

    def response_end(self, trailers: Headers | None, last_data: bytes = b"") -> None:
        self._response_complete()

    def _response_complete(self) -> None:
        status = self._status
        self._decide(200 <= status < 300, f"status {status}")
        if self._protocol is not None:
            self._protocol.transport.loseConnection()


class _GrpcProbePool(HTTP2EndpointPool):
    """
    A one-connection h2c pool of its own for one gRPC probe, which says
    when its connection is gone.
    """

    def __init__(self, endpoint: Endpoint, timeout: float, reactor: Any, lost: Callable[[], None]):
        config = ClusterConfig(name="health-check", endpoints=(endpoint,), connect_timeout=timeout, http2=True)
        super().__init__(endpoint, config, reactor)
        self._lost = lost

    def connection_lost(self, conn: Any) -> None:
        super().connection_lost(conn)
        self._lost()


class _GrpcProbe(_ProbeLifecycle):
    """
    One gRPC health check of one endpoint: C{grpc.health.v1.Health/Check}
    on a fresh h2c connection, decided by the answer, then closed.

    Same contract as L{_Probe}: C{decided(probe, success, reason)} at most
    once (never after L{abort}), C{closed(probe)} once, when the
    connection (or the attempt) is gone.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        authority: bytes,
        service: str,
        timeout: float,
        reactor: Any,
        decided: Callable[[Any, bool, str], None],
        closed: Callable[[Any], None],
    ):
        super().__init__(endpoint, timeout, reactor, decided, closed)
        self._authority = authority
        self._service = service
        self._pool = _GrpcProbePool(endpoint, timeout, reactor, self._close)
        self._stream: Any = None
        self._head: ResponseHead | None = None
        self._body = b""

    def start(self) -> None:
        self._timer = self._reactor.callLater(self._timeout, self._timed_out)
        acquired = self._pool.acquire()
        if isinstance(acquired, Deferred):
            acquired.addCallbacks(self._connected, self._connect_failed)
        else:
            self._connected(acquired)

    def _connected(self, stream: Any) -> None:
        if self._decided_cb is None:
            # Timed out or aborted while connecting.
            self._pool.close()
            self._pool.release(stream)
            return
        self._stream = stream
        head = RequestHead(b"POST", grpc.HEALTH_CHECK_PATH, self._authority, Headers([
            (b"content-type", grpc.GRPC_CONTENT_TYPE), (b"te", b"trailers"), (b"user-agent", USER_AGENT),
            (b"grpc-timeout", grpc.format_grpc_timeout(self._timeout)),
        ]), version=b"2")
        stream.start(head, False, self)
        stream.send_data(grpc.frame_message(grpc.health_check_request(self._service)), True)

    def _connect_failed(self, failure: Failure) -> None:
        self._decide(False, f"connect failed: {failure.getErrorMessage()}")
        self._close()

    # Verdict and teardown.

    def _finish(self, success: bool, reason: str) -> None:
        self._decide(success, reason)
        self._drop()

    def _drop(self) -> None:
        # A closed pool closes its connection once no stream is open.
        self._pool.close()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()

    # The upstream response handler (what the router is to a stream).

    def response_informational(self, head: ResponseHead) -> None:
        pass

    def response_head(self, head: ResponseHead, end_stream: bool) -> None:
        self._head = head
        if end_stream:
            # Trailers-only: the status is in the headers.
            self._verdict(head.headers)

    def response_data(self, data: bytes, end_stream: bool) -> None:
        self._body += data
        if end_stream:
            self._verdict(Headers())

    def response_trailers(self, trailers: Headers) -> None:
        self._verdict(trailers)

    def upstream_reset(self, flag: str, reason: str) -> None:
        self._stream = None
        self._finish(False, reason)

    def flush(self) -> None:
        pass

    def _verdict(self, trailers: Headers) -> None:
        self._stream = None
        head = self._head
        if head is None or head.status != 200:
            self._finish(False, f"status {head.status if head else 0}")
            return
        status = grpc.grpc_status_of(trailers)
        if status is None:
            status = grpc.grpc_status_of(head.headers)
        if status != grpc.OK:
            message = trailers.get(b"grpc-message") or head.headers.get(b"grpc-message") or b""
            self._finish(False, f"grpc-status {status}: {grpc.decode_grpc_message(message)}".rstrip(": "))
            return
        try:
            messages, _ = grpc.unframe_messages(self._body)
            serving = grpc.parse_health_check_response(messages[0]) if messages else grpc.HEALTH_UNKNOWN
        except ValueError as e:
            self._finish(False, f"bad health check response: {e}")
            return
        names = {grpc.HEALTH_SERVING: "SERVING", grpc.HEALTH_NOT_SERVING: "NOT_SERVING",
                 grpc.HEALTH_SERVICE_UNKNOWN: "SERVICE_UNKNOWN"}
        self._finish(serving == grpc.HEALTH_SERVING, names.get(serving, f"UNKNOWN ({serving})"))


class HealthChecker:
    """
    Active health checks of one cluster's endpoints.
    """

    def __init__(
        self,
        config: HealthCheckConfig,
        endpoints: Iterable[Endpoint],
        reactor: Any,
        on_change: Callable[[Endpoint, bool], None],
        host_header: bytes = b"",
        rng: random.Random | None = None,
    ):
        """
        @param config: what to check and how often.
        @param endpoints: the endpoints to check.
        @param reactor: an C{IReactorTCP} and C{IReactorTime}.
        @param on_change: called with C{(endpoint, healthy)} each time an
            endpoint changes between healthy and unhealthy.
        @param host_header: the C{Host} of HTTP checks; empty means the
            endpoint's C{host:port}.
        @param rng: spreads the first checks over the first interval.
        @raise ValueError: if C{config} cannot be run.
        """
        if config.kind not in KINDS:
            raise ValueError(f"health_check.kind: expected one of {sorted(KINDS)}, got {config.kind!r}")
        if not config.interval > 0:
            raise ValueError(f"health_check.interval: must be positive, got {config.interval!r}")
        if not config.timeout > 0:
            raise ValueError(f"health_check.timeout: must be positive, got {config.timeout!r}")
        self.config = config
        self._reactor = reactor
        self._on_change = on_change
        self._host_header = host_header
        self._rng = rng or random.Random()
        self._records: dict[Endpoint, _EndpointRecord] = {
            ep: _EndpointRecord(HealthState(config.healthy_threshold, config.unhealthy_threshold))
            for ep in endpoints
        }
        self._probes: set[Any] = set()
        self.running = False

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._records)

    def is_healthy(self, endpoint: Endpoint) -> bool:
        """
        @return: the current verdict on C{endpoint}; C{True} for an endpoint
            this checker does not check.
        """
        record = self._records.get(endpoint)
        return record is None or record.state.healthy

    def start(self) -> None:
        """
        Start checking; the first check of each endpoint comes at a random
        moment within the first interval.
        """
        if self.running:
            return
        self.running = True
        interval = self.config.interval
        for endpoint, record in self._records.items():
            record.call = self._reactor.callLater(self._rng.uniform(0, interval), self._check, endpoint)

    def stop(self) -> Deferred:
        """
        Stop checking: cancel the timers and close the probes in progress.

        @return: a L{Deferred} that fires once every probe connection is
            closed.
        """
        self.running = False
        for record in self._records.values():
            call, record.call = record.call, None
            if call is not None and call.active():
                call.cancel()
        closing = [probe.abort() for probe in list(self._probes)]
        return gatherResults(closing).addCallback(lambda _: None)

    def _check(self, endpoint: Endpoint) -> None:
        record = self._records[endpoint]
        record.call = None
        if self.config.kind == "grpc":
            authority = self._host_header or str(endpoint).encode("ascii")
            grpc_probe = _GrpcProbe(endpoint, authority, self.config.grpc_service, self.config.timeout,
                                    self._reactor, self._decided, self._probes.discard)
            self._probes.add(grpc_probe)
            grpc_probe.start()
            return
        if self.config.kind == "tcp":
            request = None
        else:
            authority = self._host_header or str(endpoint).encode("ascii")
            head = RequestHead(b"GET", self.config.path, authority,
                               Headers([(b"user-agent", USER_AGENT), (b"connection", b"close")]))
            request = encode_request_head(head, chunked=False)
        probe = _Probe(endpoint, request, self.config.timeout, self._reactor, self._decided, self._probes.discard)
        self._probes.add(probe)
        probe.start()

    def _decided(self, probe: _Probe, success: bool, reason: str) -> None:
        if not self.running:
            return
        endpoint = probe.endpoint
        record = self._records.get(endpoint)
        if record is None:
            return
        record.checks += 1
        if not success:
            record.failed_checks += 1
            record.last_failure = reason
            log.debug("health check of {endpoint} failed: {reason}", endpoint=str(endpoint), reason=reason)
        record.call = self._reactor.callLater(self.config.interval, self._check, endpoint)
        if record.state.record(success):
            healthy = record.state.healthy
            if healthy:
                log.info("{endpoint} is healthy again", endpoint=str(endpoint))
            else:
                log.warn("{endpoint} is unhealthy: {reason}", endpoint=str(endpoint), reason=reason)
            try:
                self._on_change(endpoint, healthy)
            except Exception:
                # A broken listener must not stop the checks.
                log.failure("health change callback failed for {endpoint}", endpoint=str(endpoint))

    def stats(self) -> dict[str, dict[str, Any]]:
        """
        @return: each endpoint's verdict and check counts, for the admin
            endpoints.
        """
        return {
            str(ep): {
                "healthy": r.state.healthy,
                "checks": r.checks,
                "failed_checks": r.failed_checks,
                "last_failure": r.last_failure,
            }
            for ep, r in self._records.items()
        }
