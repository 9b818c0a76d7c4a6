"""
The MCP server driven over stdio by the SDK's own client: real servers,
the real daemon, the real hyperd, tiny CSV/JSON/Parquet files made here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import QUICK, READY_TIMEOUT, status, wait_for
from mcp_support import CSV, UPSTREAM_TOOLS, McpTestCase, ToolCallError

class ToolTests(McpTestCase):
    def test_lists_the_upstream_tools_with_their_parameters(self) -> None:
        async def go() -> Any:
            async with self.server() as s:
                return {t.name: t.input_schema for t in (await s.list_tools()).tools}

        tools = self.drive(go())
        self.assertEqual(set(tools), UPSTREAM_TOOLS)
        self.assertEqual(set(tools["query"]["properties"]), {"sql", "database"})
        self.assertEqual(tools["execute"]["properties"]["sql"]["type"], "array")
        self.assertEqual(set(tools["load_data"]["required"]), {"table", "data"})
        self.assertEqual(set(tools["export"]["required"]), {"path", "format"})

    def test_every_tool_on_real_data(self) -> None:
        tmp = self.tmp

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                self.assertIn("persistent", await c("get_readme"))
                facts = await c("status")
                self.assertEqual(facts["mode"], "daemon")
                self.assertEqual(facts["daemon_port"], self.ports[0])

                loaded = await c("load_file", table="cities", path=str(self.csv))
                self.assertEqual(loaded["rows_loaded"], 3)
                self.assertEqual(loaded["columns"], {"city": "TEXT", "population": "BIGINT",
                                                     "area": "DOUBLE PRECISION"})
                result = await c("query", sql="SELECT city FROM cities ORDER BY population DESC")
                self.assertEqual(result["rows"], [["Lyon"], ["Nice"], ["Brest"]])

                await c("execute", sql=["CREATE TABLE notes (id int, body text)",
                                        "INSERT INTO notes VALUES (1, 'a'), (2, 'b')"])
                self.assertEqual((await c("query", sql="SELECT count(*) FROM notes"))["rows"],
                                 [[2]])

                json_data = json.dumps([{"k": "x", "v": 1.5}, {"k": "y", "v": 2}])
                await c("load_data", table="kv", data=json_data)
                await c("load_data", table="kv", data='{"k": "z", "v": 3}', format="jsonl",
                        mode="append")
                self.assertEqual((await c("query", sql="SELECT sum(v) FROM kv"))["rows"],
                                 [[6.5]])

                described = await c("describe")
                self.assertEqual(sorted(t["table"] for t in described["tables"]),
                                 ["cities", "kv", "notes"])
                one = await c("describe", table="cities")
                self.assertEqual([col["name"] for col in one["columns"]],
                                 ["city", "population", "area"])
                self.assertEqual(one["row_count"], 3)
                self.assertEqual(len((await c("sample", table="cities", n=2))["rows"]), 2)

                parquet = tmp / "cities.parquet"
                exported = await c("export", path=str(parquet), format="parquet",
                                   table="cities")
                self.assertGreater(exported["bytes"], 0)
                await c("load_file", table="from_parquet", path=str(parquet))
                self.assertEqual(
                    (await c("query", sql="SELECT count(*) FROM from_parquet"))["rows"], [[3]])
                await c("export", path=str(tmp / "big.csv"), format="csv",
                        sql="SELECT city FROM cities WHERE area > 48")
                self.assertEqual((tmp / "big.csv").read_text().splitlines(),
                                 ["city", "Nice", "Brest"])
                await c("export", path=str(tmp / "copy.hyper"), format="hyper", table="cities")

                jsonl = tmp / "events.jsonl"
                jsonl.write_text('{"e": "a", "n": 1}\n{"e": "b", "n": 2}\n')
                await c("load_file", table="events", path=str(jsonl))
                self.assertEqual((await c("query", sql="SELECT sum(n) FROM events"))["rows"],
                                 [[3]])

                once = await c("query_data", data=CSV, sql="SELECT max(area) FROM data")
                self.assertEqual(once["rows"], [[71.92]])
                once = await c("query_file", path=str(parquet),
                               sql="SELECT count(*) FROM data")
                self.assertEqual(once["rows"], [[3]])
                once = await c("query_file", path=str(self.csv), table_name="c",
                               sql="SELECT city FROM c WHERE population < 200000")
                self.assertEqual(once["rows"], [["Brest"]])
                self.assertNotIn("data", [t["table"] for t in (await c("describe"))["tables"]])

                await c("attach_database", alias="extra", kind="file",
                        path=str(tmp / "copy.hyper"))
                listed = await c("list_attached_databases")
                self.assertEqual([d["alias"] for d in listed["databases"]],
                                 ["local", "persistent", "extra"])
                self.assertEqual(
                    (await c("query", sql="SELECT count(*) FROM extra.public.cities"))["rows"],
                    [[3]])
                await c("detach_database", alias="extra")
                with self.assertRaises(ToolCallError):
                    await c("query", sql="SELECT 1 FROM extra.public.cities")

        self.drive(go())
        self.assertEqual(self.sessions_left(), [])

    def test_bad_input_gets_clear_errors_and_harms_nothing(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                bad = [
                    ("query", {"sql": "SELEKT 1"}, "syntax error"),
                    ("query", {"sql": "SELECT FROM WHERE"}, "hint"),
                    ("query", {"sql": "SELECT * FROM missing_table"}, "describe"),
                    ("query", {"sql": "DROP TABLE x"}, "execute"),
                    ("query", {"sql": "SELECT 1; SELECT 2"}, "exactly one"),
                    ("load_file", {"table": "t", "path": str(self.tmp / "nope.csv")},
                     "not a readable file"),
                    ("load_file", {"table": "t", "path": str(self.csv.with_suffix(".xlsx"))},
                     "not a readable file"),
                    ("load_data", {"table": "t", "data": "[1, 2]"}, "array of objects"),
                    ("detach_database", {"alias": "local"}, "cannot be detached"),
                    ("export", {"path": str(self.tmp / "x.csv"), "format": "xls",
                                "sql": "SELECT 1"}, "format"),
                ]
                for tool, arguments, needle in bad:
                    with self.assertRaises(ToolCallError) as caught:
                        await c(tool, **arguments)
                    self.assertIn(needle, str(caught.exception), (tool, arguments))
                strange = self.tmp / "data.xlsx"
                strange.write_text("not really")
                with self.assertRaises(ToolCallError) as caught:
                    await c("load_file", table="t", path=str(strange))
                self.assertIn("cannot tell the format", str(caught.exception))

                # A load that fails half-way leaves no table behind.
                with self.assertRaises(ToolCallError):
                    await c("load_file", table="cities", path=str(self.csv),
                            schema={"population": "BOOLEAN"})
                self.assertEqual((await c("describe"))["tables"], [])

                big = await c("query", sql="SELECT i FROM generate_series(1, 5000) AS g(i)")
                self.assertEqual((big["row_count"], len(big["rows"]), big["truncated"]),
                                 (5000, 200, True))
                self.assertEqual((await c("query", sql="SELECT 1"))["rows"], [[1]])

        self.drive(go())


class SharingTests(McpTestCase):
    def test_two_servers_share_the_persistent_database_only(self) -> None:
        async def go() -> None:
            async with self.server() as one, self.server() as two:
                await self.call(one, "load_file", table="cities", path=str(self.csv),
                                persist=True)
                await self.call(one, "execute", sql=["CREATE TABLE private (x int)"])
                shared = await self.call(
                    two, "query", sql="SELECT count(*) FROM persistent.public.cities")
                self.assertEqual(shared["rows"], [[3]])
                with self.assertRaises(ToolCallError):
                    await self.call(two, "query", sql="SELECT * FROM private")
                facts = [await self.call(x, "status") for x in (one, two)]
                self.assertEqual(facts[0]["hyperd_endpoint"], facts[1]["hyperd_endpoint"])
                self.assertEqual(len(status(self.ports[0])["sessions"]), 2)

        self.drive(go())
        wait_for(lambda: self.sessions_left() == [], QUICK, "the ephemeral folders to go")
        self.assertTrue((self.tmp / "persistent.hyper").exists())

    def test_read_only_refuses_every_write(self) -> None:
        async def go() -> None:
            async with self.server() as writer:
                await self.call(writer, "load_file", table="cities", path=str(self.csv),
                                persist=True)
            async with self.server("--read-only") as s:
                for tool, arguments in [
                    ("execute", {"sql": ["DROP TABLE persistent.public.cities"]}),
                    ("load_data", {"table": "t", "data": CSV}),
                    ("load_file", {"table": "t", "path": str(self.csv)}),
                    ("attach_database", {"alias": "w", "kind": "file",
                                         "path": str(self.tmp / "w.hyper"),
                                         "on_missing": "create"}),
                ]:
                    with self.assertRaises(ToolCallError) as caught:
                        await self.call(s, tool, **arguments)
                    self.assertIn("read-only", str(caught.exception))
                self.assertEqual((await self.call(
                    s, "query", sql="SELECT count(*) FROM persistent.public.cities"))["rows"],
                    [[3]])
                self.assertTrue((await self.call(s, "status"))["read_only"])

        self.drive(go())

    def test_ephemeral_only_has_no_persistent_database(self) -> None:
        async def go() -> None:
            async with self.server("--ephemeral-only") as s:
                with self.assertRaises(ToolCallError) as caught:
                    await self.call(s, "load_data", table="t", data=CSV, persist=True)
                self.assertIn("no persistent database", str(caught.exception))
                self.assertIsNone((await self.call(s, "status"))["persistent_db"])

        self.drive(go())
        self.assertFalse((self.tmp / "persistent.hyper").exists())

    def test_no_daemon_works_alone_and_leaves_nothing(self) -> None:
        async def go() -> None:
            async with self.server("--no-daemon") as s:
                await self.call(s, "load_file", table="cities", path=str(self.csv))
                self.assertEqual(
                    (await self.call(s, "query", sql="SELECT count(*) FROM cities"))["rows"],
                    [[3]])
                self.assertEqual((await self.call(s, "status"))["mode"], "private hyperd")
                for port in self.ports:
                    self.assertRaises(OSError, status, port)

        self.drive(go())
        self.assertFalse((self.state / "daemon.json").exists())
        self.assertEqual(self.sessions_left(), [])


class LifecycleTests(McpTestCase):
    def test_sigterm_closes_the_session_and_exits(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hyperdaemon"], env=self.env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.addCleanup(lambda: [f.close() for f in (proc.stdin, proc.stdout)])

        def listed() -> list[Any]:
            try:
                return status(self.ports[0])["sessions"]
            except OSError:
                return []

        # Before it serves, the server has opened its session.
        sessions = wait_for(listed, READY_TIMEOUT, "the server's session to be listed")
        self.assertEqual(sessions[0]["pid"], proc.pid)
        folder = Path(sessions[0]["ephemeral_db"]).parent
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(QUICK), 0)
        self.assertFalse(folder.exists())

    def test_stdin_closing_ends_the_server(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hyperdaemon", "--ephemeral-only"], env=self.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.addCleanup(proc.stdout.close)
        wait_for(lambda: (self.state / "daemon.json").exists(), READY_TIMEOUT,
                 "the daemon to be ready")
        wait_for(lambda: self.sessions_left(), READY_TIMEOUT, "the session to open")
        proc.stdin.close()
        self.assertEqual(proc.wait(QUICK), 0)
        self.assertEqual(self.sessions_left(), [])
