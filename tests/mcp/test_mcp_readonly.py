"""
What a model cannot do to the user's data through the MCP server, driven
over stdio by the SDK's own client: write through query on a --read-only
server however the SQL hides it, or destroy a file (a database in use
above all) with export.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mcp_support import McpTestCase, ToolCallError

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


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ReadOnlyTestCase(McpTestCase):
    @property
    def persistent(self) -> Path:
        return self.tmp / "persistent.hyper"

    async def keep_rows(self, session: Any) -> Any:
        return (await self.call(session, "query",
                                sql="SELECT x, note FROM persistent.public.keep ORDER BY x"))["rows"]

    def leftovers(self, folder: Path) -> list[Path]:
        return sorted(folder.glob(".*.export"))


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


class ExportTests(ReadOnlyTestCase):
    def test_read_only_export_never_replaces_a_file(self) -> None:
        notes = self.tmp / "notes.txt"
        notes.write_text("the user's own notes\n")

        async def go() -> None:
            async with self.server() as writer:
                await self.call(writer, "execute", sql=KEEP)
            before = digest(self.persistent)
            async with self.server("--read-only") as s:
                for path, fmt in [(self.persistent, "csv"), (self.persistent, "hyper"),
                                  (self.persistent, "parquet"), (notes, "csv")]:
                    with self.assertRaises(ToolCallError) as caught:
                        await self.call(s, "export", path=str(path), format=fmt,
                                        sql="SELECT 1 AS x", overwrite=True)
                    self.assertIn(str(path), str(caught.exception))
                    self.assertTrue(path.exists(), (path, fmt))
                self.assertEqual(digest(self.persistent), before)
                self.assertEqual(notes.read_text(), "the user's own notes\n")
                # Exports to new files still work.
                fresh = self.tmp / "fresh.csv"
                await self.call(s, "export", path=str(fresh), format="csv",
                                sql="SELECT x FROM persistent.public.keep ORDER BY x")
                self.assertEqual(fresh.read_text().splitlines(), ["x", "1", "2", "3"])
                with self.assertRaises(ToolCallError) as caught:
                    await self.call(s, "export", path=str(fresh), format="csv",
                                    sql="SELECT 1 AS x", overwrite=True)
                self.assertIn("--read-only", str(caught.exception))
            async with self.server() as later:
                self.assertEqual(len(await self.keep_rows(later)), 3)
            self.assertEqual(self.leftovers(self.tmp), [])

        self.drive(go())

    def test_export_never_writes_onto_an_attached_database(self) -> None:
        linked = self.tmp / "linked.hyper"
        hard = self.tmp / "hard.hyper"

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "execute", sql=KEEP)
                await self.call(s, "execute", sql=["CREATE TABLE scratch (a int)",
                                                   "INSERT INTO scratch VALUES (1)"])
                extra = self.tmp / "extra.hyper"
                await self.call(s, "attach_database", alias="extra", kind="file",
                                path=str(extra), on_missing="create")
                scratch = Path((await self.call(s, "status"))["ephemeral_db"])
                os.symlink(self.persistent, linked)
                os.link(self.persistent, hard)
                for path, alias in [(self.persistent, "persistent"), (linked, "persistent"),
                                    (hard, "persistent"), (scratch, "local"),
                                    (extra, "extra")]:
                    for fmt in ("csv", "hyper"):
                        with self.assertRaises(ToolCallError) as caught:
                            await self.call(s, "export", path=str(path), format=fmt,
                                            sql="SELECT 1 AS x", overwrite=True)
                        self.assertIn(f"attached database {alias!r}", str(caught.exception))
                self.assertEqual(len(await self.keep_rows(s)), 3)
                self.assertEqual((await self.call(s, "query", sql="SELECT a FROM scratch"))
                                 ["rows"], [[1]])
                self.assertTrue(linked.is_symlink())
            async with self.server() as later:
                self.assertEqual(len(await self.keep_rows(later)), 3)
            self.assertEqual(self.leftovers(self.tmp), [])

        self.drive(go())

    def test_a_failed_export_leaves_the_old_file_and_nothing_else(self) -> None:
        old_csv = self.tmp / "out.csv"
        old_csv.write_text("old,content\n")
        old_hyper = self.tmp / "out.hyper"

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "execute", sql=KEEP)
                await self.call(s, "export", path=str(old_hyper), format="hyper",
                                table="persistent.public.keep")
                with self.assertRaises(ToolCallError) as caught:
                    await self.call(s, "export", path=str(old_csv), format="csv",
                                    sql="SELECT 1 AS x")
                self.assertIn("exists", str(caught.exception))
                self.assertIn("overwrite=true", str(caught.exception))
                for path, fmt in [(old_csv, "csv"), (old_csv, "parquet"), (old_hyper, "hyper")]:
                    before = digest(path)
                    with self.assertRaises(ToolCallError):
                        await self.call(s, "export", path=str(path), format=fmt,
                                        sql="SELECT 1 / (x - 2) AS y FROM "
                                            "persistent.public.keep", overwrite=True)
                    self.assertEqual(digest(path), before, (path, fmt))
                    self.assertEqual(self.leftovers(self.tmp), [])
                await self.call(s, "attach_database", alias="old", kind="file",
                                path=str(old_hyper))
                self.assertEqual((await self.call(
                    s, "query", sql="SELECT count(*) FROM old.public.keep"))["rows"], [[3]])
                await self.call(s, "detach_database", alias="old")
                # A successful overwrite replaces the file whole.
                await self.call(s, "export", path=str(old_csv), format="csv",
                                sql="SELECT note FROM persistent.public.keep ORDER BY x",
                                overwrite=True)
                self.assertEqual(old_csv.read_text().splitlines(), ["note", "a", "b", "c"])
                await self.call(s, "export", path=str(old_hyper), format="hyper",
                                sql="SELECT x * 10 AS x FROM persistent.public.keep;",
                                overwrite=True)
                await self.call(s, "attach_database", alias="again", kind="file",
                                path=str(old_hyper))
                self.assertEqual((await self.call(
                    s, "query", sql="SELECT sum(x) FROM again.public.result"))["rows"], [[60]])
            self.assertEqual(self.leftovers(self.tmp), [])

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
