"""
What a model cannot do to the user's data through the MCP server, driven
over stdio by the SDK's own client: write through query on a --read-only
server however the SQL hides it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_mcpserver import McpTestCase, ToolCallError

KEEP = [
    "CREATE TABLE persistent.public.keep (x int, note text)",
    "INSERT INTO persistent.public.keep VALUES (1, 'a'), (2, 'b'), (3, 'c')",
]

#: SQL that writes, hidden from a keyword scan in every way we know of.
HIDDEN_WRITES = [
    # issue 11 item 4, and its INSERT and UPDATE variants
    "WITH x AS (SELECT E'\\'' AS q) DELETE FROM persistent.public.keep WHERE x = 1 --'",
    "WITH x AS (SELECT E'\\'' AS q) INSERT INTO persistent.public.keep VALUES (9, 'z') --'",
    "WITH x AS (SELECT E'\\'' AS q) UPDATE persistent.public.keep SET note = 'gone' --'",
    "WITH x AS (SELECT $$ ' $$ AS q) DELETE FROM persistent.public.keep --'",
    # a comment that Hyper ends earlier than a PostgreSQL parser does
    "WITH x AS (SELECT 1 AS y /* /* */ ) DELETE FROM persistent.public.keep -- */ ) "
    "SELECT * FROM x",
    "WITH x AS (DELETE FROM persistent.public.keep RETURNING *) SELECT * FROM x",
    "SELECT E'\\\\' AS q; DELETE FROM persistent.public.keep",
    "DELETE FROM persistent.public.keep",
    "UPDATE persistent.public.keep SET note = 'gone'",
    "SELECT * INTO persistent.public.copied FROM persistent.public.keep",
    "DROP TABLE persistent.public.keep",
    "EXPLAIN (ANALYZE) DELETE FROM persistent.public.keep",
]


class ReadOnlyTestCase(McpTestCase):
    @property
    def persistent(self) -> Path:
        return self.tmp / "persistent.hyper"

    async def keep_rows(self, session: Any) -> Any:
        return (await self.call(session, "query",
                                sql="SELECT x, note FROM persistent.public.keep ORDER BY x"))["rows"]


class QueryTests(ReadOnlyTestCase):
    def test_read_only_query_cannot_write_however_the_sql_hides_it(self) -> None:
        async def go() -> None:
            async with self.server() as writer:
                await self.call(writer, "execute", sql=KEEP)
                original = await self.keep_rows(writer)
            async with self.server("--read-only") as s:
                for sql in HIDDEN_WRITES:
                    with self.assertRaises(ToolCallError, msg=sql) as caught:
                        await self.call(s, "query", sql=sql)
                    self.assertNotIn("Traceback", str(caught.exception))
                    self.assertEqual(await self.keep_rows(s), original, sql)
                for tool, arguments in [
                    ("query_data", {"data": "a\n1\n", "sql": HIDDEN_WRITES[0]}),
                    ("query_file", {"path": str(self.csv), "sql": HIDDEN_WRITES[0]}),
                    ("export", {"path": str(self.tmp / "out.csv"), "format": "csv",
                                "sql": HIDDEN_WRITES[0]}),
                ]:
                    with self.assertRaises(ToolCallError) as caught:
                        await self.call(s, tool, **arguments)
                    self.assertIn("use execute", str(caught.exception))
                self.assertEqual(await self.keep_rows(s), original)
                self.assertFalse((self.tmp / "out.csv").exists())

        self.drive(go())

    def test_read_only_sql_with_write_words_runs_and_a_typo_is_a_syntax_error(self) -> None:
        async def go() -> None:
            async with self.server("--read-only") as s:
                copy = await self.call(s, "query", sql="SELECT count(*) AS copy FROM (VALUES "
                                                       "('DELETE'), (E'\\''), ($$;$$)) v(a)")
                self.assertEqual((copy["columns"], copy["rows"]), (["copy"], [[3]]))
                explained = await self.call(s, "query", sql="EXPLAIN SELECT 1 AS insert")
                self.assertEqual(explained["row_count"], 1)
                once = await self.call(s, "query_data", data="update,delete\n1,2\n",
                                       sql="SELECT \"update\" + \"delete\" AS total FROM data;")
                self.assertEqual(once["rows"], [[3]])
                with self.assertRaises(ToolCallError) as caught:
                    await self.call(s, "query", sql="SELEC 1")
                self.assertIn("syntax error", str(caught.exception))
                self.assertNotIn("read-only", str(caught.exception))

        self.drive(go())


class AttachTests(ReadOnlyTestCase):
    def test_read_only_refuses_a_writable_attach(self) -> None:
        other = self.tmp / "other.hyper"

        async def go() -> None:
            async with self.server() as writer:
                await self.call(writer, "attach_database", alias="other", kind="file",
                                path=str(other), on_missing="create", writable=True)
                await self.call(writer, "execute", sql=["CREATE TABLE other.public.t (a int)"])
            async with self.server("--read-only") as s:
                with self.assertRaises(ToolCallError) as caught:
                    await self.call(s, "attach_database", alias="other", kind="file",
                                    path=str(other), writable=True)
                self.assertIn("read-only", str(caught.exception))
                self.assertIn("writable", str(caught.exception))
                listed = await self.call(s, "list_attached_databases")
                self.assertNotIn("other", [d["alias"] for d in listed["databases"]])
                await self.call(s, "attach_database", alias="other", kind="file",
                                path=str(other))
                self.assertEqual((await self.call(
                    s, "query", sql="SELECT count(*) FROM other.public.t"))["rows"], [[0]])

        self.drive(go())
