"""
The test session's own guarantees (tests/conftest.py), checked on a small
suite run by pytest in a process of its own with the same conftest: a test
that leaves the reactor dirty fails, an asynchronous test past its deadline
fails, and child processes are still reaped after all that, since the one
reactor is never restarted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HERE = Path(__file__).parent

SUITE = '''
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater


def test_leaves_a_delayed_call():
    reactor.callLater(30, lambda: None)


def test_leaves_a_listening_port():
    reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_leaves_a_child_process():
    reactor.spawnProcess(protocol.ProcessProtocol(), "/bin/sleep", ["sleep", "30"])


@pytest.mark.deadline(0.5)
@pytest_twisted.ensureDeferred
async def test_runs_past_its_deadline():
    await deferLater(reactor, 30, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_child_is_reaped_after_all_that():
    ended = defer.Deferred()

    class Ended(protocol.ProcessProtocol):
        def processEnded(self, reason):
            ended.callback(reason.value.exitCode)

    reactor.spawnProcess(Ended(), "/bin/true", ["true"])
    assert await ended == 0


def test_nothing_is_left_for_the_next_test():
    assert reactor.getDelayedCalls() == []
'''


def test_dirty_tests_and_late_ones_fail_and_children_are_still_reaped(
        pytester: pytest.Pytester) -> None:
    for name in ("conftest.py", "support.py"):
        shutil.copy(HERE / name, pytester.path / name)
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-vv")
    result.assert_outcomes(passed=5, failed=1, errors=3)
    result.stdout.fnmatch_lines_random([
        "ERROR *test_leaves_a_delayed_call - Failed: the test left the reactor dirty*",
        "ERROR *test_leaves_a_listening_port - Failed: the test left the reactor dirty*",
        "ERROR *test_leaves_a_child_process - Failed: the test left the reactor dirty*",
        "FAILED *test_runs_past_its_deadline - AssertionError: test_runs_past_its_deadline "
        "was still running after 0.5 s*",
    ])
    result.stdout.no_fnmatch_line("*processes started by the tests were still running*")
