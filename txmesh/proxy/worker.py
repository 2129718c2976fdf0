"""
One worker process of C{twistd txmesh-proxy --concurrency N}: a
L{ProxyService} whose listeners bind with C{SO_REUSEPORT}, driven by its
parent (L{txmesh.proxy.workers}) over its pipes.

Run by the parent as C{python -m txmesh.proxy.worker --index I ...}; not
a command for people.  Standard input carries the parent's messages (the
first is the config to start with), file descriptor 3 the worker's
answers, standard output its log lines, which the parent logs again with
the worker's index.  The worker has no admin endpoint of its own: the
parent asks it for its pages over the pipe.  It ignores C{SIGHUP} (the
parent reloads and passes the config on), stops with draining on
C{SIGTERM}, and stops when its parent goes away (end of standard input).

With a pilot, the parent holds the channel and the workload identity: the
worker's configs carry no C{pilot} section, and its mutual TLS uses the
key and certificates the parent sends (L{WorkloadIdentity.adopt}).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner

from txmesh.proxy.worker_channel import FrameDecoder, FrameError, encode, read_message
from txmesh.proxy.workload_identity import IdentityError, WorkloadIdentity

log = Logger()

CHANNEL_OUT = 3
"""
The worker's descriptor for messages to its parent.
"""


def worker_document(document: Any) -> Any:
    """
    @return: the parent's config document as a worker runs it: without the
        C{admin} section (the parent serves the admin endpoint) and the
        C{pilot} section (the parent holds the channel).
    """
    if not isinstance(document, dict):
        return document
    return {key: value for key, value in document.items() if key not in ("admin", "pilot")}


def worker_identity(message: Any, now: float) -> WorkloadIdentity | None:
    """
    @param message: the parent's C{identity} message (or C{None}).
    @return: the workload identity it describes, with its certificate if
        the parent has one yet; C{None} for a proxy without one.
    """
    if not isinstance(message, dict) or not isinstance(message.get("spiffe_id"), str):
        return None
    identity = WorkloadIdentity(message["spiffe_id"])
    if message.get("material") is not None:
        identity.adopt(message["material"], now)
    return identity


class WorkerChannel(Protocol):
    """
    The worker's end of the channel: applies the parent's configs and
    answers its admin requests.
    """

    def __init__(self, service: Any, reactor: Any):
        self._service = service
        self._reactor = reactor
        self._decoder = FrameDecoder()

    def send(self, message: dict[str, Any]) -> None:
        self.transport.write(encode(message))

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except FrameError as e:
            log.error("parent channel broken: {error}", error=str(e))
            self.transport.loseConnection()
            return
        for message in messages:
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "config":
            version = message.get("version")

            def applied(error: str | None) -> None:
                self.send({"type": "applied", "version": version, "ok": error is None, "error": error})

            d = self._service.apply_document(worker_document(message.get("document")),
                                             str(message.get("source")))
            d.addCallback(applied)
            d.addErrback(lambda f: applied(f"{f.type.__name__}: {f.getErrorMessage()}"))
        elif kind == "admin":
            self.send({"type": "admin", "id": message.get("id"), "body": self._page(message.get("page"))})
        elif kind == "identity":
            self._identity(message)
        else:
            log.warn("unknown message from the parent: {kind}", kind=kind)

    def _identity(self, message: dict[str, Any]) -> None:
        identity = self._service.identity
        material = message.get("material")
        if identity is None or material is None:
            return
        try:
            identity.adopt(material, self._reactor.seconds())
        except IdentityError as e:
            log.error("workload certificate from the parent refused, keeping the last: {error}", error=str(e))

    def _page(self, page: Any) -> Any:
        service = self._service
        if page == "metrics":
            return service.metrics_text()[1].decode("utf-8")
        if page == "clusters":
            return service.clusters_dump()
        if page == "config_dump":
            return service.config_dump()
        return None

    def connectionLost(self, reason: Any) -> None:
        # The parent is gone (or closed our input): a worker never outlives it.
        if self._reactor.running:
            self._reactor.stop()


def _install_reactor(name: str) -> Any:
    if name == "txmesh":
        from txmesh.reactor import install

        install()
    elif name != "default":
        from twisted.application.reactors import installReactor

        installReactor(name)
    from twisted.internet import reactor

    return reactor


def main(argv: list[str] | None = None) -> int:
    """
    Run one worker until it is stopped.

    @return: the exit status: 0 after a stop, 1 if it could not start, 2 if
        the parent's first config was refused.
    """
    parser = argparse.ArgumentParser(prog="txmesh.proxy.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--reactor", default="default")
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    reactor = _install_reactor(args.reactor)
    # The parent adds the time and the worker's index as it logs each line.
    observer = FileLogObserver(sys.stdout, lambda event: eventAsText(event, includeTimestamp=False) + "\n")
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from twisted.internet.stdio import StandardIO

    from txmesh.config.errors import ConfigError
    from txmesh.proxy.service import ProxyService

    try:
        first = read_message(0)
    except FrameError as e:
        log.error("worker {index}: bad first message: {error}", index=args.index, error=str(e))
        return 1
    if first is None or first["type"] != "config":
        return 1
    try:
        identity = worker_identity(first.get("identity"), reactor.seconds())
    except IdentityError as e:
        log.error("worker {index}: workload certificate from the parent refused: {error}", index=args.index,
                  error=str(e))
        return 1
    service = ProxyService(str(first["source"]), reactor, document=worker_document(first["document"]),
                           drain_timeout=args.drain_timeout, reuse_port=True, identity=identity)
    try:
        service.load_initial()
    except ConfigError as e:
        log.error("invalid config: {error}", error=str(e))
        return 2
    channel = WorkerChannel(service, reactor)
    status = []

    def started(_: Any) -> None:
        # The parent reloads and passes configs on; a SIGHUP sent to the
        # whole process group must not make workers read the file too.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        StandardIO(channel, stdin=0, stdout=CHANNEL_OUT, reactor=reactor)
        channel.send({"type": "ready", "pid": os.getpid(), "version": first.get("version")})

    def failed(failure: Any) -> None:
        log.failure("worker {index} could not start", failure, index=args.index)
        status.append(1)
        reactor.stop()

    def start() -> None:
        d = maybeDeferred(service.startService)
        d.addCallbacks(started, failed)
        reactor.addSystemEventTrigger("before", "shutdown", lambda: service.running and service.stopService())

    reactor.callWhenRunning(start)
    reactor.run()
    return status[0] if status else 0


if __name__ == "__main__":
    sys.exit(main())
