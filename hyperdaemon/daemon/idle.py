"""
When the daemon has been idle long enough to stop.

Idle means: no session attached and no command received for the idle
timeout (SPEC.md).  L{idle_deadline} decides; L{IdleTimer} keeps one
delayed call armed for the deadline instead of polling, and activity only
records a time, so that a thousand heartbeats cost a thousand float stores
rather than a thousand timer resets.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime


def idle_deadline(last_activity: float, sessions: int, timeout: float) -> float | None:
    """
    When the daemon may stop if nothing else happens.

    @return: a time on the same clock as C{last_activity}, or C{None} when
        it must not stop for idleness (C{timeout} is 0, or sessions are
        attached).
    """
    if timeout <= 0 or sessions > 0:
        return None
    return last_activity + timeout


class IdleTimer(Service):
    """
    Calls C{on_idle} once the daemon has been idle for C{timeout} seconds.
    C{count_sessions} tells how many sessions are attached.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        count_sessions: Callable[[], int],
        on_idle: Callable[[], None],
    ) -> None:
        self._clock = clock
        self.timeout = timeout
        self._count_sessions = count_sessions
        self._on_idle = on_idle
        self.last_activity = clock.seconds()
        self._call: IDelayedCall | None = None

    def touch(self) -> None:
        """Something happened: the idle period starts again."""
        self.last_activity = self._clock.seconds()

    def startService(self) -> None:
        super().startService()
        self.touch()
        self._arm(self.timeout)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _arm(self, delay: float) -> None:
        if self.timeout > 0:
            self._call = self._clock.callLater(max(delay, 0.0), self._expired)

    def _expired(self) -> None:
        self._call = None
        now = self._clock.seconds()
        deadline = idle_deadline(self.last_activity, self._count_sessions(), self.timeout)
        if deadline is None:
            # Sessions are attached; the last detach counts as activity.
            self._arm(self.timeout)
        elif now >= deadline:
            self._on_idle()
        else:
            self._arm(deadline - now)
