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
from typing import Any, Callable

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from hyperdaemon.config import hyperd_executable
from hyperdaemon.liveness import Verdict
from hyperdaemon.supervisor import HyperdInstance, HyperdSupervisor, RestartBudget
from support import pid_alive, until


def query(instance: HyperdInstance) -> Any:
    import psycopg

    with psycopg.connect(host=instance.host, port=instance.port, user=instance.user,
                         password=instance.password, autocommit=True,
                         connect_timeout=5) as conn:
        return conn.execute("SELECT 20 + 22").fetchone()[0]


class SupervisorTests(TestCase):
    timeout = 120

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    def make(self, executable: Path | None = None, budget: RestartBudget | None = None,
             compat: bool = False, hung_after: float = 30.0) -> HyperdSupervisor:
        self.ready: list[HyperdInstance] = []
        self.gave_up: list[str] = []
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
        self.addCleanup(lambda: supervisor.stopService() if supervisor.running else None)
        return supervisor

    async def test_ready_hyperd_answers_queries(self) -> None:
        supervisor = self.make()
        await until(lambda: self.ready, 60, "hyperd to be ready")
        instance = self.ready[0]
        self.assertEqual(supervisor.state, "ready")
        self.assertEqual(supervisor.pid, instance.pid)
        self.assertTrue(instance.password)
        self.assertEqual(await deferToThread(query, instance), 42)

    def log_lines(self) -> list[str]:
        """The supervisor's log messages from now on."""
        from twisted.logger import formatEvent

        lines: list[str] = []
        observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return lines

    async def test_hung_hyperd_is_stopped_gracefully_and_replaced(self) -> None:
        import psycopg

        log = self.log_lines()
        supervisor = self.make(hung_after=1.0)
        await until(lambda: self.ready, 60, "hyperd to be ready")
        hung = self.ready[0]
        # A table that only a graceful stop writes out: the file stays attached.
        db = self.tmp / "kept.hyper"
        conn = await deferToThread(
            psycopg.connect, host=hung.host, port=hung.port, user=hung.user,
            password=hung.password, autocommit=True, connect_timeout=5,
        )
        self.addCleanup(conn.close)
        for sql in (f'CREATE DATABASE "{db}"', f'ATTACH DATABASE "{db}" AS kept',
                    "CREATE TABLE kept.public.t AS SELECT * FROM generate_series(1, 1000) g(x)"):
            await deferToThread(conn.execute, sql)
        os.kill(hung.pid, signal.SIGSTOP)
        self.addCleanup(lambda: pid_alive(hung.pid) and os.kill(hung.pid, signal.SIGKILL))
        await until(lambda: len(self.ready) == 2, 30, "a replacement hyperd")
        self.assertFalse(pid_alive(hung.pid))  # the old one is gone before the new one starts
        self.assertIn(f"hyperd[{hung.pid}] stopped: exited with code 0", log)
        self.assertFalse([line for line in log if "killing it" in line])
        self.assertEqual(supervisor.restarts, 1)
        self.assertNotEqual(self.ready[1].pid, hung.pid)
        self.assertNotEqual(self.ready[1].password, hung.password)

        def count_rows(instance: HyperdInstance) -> int:
            with psycopg.connect(host=instance.host, port=instance.port, user=instance.user,
                                 password=instance.password, autocommit=True,
                                 connect_timeout=5) as c:
                c.execute(f'ATTACH DATABASE "{db}" AS kept')
                return c.execute("SELECT count(*) FROM kept.public.t").fetchone()[0]

        self.assertEqual(await deferToThread(count_rows, self.ready[1]), 1000)

    async def test_briefly_stopped_hyperd_is_kept(self) -> None:
        supervisor = self.make()
        await until(lambda: self.ready, 60, "hyperd to be ready")
        pid = self.ready[0].pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(lambda: pid_alive(pid) and os.kill(pid, signal.SIGCONT))
        self.assertIs(await supervisor.check_now(), Verdict.STOPPED)
        # Stopped for many probe intervals and longer than a probe's timeout.
        stopped_at = time.monotonic()
        await until(lambda: time.monotonic() - stopped_at > supervisor.probe_timeout + 1, 30,
                    "the stop to last longer than a probe's timeout")
        os.kill(pid, signal.SIGCONT)
        self.assertIs(await supervisor.check_now(), Verdict.ANSWERS)
        self.assertEqual((supervisor.pid, supervisor.restarts, len(self.ready)), (pid, 0, 1))
        self.assertEqual(await deferToThread(query, self.ready[0]), 42)

    async def test_check_now_leaves_a_healthy_hyperd_alone(self) -> None:
        supervisor = self.make()
        await until(lambda: self.ready, 60, "hyperd to be ready")
        self.assertIs(await supervisor.check_now(), Verdict.ANSWERS)
        self.assertEqual(supervisor.state, "ready")
        self.assertEqual(supervisor.pid, self.ready[0].pid)
        self.assertEqual((supervisor.restarts, len(self.ready)), (0, 1))

    async def test_restart_budget_spent_gives_up(self) -> None:
        supervisor = self.make(budget=RestartBudget(limit=2, window=60))
        for n in range(1, 4):
            await until(lambda: len(self.ready) == n, 60, f"hyperd number {n}")
            os.kill(self.ready[-1].pid, signal.SIGKILL)
        await until(lambda: self.gave_up, 30, "the supervisor to give up")
        self.assertIn("giving up after 2 replacements", self.gave_up[0])
        self.assertEqual(supervisor.state, "failed")
        self.assertEqual(supervisor.restarts, 2)
        for instance in self.ready:
            await until(lambda: not pid_alive(instance.pid), 10, "every hyperd to be gone")

    async def test_broken_hyperd_gives_up_at_once(self) -> None:
        broken = self.tmp / "hyperd"
        broken.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
        broken.chmod(0o755)
        supervisor = self.make(executable=broken)
        await until(lambda: self.gave_up, 30, "the supervisor to give up")
        self.assertIn("exited with code 3 before it was ready", self.gave_up[0])
        self.assertEqual(self.ready, [])
        self.assertEqual(supervisor.restarts, 0)

    async def test_stop_continues_a_stopped_hyperd_and_lets_it_exit(self) -> None:
        log = self.log_lines()
        supervisor = self.make()
        supervisor.stop_grace = 120.0  # far beyond the bound below: no SIGKILL in time
        await until(lambda: self.ready, 60, "hyperd to be ready")
        pid = self.ready[0].pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(lambda: pid_alive(pid) and os.kill(pid, signal.SIGKILL))
        stopping = supervisor.stopService()
        await until(lambda: stopping.called, 30, "the supervisor to stop")
        self.assertFalse(pid_alive(pid))
        self.assertIn(f"hyperd[{pid}] stopped: exited with code 0", log)

    async def test_stop_ends_hyperd(self) -> None:
        supervisor = self.make()
        await until(lambda: self.ready, 60, "hyperd to be ready")
        await supervisor.stopService()
        self.assertFalse(pid_alive(self.ready[0].pid))
        self.assertEqual(supervisor.state, "stopped")

    async def test_stop_while_starting_leaves_nothing(self) -> None:
        supervisor = self.make()
        await until(lambda: supervisor.pid, 10, "hyperd to be spawned")
        pid = supervisor.pid
        await supervisor.stopService()
        self.assertFalse(pid_alive(pid))
        self.assertEqual(self.ready, [])
