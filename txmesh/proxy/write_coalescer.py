"""
Coalescing writes to the end of a reactor iteration.

Twisted's C{transport.write} registers the socket for writability and sends
on a later loop turn: two C{epoll_ctl} calls and an event dispatch for every
write.  Sending at once instead wakes the peer once per send, which on
virtual machines costs more than it saves.  L{WriteCoalescer} does neither:
bytes go into the transport's own buffer (so C{loseConnection}, producers and
error handling stay exactly Twisted's), and once per iteration every
transport written to is flushed with one C{send}; only what the kernel does
not take waits for writability the usual way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp


class WriteCoalescer:
    """
    Flushes the writes of one reactor's TCP transports once per iteration.
    """

    def __init__(self, reactor: Any):
        """
        @param reactor: provides C{IReactorTime}; flushes are scheduled on it.
        """
        self._reactor = reactor
        self._pending: list[Any] = []
        self._scheduled = False

    def writer_for(self, transport: Any) -> Callable[[bytes], None]:
        """
        @return: a C{write(bytes)} for C{transport}: coalesced for Twisted's
            own TCP connections, plain C{transport.write} for anything else
            (TLS, in-memory test transports, ...).
        """
        if not (isinstance(transport, tcp.Connection) and type(transport).write is tcp.Connection.write
                and hasattr(transport, "_tempDataBuffer")):
            return transport.write

        def write(data: bytes) -> None:
            if transport.TLS or transport.disconnecting or transport._writeDisconnecting:
                transport.write(data)
                return
            if not data or not transport.connected or transport._writeDisconnected:
                return
            buffer = transport._tempDataBuffer
            if not buffer and not transport.dataBuffer:
                # self._pending, not a local: flush() replaces the list.
                self._pending.append(transport)
                if not self._scheduled:
                    self._scheduled = True
                    self._reactor.callLater(0, self.flush)
            buffer.append(data)
            transport._tempDataLen += len(data)
            transport._maybePauseProducer()

        return write

    def flush(self) -> None:
        """
        Send what every transport written to since the last flush holds.
        """
        self._scheduled = False
        pending, self._pending = self._pending, []
        for transport in pending:
            if not transport.connected or transport.disconnecting or transport._writeDisconnecting:
                # Twisted flushes (and closes) these itself.
                continue
            if not transport._tempDataBuffer and not transport.dataBuffer:
                continue
            result = transport.doWrite()
            if result is not None or transport._tempDataBuffer or len(transport.dataBuffer) > transport.offset:
                # Partly sent, or failed: the reactor finishes the job (and
                # on an error, doWrite fails again there and disconnects).
                transport.startWriting()
