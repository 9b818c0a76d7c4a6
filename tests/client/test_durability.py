"""
Writes to shared databases are on disk before they are acknowledged: they
survive a SIGKILL of hyperd right after, however many sessions have the file
attached (real daemon, real hyperd; see hyperdaemon/sharedfiles.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest
import pytest_twisted

from hyperdaemon.client.session import Session
from hyperdaemon.client.sharedfiles import LockFile, NotDurable, SharedFile, take_hold, wait_until_written
from support import QUICK, Clients, pid_alive, status, until, wait_for
from mcp_support import McpTestCase

ROWS = 1000
#: Clients spawn daemons and hyperds: more time than an asynchronous test's default.
pytestmark = pytest.mark.deadline(180)


async def kill_hyperd(clients: Clients) -> None:
    """SIGKILL hyperd (nothing graceful) and wait for its replacement."""
    before = clients.daemon_status()
    os.kill(before["hyperd_pid"], signal.SIGKILL)
    await until(lambda: not pid_alive(before["hyperd_pid"]), QUICK, "hyperd to die")
    await until(lambda: clients.daemon_status()["hyperd_pid"] not in (None, before["hyperd_pid"])
                and clients.daemon_status()["state"] == "ready", QUICK, "a new hyperd")


async def count(session: Session, table: str) -> int:
    return (await session.query(f"SELECT count(*) FROM {table}")).rows[0][0]


class ConcurrentAttachTests:
    @pytest.mark.deadline(120)
    @pytest_twisted.ensureDeferred
    async def test_sessions_writing_and_reading_one_file_at_once_never_wedge_hyperd(
            self, clients: Clients) -> None:
        # Writes make every session let go of the file and attach it again,
        # the writer in the background: attaches of one file from several
        # connections at once, which wedged hyperd when one of them ran
        # CREATE DATABASE IF NOT EXISTS meanwhile.
        from twisted.internet import defer

        sessions = [await clients.open(name=f"s{i}", ephemeral_only=True) for i in range(3)]
        path = clients.tmp / "shared.hyper"
        # The first one made the file; the others only attach it.
        await sessions[0].attach("shared", path, create=True)
        for session in sessions[1:]:
            await session.attach("shared", path)
        await sessions[0].execute("CREATE TABLE shared.public.busy (x int)")

        async def work(i: int, session: Session) -> None:
            for n in range(15):
                if n % 3 == i % 3:
                    await session.execute(f"INSERT INTO shared.public.busy VALUES ({n})")
                else:
                    await count(session, "shared.public.busy")

        await defer.gatherResults([defer.ensureDeferred(work(i, s))
                                   for i, s in enumerate(sessions)])
        assert await count(sessions[0], "shared.public.busy") == 15


class DurableWriteTests:
    @pytest_twisted.ensureDeferred
    async def test_a_write_survives_sigkill_while_other_sessions_hold_the_file(
            self, clients: Clients) -> None:
        writer = await clients.open(name="writer")
        readers = [await clients.open(name=f"reader{i}") for i in range(2)]
        await writer.execute("CREATE TABLE persistent.public.seen (x int)")
        for reader in readers:
            # Each reader now has the persistent database attached, idle.
            assert await count(reader, "persistent.public.seen") == 0
        await writer.execute(
            f"CREATE TABLE persistent.public.kept AS "
            f"SELECT generate_series AS x FROM generate_series(1, {ROWS})")
        await kill_hyperd(clients)
        fresh = await clients.open(name="after")
        assert await count(fresh, "persistent.public.kept") == ROWS
        # The readers carry on, and see it too.
        for reader in readers:
            assert await count(reader, "persistent.public.kept") == ROWS

    @pytest_twisted.ensureDeferred
    async def test_rows_inserted_by_a_batch_survive_sigkill(self, clients: Clients) -> None:
        one = await clients.open()
        other = await clients.open()
        await one.execute("CREATE TABLE persistent.public.log (x int)")
        assert await count(other, "persistent.public.log") == 0
        await one.execute([f"INSERT INTO persistent.public.log VALUES ({i})" for i in range(5)])
        await kill_hyperd(clients)
        assert await count(other, "persistent.public.log") == 5

    @pytest_twisted.ensureDeferred
    async def test_a_query_that_writes_is_made_durable_too(self, clients: Clients) -> None:
        session = await clients.open()
        other = await clients.open()
        await session.execute("CREATE TABLE persistent.public.ret (x int)")
        assert await count(other, "persistent.public.ret") == 0
        result = await session.query("INSERT INTO persistent.public.ret VALUES (9) RETURNING x")
        assert result.rows == [(9,)]
        await kill_hyperd(clients)
        assert await count(other, "persistent.public.ret") == 1

    @pytest_twisted.ensureDeferred
    async def test_a_file_attached_by_name_is_made_durable_too(self, clients: Clients) -> None:
        path = clients.tmp / "extra.hyper"
        one = await clients.open()
        two = await clients.open()
        await one.attach("extra", path, create=True)
        await two.attach("extra", path)
        await one.execute("CREATE TABLE extra.public.t AS SELECT 1 AS x")
        assert await count(two, "extra.public.t") == 1
        await one.execute("INSERT INTO extra.public.t VALUES (2)")
        await kill_hyperd(clients)
        assert await count(two, "extra.public.t") == 2
        assert sorted(two.attached_files) == ["extra", "persistent"]
        await two.detach("extra")
        assert sorted(two.attached_files) == ["persistent"]

    @pytest_twisted.ensureDeferred
    async def test_a_reading_session_sees_writes_of_another_made_meanwhile(
            self, clients: Clients) -> None:
        reader = await clients.open()
        writer = await clients.open()
        await writer.execute("CREATE TABLE persistent.public.n (x int)")
        for i in range(1, 4):
            await writer.execute(f"INSERT INTO persistent.public.n VALUES ({i})")
            assert await count(reader, "persistent.public.n") == i

    @pytest_twisted.ensureDeferred
    async def test_the_file_stays_attached_between_calls_and_again_after_a_write(
            self, clients: Clients) -> None:
        session = await clients.open()
        shared = session._files["persistent"]
        await session.query("SELECT 1")
        assert shared.attached
        # Nobody else could take the hold exclusively while it is held.
        probe = LockFile(shared.hold.path)
        try:
            assert not probe.lock(exclusive=True, wait=False)
            await session.execute("CREATE TABLE persistent.public.w (x int)")
            # Written out (it let go), then attached again in the background
            # so that the next call does not pay a cold attach.
            await until(lambda: shared.attached, QUICK, "the file to be attached again")
            assert not probe.lock(exclusive=True, wait=False)
        finally:
            probe.close()

    @pytest_twisted.ensureDeferred
    async def test_closing_a_session_lets_go_of_the_file(self, clients: Clients) -> None:
        session = await clients.open()
        hold = session._files["persistent"].hold.path
        await session.close()
        probe = LockFile(hold)
        try:
            assert probe.lock(exclusive=True, wait=False)
        finally:
            probe.close()


class NoDaemonDurabilityTests:
    @pytest_twisted.ensureDeferred
    async def test_without_the_daemon_a_write_survives_sigkill(self, clients: Clients) -> None:
        session = await clients.open(no_daemon=True)
        await session.execute("CREATE TABLE persistent.public.solo AS SELECT 5 AS x")
        hyperd = session._source._supervisor.pid
        os.kill(hyperd, signal.SIGKILL)
        await until(lambda: session._source._supervisor.pid not in (None, hyperd), QUICK,
                    "a new private hyperd")
        assert (await session.query("SELECT x FROM persistent.public.solo")).rows == [(5,)]


@pytest.fixture
def shared(tmp_path: Path):
    files = []

    def make() -> SharedFile:
        f = SharedFile.at("p", tmp_path / "p.hyper", tmp_path / "locks")
        files.append(f)
        return f

    yield make
    for f in files:
        f.close()


def test_a_writer_nudges_holders_every_interval_and_gives_up_at_the_timeout(shared) -> None:
    holder, writer = shared(), shared()
    take_hold(holder, let_go=lambda: None)
    now = [0.0]
    nudges = []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(NotDurable, match="kept it attached for 3 s"):
        wait_until_written(writer, nudge=lambda: nudges.append(now[0]), timeout=3.0,
                           clock=lambda: now[0], sleep=sleep)
    assert [round(t) for t in nudges] == [0, 1, 2]
    # Once the holder lets go, the writer gets through at once.
    holder.hold.unlock()
    wait_until_written(writer, nudge=lambda: None, timeout=3.0, clock=lambda: now[0], sleep=sleep)


def test_a_session_that_would_attach_while_a_writer_waits_lets_go_first(shared) -> None:
    reader, writer = shared(), shared()
    take_hold(reader, let_go=lambda: None)
    let_go = threading.Event()
    waiting = threading.Thread(target=wait_until_written, args=(writer, let_go.set),
                               kwargs={"timeout": QUICK})
    waiting.start()
    # The writer nudges the reader (which lets go); a late reader asking
    # for the file meanwhile is asked to let go of what it holds too.
    assert let_go.wait(QUICK)
    late = shared()
    released = []

    def late_lets_go() -> None:
        released.append(True)
        reader.hold.unlock()

    take_hold(late, let_go=late_lets_go)
    waiting.join(QUICK)
    assert not waiting.is_alive()
    assert released == [True]
    late.hold.unlock()



class McpDurabilityTests(McpTestCase):
    def test_tables_loaded_and_changed_through_tools_survive_sigkill_of_hyperd(self) -> None:
        extra = self.tmp / "extra.hyper"

        async def go() -> None:
            async with self.server() as one, self.server() as two:
                c1 = lambda tool, **kw: self.call(one, tool, **kw)  # noqa: E731
                c2 = lambda tool, **kw: self.call(two, tool, **kw)  # noqa: E731
                await c1("load_file", table="cities", path=str(self.csv), persist=True)
                await c1("attach_database", alias="extra", kind="file", path=str(extra),
                         on_missing="create")
                await c2("attach_database", alias="extra", kind="file", path=str(extra))
                # The other server reads both: it holds them attached.
                await c2("query", sql="SELECT count(*) FROM persistent.public.cities")
                await c1("execute", sql=["CREATE TABLE extra.public.e (x int)",
                                         "INSERT INTO extra.public.e VALUES (1), (2)"])
                await c2("query", sql="SELECT count(*) FROM extra.public.e")
                await c1("execute", sql=["DELETE FROM persistent.public.cities "
                                         "WHERE city = 'Nice'"])
                before = status(self.ports[0])
                os.kill(before["hyperd_pid"], signal.SIGKILL)
                await asyncio.to_thread(
                    wait_for, lambda: status(self.ports[0])["hyperd_pid"]
                    not in (None, before["hyperd_pid"]), QUICK, "a new hyperd")
                rows = await c2("query", sql="SELECT city FROM persistent.public.cities "
                                             "ORDER BY city")
                assert rows["rows"] == [["Brest"], ["Lyon"]]
                counted = await c2("query", sql="SELECT count(*) FROM extra.public.e")
                assert counted["rows"] == [[2]]

        self.drive(go())
