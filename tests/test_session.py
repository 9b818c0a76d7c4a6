"""
Clients: sessions through a real daemon that they find or spawn, with the
real hyperd; client processes killed, daemons and hyperds killed, races.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hyperdaemon.config import PortChoice
from hyperdaemon.finder import DaemonAddress, Finder, parse_version, should_take_over
from hyperdaemon.session import DaemonEndpoint, HeartbeatDebouncer, Session, heartbeat_delay
from support import (
    until,
    QUICK,
    READY_TIMEOUT,
    children_of,
    client_environment,
    pid_alive,
    status,
    stop_daemon_on,
    wait_for,
)

CLIENT = Path(__file__).with_name("client_program.py")


class DecisionTests(SynchronousTestCase):
    def test_parse_version(self) -> None:
        self.assertEqual(parse_version("1.0.0"), (1, 0, 0))
        self.assertEqual(parse_version("0.7.3.r28c8813a"), (0, 7, 3))
        self.assertEqual(parse_version("2.1rc1"), (2, 1))
        self.assertEqual(parse_version("dev"), ())

    def test_newer_client_takes_over_an_older_daemon_of_ours(self) -> None:
        self.assertTrue(should_take_over("1.2.0", "1.1.9", 1))
        self.assertTrue(should_take_over("1.10.0", "1.9.0", 1))

    def test_equal_or_older_client_reuses(self) -> None:
        self.assertFalse(should_take_over("1.0.0", "1.0.0", 1))
        self.assertFalse(should_take_over("1.0.0", "2.0.0", 1))

    def test_upstream_daemon_is_never_taken_over(self) -> None:
        self.assertFalse(should_take_over("9.0.0", "0.7.3", None))

    def test_unparseable_versions_are_reused(self) -> None:
        self.assertFalse(should_take_over("1.0.0", "weird", 1))


class HeartbeatTests(SynchronousTestCase):
    def test_delay(self) -> None:
        self.assertEqual(heartbeat_delay(100.0, None, 10.0), 0.0)
        self.assertEqual(heartbeat_delay(100.0, 95.0, 10.0), 5.0)
        self.assertEqual(heartbeat_delay(100.0, 80.0, 10.0), 0.0)

    def test_at_most_one_heartbeat_per_interval(self) -> None:
        clock, sent = Clock(), []
        debouncer = HeartbeatDebouncer(clock, 10.0, lambda: sent.append(clock.seconds()))
        for _ in range(100):
            debouncer.activity()
        clock.advance(0)
        self.assertEqual(sent, [0.0])
        for step in range(30):
            clock.advance(1)
            debouncer.activity()
        clock.advance(0)
        self.assertEqual(sent, [0.0, 10.0, 20.0, 30.0])

    def test_no_activity_no_heartbeat(self) -> None:
        clock, sent = Clock(), []
        HeartbeatDebouncer(clock, 10.0, lambda: sent.append(1))
        clock.advance(100)
        self.assertEqual(sent, [])

    def test_cancel(self) -> None:
        clock, sent = Clock(), []
        debouncer = HeartbeatDebouncer(clock, 10.0, lambda: sent.append(1))
        debouncer.activity()
        debouncer.cancel()
        clock.advance(100)
        self.assertEqual((sent, clock.getDelayedCalls()), ([], []))


class _InlinePool:
    def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any, **kw: Any) -> None:
        onResult(True, f(*args, **kw))


class _InlineThreadsReactor(MemoryReactorClock):
    """A memory reactor whose thread pool runs work at once, in the caller."""

    def getThreadPool(self) -> _InlinePool:
        return _InlinePool()

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class _CountingFinder:
    def __init__(self, port: int) -> None:
        self.port = port
        self.lookups = 0

    def ensure(self) -> DaemonAddress:
        self.lookups += 1
        return DaemonAddress(self.port, "1.0.0", 1, {})


class DaemonEndpointTests(SynchronousTestCase):
    def test_a_daemon_just_found_is_connected_to_without_looking_again_once(self) -> None:
        reactor, finder, found = _InlineThreadsReactor(), _CountingFinder(7602), []
        endpoint = DaemonEndpoint(reactor, finder, found.append,  # type: ignore[arg-type]
                                  known=DaemonAddress(7601, "1.0.0", 1, {}))
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual((finder.lookups, reactor.tcpClients[-1][:2]), (0, ("127.0.0.1", 7601)))
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual((finder.lookups, reactor.tcpClients[-1][:2]), (1, ("127.0.0.1", 7602)))
        self.assertEqual([a.port for a in found], [7601, 7602])


class ClientTestCase(TestCase):
    timeout = 180

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state, self.ports, self.env = client_environment(tmp_path)
        self.addCleanup(stop_daemon_on, self.ports)

    async def open(self, **kwargs: Any) -> Session:
        session = await Session.open(reactor, environ=self.env, **kwargs)
        self.addCleanup(session.close)
        return session

    def run_client(self, *args: str) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, str(CLIENT), *args], env=self.env, capture_output=True,
            text=True, timeout=READY_TIMEOUT, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def hold_client(self, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        proc = subprocess.Popen(
            [sys.executable, str(CLIENT), "--hold", *args], env=self.env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

        def cleanup() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(QUICK)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()

        self.addCleanup(cleanup)
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        return proc, json.loads(line)

    def daemon_status(self) -> dict[str, Any]:
        for port in self.ports:
            try:
                return status(port)
            except OSError:
                continue
        raise AssertionError("no daemon answers in the test's range")


class SharingTests(ClientTestCase):
    async def test_two_sessions_share_persistent_tables_but_not_ephemeral_ones(self) -> None:
        one = await self.open(name="one")
        two = await self.open(name="two")
        self.assertEqual(one.credentials, two.credentials)
        await one.execute("CREATE TABLE persistent.public.shared (x int)")
        await one.execute(["INSERT INTO persistent.public.shared VALUES (1)",
                           "INSERT INTO persistent.public.shared VALUES (2)"])
        await one.execute("CREATE TABLE scratch (y int)")
        await one.execute("INSERT INTO scratch VALUES (5)")
        self.assertEqual((await two.query("SELECT sum(x) FROM persistent.public.shared")).rows,
                         [(3,)])
        self.assertEqual((await one.query("SELECT y FROM scratch")).rows, [(5,)])
        import psycopg

        with self.assertRaises(psycopg.errors.UndefinedTable):
            await two.query("SELECT y FROM scratch")
        sessions = self.daemon_status()["sessions"]
        self.assertEqual(sorted(s["name"] for s in sessions), ["one", "two"])
        self.assertEqual(sorted(s["ephemeral_db"] for s in sessions),
                         sorted([str(one.ephemeral_db), str(two.ephemeral_db)]))
        await one.close()
        await two.close()
        self.assertFalse(one.ephemeral_db.parent.exists())
        self.assertFalse(two.ephemeral_db.parent.exists())
        self.assertTrue((self.tmp / "persistent.hyper").exists())
        await until(lambda: self.daemon_status()["sessions"] == [], QUICK, "sessions to end")

    async def test_persistent_data_outlives_the_sessions(self) -> None:
        one = await self.open()
        await one.execute(["CREATE TABLE persistent.public.kept (x int)",
                           "INSERT INTO persistent.public.kept VALUES (42)"])
        await one.close()
        two = await self.open()
        self.assertEqual((await two.query("SELECT x FROM persistent.public.kept")).rows, [(42,)])

    async def test_atomic_batch_leaves_nothing_when_a_statement_fails(self) -> None:
        session = await self.open()
        await session.execute("CREATE TABLE t (x int)")
        with self.assertRaises(psycopg.errors.UndefinedTable) as caught:
            await session.execute(["INSERT INTO t VALUES (1)", "INSERT INTO nowhere VALUES (2)"])
        self.assertIn("nowhere", str(caught.exception))
        self.assertEqual((await session.query("SELECT count(*) FROM t")).rows, [(0,)])

    async def test_ephemeral_only_has_no_persistent_database(self) -> None:
        session = await self.open(ephemeral_only=True)
        self.assertIsNone(session.persistent_db)
        # No database of that name: not merely a missing table.
        with self.assertRaises(psycopg.errors.InvalidSchemaName) as caught:
            await session.query("SELECT 1 FROM persistent.public.anything")
        self.assertIn("persistent", str(caught.exception))
        self.assertFalse((self.tmp / "persistent.hyper").exists())



class CleanupTests(ClientTestCase):
    async def test_killed_client_loses_its_ephemeral_database_and_session(self) -> None:
        proc, facts = await deferToThread(
            self.hold_client, "CREATE TABLE mine (x int)", "INSERT INTO mine VALUES (1)"
        )
        ephemeral = Path(facts["ephemeral_db"])
        self.assertTrue(ephemeral.exists())
        pids = [s["pid"] for s in self.daemon_status()["sessions"]]
        self.assertEqual(pids, [proc.pid])
        proc.kill()
        await until(lambda: not ephemeral.parent.exists(), QUICK, "the ephemeral folder to go")
        await until(lambda: self.daemon_status()["sessions"] == [], QUICK, "the session to end")

    async def test_clean_exit_removes_the_ephemeral_database(self) -> None:
        facts = await deferToThread(self.run_client, "CREATE TABLE mine (x int)")
        self.assertFalse(Path(facts["ephemeral_db"]).parent.exists())
        self.assertEqual(self.daemon_status()["sessions"], [])

    async def test_daemon_start_sweeps_folders_of_dead_clients(self) -> None:
        orphan = self.state / "sessions" / "999999-abcdef"
        orphan.mkdir(parents=True)
        (orphan / "scratch.hyper").write_bytes(b"left over")
        await self.open()
        self.assertFalse(orphan.exists())


class RecoveryTests(ClientTestCase):
    async def test_killed_daemon_is_replaced_and_the_next_query_works(self) -> None:
        session = await self.open()
        await session.execute(["CREATE TABLE keep (x int)", "INSERT INTO keep VALUES (7)"])
        before = self.daemon_status()
        os.kill(before["pid"], signal.SIGKILL)
        await until(lambda: not pid_alive(before["hyperd_pid"]), QUICK, "the old hyperd to go")
        self.assertEqual((await session.query("SELECT x FROM keep")).rows, [(7,)])
        after = self.daemon_status()
        self.assertNotEqual(after["pid"], before["pid"])
        self.assertEqual([s["ephemeral_db"] for s in after["sessions"]],
                         [str(session.ephemeral_db)])

    async def test_killed_hyperd_is_replaced_and_the_next_query_works(self) -> None:
        session = await self.open()
        await session.execute("CREATE TABLE before_kill (x int)")
        before = self.daemon_status()
        os.kill(before["hyperd_pid"], signal.SIGKILL)
        # A hyperd killed outright may lose its last writes (Hyper flushes on
        # a graceful stop); what must hold is that the session carries on.
        self.assertEqual((await session.query("SELECT 6 * 7")).rows, [(42,)])
        await session.execute(["CREATE TABLE after_kill (x int)",
                               "INSERT INTO after_kill VALUES (8)"])
        self.assertEqual((await session.query("SELECT x FROM after_kill")).rows, [(8,)])
        after = self.daemon_status()
        self.assertEqual(after["pid"], before["pid"])
        self.assertNotEqual(after["hyperd_pid"], before["hyperd_pid"])
        self.assertEqual(session.credentials.port,
                         int(after["hyperd_endpoint"].rpartition(":")[2]))


class SpawnTests(ClientTestCase):
    async def test_twenty_clients_at_once_share_one_daemon_and_one_hyperd(self) -> None:
        procs = [
            subprocess.Popen([sys.executable, str(CLIENT)], env=self.env, text=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
            for _ in range(20)
        ]
        outputs = []
        for proc in procs:
            out, err = await deferToThread(proc.communicate, timeout=READY_TIMEOUT)
            self.assertEqual(proc.returncode, 0, err)
            outputs.append(json.loads(out))
        self.assertEqual(len({o["daemon_pid"] for o in outputs}), 1)
        self.assertEqual(len({o["hyperd_endpoint"] for o in outputs}), 1)
        facts = self.daemon_status()
        self.assertEqual(facts["pid"], outputs[0]["daemon_pid"])
        daemons = [pid for pid in _marked_pids() if _is_daemon(pid)]
        self.assertEqual(daemons, [facts["pid"]])
        self.assertEqual(children_of(facts["pid"]), [facts["hyperd_pid"]])

    async def test_a_foreign_listener_on_the_base_port_is_skipped(self) -> None:
        import socket

        foreign = socket.socket()
        foreign.bind(("127.0.0.1", self.ports[0]))
        foreign.listen()
        self.addCleanup(foreign.close)
        one = await self.open()
        two = await self.open()
        self.assertEqual(one._source.address.port, self.ports[1])
        self.assertEqual(two._source.address.port, self.ports[1])
        self.assertEqual(one.credentials, two.credentials)

    async def test_a_newer_client_takes_over_an_older_daemon(self) -> None:
        first = await self.open()
        old = self.daemon_status()
        env = self.env
        newer = Finder(Path(env["HYPERDB_STATE_DIR"]),
                       PortChoice(None, self.ports[0], self.ports[-1]),
                       client_version="99.0.0", environ=env)
        address = await deferToThread(newer.ensure)
        self.assertEqual(address.port, old["health_port"])
        self.assertNotEqual(address.facts["pid"], old["pid"])
        self.assertFalse(pid_alive(old["pid"]))
        # The older daemon's client carries on with the new one.
        self.assertEqual((await first.query("SELECT 1")).rows, [(1,)])

    async def test_an_older_client_reuses_the_daemon(self) -> None:
        await self.open()
        old = self.daemon_status()
        older = Finder(self.state, PortChoice(None, self.ports[0], self.ports[-1]),
                       client_version="0.1.0", environ=self.env)
        address = await deferToThread(older.ensure)
        self.assertEqual(address.facts["pid"], old["pid"])

    async def test_no_daemon_session_leaves_nothing_behind(self) -> None:
        session = await Session.open(reactor, environ=self.env, no_daemon=True)
        hyperd = session._source._supervisor.pid
        self.assertTrue(pid_alive(hyperd))
        await session.execute(["CREATE TABLE t (x int)", "INSERT INTO t VALUES (3)"])
        self.assertEqual((await session.query("SELECT x FROM t")).rows, [(3,)])
        for port in self.ports:
            self.assertRaises(OSError, status, port)
        await session.close()
        self.assertFalse(pid_alive(hyperd))
        self.assertFalse(session.ephemeral_db.parent.exists())
        self.assertFalse((self.state / "daemon.json").exists())

    async def test_unusable_hyperd_fails_open_with_a_clear_error(self) -> None:
        from hyperdaemon.finder import DaemonUnavailable

        self.env["HYPERD_PATH"] = str(self.tmp / "missing")
        with self.assertRaises(DaemonUnavailable) as caught:
            await Session.open(reactor, environ=self.env)
        self.assertIn("hyperd is missing", str(caught.exception))
        self.assertEqual(list((self.state / "sessions").iterdir()), [])


def _marked_pids() -> list[int]:
    from support import MARKER

    needle = f"{MARKER}={os.environ[MARKER]}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_alive(int(entry)):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _is_daemon(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"hyperdaemon" in argv and b"daemon" in argv


PEER = Path(os.environ.get("HYPERDB_PEER_DIR", "/tmp/peer/package"))


@pytest.mark.skipif(not (PEER / "hyperdb-mcp").exists(),
                    reason="the upstream hyperdb-mcp is not installed (shared/tools/peer-install.sh)")
class UpstreamDaemonTests(ClientTestCase):
    """A daemon without our session commands is used as it is."""

    async def test_session_through_the_upstream_daemon(self) -> None:
        port = self.ports[0]
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = dict(self.env, HYPERD_PATH=str(PEER / "hyperd"), HYPERDB_DAEMON_PORT=str(port))
        upstream = subprocess.Popen(
            [str(PEER / "hyperdb-mcp"), "daemon", "--port", str(port), "--idle-timeout", "60"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: (upstream.poll() is None and upstream.kill(), upstream.wait(QUICK)))
        await deferToThread(wait_for, lambda: (self.state / "daemon.json").exists(),
                            READY_TIMEOUT, "the upstream daemon to be ready")
        session = await self.open(port=port)
        self.assertIsNone(session._source.address.session_protocol)
        await session.execute(["CREATE TABLE t (x int)", "INSERT INTO t VALUES (1)"])
        self.assertEqual((await session.query("SELECT x FROM t")).rows, [(1,)])
        folder = session.ephemeral_db.parent
        await session.close()
        self.assertFalse(folder.exists())
        self.assertIsNone(upstream.poll())
