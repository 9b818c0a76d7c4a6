"""
The daemon's supervision of the MCP host, in-process, with a stand-in host
(a small Python program that speaks the host's side of the pipe: C{READY},
C{SESSIONS}, exit when stdin closes).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from hyperdaemon.daemon.hoststart import EarlyHost, start_early
from hyperdaemon.daemon.mcphost import McpHostSupervisor, McpHostUnavailable
from hyperdaemon.daemon.supervisor import RestartBudget
from support import QUICK, pid_alive, until, wait_for

#: A host that is ready at once, reports one session, and exits when its
#: stdin (the daemon's pipe) closes, even when asked to stop by SIGTERM
#: (it closes its sessions first, as the real one does).
STAND_IN = """
import signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("READY", flush=True)
print('SESSIONS [{"pid": 4242, "name": "t", "ephemeral_db": "/x/scratch.hyper"}]', flush=True)
print("something for the log", file=sys.stderr, flush=True)
sys.stdin.read()
"""


#: A host started with the daemon (hoststart): it waits for its port on
#: stdin, then is ready and reports what it was told as its one session.
EARLY_STAND_IN = """
import json, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
told = sys.stdin.readline().strip()
print("READY", flush=True)
print("SESSIONS " + json.dumps([{"told": told}]), flush=True)
sys.stdin.read()
"""


@pytest_twisted.async_yield_fixture
async def made(tmp_path: Path) -> AsyncIterator[list[McpHostSupervisor]]:
    supervisors: list[McpHostSupervisor] = []
    yield supervisors
    for supervisor in supervisors:
        if supervisor.running:
            await supervisor.stopService()


def supervisor_for(made: list[McpHostSupervisor], tmp_path: Path,
                   budget: RestartBudget | None = None,
                   early: EarlyHost | None = None) -> McpHostSupervisor:
    supervisor = McpHostSupervisor(reactor, tmp_path, 1234, budget=budget,
                                   argv=[sys.executable, "-c", STAND_IN], early=early)
    supervisor.startService()
    made.append(supervisor)
    return supervisor


class McpHostSupervisorTests:
    @pytest_twisted.ensureDeferred
    async def test_ensure_starts_the_host_and_answers_once_it_is_ready(
            self, made: list[McpHostSupervisor], tmp_path: Path) -> None:
        supervisor = supervisor_for(made, tmp_path)
        facts = await supervisor.ensure()
        assert facts == {"pid": supervisor.pid, "socket": str(tmp_path / "mcp-host.sock")}
        assert pid_alive(facts["pid"])
        # Asked again, the same host.
        assert (await supervisor.ensure())["pid"] == facts["pid"]
        await until(lambda: supervisor.status()["sessions"], QUICK, "the host's sessions")
        status = supervisor.status()
        assert (status["state"], status["restarts"]) == ("ready", 0)
        assert status["sessions"] == [{"pid": 4242, "name": "t",
                                       "ephemeral_db": "/x/scratch.hyper"}]
        assert isinstance(status["rss_kb"], int) and status["rss_kb"] > 0

    @pytest_twisted.ensureDeferred
    async def test_a_host_that_dies_is_replaced(
            self, made: list[McpHostSupervisor], tmp_path: Path) -> None:
        supervisor = supervisor_for(made, tmp_path)
        first = (await supervisor.ensure())["pid"]
        os.kill(first, signal.SIGKILL)
        await until(lambda: supervisor.restarts == 1 and supervisor.status()["state"] == "ready",
                    QUICK, "a new host")
        second = (await supervisor.ensure())["pid"]
        assert second != first and pid_alive(second)

    @pytest_twisted.ensureDeferred
    async def test_past_its_budget_the_daemon_gives_up_on_the_host(
            self, made: list[McpHostSupervisor], tmp_path: Path) -> None:
        supervisor = supervisor_for(made, tmp_path, RestartBudget(limit=1, window=600))
        for _ in range(2):
            pid = (await supervisor.ensure())["pid"]
            os.kill(pid, signal.SIGKILL)
            await until(lambda: supervisor.pid != pid, QUICK, "the host to be gone")
        await until(lambda: supervisor.gave_up, QUICK, "the supervisor to give up")
        assert supervisor.status()["state"] == "failed"
        with pytest.raises(McpHostUnavailable, match="launchers serve in their own process"):
            await supervisor.ensure()

    @pytest_twisted.ensureDeferred
    async def test_stopping_closes_the_hosts_pipe_and_waits_for_its_exit(
            self, made: list[McpHostSupervisor], tmp_path: Path) -> None:
        supervisor = supervisor_for(made, tmp_path)
        pid = (await supervisor.ensure())["pid"]
        started = reactor.seconds()
        await supervisor.stopService()
        # It ignores SIGTERM: it went because its stdin closed, not killed
        # once the grace ran out.
        assert not pid_alive(pid)
        assert reactor.seconds() - started < supervisor.stop_grace
        with pytest.raises(McpHostUnavailable, match="stopping"):
            await supervisor.ensure()


def early_host(tmp_path: Path) -> EarlyHost:
    early = start_early(str(tmp_path), dict(os.environ), argv=[sys.executable, "-c",
                                                                EARLY_STAND_IN])
    assert early is not None
    return early


class EarlyHostTests:
    @pytest_twisted.ensureDeferred
    async def test_the_host_started_with_the_daemon_is_adopted_and_told_its_port(
            self, made: list[McpHostSupervisor], tmp_path: Path) -> None:
        early = early_host(tmp_path)
        supervisor = supervisor_for(made, tmp_path, early=early)
        facts = await supervisor.ensure()
        assert facts["pid"] == early.pid
        await until(lambda: supervisor.status()["sessions"], QUICK, "the host's report")
        assert supervisor.status()["sessions"] == [{"told": "PORT 1234"}]
        assert (supervisor.status()["state"], supervisor.restarts) == ("ready", 0)

    @pytest_twisted.ensureDeferred
    async def test_an_adopted_host_that_dies_is_reaped_and_replaced(
            self, made: list[McpHostSupervisor], tmp_path: Path) -> None:
        early = early_host(tmp_path)
        supervisor = supervisor_for(made, tmp_path, early=early)
        await supervisor.ensure()
        os.kill(early.pid, signal.SIGKILL)
        await until(lambda: supervisor.restarts == 1 and supervisor.status()["state"] == "ready",
                    QUICK, "a spawned host in its place")
        assert supervisor.pid != early.pid
        # Reaped: no zombie is left of it.
        with pytest.raises(ChildProcessError):
            os.waitpid(early.pid, os.WNOHANG)

    @pytest_twisted.ensureDeferred
    async def test_stopping_closes_an_adopted_hosts_pipe_and_waits_for_its_exit(
            self, made: list[McpHostSupervisor], tmp_path: Path) -> None:
        early = early_host(tmp_path)
        supervisor = supervisor_for(made, tmp_path, early=early)
        await supervisor.ensure()
        started = reactor.seconds()
        await supervisor.stopService()
        # It ignores SIGTERM: its pipe's end made it go.
        assert not pid_alive(early.pid)
        assert reactor.seconds() - started < supervisor.stop_grace

    def test_the_host_started_early_holds_no_descriptor_of_the_daemons(
            self, tmp_path: Path) -> None:
        import select

        # As the spawner's --ready-fd pipe is in the daemon: inheritable.
        ready_r, ready_w = os.pipe()
        os.set_inheritable(ready_w, True)
        early = early_host(tmp_path)
        try:
            os.close(ready_w)
            # The spawner hears the daemon's end at once, not the host's.
            readable, _, _ = select.select([ready_r], [], [], QUICK)
            assert readable and os.read(ready_r, 1) == b""
            assert pid_alive(early.pid)
        finally:
            os.close(ready_r)
            early.discard()

    def test_a_daemon_that_does_not_run_kills_the_host_started_with_it(
            self, tmp_path: Path) -> None:
        early = early_host(tmp_path)
        supervisor = McpHostSupervisor(reactor, tmp_path, 1234, early=early)
        supervisor.discard_early()
        with pytest.raises(ChildProcessError):  # killed and reaped
            os.waitpid(early.pid, os.WNOHANG)
        supervisor.discard_early()  # once is enough

    def test_only_a_daemon_spawned_for_a_launcher_starts_its_host_first(
            self, tmp_path: Path) -> None:
        from hyperdaemon.daemon.hoststart import start_for_daemon
        from hyperdaemon.mcp.launcher import START_VAR

        wanted = {START_VAR: "1"}
        state = str(tmp_path)
        for argv, environ in ((["daemon", "--state-dir", state], {}),
                              (["daemon", "status", "--state-dir", state], wanted),
                              (["daemon", "stop", "--state-dir", state], wanted),
                              (["daemon", "--state-dir", "relative"], wanted),
                              (["daemon", "--state-dir"], wanted),
                              (["daemon"], wanted),
                              (["--read-only"], wanted)):
            assert start_for_daemon(argv, environ) is None, argv


def test_the_leak_check_finds_a_host_of_this_run_even_unmarked(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    import subprocess

    from conftest import _leaked_hosts
    from support import MARKER

    base = tmp_path_factory.getbasetemp()
    environ = {k: v for k, v in os.environ.items() if k != MARKER}
    stray = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "-m", "hyperdaemon.mcp.host",
         "--state-dir", str(base / "some-test" / "state")],
        stdin=subprocess.PIPE, env=environ)
    try:
        found = wait_for(lambda: _leaked_hosts(base).get(stray.pid), QUICK,
                         "the stray host to be found")
        assert "hyperdaemon.mcp.host" in found
        # Not another run's: a folder whose name merely starts the same.
        for other in (base / "elsewhere", Path(str(base)[:-1])):
            assert stray.pid not in _leaked_hosts(other), other
    finally:
        stray.stdin.close()
        stray.wait(QUICK)
    assert stray.pid not in _leaked_hosts(base)
