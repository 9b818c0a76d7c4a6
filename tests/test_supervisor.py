"""
The hyperd supervisor in-process, against the real hyperd, with its probe
tunables shortened so that a hung hyperd is noticed in a fraction of a second.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hyperdaemon.config import hyperd_executable
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
             compat: bool = False) -> HyperdSupervisor:
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
        supervisor.probe_timeout = 0.5
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

    async def test_hung_hyperd_is_killed_and_replaced(self) -> None:
        supervisor = self.make()
        await until(lambda: self.ready, 60, "hyperd to be ready")
        hung = self.ready[0]
        os.kill(hung.pid, signal.SIGSTOP)
        self.addCleanup(lambda: pid_alive(hung.pid) and os.kill(hung.pid, signal.SIGKILL))
        await until(lambda: len(self.ready) == 2, 30, "a replacement hyperd")
        await until(lambda: not pid_alive(hung.pid), 10, "the hung hyperd to be killed")
        self.assertEqual(supervisor.restarts, 1)
        self.assertNotEqual(self.ready[1].pid, hung.pid)
        self.assertNotEqual(self.ready[1].password, hung.password)
        self.assertEqual(await deferToThread(query, self.ready[1]), 42)

    async def test_check_now_leaves_a_healthy_hyperd_alone(self) -> None:
        supervisor = self.make()
        await until(lambda: self.ready, 60, "hyperd to be ready")
        await supervisor.check_now()
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
