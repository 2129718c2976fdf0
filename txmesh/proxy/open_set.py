"""
L{OpenSet}: what is open now (a listener's connections, a proxy's L4
sessions), and the Deferreds of those waiting for none to be, as a drain
does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed

T = TypeVar("T")


class OpenSet(Generic[T]):
    """
    A set of open things that tells waiters when it becomes empty.
    """

    def __init__(self) -> None:
        self._open: set[T] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[T]:
        return iter(self._open)

    def __contains__(self, item: object) -> bool:
        return item in self._open

    def add(self, item: T) -> None:
        self._open.add(item)

    def discard(self, item: T) -> None:
        self._open.discard(item)
        if not self._open and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def when_empty(self) -> Deferred[None]:
        """
        @return: a L{Deferred} that fires once nothing is open (at once if
            nothing is); cancelling it stops the wait.
        """
        if not self._open:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._idle_waiters.remove(d) if d in self._idle_waiters else None)
        self._idle_waiters.append(d)
        return d
