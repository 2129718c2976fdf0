"""
Keepalive for either end of the pilot channel: ping a quiet peer, give up
on a silent one.

Any bytes from the peer count as a sign of life, so a busy channel sends no
pings.  The timer is one delayed call per channel that re-arms itself from
the time of the last activity, rather than being reset on every read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Keepalive:
    """
    Watches one channel.

    @ivar interval: seconds of quiet after which a ping is sent (and again
        every C{interval} while the quiet lasts).
    @ivar timeout: seconds of quiet after which the peer is given up on.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        send_ping: Callable[[int], Any],
        expired: Callable[[float], Any],
    ):
        """
        @param clock: the time source and scheduler.
        @param interval: see L{interval}; must be positive.
        @param timeout: see L{timeout}; must be at least C{interval}.
        @param send_ping: called with a fresh ping id to send a ping.
        @param expired: called once, with the seconds of quiet, when the
            peer has been silent for C{timeout}; the caller closes the
            channel.
        @raise ValueError: for an interval or timeout out of range.
        """
        if interval <= 0:
            raise ValueError(f"keepalive interval must be positive, not {interval}")
        if timeout < interval:
            raise ValueError(f"keepalive timeout ({timeout}) must be at least the interval ({interval})")
        self._clock = clock
        self.interval = interval
        self.timeout = timeout
        self._send_ping = send_ping
        self._expired = expired
        self._last = clock.seconds()
        self._next_id = 0
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        """
        Start watching, counting quiet from now.
        """
        self._last = self._clock.seconds()
        if self._call is None:
            self._call = self._clock.callLater(self.interval, self._check)

    def stop(self) -> None:
        """
        Stop watching; nothing is called after this.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def received(self) -> None:
        """
        The peer sent something.
        """
        self._last = self._clock.seconds()

    def _check(self) -> None:
        self._call = None
        quiet = self._clock.seconds() - self._last
        if quiet >= self.timeout:
            self._expired(quiet)
            return
        wait = self.interval - quiet
        if wait <= 0:
            self._next_id += 1
            self._send_ping(self._next_id)
            wait = self.interval
        self._call = self._clock.callLater(min(wait, self.timeout - quiet), self._check)
