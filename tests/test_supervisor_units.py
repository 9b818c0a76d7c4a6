"""
Unit tests for the pure parts of L{hyperdaemon.supervisor}: the restart
budget, the callback-frame parser, L{HyperdInstance}, and when the probe is
scheduled.  No C{hyperd} runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from hyperdaemon.supervisor import (
    HyperdInstance,
    HyperdSupervisor,
    RestartBudget,
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
