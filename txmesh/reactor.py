"""
An epoll reactor with a leaner event dispatch and batched writes, for
txmesh-proxy.

Two things Twisted's epoll reactor does per event cost a proxy dearly, as a
proxy handles a few events per request:

  - it wraps every ready descriptor's C{doRead}/C{doWrite} in
    C{log.callWithLogger}, a legacy logging context (the "system" prefix of
    old-style log lines) of several Python calls; L{TxmeshReactor}
    dispatches directly, errors still caught and logged by the reactor's own
    C{_doReadOrWrite};
  - C{transport.write} registers the socket for writability
    (C{epoll_ctl}), the next poll reports it writable, the send happens and
    the socket is unregistered (C{epoll_ctl} again): two system calls and a
    dispatch for every write, plaintext or TLS.  L{TxmeshReactor} instead
    keeps a connected descriptor that asks to write in a set, and before it
    polls it calls C{doWrite} of each: one C{send} for all the writes of an
    iteration, as C{epoll} would have reported the socket writable anyway.
    Only a descriptor the kernel did not take everything from is registered
    for writability, the usual way.  A send never happens during a
    C{write} call, so a protocol's writes of one event still leave together
    and its peer is woken once.

Select it with C{twistd -r txmesh ...}.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.epollreactor import EPOLLOUT, EPollReactor


class TxmeshReactor(EPollReactor):
    """
    L{EPollReactor} without the per-event logging context, with writes
    batched per iteration.

    @ivar _pending_writers: connected descriptors that asked to write since
        the last poll, in order, not registered with C{epoll}.
    """

    def __init__(self) -> None:
        self._pending_writers: dict[Any, None] = {}
        super().__init__()

    def addWriter(self, writer: Any) -> None:
        """
        Note C{writer} for the flush before the next poll; a descriptor that
        is not connected yet (a client still connecting waits for
        writability to learn the outcome) goes to C{epoll} at once.
        """
        if writer in self._pending_writers:
            return
        if getattr(writer, "connected", False) and writer.fileno() not in self._writes:
            self._pending_writers[writer] = None
            return
        super().addWriter(writer)

    def removeWriter(self, writer: Any) -> None:
        if self._pending_writers.pop(writer, 0) is None:
            return
        super().removeWriter(writer)

    def getWriters(self) -> list[Any]:
        return super().getWriters() + list(self._pending_writers)

    def removeAll(self) -> list[Any]:
        pending = list(self._pending_writers)
        self._pending_writers.clear()
        removed = super().removeAll()
        return removed + [writer for writer in pending if writer not in removed]

    def _flush_writers(self) -> None:
        """
        Call C{doWrite} of every pending descriptor; those still wanting to
        write (the kernel's buffer is full) wait for writability in C{epoll}.
        """
        pending = self._pending_writers
        dispatch = self._doReadOrWrite
        for writer in list(pending):
            if writer not in pending:
                continue  # removed by an earlier writer's disconnection
            # It stays pending while it writes: a doWrite that sends
            # everything calls stopWriting, which removes it.
            dispatch(writer, writer.fileno(), EPOLLOUT)
            if pending.pop(writer, 0) is None:
                super().addWriter(writer)

    def doPoll(self, timeout: float | None) -> None:
        if self._pending_writers:
            self._flush_writers()
            if self._pending_writers:
                # Written to by the flush itself (a disconnection's
                # callbacks): send on the next turn, without waiting.
                timeout = 0
            elif self._newTimedCalls or self.threadCallQueue:
                # The flush ran protocol code, which scheduled calls: the
                # main loop's timeout was computed without them.
                due = self.timeout()
                if due is not None and (timeout is None or due < timeout):
                    timeout = due
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                dispatch(selectable, fd, event)

    doIteration = doPoll


def install() -> TxmeshReactor:
    """
    Install L{TxmeshReactor} as the global reactor.
    """
    from twisted.internet.main import installReactor

    reactor = TxmeshReactor()
    installReactor(reactor)
    return reactor
