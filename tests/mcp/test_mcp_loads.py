"""
The loading tools (load_data, load_file, query_data, query_file) driven
through the MCP SDK's stdio client, on the real daemon and hyperd: big inline
loads, the payload cap, a SIGTERM in the middle of a load, and the column
types inferred over every row.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from support import QUICK, pid_alive, status, wait_for
from mcp_support import ReportingTestCase, ToolCallError, eventually

#: A bound on a 150,000-row inline load; the row-by-row loader took 59 to 115 s.
BIG_LOAD_BOUND = 30.0
#: Rows of the JSON-lines file loaded when the SIGTERM comes (140 MB): a load
#: that runs some 13 s on a quiet machine when nothing stops it.
SIGTERM_ROWS = 3_000_000
#: A bound on the exit after a SIGTERM during that load; it takes 0.1 s.
PROMPT = 5.0


def _day(i: int) -> str:
    return f"2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}"


class LoadTestCase(ReportingTestCase):
    pass


class InlineLoadTests(LoadTestCase):
    def test_150000_inline_csv_rows_load_quickly_and_count_right(self) -> None:
        rows = 150_000
        data = "id,name,score,day\n" + "".join(
            f"{i},name {i},{i * 0.5},{_day(i)}\n" for i in range(rows))

        async def go() -> tuple[Any, float, Any]:
            async with self.server() as s:
                start = time.perf_counter()
                loaded = await self.call(s, "load_data", table="big", data=data)
                elapsed = time.perf_counter() - start
                counted = await self.call(
                    s, "query", sql="SELECT count(*), count(DISTINCT id), sum(id), "
                                    "min(day), max(day), max(score) FROM big")
                return loaded, elapsed, counted

        loaded, elapsed, counted = self.drive(go())
        self.report(f"load_data of {rows:,} inline CSV rows ({len(data) / 1e6:.1f} MB): "
                    f"{elapsed:.2f} s through MCP")
        self.assertEqual(loaded["rows_loaded"], rows)
        self.assertEqual(loaded["columns"], {"id": "BIGINT", "name": "TEXT",
                                             "score": "DOUBLE PRECISION", "day": "DATE"})
        self.assertEqual(counted["rows"], [[rows, rows, rows * (rows - 1) // 2, "2024-01-01",
                                            "2024-12-28", (rows - 1) * 0.5]])
        self.assertLess(elapsed, BIG_LOAD_BOUND)

    def test_a_payload_over_the_cap_is_refused_clearly_and_leaves_no_table(self) -> None:
        from hyperdaemon.mcp.loading import MAX_INLINE_CHARS

        data = "n\n" + "7\n" * (MAX_INLINE_CHARS // 2)  # two characters over

        async def go() -> None:
            async with self.server() as s:
                for tool, arguments in [("load_data", {"table": "huge"}),
                                        ("query_data", {"sql": "SELECT count(*) FROM data"})]:
                    with self.assertRaises(ToolCallError) as caught:
                        await self.call(s, tool, data=data, **arguments)
                    message = str(caught.exception)
                    self.assertIn(f"{MAX_INLINE_CHARS:,} (64 MB)", message)
                    self.assertIn("load_file", message)
                self.assertEqual((await self.call(s, "describe"))["tables"], [])
                # The server is unharmed.
                self.assertEqual((await self.call(s, "load_data", table="small",
                                                  data="n\n7\n"))["rows_loaded"], 1)

        self.drive(go())


class InferenceTests(LoadTestCase):
    def test_dates_and_timestamps_are_inferred_from_csv_and_json(self) -> None:
        csv_text = ("id,day,at,at_utc\n"
                    "1,2024-01-31,2024-01-31 10:00:00,2024-01-31T10:00:00Z\n"
                    "2,2024-02-29,2024-02-29T23:59:59.5,2024-02-29 23:59:59+02:00\n")
        records = [{"id": 1, "day": "2024-01-31", "at": "2024-01-31 10:00:00",
                    "at_utc": "2024-01-31T10:00:00Z"},
                   {"id": 2, "day": "2024-02-29", "at": "2024-02-29T23:59:59.5",
                    "at_utc": "2024-02-29 23:59:59+02:00"}]
        json_file = self.tmp / "events.json"
        json_file.write_text(json.dumps(records))
        csv_file = self.tmp / "events.csv"
        csv_file.write_text(csv_text)
        expected = {"id": "BIGINT", "day": "DATE", "at": "TIMESTAMP", "at_utc": "TIMESTAMPTZ"}
        later = ("SELECT day + 1, at + INTERVAL '1 hour', "
                 "CAST(at_utc AT TIME ZONE 'UTC' AS TEXT) FROM {} ORDER BY id")
        answer = [["2024-02-01", "2024-01-31T11:00:00", "2024-01-31 10:00:00"],
                  ["2024-03-01", "2024-03-01T00:59:59.500000", "2024-02-29 21:59:59"]]

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                for table, loaded in [
                    ("from_csv", await c("load_data", table="from_csv", data=csv_text)),
                    ("from_json", await c("load_data", table="from_json",
                                          data=json.dumps(records))),
                    ("from_file", await c("load_file", table="from_file", path=str(json_file))),
                ]:
                    self.assertEqual(loaded["columns"], expected, table)
                    self.assertNotIn("notes", loaded)
                    self.assertEqual((await c("query", sql=later.format(table)))["rows"],
                                     answer, table)
                described = await c("describe", table="from_csv")
                self.assertEqual([col["type"] for col in described["columns"]],
                                 ["int8", "date", "timestamp", "timestamptz"])
                # Date arithmetic works on one-shot data too (it failed on TEXT).
                for once in [await c("query_data", data=csv_text, sql=later.format("data")),
                             await c("query_file", path=str(csv_file),
                                     sql=later.format("data"))]:
                    self.assertEqual(once["rows"], answer)

        self.drive(go())

    def test_a_late_row_that_does_not_fit_widens_its_column_and_says_so(self) -> None:
        rows = [[str(i), _day(i), str(1000 + i), "true" if i % 2 else "false"]
                for i in range(1500)]
        rows[1200][0] = "2.5"
        rows[1300][1] = "2024-03-01 12:30:00"
        rows[1400][2] = "n/a"
        csv_text = "n,day,code,flag\n" + "".join(",".join(row) + "\n" for row in rows)
        lines = self.tmp / "late.jsonl"
        lines.write_text("".join(json.dumps(dict(zip(["n", "day", "code", "flag"], row))) + "\n"
                                 for row in rows))
        expected = {"n": "DOUBLE PRECISION", "day": "TIMESTAMP", "code": "TEXT",
                    "flag": "BOOLEAN"}
        check = ("SELECT (SELECT count(*) FROM {0} WHERE n = 2.5), "
                 "(SELECT count(*) FROM {0} WHERE day = TIMESTAMP '2024-03-01 12:30:00'), "
                 "(SELECT count(*) FROM {0} WHERE code = 'n/a'), "
                 "(SELECT count(*) FROM {0} WHERE flag)")

        def assert_noted(notes: list[str]) -> None:
            self.assertEqual(len(notes), 3, notes)
            for column, first, example, final in [
                ("n", "BIGINT", "2.5", "DOUBLE PRECISION"),
                ("day", "DATE", "2024-03-01 12:30:00", "TIMESTAMP"),
                ("code", "BIGINT", "n/a", "TEXT"),
            ]:
                (note,) = [n for n in notes if n.startswith(f"column {column!r}")]
                self.assertIn(first, note)
                self.assertIn(repr(example), note)
                self.assertIn(f"loaded as {final}", note)

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                for table, loaded in [
                    ("inline", await c("load_data", table="inline", data=csv_text)),
                    ("from_lines", await c("load_file", table="from_lines", path=str(lines))),
                ]:
                    self.assertEqual(loaded["columns"], expected, table)
                    self.assertEqual(loaded["rows_loaded"], 1500)
                    assert_noted(loaded["notes"])
                    self.assertEqual((await c("query", sql=check.format(table)))["rows"],
                                     [[1, 1, 1, 750]], table)
                once = await c("query_data", data=csv_text, sql=check.format("data"))
                self.assertEqual(once["rows"], [[1, 1, 1, 750]])
                assert_noted(once["notes"])

        self.drive(go())

    def test_schema_overrides_the_inference_and_its_mistakes_are_named(self) -> None:
        csv_text = "zip,n,day\n75001,1,2024-01-02\n69002,2,2024-01-03\n"

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                loaded = await c("load_data", table="t", data=csv_text,
                                 schema={"zip": "TEXT", "n": "DOUBLE PRECISION",
                                         "day": "VARCHAR(10)"})
                self.assertEqual(loaded["columns"], {"zip": "TEXT", "n": "DOUBLE PRECISION",
                                                     "day": "VARCHAR(10)"})
                described = await c("describe", table="t")
                self.assertEqual([col["type"] for col in described["columns"]],
                                 ["text", "float8", "varchar"])
                # TEXT: the maximum is a string.
                self.assertEqual((await c("query_data", data=csv_text, schema={"n": "TEXT"},
                                          sql="SELECT max(n) FROM data"))["rows"], [["2"]])
                for schema, needles in [
                    ({"zip": "BOOLEAN"}, ["'zip'", "BOOLEAN", "schema"]),
                    ({"nope": "TEXT"}, ["'nope'", "'zip', 'n', 'day'"]),
                    ({"n": "BIGINT); DROP TABLE t; --"}, ["not a type name"]),
                    ({"n": "NOSUCHTYPE"}, ["does not know", "nosuchtype"]),
                ]:
                    with self.assertRaises(ToolCallError, msg=schema) as caught:
                        await c("load_data", table="bad", data=csv_text, schema=schema)
                    for needle in needles:
                        self.assertIn(needle, str(caught.exception), schema)
                tables = [t["table"] for t in (await c("describe"))["tables"]]
                self.assertEqual(tables, ["t"])

        self.drive(go())


class ShutdownTests(LoadTestCase):
    def test_sigterm_during_a_long_load_ends_the_server_promptly_and_cleans_up(self) -> None:
        big = self.tmp / "big.jsonl"
        self.addCleanup(big.unlink, missing_ok=True)
        block = "".join(json.dumps({"id": i, "name": f"name {i}", "v": i * 0.5}) + "\n"
                        for i in range(10_000))
        with open(big, "w") as f:
            for _ in range(SIGTERM_ROWS // 10_000):
                f.write(block)

        async def go() -> tuple[float, Path]:
            async with self.server() as s:
                (session,) = status(self.ports[0])["sessions"]
                pid, folder = session["pid"], Path(session["ephemeral_db"]).parent
                load = asyncio.ensure_future(
                    s.call_tool("load_file", {"table": "big", "path": str(big)}))
                try:
                    # The load is under way once its staging file is there.
                    await eventually(lambda: list(folder.glob("load-*.csv")), QUICK,
                                     "the load's staging file")
                    os.kill(pid, signal.SIGTERM)
                    start = time.monotonic()
                    await eventually(lambda: not pid_alive(pid), QUICK, "the server to exit")
                    return time.monotonic() - start, folder
                finally:
                    load.cancel()
                    await asyncio.gather(load, return_exceptions=True)

        elapsed, folder = self.drive(go())
        self.report(f"SIGTERM during a load of {big.stat().st_size / 1e6:.0f} MB of JSON "
                    f"lines: the server exited {elapsed:.2f} s later")
        self.assertLess(elapsed, PROMPT)
        wait_for(lambda: not folder.exists(), QUICK, "the session folder to go")
        self.assertEqual(status(self.ports[0])["sessions"], [])
