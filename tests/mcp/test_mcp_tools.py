"""
What the MCP tools promise an assistant, driven through the SDK's stdio
client on the real daemon and hyperd: one-shot tables that survive a long
session and a failed call, faithful values as strict JSON, batches that are
all or nothing, unknown aliases named, errors that name the parameter, and
upstream's names and options (local_file, the file's stem, merge, export's
format_options, sample's n).
"""

from __future__ import annotations

import csv
import json
from typing import Any

from mcp_support import CSV, PlainRefusalsTestCase, ToolCallError

#: The two databases every session has, as errors list them.
ALIASES = "'local', 'persistent'"


def strict_json(text: str) -> Any:
    """C{text} read by a JSON parser that refuses NaN and the infinities."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


class ToolsTestCase(PlainRefusalsTestCase):
    async def raw(self, session: Any, tool: str, **arguments: Any) -> str:
        """The text of a successful call, as the server sent it."""
        result = await session.call_tool(tool, arguments)
        text = result.content[0].text
        if result.is_error:
            raise ToolCallError(text)
        return text


    async def tables(self, session: Any, database: str = "local") -> list[str]:
        described = await self.call(session, "describe", database=database)
        return sorted(t["table"] for t in described["tables"])


class OneShotTests(ToolsTestCase):
    def test_query_file_answers_call_after_call_in_one_session(self) -> None:
        records = [{"k": "a", "n": 1}, {"k": "b", "n": 2}]
        as_json = self.tmp / "x.json"
        as_json.write_text(json.dumps(records))
        as_jsonl = self.tmp / "x.jsonl"
        as_jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))

        async def go() -> None:
            async with self.server() as s:
                for call in range(20):
                    counted = await self.call(s, "query_file", path=str(self.csv),
                                              sql="SELECT count(*) FROM data")
                    self.assertEqual(counted["rows"], [[3]], f"call {call + 1}")
                for path in (as_json, as_jsonl):
                    summed = await self.call(s, "query_file", path=str(path),
                                             sql="SELECT sum(n), min(k) FROM data")
                    self.assertEqual(summed["rows"], [[3, "a"]], path.name)

        self.drive(go())

    def test_a_failed_one_shot_call_leaves_nothing_and_spares_a_real_table_of_that_name(
            self) -> None:
        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                await c("load_data", table="data", data="kept\nmine\n")
                # A later row lacks a field: the load fails after the
                # one-shot table was made, and is dropped again.
                message = await self.refused(s, "query_data", data="a,b\n1,2\n3\n",
                                             sql="SELECT * FROM data")
                self.assertIn("cannot be read", message)
                await self.refused(s, "query_data", data="a\n1\n",
                                   sql="SELECT no_such_column FROM data")
                await self.refused(s, "query_file", path=str(self.csv),
                                   sql="SELECT * FROM data WHERE 1/0 = 1")
                # The user's own table "data" is untouched, and the name is free.
                self.assertEqual((await c("query", sql="SELECT * FROM data"))["rows"],
                                 [["mine"]])
                self.assertEqual(await self.tables(s), ["data"])
                once = await c("query_data", data="a\n1\n2\n", sql="SELECT sum(a) FROM data")
                self.assertEqual(once["rows"], [[3]])
                self.assertEqual((await c("query", sql="SELECT * FROM data"))["rows"],
                                 [["mine"]])

        self.drive(go())

    def test_query_file_names_the_table_after_the_file_and_as_data(self) -> None:
        orders = self.tmp / "Orders.csv"
        orders.write_text("id,total\n1,10.5\n2,4.5\n")

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                for sql in ["SELECT sum(total) FROM orders", "SELECT sum(total) FROM Orders",
                            "SELECT sum(total) FROM data",
                            "SELECT sum(o.total) FROM orders o JOIN data d ON o.id = d.id"]:
                    self.assertEqual((await c("query_file", path=str(orders), sql=sql))["rows"],
                                     [[15.0]], sql)
                named = await c("query_file", path=str(orders), table_name="Sales",
                                sql="SELECT count(*) FROM sales")
                self.assertEqual(named["rows"], [[2]])
                message = await self.refused(s, "query_file", path=str(orders),
                                             table_name="sales", sql="SELECT * FROM data")
                self.assertIn('"data" does not exist', message)
                self.assertEqual(await self.tables(s), [])

        self.drive(go())


class ValueTests(ToolsTestCase):
    def test_every_value_type_comes_back_as_strict_faithful_json(self) -> None:
        sql = ("SELECT INTERVAL '1 day 2 hours' AS span, "
               "TIMESTAMP '2024-01-02 03:04:05' - TIMESTAMP '2024-01-01 00:00:00' AS took, "
               "ARRAY[1,2,3] AS ints, ARRAY['a', NULL, 'b \"c\"'] AS texts, "
               "CAST('NaN' AS DOUBLE PRECISION) AS nan, "
               "CAST('Infinity' AS DOUBLE PRECISION) AS inf, "
               "CAST('-Infinity' AS DOUBLE PRECISION) AS ninf, "
               "CAST(0.1 AS DOUBLE PRECISION) + CAST(0.2 AS DOUBLE PRECISION) AS sum, "
               "CAST('12345678901234567890123456.78' AS NUMERIC(38,2)) AS exact, "
               "CAST('abc' AS BYTEA) AS bytes, '東京' AS city, "
               "DATE '2024-02-29' AS day, TIMESTAMP '2024-01-02 03:04:05.5' AS at, "
               "true AS yes, CAST(NULL AS TEXT) AS nothing")

        async def go() -> None:
            async with self.server() as s:
                text = await self.raw(s, "query", sql=sql)
                self.assertIn("東京", text)
                self.assertNotIn("\\u", text)
                result = strict_json(text)
                self.assertEqual(dict(zip(result["columns"], result["rows"][0])), {
                    "span": "P1DT2H", "took": "P1DT3H4M5S", "ints": [1, 2, 3],
                    "texts": ["a", None, 'b "c"'], "nan": "NaN", "inf": "Infinity",
                    "ninf": "-Infinity", "sum": 0.30000000000000004,
                    "exact": "12345678901234567890123456.78", "bytes": "\\x616263",
                    "city": "東京", "day": "2024-02-29", "at": "2024-01-02T03:04:05.500000",
                    "yes": True, "nothing": None})

                # A sum that 15 digits would round comes back exact.
                summed = strict_json(await self.raw(
                    s, "query_data", data="x\n0.1\n0.2\n0.3\n", sql="SELECT sum(x) FROM data"))
                self.assertEqual(summed["rows"], [[0.1 + 0.2 + 0.3]])

                long = strict_json(await self.raw(
                    s, "query", sql="SELECT repeat('ab', 1500) AS long, 'short' AS short"))
                self.assertEqual(len(long["rows"][0][0]), 2000)
                self.assertEqual(long["rows"][0][1], "short")
                self.assertEqual(long["cut_cells"], [{"row": 0, "column": "long",
                                                      "length": 3000}])
                self.assertIn("substring(", long["cut_note"])

        self.drive(go())


class BatchTests(ToolsTestCase):
    def test_a_batch_is_all_or_nothing_and_says_so_only_when_it_is(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                message = await self.refused(s, "execute", sql=[
                    "CREATE TABLE m3 (a INT)", "INSERT INTO no_such_table VALUES (1)"])
                self.assertIn("sql item 2", message)
                self.assertIn("nothing of the batch was kept", message)
                self.assertEqual(await self.tables(s), [])

                done = await c("execute", sql=["CREATE TABLE t (a INT)",
                                               "INSERT INTO t VALUES (1), (2)"])
                self.assertEqual(done, {"statements": 2, "rows_affected": 2, "atomic": True})
                await self.refused(s, "execute", sql=[
                    "CREATE TABLE u (a INT)", "INSERT INTO u VALUES (1)",
                    "UPDATE t SET a = 0", "INSERT INTO t VALUES (1 / 0)"])
                self.assertEqual(await self.tables(s), ["t"])
                self.assertEqual((await c("query", sql="SELECT a FROM t ORDER BY a"))["rows"],
                                 [[1], [2]])

                # One statement that fails half-way (Hyper keeps the table of
                # a failed CREATE TABLE AS) leaves nothing either.
                await self.refused(s, "execute", sql=["CREATE TABLE v AS SELECT 1 / 0 AS x"])
                self.assertEqual(await self.tables(s), ["t"])

                # What Hyper cannot undo is refused in a batch, before anything runs.
                message = await self.refused(s, "execute", sql=["DROP TABLE t", "SELECT 1 / 0"])
                self.assertIn("DROP", message)
                self.assertIn("own execute call", message)
                message = await self.refused(s, "execute", sql=[
                    "INSERT INTO t VALUES (3)", "CREATE TABLE w (a INT)"])
                self.assertIn("put the CREATE TABLE statements first", message)
                self.assertEqual(await self.tables(s), ["t"])
                self.assertEqual((await c("query", sql="SELECT count(*) FROM t"))["rows"],
                                 [[2]])
                # A CREATE TABLE that fails because the table exists drops nothing.
                await self.refused(s, "execute", sql=["CREATE TABLE t (b INT)",
                                                      "INSERT INTO t VALUES (9)"])
                self.assertEqual((await c("query", sql="SELECT count(*) FROM t"))["rows"],
                                 [[2]])

        self.drive(go())


class ErrorTests(ToolsTestCase):
    def test_an_unknown_database_alias_is_named_in_every_tool(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_data", table="t", data="a\n1\n")
                for tool, arguments in [
                    ("query", {"sql": "SELECT 1"}),
                    ("execute", {"sql": ["CREATE TABLE x (a INT)"]}),
                    ("describe", {}),
                    ("describe", {"table": "t"}),
                    ("sample", {"table": "t"}),
                    ("load_data", {"table": "x", "data": "a\n1\n"}),
                    ("load_file", {"table": "x", "path": str(self.csv)}),
                    ("export", {"path": str(self.tmp / "out.csv"), "format": "csv",
                                "table": "t"}),
                ]:
                    message = await self.refused(s, tool, database="nope", **arguments)
                    self.assertIn("database: no database is attached as 'nope'", message, tool)
                    self.assertIn(ALIASES, message, tool)
                self.assertEqual(await self.tables(s), ["t"])
                self.assertFalse((self.tmp / "out.csv").exists())

        self.drive(go())

    def test_errors_name_the_parameter_and_say_what_to_try(self) -> None:
        not_hyper = self.tmp / "not.hyper"
        not_hyper.write_text("not a database")

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_data", table="cities", data=CSV)
                for tool, arguments, start, advice in [
                    ("detach_database", {"alias": "never_attached"}, "alias: ",
                     "list_attached_databases"),
                    ("query", {"sql": "SELECT nope FROM cities"}, "sql: ", "describe"),
                    ("query", {"sql": "SELEC 1"}, "sql: ", "syntax"),
                    ("query", {"sql": "SELECT * FROM nowhere"}, "sql: ", "describe"),
                    ("describe", {"table": "nowhere"}, "table: ", "'cities'"),
                    ("sample", {"table": "nowhere"}, "table: ", "'cities'"),
                    ("sample", {"table": "cities", "n": -1}, "n: ", "0 to 200"),
                    ("load_data", {"table": "x", "data": CSV, "mode": "upsert"}, "mode: ",
                     "replace"),
                    ("load_file", {"table": "x", "path": str(self.tmp / "no.csv")}, "path: ",
                     "check the path"),
                    ("attach_database", {"alias": "a", "kind": "s3", "path": str(not_hyper)},
                     "kind: ", "local_file"),
                    ("attach_database", {"alias": "a", "kind": "local_file",
                                         "path": str(not_hyper)}, "path: ", ".hyper"),
                    ("attach_database", {"alias": "a", "kind": "local_file",
                                         "path": str(self.tmp / "missing.hyper")}, "path: ",
                     "on_missing='create'"),
                    ("attach_database", {"alias": "local", "kind": "local_file",
                                         "path": str(not_hyper)}, "alias: ", "plain name"),
                    ("export", {"path": str(self.tmp / "o.csv"), "format": "xls",
                                "table": "cities"}, "format: ", "csv, parquet, hyper"),
                    ("export", {"path": str(self.tmp / "o.csv"), "format": "csv"},
                     "sql, table: ", "exactly one"),
                    ("execute", {"sql": []}, "sql: ", "at least one statement"),
                    ("execute", {"sql": ["INSERT INTO cities VALUES ('x', 'y', 1)"]}, "sql: ",
                     "a value does not fit"),
                ]:
                    message = await self.refused(s, tool, **arguments)
                    self.assertTrue(message.startswith(start), (tool, arguments, message))
                    self.assertIn(advice, message, (tool, arguments))
                    self.assertNotIn("pydantic", message)

        self.drive(go())


class UpstreamTests(ToolsTestCase):
    def test_attach_database_takes_upstreams_local_file_kind(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                await c("attach_database", alias="extra", kind="local_file",
                        path=str(self.tmp / "extra.hyper"), on_missing="create")
                await c("load_data", table="t", data="a\n1\n", database="extra")
                self.assertEqual((await c("query", sql="SELECT a FROM extra.public.t"))["rows"],
                                 [[1]])
                await c("detach_database", alias="extra")
                await c("attach_database", alias="again", kind="local_file",
                        path=str(self.tmp / "extra.hyper"))
                self.assertEqual(await self.tables(s, "again"), ["t"])

        self.drive(go())

    def test_load_file_merge_updates_rows_by_key_and_inserts_the_rest(self) -> None:
        first = self.tmp / "first.csv"
        first.write_text("id,name,score\n1,a,10\n2,b,20\n")
        update = self.tmp / "update.csv"
        update.write_text("id,name,score\n2,B,200\n3,c,30\n")
        doubled = self.tmp / "doubled.csv"
        doubled.write_text("id,name,score\n4,d,1\n4,e,2\n")
        wider = self.tmp / "wider.csv"
        wider.write_text("id,name,score,extra\n5,f,1,x\n")

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                everything = "SELECT id, name, score FROM people ORDER BY id"
                await c("load_file", table="people", path=str(first))
                merged = await c("load_file", table="people", path=str(update), mode="merge",
                                 merge_key="id")
                self.assertEqual((merged["rows_updated"], merged["rows_inserted"]), (1, 1))
                expected = [[1, "a", 10], [2, "B", 200], [3, "c", 30]]
                self.assertEqual((await c("query", sql=everything))["rows"], expected)

                for path, key, needle in [
                    (update, "nope", "merge_key: the file has no column 'nope'"),
                    (doubled, ["id"], "several rows of the file have the same key"),
                    (wider, "id", "lacks ('extra')"),
                    (update, None, "merge_key: mode='merge' needs"),
                ]:
                    message = await self.refused(s, "load_file", table="people",
                                                 path=str(path), mode="merge", merge_key=key)
                    self.assertIn(needle, message)
                    # Nothing changed, and no staging table is left.
                    self.assertEqual((await c("query", sql=everything))["rows"], expected)
                    self.assertEqual(await self.tables(s), ["people"])
                message = await self.refused(s, "load_file", table="people", path=str(update),
                                             merge_key="id")
                self.assertIn("only with mode='merge'", message)

                # Merging into a table that is not there yet makes it.
                made = await c("load_file", table="fresh", path=str(update), mode="merge",
                               merge_key=["id"], persist=True)
                self.assertEqual(made["rows_inserted"], 2)
                self.assertEqual((await c("query", sql="SELECT count(*) FROM "
                                                       "persistent.public.fresh"))["rows"], [[2]])

        self.drive(go())

    def test_export_honours_format_options_and_refuses_unknown_ones(self) -> None:
        out = self.tmp / "out"
        out.mkdir()

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                await c("load_data", table="cities", data=CSV)
                await c("export", path=str(out / "plain.csv"), format="csv", table="cities",
                        format_options={"delimiter": ";", "header": False})
                for codec in ("zstd", "snappy"):
                    await c("export", path=str(out / f"{codec}.parquet"), format="parquet",
                            table="cities", format_options={"codec": codec})
                    back = await c("query_file", path=str(out / f"{codec}.parquet"),
                                   sql="SELECT count(*) FROM data")
                    self.assertEqual(back["rows"], [[3]])
                for fmt, options, needle in [
                    ("csv", {"compression": "gzip"}, "format 'csv' has no option "
                                                     "'compression'; it takes header"),
                    ("parquet", {"delimiter": ";"}, "no option 'delimiter'"),
                    ("parquet", {"codec": "lz4"}, "codec 'lz4'"),
                    ("csv", {"delimiter": "||"}, "one character"),
                    ("csv", {"header": "yes"}, "true or false"),
                    ("hyper", {"codec": "zstd"}, "it takes none"),
                ]:
                    message = await self.refused(s, "export", path=str(out / f"x.{fmt}"),
                                                 format=fmt, table="cities",
                                                 format_options=options)
                    self.assertTrue(message.startswith("format_options: "), message)
                    self.assertIn(needle, message)
                    self.assertFalse((out / f"x.{fmt}").exists())
                message = await self.refused(s, "export", path=str(out / "plain.csv"),
                                             format="csv", table="cities")
                self.assertIn("exists", message)
                self.assertIn("overwrite=true", message)

        self.drive(go())
        with open(out / "plain.csv", newline="") as f:
            self.assertEqual(list(csv.reader(f, delimiter=";")),
                             [["Lyon", "522000", "47.87"], ["Nice", "342000", "71.92"],
                              ["Brest", "139000", "49.51"]])
        # A zstd frame starts with its magic number; snappy has none.
        zstd_magic = b"\x28\xb5\x2f\xfd"
        self.assertIn(zstd_magic, (out / "zstd.parquet").read_bytes())
        self.assertNotIn(zstd_magic, (out / "snappy.parquet").read_bytes())

    def test_sample_of_zero_rows_gives_the_columns_and_no_rows(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                await c("load_data", table="cities", data=CSV)
                none = await c("sample", table="cities", n=0)
                self.assertEqual((none["columns"], none["rows"], none["row_count"]),
                                 (["city", "population", "area"], [], 0))
                self.assertEqual(len((await c("sample", table="cities"))["rows"]), 3)
                capped = await c("sample", table="cities", n=1000)
                self.assertEqual(len(capped["rows"]), 3)
                self.assertIn("more than the 200 rows", capped["note"])

        self.drive(go())


class AppendTests(ToolsTestCase):
    def test_an_append_matches_columns_by_name_and_refuses_a_column_the_table_lacks(self) -> None:
        swapped = self.tmp / "swapped.csv"
        swapped.write_text("population,city\n861000,Marseille\n")
        extra = self.tmp / "extra.csv"
        extra.write_text("city,population,mayor\nToulouse,504000,X\n")

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                await c("load_data", table="cities", data="city,population\nLyon,522000\n")
                appended = await c("load_file", table="cities", path=str(swapped),
                                   mode="append")
                self.assertEqual(appended["rows_loaded"], 1)
                rows = await c("query", sql="SELECT city, population FROM cities ORDER BY city")
                self.assertEqual(rows["rows"], [["Lyon", 522000], ["Marseille", 861000]])
                with self.assertRaises(ToolCallError) as caught:
                    await c("load_file", table="cities", path=str(extra), mode="append")
                self.assertIn("'mayor'", str(caught.exception))
                self.assertIn("ALTER TABLE", str(caught.exception))
                counted = await c("query", sql="SELECT count(*) FROM cities")
                self.assertEqual(counted["rows"], [[2]])
                partial = await c("load_data", table="cities", data="city\nNantes\n",
                                  mode="append")
                self.assertIn("'population'", " ".join(partial["notes"]))

        self.drive(go())
