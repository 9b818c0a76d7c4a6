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
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread

from hyperdaemon.config import PortChoice
from hyperdaemon.client.finder import DaemonAddress, Finder, parse_version, should_take_over
from hyperdaemon.client.session import DaemonEndpoint, HeartbeatDebouncer, Session, heartbeat_delay
from support import (
    CLIENT,
    QUICK,
    READY_TIMEOUT,
    Clients,
    children_of,
    pid_alive,
    status,
    until,
    wait_for,
)

#: Clients spawn daemons and hyperds: more time than an asynchronous test's default.
pytestmark = pytest.mark.deadline(180)


class DecisionTests:
    def test_parse_version(self) -> None:
        assert parse_version("1.0.0") == (1, 0, 0)
        assert parse_version("0.7.3.r28c8813a") == (0, 7, 3)
        assert parse_version("2.1rc1") == (2, 1)
        assert parse_version("dev") == ()

    def test_newer_client_takes_over_an_older_daemon_of_ours(self) -> None:
        assert should_take_over("1.2.0", "1.1.9", 1)
        assert should_take_over("1.10.0", "1.9.0", 1)

    def test_equal_or_older_client_reuses(self) -> None:
        assert not should_take_over("1.0.0", "1.0.0", 1)
        assert not should_take_over("1.0.0", "2.0.0", 1)

    def test_upstream_daemon_is_never_taken_over(self) -> None:
        assert not should_take_over("9.0.0", "0.7.3", None)

    def test_unparseable_versions_are_reused(self) -> None:
        assert not should_take_over("1.0.0", "weird", 1)


class HeartbeatTests:
    def test_delay(self) -> None:
        assert heartbeat_delay(100.0, None, 10.0) == 0.0
        assert heartbeat_delay(100.0, 95.0, 10.0) == 5.0
        assert heartbeat_delay(100.0, 80.0, 10.0) == 0.0

    def test_at_most_one_heartbeat_per_interval(self) -> None:
        clock, sent = Clock(), []
        debouncer = HeartbeatDebouncer(clock, 10.0, lambda: sent.append(clock.seconds()))
        for _ in range(100):
            debouncer.activity()
        clock.advance(0)
        assert sent == [0.0]
        for step in range(30):
            clock.advance(1)
            debouncer.activity()
        clock.advance(0)
        assert sent == [0.0, 10.0, 20.0, 30.0]

    def test_no_activity_no_heartbeat(self) -> None:
        clock, sent = Clock(), []
        HeartbeatDebouncer(clock, 10.0, lambda: sent.append(1))
        clock.advance(100)
        assert sent == []

    def test_cancel(self) -> None:
        clock, sent = Clock(), []
        debouncer = HeartbeatDebouncer(clock, 10.0, lambda: sent.append(1))
        debouncer.activity()
        debouncer.cancel()
        clock.advance(100)
        assert (sent, clock.getDelayedCalls()) == ([], [])


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


class DaemonEndpointTests:
    def test_a_daemon_just_found_is_connected_to_without_looking_again_once(self) -> None:
        reactor, finder, found = _InlineThreadsReactor(), _CountingFinder(7602), []
        endpoint = DaemonEndpoint(reactor, finder, found.append,  # type: ignore[arg-type]
                                  known=DaemonAddress(7601, "1.0.0", 1, {}))
        endpoint.connect(Factory.forProtocol(Protocol))
        assert (finder.lookups, reactor.tcpClients[-1][:2]) == (0, ("127.0.0.1", 7601))
        endpoint.connect(Factory.forProtocol(Protocol))
        assert (finder.lookups, reactor.tcpClients[-1][:2]) == (1, ("127.0.0.1", 7602))
        assert [a.port for a in found] == [7601, 7602]


class SharingTests:
    @pytest_twisted.ensureDeferred
    async def test_two_sessions_share_persistent_tables_but_not_ephemeral_ones(
            self, clients: Clients) -> None:
        one = await clients.open(name="one")
        two = await clients.open(name="two")
        assert one.credentials == two.credentials
        await one.execute("CREATE TABLE persistent.public.shared (x int)")
        await one.execute(["INSERT INTO persistent.public.shared VALUES (1)",
                           "INSERT INTO persistent.public.shared VALUES (2)"])
        await one.execute("CREATE TABLE scratch (y int)")
        await one.execute("INSERT INTO scratch VALUES (5)")
        assert (await two.query("SELECT sum(x) FROM persistent.public.shared")).rows == [(3,)]
        assert (await one.query("SELECT y FROM scratch")).rows == [(5,)]
        import psycopg

        with pytest.raises(psycopg.errors.UndefinedTable):
            await two.query("SELECT y FROM scratch")
        sessions = clients.daemon_status()["sessions"]
        assert sorted(s["name"] for s in sessions) == ["one", "two"]
        assert (sorted(s["ephemeral_db"] for s in sessions)
                == sorted([str(one.ephemeral_db), str(two.ephemeral_db)]))
        await one.close()
        await two.close()
        assert not one.ephemeral_db.parent.exists()
        assert not two.ephemeral_db.parent.exists()
        assert (clients.tmp / "persistent.hyper").exists()
        await until(lambda: clients.daemon_status()["sessions"] == [], QUICK, "sessions to end")

    @pytest_twisted.ensureDeferred
    async def test_persistent_data_outlives_the_sessions(self, clients: Clients) -> None:
        one = await clients.open()
        await one.execute(["CREATE TABLE persistent.public.kept (x int)",
                           "INSERT INTO persistent.public.kept VALUES (42)"])
        await one.close()
        two = await clients.open()
        assert (await two.query("SELECT x FROM persistent.public.kept")).rows == [(42,)]

    @pytest_twisted.ensureDeferred
    async def test_atomic_batch_leaves_nothing_when_a_statement_fails(
            self, clients: Clients) -> None:
        session = await clients.open()
        await session.execute("CREATE TABLE t (x int)")
        with pytest.raises(psycopg.errors.UndefinedTable) as caught:
            await session.execute(["INSERT INTO t VALUES (1)", "INSERT INTO nowhere VALUES (2)"])
        assert "nowhere" in str(caught.value)
        assert (await session.query("SELECT count(*) FROM t")).rows == [(0,)]

    @pytest_twisted.ensureDeferred
    async def test_ephemeral_only_has_no_persistent_database(self, clients: Clients) -> None:
        session = await clients.open(ephemeral_only=True)
        assert session.persistent_db is None
        # No database of that name: not merely a missing table.
        with pytest.raises(psycopg.errors.InvalidSchemaName) as caught:
            await session.query("SELECT 1 FROM persistent.public.anything")
        assert "persistent" in str(caught.value)
        assert not (clients.tmp / "persistent.hyper").exists()


class CleanupTests:
    @pytest_twisted.ensureDeferred
    async def test_killed_client_loses_its_ephemeral_database_and_session(
            self, clients: Clients) -> None:
        proc, facts = await deferToThread(
            clients.hold_client, "CREATE TABLE mine (x int)", "INSERT INTO mine VALUES (1)"
        )
        ephemeral = Path(facts["ephemeral_db"])
        assert ephemeral.exists()
        pids = [s["pid"] for s in clients.daemon_status()["sessions"]]
        assert pids == [proc.pid]
        proc.kill()
        await until(lambda: not ephemeral.parent.exists(), QUICK, "the ephemeral folder to go")
        await until(lambda: clients.daemon_status()["sessions"] == [], QUICK, "the session to end")

    @pytest_twisted.ensureDeferred
    async def test_clean_exit_removes_the_ephemeral_database(self, clients: Clients) -> None:
        facts = await deferToThread(clients.run_client, "CREATE TABLE mine (x int)")
        assert not Path(facts["ephemeral_db"]).parent.exists()
        assert clients.daemon_status()["sessions"] == []

    @pytest_twisted.ensureDeferred
    async def test_daemon_start_sweeps_folders_of_dead_clients(self, clients: Clients) -> None:
        orphan = clients.state / "sessions" / "999999-abcdef"
        orphan.mkdir(parents=True)
        (orphan / "scratch.hyper").write_bytes(b"left over")
        await clients.open()
        assert not orphan.exists()


class RecoveryTests:
    @pytest_twisted.ensureDeferred
    async def test_killed_daemon_is_replaced_and_the_next_query_works(
            self, clients: Clients) -> None:
        session = await clients.open()
        await session.execute(["CREATE TABLE keep (x int)", "INSERT INTO keep VALUES (7)"])
        before = clients.daemon_status()
        os.kill(before["pid"], signal.SIGKILL)
        await until(lambda: not pid_alive(before["hyperd_pid"]), QUICK, "the old hyperd to go")
        assert (await session.query("SELECT x FROM keep")).rows == [(7,)]
        after = clients.daemon_status()
        assert after["pid"] != before["pid"]
        assert [s["ephemeral_db"] for s in after["sessions"]] == [str(session.ephemeral_db)]

    @pytest_twisted.ensureDeferred
    async def test_killed_hyperd_is_replaced_and_the_next_query_works(
            self, clients: Clients) -> None:
        session = await clients.open()
        await session.execute("CREATE TABLE before_kill (x int)")
        before = clients.daemon_status()
        os.kill(before["hyperd_pid"], signal.SIGKILL)
        # A hyperd killed outright may lose its last writes (Hyper flushes on
        # a graceful stop); what must hold is that the session carries on.
        assert (await session.query("SELECT 6 * 7")).rows == [(42,)]
        await session.execute(["CREATE TABLE after_kill (x int)",
                               "INSERT INTO after_kill VALUES (8)"])
        assert (await session.query("SELECT x FROM after_kill")).rows == [(8,)]
        after = clients.daemon_status()
        assert after["pid"] == before["pid"]
        assert after["hyperd_pid"] != before["hyperd_pid"]
        assert session.credentials.port == int(after["hyperd_endpoint"].rpartition(":")[2])


class SpawnTests:
    @pytest_twisted.ensureDeferred
    async def test_twenty_clients_at_once_share_one_daemon_and_one_hyperd(
            self, clients: Clients) -> None:
        procs = [
            subprocess.Popen([sys.executable, str(CLIENT)], env=clients.env, text=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
            for _ in range(20)
        ]
        outputs = []
        for proc in procs:
            out, err = await deferToThread(proc.communicate, timeout=READY_TIMEOUT)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out))
        assert len({o["daemon_pid"] for o in outputs}) == 1
        assert len({o["hyperd_endpoint"] for o in outputs}) == 1
        facts = clients.daemon_status()
        assert facts["pid"] == outputs[0]["daemon_pid"]
        daemons = [pid for pid in _marked_pids() if _is_daemon(pid)]
        assert daemons == [facts["pid"]]
        assert children_of(facts["pid"]) == [facts["hyperd_pid"]]

    @pytest_twisted.ensureDeferred
    async def test_a_foreign_listener_on_the_base_port_is_skipped(self, clients: Clients) -> None:
        import socket

        with socket.socket() as foreign:
            foreign.bind(("127.0.0.1", clients.ports[0]))
            foreign.listen()
            one = await clients.open()
            two = await clients.open()
        assert one._source.address.port == clients.ports[1]
        assert two._source.address.port == clients.ports[1]
        assert one.credentials == two.credentials

    @pytest_twisted.ensureDeferred
    async def test_a_newer_client_takes_over_an_older_daemon(self, clients: Clients) -> None:
        first = await clients.open()
        old = clients.daemon_status()
        env = clients.env
        newer = Finder(Path(env["HYPERDB_STATE_DIR"]),
                       PortChoice(None, clients.ports[0], clients.ports[-1]),
                       client_version="99.0.0", environ=env)
        address = await deferToThread(newer.ensure)
        assert address.port == old["health_port"]
        assert address.facts["pid"] != old["pid"]
        assert not pid_alive(old["pid"])
        # The older daemon's client carries on with the new one.
        assert (await first.query("SELECT 1")).rows == [(1,)]

    @pytest_twisted.ensureDeferred
    async def test_an_older_client_reuses_the_daemon(self, clients: Clients) -> None:
        await clients.open()
        old = clients.daemon_status()
        older = Finder(clients.state, PortChoice(None, clients.ports[0], clients.ports[-1]),
                       client_version="0.1.0", environ=clients.env)
        address = await deferToThread(older.ensure)
        assert address.facts["pid"] == old["pid"]

    @pytest_twisted.ensureDeferred
    async def test_no_daemon_session_leaves_nothing_behind(self, clients: Clients) -> None:
        session = await Session.open(reactor, environ=clients.env, no_daemon=True)
        hyperd = session._source._supervisor.pid
        assert pid_alive(hyperd)
        await session.execute(["CREATE TABLE t (x int)", "INSERT INTO t VALUES (3)"])
        assert (await session.query("SELECT x FROM t")).rows == [(3,)]
        for port in clients.ports:
            with pytest.raises(OSError):
                status(port)
        await session.close()
        assert not pid_alive(hyperd)
        assert not session.ephemeral_db.parent.exists()
        assert not (clients.state / "daemon.json").exists()

    @pytest_twisted.ensureDeferred
    async def test_unusable_hyperd_fails_open_with_a_clear_error(self, clients: Clients) -> None:
        from hyperdaemon.client.finder import DaemonUnavailable

        clients.env["HYPERD_PATH"] = str(clients.tmp / "missing")
        with pytest.raises(DaemonUnavailable) as caught:
            await Session.open(reactor, environ=clients.env)
        assert "hyperd is missing" in str(caught.value)
        assert list((clients.state / "sessions").iterdir()) == []


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
class UpstreamDaemonTests:
    """A daemon without our session commands is used as it is."""

    @pytest_twisted.ensureDeferred
    async def test_session_through_the_upstream_daemon(self, clients: Clients) -> None:
        port = clients.ports[0]
        clients.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = dict(clients.env, HYPERD_PATH=str(PEER / "hyperd"), HYPERDB_DAEMON_PORT=str(port))
        upstream = subprocess.Popen(
            [str(PEER / "hyperdb-mcp"), "daemon", "--port", str(port), "--idle-timeout", "60"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await deferToThread(wait_for, lambda: (clients.state / "daemon.json").exists(),
                                READY_TIMEOUT, "the upstream daemon to be ready")
            session = await clients.open(port=port)
            assert session._source.address.session_protocol is None
            await session.execute(["CREATE TABLE t (x int)", "INSERT INTO t VALUES (1)"])
            assert (await session.query("SELECT x FROM t")).rows == [(1,)]
            folder = session.ephemeral_db.parent
            await session.close()
            assert not folder.exists()
            assert upstream.poll() is None
        finally:
            if upstream.poll() is None:
                upstream.kill()
            upstream.wait(QUICK)
