"""
C{twistd txmesh-proxy --concurrency N}: N worker processes serving the same
listeners, one parent that reads the config and serves the admin endpoint.

  - B{Accepting}: every worker binds each TCP listener's port itself with
    C{SO_REUSEPORT} (L{txmesh.proxy.reuseport}), and the kernel spreads new
    connections between them.  A listener added by a reload opens in every
    worker with no file descriptor passing.
  - B{Config}: the parent loads and validates the file (at start, on
    C{SIGHUP}, with C{--watch}) and sends each accepted document to every
    worker over its pipe (L{txmesh.proxy.worker_channel}); each worker
    applies it with the same validation as a single proxy's reload
    (L{ProxyService.apply_document}).  A document the parent refuses
    reaches no worker.  A restarted worker starts from the current one.
  - B{Pilot}: with a C{pilot} section (or C{--pilot}) the parent alone
    holds the channel (L{txmesh.proxy.pilot_link}), so the pilot sees one
    proxy: it merges and validates each push, sends it to the workers, and
    acks it once every worker has applied it (a worker's refusal is the
    NACK's reason).  The parent also keeps the workload identity: it makes
    the key and asks the pilot for certificates, and sends the key, chain
    and trust bundle to the workers over their pipes whenever they change
    (never through the environment or a file).
  - B{Admin}: only the parent listens on the admin address.
    C{/stats/prometheus} is the workers' pages merged
    (L{txmesh.proxy.worker_metrics}) plus the parent's own
    C{txmesh_worker*} families; C{/ready} answers C{LIVE} when every worker
    is serving; C{/config_dump} and
    C{/clusters} add each worker's view.
  - B{Lifecycle}: stopping the parent (C{SIGTERM}) sends C{SIGTERM} to
    every worker, which drains like a single proxy, and kills those still
    running after the drain timeout and a grace period.  A worker that
    exits otherwise is logged and started again after a backoff (doubling
    from 0.5 s up to 30 s, reset once a worker has run a minute).

L{WorkerPool} is the parent's service; L{txmesh.proxy.worker} is the
worker's program.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmesh.config.errors import ConfigError
from txmesh.config.loader import ConfigLoader, watched_mtimes
from txmesh.config.model import ProxyConfig
from txmesh.filters.registry import FilterRegistry
from txmesh.observability.metrics import pilot_families
from txmesh.proxy.admin import AdminResource, AdminSite
from txmesh.proxy.pilot_link import PilotLink
from txmesh.proxy.reuseport import shared_address_error
from txmesh.proxy.worker_channel import FrameDecoder, FrameError, encode
from txmesh.proxy.worker_metrics import merge_expositions, render

log = Logger()

BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
"""
Seconds a worker must run before its slot's backoff starts again from
L{BACKOFF_BASE}.
"""

SCRAPE_TIMEOUT = 5.0
ROLLOUT_TIMEOUT = 30.0
"""
Seconds the workers get to apply a pushed config before the parent
refuses (NACKs) it for them.
"""
KILL_GRACE = 5.0
"""
Seconds past the drain timeout before a worker still running at stop is
killed.
"""


def restart_delay(failures: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """
    @param failures: exits of the slot's workers in a row (1 for the first).
    @return: seconds to wait before starting the slot's next worker.
    """
    return min(cap, base * 2 ** max(0, failures - 1))


def exit_description(status: Any) -> str:
    """
    @param status: the C{ProcessDone} or C{ProcessTerminated} a worker
        ended with.
    @return: how it ended, for the log.
    """
    signal_number = getattr(status, "signal", None)
    if signal_number is not None:
        try:
            return f"was killed by {signal.Signals(signal_number).name}"
        except ValueError:
            return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(status, 'exitCode', None)}"


def check_shareable(config: ProxyConfig, source: str, reactor: Any) -> None:
    """
    @raise ConfigError: C{config} cannot run in several worker processes:
        it has a listener whose address cannot be shared.
    """
    for i, listener in enumerate(config.listeners):
        reason = shared_address_error(reactor, listener.address)
        if reason is not None:
            raise ConfigError(source, f"listeners[{i}].address", f"with --concurrency: {reason}")


class WorkerProcess(ProcessProtocol):
    """
    The parent's end of one worker: its pipes and what it has said.

    @ivar index: the worker's slot, C{0} to C{N - 1}.
    @ivar pid: its process id, once started.
    @ivar ready: whether it has started serving.
    @ivar version: the parent's config version it last applied.
    @ivar error: why it refused the last config, or C{None}.
    """

    def __init__(self, pool: WorkerPool, index: int):
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self.ready = False
        self.version: int | None = None
        self.error: str | None = None
        self.started_at = 0.0
        self.ended: Deferred = Deferred()
        self._decoder = FrameDecoder()
        self._lines = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and self.transport.pid is not None:
            self.transport.writeToChild(0, encode(message))

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 3:
            try:
                messages = self._decoder.feed(data)
            except FrameError as e:
                log.error("worker {index}: channel broken ({error}); stopping it", index=self.index, error=str(e))
                self.signal("KILL")
                return
            for message in messages:
                self.pool.received(self, message)
            return
        buffered = self._lines.get(fd, b"") + data
        *lines, self._lines[fd] = buffered.split(b"\n")
        for line in lines:
            if line:
                log.info("worker {index}: {line}", index=self.index,
                         line=line.decode("utf-8", "replace").rstrip("\r"))

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason: Any) -> None:
        self.ready = False
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    The parent of C{twistd txmesh-proxy --concurrency N}: reads the config,
    runs and restarts the workers, serves the admin endpoint.

    @ivar config: the config the workers run.
    @ivar version: the parent's config version (1 at start, one more per
        accepted reload); workers report the version they applied.
    @ivar workers: the current worker of each slot.
    """

    def __init__(self, config_path: str, reactor: Any, concurrency: int, *,
                 registry: FilterRegistry | None = None, watch_interval: float = 0.0,
                 drain_timeout: float = 5.0, reactor_name: str = "default",
                 python: str = sys.executable, backoff: tuple[float, float] = (BACKOFF_BASE, BACKOFF_MAX),
                 document: dict | None = None, pilot_backoff: tuple[float, float] = (0.5, 15.0)):
        """
        @param config_path: the YAML file to run from (a name for messages
            when C{document} is given).
        @param concurrency: the number of worker processes, at least 1.
        @param reactor: provides C{IReactorProcess}, C{IReactorTCP} and
            C{IReactorTime}.
        @param reactor_name: the reactor workers install (C{txmesh},
            C{default}, or a Twisted reactor's short name).
        @param python: the interpreter that runs the workers.
        @param backoff: seconds: the first restart delay and its cap.
        @param document: the config document to run from instead of the
            file's (the bootstrap C{--pilot} makes, see
            L{txmesh.proxy.bootstrap}).
        @param pilot_backoff: seconds: the default first and largest waits
            before reconnecting to the pilot (see L{PilotLink}).
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._path = config_path
        self._document = document
        self._pilot_backoff = pilot_backoff
        self._link: PilotLink | None = None
        self._rollouts: dict[int, _Rollout] = {}
        self._reactor = reactor
        self._concurrency = concurrency
        self._loader = ConfigLoader(registry or FilterRegistry.from_plugins())
        self._watch_interval = watch_interval
        self._drain_timeout = drain_timeout
        self._reactor_name = reactor_name
        self._python = python
        self._backoff = backoff
        self.config: ProxyConfig | None = None
        self.version = 0
        self.loaded_at = 0.0
        self.workers: list[WorkerProcess | None] = [None] * concurrency
        self._failures = [0] * concurrency
        self._restarts: list[Any] = [None] * concurrency
        self._requests: dict[int, tuple[WorkerProcess, Deferred]] = {}
        self._next_request = 0
        self._stopping = False
        self._admin_port: Any = None
        self._watcher: LoopingCall | None = None
        self._mtime: tuple[float | None, ...] | None = None
        self._old_sighup: Any = None
        self.overload = None
        self._registry = CollectorRegistry()
        self._reloads = Counter("txmesh_config_reloads", "Config reloads by result.", ("result",),
                                registry=self._registry)
        self._worker_restarts = Counter("txmesh_worker_restarts", "Worker processes started again after exiting.",
                                        registry=self._registry)
        workers = Gauge("txmesh_workers", "Worker processes, by state (configured, running, ready).", ("state",),
                        registry=self._registry)
        workers.labels("configured").set(concurrency)
        workers.labels("running").set_function(lambda: sum(w is not None for w in self.workers))
        workers.labels("ready").set_function(lambda: sum(w is not None and w.ready for w in self.workers))
        # The parent holds the pilot channel: its state is the parent's to report.
        self._registry.register(_PilotCollector(self.pilot_status))

    # Config

    def load_initial(self) -> ProxyConfig:
        """
        Load and validate the config before the service starts.

        @raise ConfigError: the file is invalid, or cannot run in worker
            processes (see L{check_shareable}).
        """
        if self._document is not None:
            config = self._loader.load_document(self._document, self._path)
        else:
            config = self._loader.load_file(self._path)
        check_shareable(config, self._path, self._reactor)
        self.config = config
        self._mtime = self._file_mtime()
        self._log_warnings(config)
        return config

    def _log_warnings(self, config: ProxyConfig) -> None:
        for warning in config.warnings:
            log.warn("config warning: {text}", text=warning)

    def _config_message(self) -> dict[str, Any]:
        return {"type": "config", "document": self.config.raw, "source": self._path, "version": self.version}

    def _identity_message(self) -> dict[str, Any] | None:
        identity = self._link.identity if self._link is not None else None
        if identity is None:
            return None
        return {"type": "identity", "spiffe_id": identity.spiffe_id, "material": identity.material()}

    def _identity_changed(self, identity: Any) -> None:
        message = self._identity_message()
        for worker in self.workers:
            if worker is not None:
                worker.send(message)
        log.info("workload certificate for {identity} sent to the workers", identity=identity.spiffe_id)

    def _send_config(self) -> list[WorkerProcess]:
        """
        Send the current config to every running worker.

        @return: the workers it was sent to.
        """
        message = self._config_message()
        sent = [w for w in self.workers if w is not None]
        for worker in sent:
            worker.send(message)
        log.info("config version {version} sent to {n} worker(s)", version=self.version, n=len(sent))
        return sent

    def _apply_pushed(self, document: dict, source: str) -> Deferred:
        """
        A push from the pilot, merged with the bootstrap: validate it as a
        single proxy would, send it to the workers, and fire once every
        worker has applied it.

        @raise ConfigError: (or fail with it) the document is invalid, or a
            worker refused it or did not apply it in time; the pilot is
            told why.
        """
        try:
            new = self._loader.load_document(document, source)
            check_shareable(new, source, self._reactor)
        except ConfigError:
            self._reloads.labels("rejected").inc()
            raise
        self._log_warnings(new)
        self.config = new
        self.version += 1
        self.loaded_at = self._reactor.seconds()
        self._reloads.labels("applied").inc()
        rollout = _Rollout(self.version, source, {w.index for w in self._send_config()})
        self._rollouts[self.version] = rollout
        rollout.done.addTimeout(ROLLOUT_TIMEOUT, self._reactor, onTimeoutCancel=rollout.timed_out)

        def forget(result: Any) -> Any:
            self._rollouts.pop(rollout.version, None)
            return result

        rollout.check()
        return rollout.done.addBoth(forget)

    def reload(self) -> Deferred:
        """
        Re-read the file; if it is valid, send it to every worker.

        @return: a L{Deferred} firing with C{True} if it was accepted (sent),
            C{False} if refused; whether workers applied it shows in
            C{/config_dump} and C{/ready}.
        """
        self._mtime = self._file_mtime()
        if self._link is not None:
            # As a single proxy's: the file is only the pilot bootstrap.
            log.warn("{path} changed; it is the pilot bootstrap, so changes need a restart", path=self._path)
            return defer.succeed(False)
        try:
            new = self._loader.load_file(self._path)
            check_shareable(new, self._path, self._reactor)
        except ConfigError as e:
            log.error("config reload refused, still serving version {version}: {error}",
                      version=self.version, error=str(e))
            self._reloads.labels("rejected").inc()
            return defer.succeed(False)
        if self.config is not None and self.config.admin_address != new.admin_address:
            log.warn("admin address changes need a restart; still on {address}",
                     address=self.config.admin_address)
        self._log_warnings(new)
        self.config = new
        self.version += 1
        self.loaded_at = self._reactor.seconds()
        self._mtime = self._file_mtime()
        self._reloads.labels("applied").inc()
        self._send_config()
        return defer.succeed(True)

    def _file_mtime(self) -> tuple[float | None, ...]:
        return watched_mtimes(self._path, self.config)

    def _check_file(self) -> None:
        if self._file_mtime() != self._mtime:
            self.reload()

    # Lifecycle

    @defer.inlineCallbacks
    def startService(self) -> Any:
        Service.startService(self)
        if self.config is None:
            self.load_initial()
        self.version = 1
        self.loaded_at = self._reactor.seconds()
        if self.config.pilot is not None:
            self._link = PilotLink(self.config, self._reactor, self._apply_pushed, self._pilot_backoff)
            if self._link.identity is not None:
                self._link.identity.subscribe(self._identity_changed)
        for index in range(self._concurrency):
            self._spawn(index)
        if self.config.admin_address:
            self._admin_port = yield serverFromString(self._reactor, self.config.admin_address).listen(
                AdminSite(AdminResource(self)))
        self._install_sighup()
        if self._watch_interval > 0:
            self._watcher = LoopingCall(self._check_file)
            self._watcher.clock = self._reactor
            self._watcher.start(self._watch_interval, now=False)
        log.info("txmesh-proxy: {n} worker processes from {path}", n=self._concurrency, path=self._path)
        if self._link is not None:
            self._link.start()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        self._stopping = True
        if self._link is not None:
            self._link.stop()
        if self._watcher is not None and self._watcher.running:
            self._watcher.stop()
        self._restore_sighup()
        for index, call in enumerate(self._restarts):
            if call is not None and call.active():
                call.cancel()
            self._restarts[index] = None
        running = [w for w in self.workers if w is not None]
        for worker in running:
            worker.signal("TERM")
        ended = DeferredList([w.ended for w in running])
        kill = self._reactor.callLater(self._drain_timeout + KILL_GRACE, self._kill, running)
        yield ended
        if kill.active():
            kill.cancel()
        if self._admin_port is not None:
            yield maybeDeferred(self._admin_port.stopListening)
        log.info("txmesh-proxy: all workers stopped")

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn("worker {index} (pid {pid}) still running after the drain: killing it",
                         index=worker.index, pid=worker.pid)
                worker.signal("KILL")

    def _spawn(self, index: int) -> None:
        self._restarts[index] = None
        worker = WorkerProcess(self, index)
        argv = [self._python, "-m", "txmesh.proxy.worker", "--index", str(index),
                "--reactor", self._reactor_name, "--drain-timeout", repr(self._drain_timeout)]
        self._reactor.spawnProcess(worker, self._python, argv, env=dict(os.environ),
                                   childFDs={0: "w", 1: "r", 2: "r", 3: "r"})
        worker.started_at = self._reactor.seconds()
        self.workers[index] = worker
        worker.send({**self._config_message(), "identity": self._identity_message()})
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def ended(self, worker: WorkerProcess, reason: Any) -> None:
        """
        C{worker} exited: forget it, and unless the pool is stopping start
        its slot again after a backoff.
        """
        if self.workers[worker.index] is worker:
            self.workers[worker.index] = None
        # Its replacement starts from the current config.
        for rollout in list(self._rollouts.values()):
            rollout.answered(worker.index)
        for key, (owner, d) in list(self._requests.items()):
            if owner is worker:
                del self._requests[key]
                d.errback(RuntimeError(f"worker {worker.index} exited"))
        if self._stopping:
            log.info("worker {index} (pid {pid}) stopped", index=worker.index, pid=worker.pid)
            return
        index = worker.index
        if self._reactor.seconds() - worker.started_at >= STABLE_AFTER:
            self._failures[index] = 0
        self._failures[index] += 1
        delay = restart_delay(self._failures[index], *self._backoff)
        how = exit_description(reason.value)
        log.error("worker {index} (pid {pid}) {how}; starting it again in {delay:.1f}s",
                  index=index, pid=worker.pid, how=how, delay=delay)
        self._worker_restarts.inc()
        self._restarts[index] = self._reactor.callLater(delay, self._spawn, index)

    def received(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        """
        A message from C{worker}.
        """
        kind = message["type"]
        if kind == "ready":
            worker.ready = True
            worker.version = message.get("version")
            log.info("worker {index} (pid {pid}) ready", index=worker.index, pid=worker.pid)
        elif kind == "applied":
            worker.version = message.get("version")
            worker.error = None if message.get("ok") else message.get("error")
            if worker.error is not None:
                log.error("worker {index} refused config version {version}: {error}", index=worker.index,
                          version=worker.version, error=worker.error)
            rollout = self._rollouts.get(worker.version)
            if rollout is not None:
                rollout.answered(worker.index, worker.error)
        elif kind == "admin":
            pending = self._requests.pop(message.get("id"), None)
            if pending is not None:
                pending[1].callback(message.get("body"))

    def ask(self, worker: WorkerProcess, page: str) -> Deferred:
        """
        @return: a L{Deferred} firing with C{worker}'s admin C{page}, or
            failing if it does not answer within L{SCRAPE_TIMEOUT}.
        """
        self._next_request += 1
        key = self._next_request
        d: Deferred = Deferred()
        self._requests[key] = (worker, d)

        def forget(result: Any) -> Any:
            self._requests.pop(key, None)
            return result

        d.addTimeout(SCRAPE_TIMEOUT, self._reactor)
        d.addBoth(forget)
        worker.send({"type": "admin", "id": key, "page": page})
        return d

    @defer.inlineCallbacks
    def _gather(self, page: str) -> Any:
        """
        @return: (a Deferred of) C{[(worker, answer or None)]} for the live
            workers.
        """
        live = [w for w in self.workers if w is not None and w.ready]
        results = yield DeferredList([self.ask(w, page) for w in live], consumeErrors=True)
        out = []
        for worker, (ok, value) in zip(live, results, strict=True):
            if not ok:
                log.warn("worker {index} did not answer for {page}: {error}", index=worker.index, page=page,
                         error=value.getErrorMessage())
            out.append((worker, value if ok else None))
        return out

    # Signals

    def _install_sighup(self) -> None:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
            return
        reactor = self._reactor
        self._old_sighup = signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(self.reload))

    def _restore_sighup(self) -> None:
        if self._old_sighup is not None:
            signal.signal(signal.SIGHUP, self._old_sighup)
            self._old_sighup = None

    # What the admin endpoint shows (see AdminResource)

    def is_ready(self) -> bool:
        """
        @return: whether every worker is running and serving.  A worker
            still applying (or refusing) the latest config serves the one
            before, as a single proxy does: C{/config_dump} shows each
            worker's version, so a reload does not make the proxy unready.
        """
        return self.running and all(w is not None and w.ready for w in self.workers)

    def _worker_status(self) -> list[dict[str, Any]]:
        now = self._reactor.seconds()
        return [
            {"index": index, "pid": w.pid if w else None, "ready": bool(w and w.ready),
             "version": w.version if w else None, "error": w.error if w else None,
             "uptime": round(now - w.started_at, 3) if w else None, "restarts_in_a_row": self._failures[index]}
            for index, w in enumerate(self.workers)
        ]

    def config_dump(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self._path,
            "loaded_at": self.loaded_at,
            "config": self.config.raw if self.config is not None else None,
            "workers": self._worker_status(),
        }

    def clusters_dump(self) -> Deferred:
        """
        @return: a L{Deferred} firing with C{{"workers": {index: clusters}}}.
        """
        d = self._gather("clusters")
        d.addCallback(lambda answers: {"workers": {str(w.index): body for w, body in answers}})
        return d

    def pilot_status(self) -> dict | None:
        """
        @return: the pilot channel's status, held by the parent, or C{None}
            without a pilot.
        """
        return self._link.status() if self._link is not None else None

    def metrics_text(self) -> Deferred:
        """
        @return: a L{Deferred} firing with the content type and body of the
            merged exposition: the workers' pages summed, and the parent's
            own families.
        """
        def merge(answers: list) -> tuple[str, bytes]:
            texts = [generate_latest(self._registry).decode("utf-8")]
            for _worker, body in answers:
                if isinstance(body, str):
                    texts.append(body)
            try:
                return CONTENT_TYPE_LATEST, render(merge_expositions(texts))
            except ValueError as e:
                log.error("worker metrics do not merge: {error}", error=str(e))
                return CONTENT_TYPE_LATEST, texts[0].encode("utf-8")

        return self._gather("metrics").addCallback(merge)


class _Rollout:
    """
    One pushed config on its way to the workers: the pilot's push is acked
    once every worker it was sent to has applied it.

    @ivar done: fires with C{None} when all have; fails with L{ConfigError}
        when one refuses it (or, through L{timed_out}, when they are too
        slow).
    """

    def __init__(self, version: int, source: str, waiting: set[int]):
        self.version = version
        self._source = source
        self._waiting = waiting
        self.done: Deferred = Deferred()

    def answered(self, index: int, error: str | None = None) -> None:
        """
        Worker C{index} applied the config (C{error} is C{None}), refused it
        (C{error} says why), or exited (its replacement starts from it).
        """
        if self.done.called or index not in self._waiting:
            return
        if error is not None:
            self.done.errback(ConfigError(self._source, "", f"worker {index}: {error}"))
            return
        self._waiting.discard(index)
        self.check()

    def check(self) -> None:
        if not self.done.called and not self._waiting:
            self.done.callback(None)

    def timed_out(self, result: Any, timeout: float) -> Failure:
        """
        C{addTimeout}'s hook: the reason instead of a C{CancelledError}.
        """
        waiting = ", ".join(str(i) for i in sorted(self._waiting))
        return Failure(ConfigError(self._source, "", f"worker(s) {waiting} did not apply it within {timeout:g}s"))


class _PilotCollector:
    """
    A prometheus-client collector of the pilot channel's state.
    """

    def __init__(self, status: Any):
        self._status = status

    def collect(self) -> Any:
        return pilot_families(self._status())
