"""
An epoll reactor with a leaner event dispatch, for txmesh-proxy.

Twisted's epoll reactor wraps every ready descriptor's C{doRead}/C{doWrite}
in C{log.callWithLogger}, which sets up a legacy logging context (the
"system" prefix of old-style log lines) at a cost of several Python calls
per event.  A proxy handles a few events per request, so this reactor
dispatches directly; errors are still caught and logged by the reactor's
own C{_doReadOrWrite}.  Select it with C{twistd -r txmesh ...}.
"""

from __future__ import annotations

import errno

from twisted.internet.epollreactor import EPollReactor


class TxmeshReactor(EPollReactor):
    """
    L{EPollReactor} without the per-event logging context.
    """

    def doPoll(self, timeout: float | None) -> None:
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
