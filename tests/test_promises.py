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
from pathlib import Path

import psycopg
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver

from hyperdaemon import finder as finder_module
from hyperdaemon import session as session_module
from hyperdaemon.config import PortChoice
from hyperdaemon.daemon import SESSION_PROTOCOL
from hyperdaemon.finder import Finder
from hyperdaemon.session import SessionError
from support import QUICK, pid_alive, until
from test_mcpserver import McpTestCase, ToolCallError
from test_session import ClientTestCase


class TakeoverTests(ClientTestCase):
    async def test_a_takeover_keeps_the_old_daemons_port_even_past_the_first(self) -> None:
        # The old daemon sits on the second port of the range: a takeover
        # that spawned anew would land on the (now free) first one.
        foreign = socket.socket()
        foreign.bind(("127.0.0.1", self.ports[0]))
        foreign.listen()
        first = await self.open()
        await first.execute("CREATE TABLE mine (x int)")
        old = self.daemon_status()
        self.assertEqual(old["health_port"], self.ports[1])
        foreign.close()
        newer = Finder(self.state, PortChoice(None, self.ports[0], self.ports[-1]),
                       client_version="99.0.0", environ=self.env)
        address = await deferToThread(newer.ensure)
        self.assertEqual(address.port, self.ports[1])
        self.assertNotEqual(address.facts["pid"], old["pid"])
        # The attached session carries on with a new, empty scratch database.
        self.assertEqual((await first.query("SELECT 1")).rows, [(1,)])
        with self.assertRaises(psycopg.errors.UndefinedTable):
            await first.query("SELECT * FROM mine")
        self.assertEqual([s["ephemeral_db"] for s in self.daemon_status()["sessions"]],
                         [str(first.ephemeral_db)])

    async def test_an_older_daemon_that_does_not_stop_is_used(self) -> None:
        port = self.ports[0]
        listening = reactor.listenTCP(port, Factory.forProtocol(_StubbornOldDaemon),
                                      interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.patch(finder_module, "TAKEOVER_TIMEOUT", 1.0)
        newer = Finder(self.state, PortChoice(None, self.ports[0], self.ports[-1]),
                       client_version="99.0.0", environ=self.env)
        address = await deferToThread(newer.ensure)
        self.assertEqual((address.port, address.version), (port, "0.0.1"))
        self.assertIn("STOP", _StubbornOldDaemon.heard)


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


class IdleTests(ClientTestCase):
    async def test_an_attached_session_keeps_the_daemon_alive_without_heartbeats(self) -> None:
        self.env["HYPERDB_DAEMON_IDLE_TIMEOUT"] = "1"
        session = await self.open()
        pid = self.daemon_status()["pid"]
        # Three idle timeouts without a call (so without a heartbeat).
        await deferLater(reactor, 3.0, lambda: None)
        self.assertTrue(pid_alive(pid))
        self.assertEqual(len(self.daemon_status()["sessions"]), 1)
        await session.close()
        await until(lambda: not pid_alive(pid), QUICK, "the idle daemon to stop")


class ClosedSessionTests(ClientTestCase):
    async def test_close_twice_does_nothing_and_a_closed_session_refuses_work(self) -> None:
        session = await self.open()
        await session.close()
        await session.close()
        for attempt in (lambda: session.query("SELECT 1"),
                        lambda: session.execute("SELECT 1"),
                        lambda: session.call(lambda conn: None)):
            with self.assertRaises(SessionError) as caught:
                attempt()
            self.assertIn("closed", str(caught.exception))


class InterruptedTests(ClientTestCase):
    async def test_an_execute_cut_by_hyperds_death_is_not_run_again_and_says_so(self) -> None:
        session = await self.open()
        await session.execute("CREATE TABLE persistent.public.runs (x int)")
        hyperd = self.daemon_status()["hyperd_pid"]

        def write_then_die(connection: psycopg.Connection) -> None:
            connection.execute("INSERT INTO persistent.public.runs VALUES (1)")
            os.kill(hyperd, signal.SIGKILL)
            connection.execute("SELECT pg_sleep(5)")

        with self.assertRaises(SessionError) as caught:
            await session.call(write_then_die)
        self.assertIn("went away during the statement", str(caught.exception))
        self.assertIn("reconnected", str(caught.exception))
        # Not run a second time; the session works again.
        count = (await session.query("SELECT count(*) FROM persistent.public.runs")).rows[0][0]
        self.assertLessEqual(count, 1)
        self.assertEqual((await session.query("SELECT 2")).rows, [(2,)])

    async def test_a_session_without_a_usable_hyperd_gives_up_after_its_limit(self) -> None:
        session = await self.open()
        self.patch(session_module, "CREDENTIALS_TIMEOUT", 2.0)
        # The daemon is frozen: it can neither answer nor start a hyperd.
        facts = self.daemon_status()
        os.kill(facts["pid"], signal.SIGSTOP)
        self.addCleanup(_continue, facts["pid"])
        os.kill(facts["hyperd_pid"], signal.SIGKILL)
        began = reactor.seconds()
        with self.assertRaises(SessionError) as caught:
            await session.query("SELECT 1")
        self.assertIn("no hyperd became available within 2 s", str(caught.exception))
        self.assertLess(reactor.seconds() - began, QUICK)


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
                with self.assertRaises(ToolCallError) as caught:
                    await c("load_file", table="keep", path=str(broken), mode="replace",
                            schema=schema)
                self.assertIn("does not fit", str(caught.exception))
                rows = await c("query", sql="SELECT id, name FROM keep ORDER BY id")
                self.assertEqual(rows["rows"], [[1, "a"], [2, "b"]])
                with self.assertRaises(ToolCallError):
                    await c("load_file", table="fresh", path=str(broken), schema=schema)
                listed = await c("describe")
                names = [t["table"] for t in listed["tables"]]
                self.assertNotIn("fresh", names)
                self.assertFalse([n for n in names if "loading" in n], names)

        self.drive(go())
