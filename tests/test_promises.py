"""
Promises of the README that break silently unless a test holds them: a
takeover keeps the daemon's port, sessions keep an idle daemon alive, a
closed session refuses work, an interrupted write is not run again, and a
session gives up on hyperd after its limit.  Real daemon, real hyperd.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver

from hyperdaemon.client import finder as finder_module
from hyperdaemon.client import session as session_module
from hyperdaemon.config import PortChoice
from hyperdaemon.daemon.service import SESSION_PROTOCOL
from hyperdaemon.client.finder import Finder
from hyperdaemon.client.session import SessionError
from support import QUICK, Clients, pid_alive, until
from mcp_support import McpTestCase, ToolCallError

#: Clients spawn daemons and hyperds: more time than an asynchronous test's default.
pytestmark = pytest.mark.deadline(180)


class TakeoverTests:
    @pytest_twisted.ensureDeferred
    async def test_a_takeover_keeps_the_old_daemons_port_even_past_the_first(
            self, clients: Clients) -> None:
        # The old daemon sits on the second port of the range: a takeover
        # that spawned anew would land on the (now free) first one.
        foreign = socket.socket()
        foreign.bind(("127.0.0.1", clients.ports[0]))
        foreign.listen()
        first = await clients.open()
        await first.execute("CREATE TABLE mine (x int)")
        old = clients.daemon_status()
        assert old["health_port"] == clients.ports[1]
        foreign.close()
        newer = Finder(clients.state, PortChoice(None, clients.ports[0], clients.ports[-1]),
                       client_version="99.0.0", environ=clients.env)
        address = await deferToThread(newer.ensure)
        assert address.port == clients.ports[1]
        assert address.facts["pid"] != old["pid"]
        # The attached session carries on with a new, empty scratch database.
        assert (await first.query("SELECT 1")).rows == [(1,)]
        with pytest.raises(psycopg.errors.UndefinedTable):
            await first.query("SELECT * FROM mine")
        assert ([s["ephemeral_db"] for s in clients.daemon_status()["sessions"]]
                == [str(first.ephemeral_db)])

    @pytest_twisted.ensureDeferred
    async def test_an_older_daemon_that_does_not_stop_is_used(
            self, clients: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
        port = clients.ports[0]
        listening = reactor.listenTCP(port, Factory.forProtocol(_StubbornOldDaemon),
                                      interface="127.0.0.1")
        try:
            monkeypatch.setattr(finder_module, "TAKEOVER_TIMEOUT", 1.0)
            newer = Finder(clients.state, PortChoice(None, clients.ports[0], clients.ports[-1]),
                           client_version="99.0.0", environ=clients.env)
            address = await deferToThread(newer.ensure)
            assert (address.port, address.version) == (port, "0.0.1")
            assert "STOP" in _StubbornOldDaemon.heard
        finally:
            await listening.stopListening()


class _StubbornOldDaemon(LineReceiver):
    """An older daemon of ours that says it stops, and does not."""

    delimiter = b"\n"
    heard: list[str] = []

    def lineReceived(self, line: bytes) -> None:
        command = line.decode().strip()
        self.heard.append(command)
        if command == "PING":
            self.sendLine(b"PONG hyperdb-mcp 0.0.1")
        elif command == "STATUS":
            self.sendLine(json.dumps({
                "pid": os.getpid(), "version": "0.0.1", "health_port": self.transport.getHost().port,
                "session_protocol": SESSION_PROTOCOL, "state": "ready", "sessions": [],
            }).encode())
        elif command == "STOP":
            self.sendLine(b"STOPPING")
        else:
            self.sendLine(b"OK")


class IdleTests:
    @pytest_twisted.ensureDeferred
    async def test_an_attached_session_keeps_the_daemon_alive_without_heartbeats(
            self, clients: Clients) -> None:
        clients.env["HYPERDB_DAEMON_IDLE_TIMEOUT"] = "1"
        session = await clients.open()
        pid = clients.daemon_status()["pid"]
        # Three idle timeouts without a call (so without a heartbeat).
        await deferLater(reactor, 3.0, lambda: None)
        assert pid_alive(pid)
        assert len(clients.daemon_status()["sessions"]) == 1
        await session.close()
        await until(lambda: not pid_alive(pid), QUICK, "the idle daemon to stop")


class ClosedSessionTests:
    @pytest_twisted.ensureDeferred
    async def test_close_twice_does_nothing_and_a_closed_session_refuses_work(
            self, clients: Clients) -> None:
        session = await clients.open()
        await session.close()
        await session.close()
        for attempt in (lambda: session.query("SELECT 1"),
                        lambda: session.execute("SELECT 1"),
                        lambda: session.call(lambda conn: None)):
            with pytest.raises(SessionError) as caught:
                attempt()
            assert "closed" in str(caught.value)


class InterruptedTests:
    @pytest_twisted.ensureDeferred
    async def test_an_execute_cut_by_hyperds_death_is_not_run_again_and_says_so(
            self, clients: Clients) -> None:
        session = await clients.open()
        await session.execute("CREATE TABLE persistent.public.runs (x int)")
        hyperd = clients.daemon_status()["hyperd_pid"]

        def write_then_die(connection: psycopg.Connection) -> None:
            connection.execute("INSERT INTO persistent.public.runs VALUES (1)")
            os.kill(hyperd, signal.SIGKILL)
            connection.execute("SELECT pg_sleep(5)")

        with pytest.raises(SessionError) as caught:
            await session.call(write_then_die)
        assert "went away during the statement" in str(caught.value)
        assert "reconnected" in str(caught.value)
        # Not run a second time; the session works again.
        count = (await session.query("SELECT count(*) FROM persistent.public.runs")).rows[0][0]
        assert count <= 1
        assert (await session.query("SELECT 2")).rows == [(2,)]

    @pytest_twisted.ensureDeferred
    async def test_a_session_without_a_usable_hyperd_gives_up_after_its_limit(
            self, clients: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
        session = await clients.open()
        monkeypatch.setattr(session_module, "CREDENTIALS_TIMEOUT", 2.0)
        # The daemon is frozen: it can neither answer nor start a hyperd.
        facts = clients.daemon_status()
        os.kill(facts["pid"], signal.SIGSTOP)
        try:
            os.kill(facts["hyperd_pid"], signal.SIGKILL)
            began = reactor.seconds()
            with pytest.raises(SessionError) as caught:
                await session.query("SELECT 1")
            assert "no hyperd became available within 2 s" in str(caught.value)
            assert reactor.seconds() - began < QUICK
        finally:
            _continue(facts["pid"])


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


class FailedLoadTests(McpTestCase):
    def test_a_failed_replace_keeps_the_old_rows_and_a_broken_json_lines_file_loads_nothing(
            self) -> None:
        # Rows that fit, then one that does not fit the schema, far into the file.
        broken = self.tmp / "broken.jsonl"
        good = "".join(json.dumps({"id": i, "name": f"n{i}"}) + "\n" for i in range(5000))
        broken.write_text(good + json.dumps({"id": "not a number", "name": "x"}) + "\n" + good)
        schema = {"id": "BIGINT", "name": "TEXT"}

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                await c("load_data", table="keep", data="id,name\n1,a\n2,b\n")
                with pytest.raises(ToolCallError) as caught:
                    await c("load_file", table="keep", path=str(broken), mode="replace",
                            schema=schema)
                assert "does not fit" in str(caught.value)
                rows = await c("query", sql="SELECT id, name FROM keep ORDER BY id")
                assert rows["rows"] == [[1, "a"], [2, "b"]]
                with pytest.raises(ToolCallError):
                    await c("load_file", table="fresh", path=str(broken), schema=schema)
                listed = await c("describe")
                names = [t["table"] for t in listed["tables"]]
                assert "fresh" not in names
                assert not [n for n in names if "loading" in n], names

        self.drive(go())
