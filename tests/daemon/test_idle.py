"""
Unit tests for L{hyperdaemon.daemon.idle}: the pure idle deadline, and the
L{IdleTimer} service driven by a L{Clock}.
"""

from __future__ import annotations

from typing import Iterator

import pytest
from twisted.internet.task import Clock

from hyperdaemon.daemon.idle import IdleTimer, idle_deadline

TIMEOUT = 100.0


@pytest.mark.parametrize("last", [0.0, 1234.5])
def test_idle_deadline_is_none_when_timeout_is_zero(last: float) -> None:
    assert idle_deadline(last, sessions=0, timeout=0) is None


@pytest.mark.parametrize("sessions", [1, 2, 50])
def test_idle_deadline_is_none_while_sessions_are_attached(sessions: int) -> None:
    assert idle_deadline(10.0, sessions=sessions, timeout=30.0) is None


@pytest.mark.parametrize(
    ("last", "timeout", "expected"),
    [(0.0, 1800.0, 1800.0), (1000.0, 30.0, 1030.0), (5.5, 0.25, 5.75)],
)
def test_idle_deadline_is_last_activity_plus_timeout_without_sessions(
    last: float, timeout: float, expected: float
) -> None:
    assert idle_deadline(last, sessions=0, timeout=timeout) == expected


class IdleTimerTests:
    @pytest.fixture(autouse=True)
    def _timers(self) -> Iterator[None]:
        self.started: list[IdleTimer] = []
        yield
        for timer in reversed(self.started):
            timer.stopService()

    def make_timer(self, timeout: float = TIMEOUT, start: bool = True) -> IdleTimer:
        self.clock = Clock()
        self.clock.advance(1000)  # not at 0, so absolute times are tested
        self.sessions = 0
        self.fired: list[float] = []
        timer = IdleTimer(
            self.clock,
            timeout,
            lambda: self.sessions,
            lambda: self.fired.append(self.clock.seconds()),
        )
        if start:
            timer.startService()
            self.started.append(timer)
        return timer

    def test_fires_once_after_the_timeout_without_activity(self) -> None:
        self.make_timer()
        self.clock.advance(TIMEOUT - 0.5)
        assert self.fired == []
        self.clock.advance(0.5)
        assert self.fired == [1000 + TIMEOUT]
        self.clock.advance(TIMEOUT * 10)
        assert len(self.fired) == 1
        assert self.clock.getDelayedCalls() == []

    def test_touch_postpones_firing_until_timeout_after_the_last_touch(self) -> None:
        timer = self.make_timer()
        self.clock.advance(40)
        timer.touch()
        self.clock.advance(40)
        timer.touch()  # last activity at 1080
        self.clock.advance(TIMEOUT - 40 - 0.5)  # past the original deadline
        assert self.fired == []
        self.clock.advance(40)  # 1179.5: still before 1080 + TIMEOUT
        assert self.fired == []
        self.clock.advance(0.5)
        assert self.fired == [1080 + TIMEOUT]

    def test_touch_records_the_clock_time(self) -> None:
        timer = self.make_timer()
        self.clock.advance(12.5)
        timer.touch()
        assert timer.last_activity == 1012.5

    def test_never_fires_while_sessions_are_attached(self) -> None:
        self.make_timer()
        self.sessions = 1
        for _ in range(20):
            self.clock.advance(TIMEOUT / 2)
        assert self.fired == []
        # It keeps a call armed to look again, rather than giving up.
        assert len(self.clock.getDelayedCalls()) == 1

    def test_fires_timeout_after_the_last_session_detaches(self) -> None:
        timer = self.make_timer()
        self.sessions = 2
        self.clock.advance(TIMEOUT * 3.3)
        self.sessions = 0
        timer.touch()  # the detach counts as activity
        detached = self.clock.seconds()
        self.clock.advance(TIMEOUT - 0.5)
        assert self.fired == []
        self.clock.advance(0.5)
        assert self.fired == [detached + TIMEOUT]

    def test_timeout_zero_never_fires_and_arms_nothing(self) -> None:
        timer = self.make_timer(timeout=0)
        assert self.clock.getDelayedCalls() == []
        timer.touch()
        self.clock.advance(10**9)
        assert self.fired == []
        assert self.clock.getDelayedCalls() == []

    def test_nothing_is_armed_before_start_service(self) -> None:
        self.make_timer(start=False)
        assert self.clock.getDelayedCalls() == []
        self.clock.advance(TIMEOUT * 2)
        assert self.fired == []

    def test_idle_period_starts_at_start_service(self) -> None:
        timer = self.make_timer(start=False)
        self.clock.advance(TIMEOUT * 5)
        timer.startService()
        self.started.append(timer)
        started = self.clock.seconds()
        self.clock.advance(TIMEOUT - 0.5)
        assert self.fired == []
        self.clock.advance(0.5)
        assert self.fired == [started + TIMEOUT]

    def test_stop_service_cancels_the_pending_call(self) -> None:
        timer = self.make_timer()
        assert len(self.clock.getDelayedCalls()) == 1
        timer.stopService()
        assert self.clock.getDelayedCalls() == []
        self.clock.advance(TIMEOUT * 2)
        assert self.fired == []

    def test_stop_service_cancels_a_rearmed_call(self) -> None:
        timer = self.make_timer()
        self.clock.advance(TIMEOUT / 2)
        timer.touch()
        self.clock.advance(TIMEOUT / 2)  # first expiry re-arms for the touch
        assert len(self.clock.getDelayedCalls()) == 1
        timer.stopService()
        assert self.clock.getDelayedCalls() == []
        self.clock.advance(TIMEOUT * 2)
        assert self.fired == []
