"""
The hyperd supervisor in-process, against the real hyperd.  Probes run often
(every 0.2 s) but keep the default timeout, which holds on a loaded machine;
tests that need a hyperd to count as hung shorten only the hung limit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from hyperdaemon.config import hyperd_executable
from hyperdaemon.daemon.liveness import Verdict
from hyperdaemon.daemon.supervisor import HyperdInstance, HyperdSupervisor, RestartBudget
from support import pid_alive, until


def query(instance: HyperdInstance) -> Any:
    import psycopg

    with psycopg.connect(host=instance.host, port=instance.port, user=instance.user,
                         password=instance.password, autocommit=True,
                         connect_timeout=5) as conn:
        return conn.execute("SELECT 20 + 22").fetchone()[0]


@attrs.define
class Supervised:
    """Makes the test's supervisor, and keeps what it reports."""

    tmp: Path
    ready: list[HyperdInstance] = attrs.Factory(list)
    gave_up: list[str] = attrs.Factory(list)
    supervisor: HyperdSupervisor | None = None

    def make(self, executable: Path | None = None, budget: RestartBudget | None = None,
             compat: bool = False, hung_after: float = 30.0) -> HyperdSupervisor:
        supervisor = HyperdSupervisor(
            reactor,
            executable or hyperd_executable(os.environ),
            self.tmp / "logs",
            compat,
            on_ready=self.ready.append,
            on_give_up=self.gave_up.append,
            budget=budget,
        )
        supervisor.probe_interval = 0.2
        supervisor.hung_after = hung_after
        supervisor.startService()
        self.supervisor = supervisor
        return supervisor

    async def end(self) -> None:
        """
        Stop the supervisor, after waking any hyperd that the test left
        stopped; kill any that is still there then.
        """
        for instance in self.ready:
            if pid_alive(instance.pid):
                os.kill(instance.pid, signal.SIGCONT)
        if self.supervisor is not None and self.supervisor.running:
            await self.supervisor.stopService()
        for instance in self.ready:
            if pid_alive(instance.pid):
                os.kill(instance.pid, signal.SIGKILL)


@pytest_twisted.async_yield_fixture
async def supervised(tmp_path: Path) -> AsyncIterator[Supervised]:
    made = Supervised(tmp_path)
    yield made
    await made.end()


@pytest.fixture
def log() -> Iterator[list[str]]:
    """The log messages from now on."""
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


class SupervisorTests:
    @pytest_twisted.ensureDeferred
    async def test_ready_hyperd_answers_queries(self, supervised: Supervised) -> None:
        supervisor = supervised.make()
        await until(lambda: supervised.ready, 60, "hyperd to be ready")
        instance = supervised.ready[0]
        assert supervisor.state == "ready"
        assert supervisor.pid == instance.pid
        assert instance.password
        assert await deferToThread(query, instance) == 42

    @pytest_twisted.ensureDeferred
    async def test_hung_hyperd_is_stopped_gracefully_and_replaced(
            self, supervised: Supervised, log: list[str], tmp_path: Path) -> None:
        import psycopg

        supervisor = supervised.make(hung_after=1.0)
        await until(lambda: supervised.ready, 60, "hyperd to be ready")
        hung = supervised.ready[0]
        # A table that only a graceful stop writes out: the file stays attached.
        db = tmp_path / "kept.hyper"
        conn = await deferToThread(
            psycopg.connect, host=hung.host, port=hung.port, user=hung.user,
            password=hung.password, autocommit=True, connect_timeout=5,
        )
        with conn:
            for sql in (
                    f'CREATE DATABASE "{db}"', f'ATTACH DATABASE "{db}" AS kept',
                    "CREATE TABLE kept.public.t AS SELECT * FROM generate_series(1, 1000) g(x)"):
                await deferToThread(conn.execute, sql)
            os.kill(hung.pid, signal.SIGSTOP)
            await until(lambda: len(supervised.ready) == 2, 30, "a replacement hyperd")
        assert not pid_alive(hung.pid)  # the old one is gone before the new one starts
        assert f"hyperd[{hung.pid}] stopped: exited with code 0" in log
        assert not [line for line in log if "killing it" in line]
        assert supervisor.restarts == 1
        assert supervised.ready[1].pid != hung.pid
        assert supervised.ready[1].password != hung.password

        def count_rows(instance: HyperdInstance) -> int:
            with psycopg.connect(host=instance.host, port=instance.port, user=instance.user,
                                 password=instance.password, autocommit=True,
                                 connect_timeout=5) as c:
                c.execute(f'ATTACH DATABASE "{db}" AS kept')
                return c.execute("SELECT count(*) FROM kept.public.t").fetchone()[0]

        assert await deferToThread(count_rows, supervised.ready[1]) == 1000

    @pytest_twisted.ensureDeferred
    async def test_briefly_stopped_hyperd_is_kept(self, supervised: Supervised) -> None:
        supervisor = supervised.make()
        await until(lambda: supervised.ready, 60, "hyperd to be ready")
        pid = supervised.ready[0].pid
        os.kill(pid, signal.SIGSTOP)
        assert await supervisor.check_now() is Verdict.STOPPED
        # Stopped for many probe intervals and longer than a probe's timeout.
        stopped_at = time.monotonic()
        await until(lambda: time.monotonic() - stopped_at > supervisor.probe_timeout + 1, 30,
                    "the stop to last longer than a probe's timeout")
        os.kill(pid, signal.SIGCONT)
        assert await supervisor.check_now() is Verdict.ANSWERS
        assert (supervisor.pid, supervisor.restarts, len(supervised.ready)) == (pid, 0, 1)
        assert await deferToThread(query, supervised.ready[0]) == 42

    @pytest_twisted.ensureDeferred
    async def test_check_now_leaves_a_healthy_hyperd_alone(self, supervised: Supervised) -> None:
        supervisor = supervised.make()
        await until(lambda: supervised.ready, 60, "hyperd to be ready")
        assert await supervisor.check_now() is Verdict.ANSWERS
        assert supervisor.state == "ready"
        assert supervisor.pid == supervised.ready[0].pid
        assert (supervisor.restarts, len(supervised.ready)) == (0, 1)

    @pytest_twisted.ensureDeferred
    async def test_restart_budget_spent_gives_up(self, supervised: Supervised) -> None:
        supervisor = supervised.make(budget=RestartBudget(limit=2, window=60))
        for n in range(1, 4):
            await until(lambda: len(supervised.ready) == n, 60, f"hyperd number {n}")
            os.kill(supervised.ready[-1].pid, signal.SIGKILL)
        await until(lambda: supervised.gave_up, 30, "the supervisor to give up")
        assert "giving up after 2 replacements" in supervised.gave_up[0]
        assert supervisor.state == "failed"
        assert supervisor.restarts == 2
        for instance in supervised.ready:
            await until(lambda: not pid_alive(instance.pid), 10, "every hyperd to be gone")

    @pytest_twisted.ensureDeferred
    async def test_broken_hyperd_gives_up_at_once(
            self, supervised: Supervised, tmp_path: Path) -> None:
        broken = tmp_path / "hyperd"
        broken.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
        broken.chmod(0o755)
        supervisor = supervised.make(executable=broken)
        await until(lambda: supervised.gave_up, 30, "the supervisor to give up")
        assert "exited with code 3 before it was ready" in supervised.gave_up[0]
        assert supervised.ready == []
        assert supervisor.restarts == 0

    @pytest_twisted.ensureDeferred
    async def test_stop_continues_a_stopped_hyperd_and_lets_it_exit(
            self, supervised: Supervised, log: list[str]) -> None:
        supervisor = supervised.make()
        supervisor.stop_grace = 120.0  # far beyond the bound below: no SIGKILL in time
        await until(lambda: supervised.ready, 60, "hyperd to be ready")
        pid = supervised.ready[0].pid
        os.kill(pid, signal.SIGSTOP)
        stopping = supervisor.stopService()
        await until(lambda: stopping.called, 30, "the supervisor to stop")
        assert not pid_alive(pid)
        assert f"hyperd[{pid}] stopped: exited with code 0" in log

    @pytest_twisted.ensureDeferred
    async def test_stop_ends_hyperd(self, supervised: Supervised) -> None:
        supervisor = supervised.make()
        await until(lambda: supervised.ready, 60, "hyperd to be ready")
        await supervisor.stopService()
        assert not pid_alive(supervised.ready[0].pid)
        assert supervisor.state == "stopped"

    @pytest_twisted.ensureDeferred
    async def test_stop_while_starting_leaves_nothing(self, supervised: Supervised) -> None:
        supervisor = supervised.make()
        await until(lambda: supervisor.pid, 10, "hyperd to be spawned")
        pid = supervisor.pid
        await supervisor.stopService()
        assert not pid_alive(pid)
        assert supervised.ready == []
