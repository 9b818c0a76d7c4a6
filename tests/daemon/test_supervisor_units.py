"""
Unit tests of L{hyperdaemon.daemon.supervisor} on a fake clock: the restart budget,
the callback-frame parser, L{HyperdInstance}, when the probe is scheduled,
and what a check decides and does to a fake C{hyperd} process (busy, stopped,
hung, gone) and how it is stopped.  No C{hyperd} runs.
"""

from __future__ import annotations

import signal
from pathlib import Path

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from hyperdaemon.daemon.liveness import GONE, ProcessSample, Verdict
from hyperdaemon.daemon.supervisor import (
    HyperdInstance,
    HyperdSupervisor,
    HyperdUnavailable,
    RestartBudget,
    _HyperdProcess,
    parse_callback_frame,
)

FRAME = b"\x1atab.tcp://127.0.0.1:37447\x00"


def frame(text: bytes) -> bytes:
    """A callback frame for C{text}: length byte (counting the NUL), text, NUL."""
    return bytes([len(text) + 1]) + text + b"\x00"


# -- RestartBudget ------------------------------------------------------------


def test_budget_allows_three_replacements_within_a_minute() -> None:
    budget = RestartBudget()
    assert [budget.spend(t) for t in (0.0, 10.0, 20.0)] == [True, True, True]


def test_budget_refuses_the_fourth_replacement_within_a_minute() -> None:
    budget = RestartBudget()
    for t in (0.0, 10.0, 20.0):
        budget.spend(t)
    assert budget.spend(59.9) is False


def test_refused_replacement_does_not_use_up_budget() -> None:
    budget = RestartBudget()
    for t in (0.0, 10.0, 20.0):
        budget.spend(t)
    assert budget.spend(30.0) is False
    assert budget.spend(30.0) is False
    # Only the spend at 0 has left the window: exactly one more is allowed.
    assert budget.spend(60.0) is True
    assert budget.spend(60.0) is False


def test_budget_allows_again_once_the_window_slides_past_the_oldest() -> None:
    budget = RestartBudget()
    for t in (0.0, 10.0, 20.0):
        budget.spend(t)
    assert budget.spend(59.0) is False
    assert budget.spend(60.0) is True  # 0.0 is now 60 s old
    assert budget.spend(65.0) is False  # 10, 20 and 60 are within the window
    assert budget.spend(70.0) is True  # 10.0 has left the window


def test_budget_spaced_replacements_are_always_allowed() -> None:
    budget = RestartBudget()
    assert all(budget.spend(t * 25.0) for t in range(100))


def test_budget_with_custom_limit_and_window() -> None:
    budget = RestartBudget(limit=1, window=10.0)
    assert budget.spend(0.0) is True
    assert budget.spend(9.0) is False
    assert budget.spend(10.0) is True
    assert budget.spend(15.0) is False


def test_budget_with_larger_limit() -> None:
    budget = RestartBudget(limit=5, window=60.0)
    assert [budget.spend(float(t)) for t in range(6)] == [True] * 5 + [False]


def test_budget_with_zero_limit_refuses_everything() -> None:
    budget = RestartBudget(limit=0)
    assert budget.spend(0.0) is False
    assert budget.spend(1000.0) is False


def test_default_budget_is_three_in_sixty_seconds() -> None:
    budget = RestartBudget()
    assert (budget.limit, budget.window) == (3, 60.0)


# -- parse_callback_frame -----------------------------------------------------


def test_complete_frame_gives_host_and_port() -> None:
    assert parse_callback_frame(FRAME) == ("127.0.0.1", 37447)


@pytest.mark.parametrize("cut", range(1, len(FRAME)))
def test_incomplete_frame_gives_none(cut: int) -> None:
    assert parse_callback_frame(FRAME[:cut]) is None


def test_empty_buffer_gives_none() -> None:
    assert parse_callback_frame(b"") is None


def test_bytes_after_a_complete_frame_are_ignored() -> None:
    assert parse_callback_frame(FRAME + b"\x05junk") == ("127.0.0.1", 37447)


def test_other_host_and_port_are_parsed() -> None:
    assert parse_callback_frame(frame(b"tab.tcp://localhost:1")) == ("localhost", 1)


@pytest.mark.parametrize(
    "text",
    [b"tcp://127.0.0.1:37447", b"http://127.0.0.1:37447", b"tab.udp://127.0.0.1:1", b""],
)
def test_wrong_scheme_raises_value_error(text: bytes) -> None:
    with pytest.raises(ValueError):
        parse_callback_frame(frame(text))


@pytest.mark.parametrize("text", [b"tab.tcp://127.0.0.1:notaport", b"tab.tcp://127.0.0.1"])
def test_bad_port_raises_value_error(text: bytes) -> None:
    with pytest.raises(ValueError):
        parse_callback_frame(frame(text))


# -- HyperdInstance -----------------------------------------------------------


def test_instance_endpoint_is_host_colon_port() -> None:
    instance = HyperdInstance(123, "127.0.0.1", 37447, "tableau_internal_user", "pw")
    assert instance.endpoint == "127.0.0.1:37447"


def test_instance_repr_does_not_contain_the_password() -> None:
    password = "s3cr3t-Pa55word-xyzzy"
    instance = HyperdInstance(123, "127.0.0.1", 37447, "tableau_internal_user", password)
    text = repr(instance)
    assert password not in text
    assert password not in str(instance)
    # The rest is still there for logs.
    assert "37447" in text and "tableau_internal_user" in text


def test_instance_without_password_has_endpoint() -> None:
    instance = HyperdInstance(1, "localhost", 5, "u", None)
    assert instance.endpoint == "localhost:5"
    assert instance.password is None


# -- watching -----------------------------------------------------------------

def _ready_supervisor(clock: Clock) -> HyperdSupervisor:
    """A supervisor whose hyperd is taken as ready (none is started)."""
    supervisor = HyperdSupervisor(clock, Path("/nonexistent/hyperd"), Path("/nonexistent"),
                                  False, on_ready=lambda _: None, on_give_up=lambda _: None)
    supervisor.state = "ready"
    return supervisor


def test_watched_by_default() -> None:
    assert _ready_supervisor(Clock()).watched


def test_unwatched_ready_hyperd_schedules_nothing() -> None:
    clock = Clock()
    supervisor = _ready_supervisor(clock)
    supervisor.watch(True)
    assert len(clock.getDelayedCalls()) == 1
    supervisor.watch(False)
    clock.advance(HyperdSupervisor.probe_interval * 10)
    assert clock.getDelayedCalls() == []  # nothing would wake the process


def test_watching_a_ready_hyperd_probes_every_interval_until_unwatched() -> None:
    clock = Clock()
    supervisor = _ready_supervisor(clock)
    supervisor.watch(False)
    supervisor.watch(True)
    [probe] = clock.getDelayedCalls()
    assert probe.getTime() == HyperdSupervisor.probe_interval
    clock.advance(HyperdSupervisor.probe_interval)
    [probe] = clock.getDelayedCalls()
    assert probe.getTime() == 2 * HyperdSupervisor.probe_interval
    supervisor.watch(False)
    assert clock.getDelayedCalls() == []


def test_watching_before_ready_waits_for_ready() -> None:
    clock = Clock()
    supervisor = _ready_supervisor(clock)
    supervisor.state = "starting"
    supervisor.watch(True)
    assert clock.getDelayedCalls() == []
    assert supervisor.watched


# -- judging and stopping hyperd (a fake process, probe and /proc) ------------

SLEEPING = ProcessSample("S", "SSSS", 1.0)
STOPPED = ProcessSample("T", "TTTT", 1.0)
WORKING = ProcessSample("S", "RRSS", 1.0)
INTERVAL = HyperdSupervisor.probe_interval
TIMEOUT = HyperdSupervisor.probe_timeout
HUNG_AFTER = HyperdSupervisor.hung_after
GRACE = HyperdSupervisor.stop_grace


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)


class FakeCallback:
    closed_after: list[int] | None = None

    def __init__(self, transport: FakeTransport) -> None:
        self._transport = transport

    def close(self) -> None:
        # Which signals had been sent when the callback connection closed.
        self.closed_after = list(self._transport.signals)


class FakeProbe:
    """A probe whose checks the test answers (or lets time out)."""

    def __init__(self) -> None:
        self.checks: list[Deferred[None]] = []

    def check(self) -> Deferred[None]:
        self.checks.append(Deferred())
        return self.checks[-1]

    def answer(self) -> None:
        self.checks[-1].callback(None)

    def close(self) -> None:
        pass


@attrs.define
class World:
    """A ready supervisor of one fake hyperd, and what it did to it."""

    clock: Clock
    supervisor: HyperdSupervisor
    process: _HyperdProcess
    transport: FakeTransport
    probe: FakeProbe
    sample: ProcessSample | None = SLEEPING
    launches: list[float] = attrs.Factory(list)
    instance: HyperdInstance = HyperdInstance(4242, "127.0.0.1", 1, "u", "pw")

    def exits(self, signum: int | None = None) -> None:
        reason = ProcessTerminated(signal=signum) if signum else ProcessDone(0)
        self.process.processExited(Failure(reason))


def serving(watched: bool = True) -> World:
    """
    A supervisor whose hyperd (pid 4242, not a real process) has just become
    ready, as after L{HyperdSupervisor._start}.  A replacement is recorded
    in C{launches}, not started.
    """
    clock = Clock()
    supervisor = HyperdSupervisor(clock, Path("/nonexistent/hyperd"), Path("/nonexistent"),
                                  False, on_ready=lambda _: None, on_give_up=lambda _: None,
                                  sample_process=lambda pid: world.sample)
    supervisor.running = True
    supervisor.watch(watched)
    transport = FakeTransport(4242)
    process = _HyperdProcess()
    process.makeConnection(transport)
    process.callback = FakeCallback(transport)  # type: ignore[assignment]
    probe = FakeProbe()
    world = World(clock, supervisor, process, transport, probe)
    supervisor._current = process
    supervisor._live.add(process)
    supervisor._probe = probe  # type: ignore[assignment]
    process.ended.addBoth(lambda _: supervisor._ended(process, supervisor._generation))
    supervisor._launch = lambda: world.launches.append(clock.seconds())  # type: ignore[method-assign]
    supervisor._became_ready(world.instance)
    return world


def test_a_busy_hyperd_that_never_answers_is_never_stopped() -> None:
    world = serving()
    clock = world.clock
    while clock.seconds() < 10 * HUNG_AFTER:
        # Its CPU time advances by 1.5 CPUs; every probe times out.
        world.sample = ProcessSample("S", "SSSS", 1.5 * clock.seconds())
        clock.advance(1.0)
    assert len(world.probe.checks) > 10
    assert world.transport.signals == []
    assert (world.launches, world.supervisor.restarts) == ([], 0)
    assert world.supervisor.pid == 4242 and world.supervisor.state == "ready"


def test_a_check_of_a_busy_hyperd_judges_it_busy_and_leaves_it() -> None:
    world = serving(watched=False)
    world.sample = WORKING
    checked = world.supervisor.check_now()
    world.clock.advance(TIMEOUT)
    assert checked.result is Verdict.BUSY
    assert world.transport.signals == [] and world.launches == []


def test_a_briefly_stopped_hyperd_is_kept() -> None:
    world = serving()
    world.sample = STOPPED
    world.clock.pump([INTERVAL] * int((HUNG_AFTER - 1) // INTERVAL))
    world.sample = SLEEPING
    world.clock.advance(INTERVAL)
    world.probe.answer()
    assert world.transport.signals == [] and world.launches == []
    assert world.supervisor.state == "ready"


def test_a_stopped_hyperd_is_not_probed() -> None:
    world = serving(watched=False)
    world.sample = STOPPED
    assert world.supervisor.check_now().result is Verdict.STOPPED
    assert world.probe.checks == []


def test_a_hung_hyperd_is_continued_and_terminated_then_replaced_once_it_exits() -> None:
    world = serving()
    world.sample = STOPPED
    world.clock.pump([INTERVAL] * int(HUNG_AFTER // INTERVAL))
    assert world.transport.signals == [signal.SIGCONT, signal.SIGTERM]
    assert world.process.callback.closed_after == [signal.SIGCONT]
    assert world.supervisor.state == "starting" and world.supervisor.instance is None
    assert world.supervisor.restarts == 1
    world.clock.advance(GRACE / 2)
    assert world.launches == []  # not while it may still write its databases out
    world.exits()
    assert world.launches == [HUNG_AFTER + GRACE / 2]
    world.clock.advance(GRACE)
    assert world.transport.signals == [signal.SIGCONT, signal.SIGTERM]  # never killed


def test_a_hung_hyperd_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    world = serving()
    world.sample = SLEEPING  # idle, and every probe times out
    while not world.transport.signals:
        world.clock.advance(0.25)
    assert world.clock.seconds() == HUNG_AFTER
    assert world.transport.signals == [signal.SIGCONT, signal.SIGTERM]
    world.clock.advance(GRACE - 0.25)
    assert signal.SIGKILL not in world.transport.signals
    world.clock.advance(0.25)
    assert world.transport.signals[-1] == signal.SIGKILL
    assert world.launches == []
    world.exits(signal.SIGKILL)
    assert len(world.launches) == 1


def test_a_hyperd_that_exits_is_replaced_at_once() -> None:
    world = serving()
    world.clock.advance(1.0)
    world.exits(signal.SIGKILL)
    assert world.launches == [1.0]
    assert world.transport.signals == []


def test_a_hyperd_seen_gone_by_a_probe_is_replaced_as_soon_as_it_is_reaped() -> None:
    world = serving(watched=False)
    world.sample = GONE
    assert world.supervisor.check_now().result is Verdict.GONE
    assert world.supervisor.state == "starting"
    world.exits(signal.SIGSEGV)
    assert len(world.launches) == 1


def test_usable_at_once_after_a_recent_sign_of_life() -> None:
    world = serving(watched=False)
    world.clock.advance(INTERVAL - 0.25)
    assert world.supervisor.when_usable().result is world.instance
    assert world.probe.checks == []


def test_usable_after_a_quiet_period_once_it_answers_a_probe() -> None:
    world = serving(watched=False)
    world.clock.advance(3600)
    usable = world.supervisor.when_usable()
    assert not usable.called and len(world.probe.checks) == 1
    world.probe.answer()
    assert usable.result is world.instance


def test_usable_after_a_quiet_period_when_seen_working() -> None:
    world = serving(watched=False)
    world.clock.advance(3600)
    world.sample = WORKING
    usable = world.supervisor.when_usable()
    assert usable.result is world.instance  # before its probe is answered


def test_stopped_after_a_quiet_period_it_is_replaced_at_once_and_the_waiter_gets_the_new_one() -> None:
    world = serving(watched=False)
    world.clock.advance(3600)
    world.sample = STOPPED
    usable = world.supervisor.when_usable()
    assert world.transport.signals == [signal.SIGCONT, signal.SIGTERM]
    world.exits()
    assert world.launches == [3600]
    assert not usable.called
    new = HyperdInstance(4343, "127.0.0.1", 2, "u", "pw2")
    world.supervisor._became_ready(new)
    assert usable.result is new


def test_a_waiting_client_keeps_an_unwatched_hyperd_probed_until_it_answers() -> None:
    world = serving(watched=False)
    world.clock.advance(HUNG_AFTER / 2)
    world.sample = STOPPED
    usable = world.supervisor.when_usable()
    assert not usable.called and world.launches == []
    world.clock.advance(INTERVAL)  # probed again though unwatched
    world.sample = SLEEPING
    world.clock.advance(INTERVAL)
    world.probe.answer()
    assert usable.result is world.instance
    assert world.clock.getDelayedCalls() == []  # unwatched again: nothing scheduled


def test_stopping_waits_only_until_hyperd_exits() -> None:
    world = serving()
    stopping = world.supervisor.stopService()
    assert world.transport.signals == [signal.SIGCONT, signal.SIGTERM]
    assert not stopping.called
    world.exits()
    assert stopping.called
    assert world.clock.getDelayedCalls() == []


def test_stopping_kills_a_hyperd_that_ignores_sigterm_after_the_grace_period() -> None:
    world = serving()
    stopping = world.supervisor.stopService()
    world.clock.advance(GRACE - 0.25)
    assert signal.SIGKILL not in world.transport.signals
    world.clock.advance(0.25)
    assert world.transport.signals[-1] == signal.SIGKILL
    world.exits(signal.SIGKILL)
    assert stopping.called


def test_stopping_fails_waiting_clients() -> None:
    world = serving(watched=False)
    world.clock.advance(3600)
    usable = world.supervisor.when_usable()
    world.supervisor.stopService()
    failure = usable.result
    assert failure.check(HyperdUnavailable)
    assert world.supervisor.when_usable().result.check(HyperdUnavailable)
    world.exits()


def test_stopping_an_exited_process_sends_nothing() -> None:
    world = serving()
    world.exits()
    assert world.process.stop(world.clock, GRACE).called
    assert world.transport.signals == []


def test_a_client_waits_after_a_check_found_hyperd_stopped_however_recent() -> None:
    world = serving(watched=False)
    world.sample = STOPPED
    assert world.supervisor.check_now().result is Verdict.STOPPED  # a client reported it
    usable = world.supervisor.when_usable()
    assert not usable.called


def test_a_client_waits_for_a_check_under_way() -> None:
    world = serving(watched=False)
    world.clock.advance(3600)
    world.supervisor.check_now()
    world.clock.advance(INTERVAL - 1)  # the probe has not answered yet
    usable = world.supervisor.when_usable()
    assert not usable.called
    world.probe.answer()
    assert usable.result is world.instance
