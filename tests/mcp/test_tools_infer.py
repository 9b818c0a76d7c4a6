"""
Type inference and staging for the loading tools (L{hyperdaemon.mcp.loading}):
the pure pieces on their own, the staging files on a temporary folder, and
the patterns read side by side by Python and by a real C{hyperd}.
"""

from __future__ import annotations

import io
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hyperdaemon.mcp import loading
from hyperdaemon.mcp.loading import (
    BIGINT,
    BOOLEAN,
    DATE,
    DOUBLE,
    INFERRED,
    TEXT,
    TIMESTAMP,
    TIMESTAMPTZ,
    choose_type,
    file_source,
    fits,
    fits_sql,
    infer_type,
    inline_source,
    schema_types,
    value_type,
    widen,
    wider_types,
)
from hyperdaemon.client.session import Session
from hyperdaemon.mcp.tools import ToolFailure, quote_literal
from support import client_environment

#: Values and the type each one is, as hyperd would take it without loss.
EXAMPLES = {
    "": None,
    "true": BOOLEAN, "FALSE": BOOLEAN, " True\t": BOOLEAN,
    "0": BIGINT, "-0": BIGINT, "42": BIGINT, "+7": BIGINT, " 12 ": BIGINT,
    "123456789012345678": BIGINT,
    "1.5": DOUBLE, "-.5": DOUBLE, "5.": DOUBLE, "1e5": DOUBLE, "2.5E-3": DOUBLE,
    "1234567890123456789012.5": DOUBLE,
    "2024-01-02": DATE, "2024-02-29": DATE, "2000-02-29": DATE, "0001-01-01": DATE,
    " 2024-12-31 ": DATE,
    "2024-01-02 10:00": TIMESTAMP, "2024-01-02T10:00:59": TIMESTAMP,
    "2024-01-02 23:59:59.123456": TIMESTAMP,
    "2024-01-02T10:00:00Z": TIMESTAMPTZ, "2024-01-02 10:00:00+02:00": TIMESTAMPTZ,
    "2024-01-02T10:00-0530": TIMESTAMPTZ, "2024-01-02 10:00:00.5+05": TIMESTAMPTZ,
    # Text that hyperd would take as a number, a date or a time only by losing
    # something, or not at all.
    "007": TEXT, "1234567890123456789": TEXT, "99999999999999999999": TEXT,
    "1e400": TEXT, "1" + "0" * 400: TEXT, "NaN": TEXT, "inf": TEXT, "1_000": TEXT,
    "0x10": TEXT, "yes": TEXT, "t": TEXT, "1,5": TEXT,
    "2023-02-29": TEXT, "1900-02-29": TEXT, "2024-04-31": TEXT, "2024-13-01": TEXT,
    "0000-01-01": TEXT, "2024-1-2": TEXT, "20240102": BIGINT, "01/02/2024": TEXT,
    "2024-01-02 24:00:00": TEXT, "2024-01-02 10:00:00.1234567": TEXT,
    "2024-01-02Z": TEXT, "2024-01-02T10": TEXT, "5\n": TEXT, "a5": TEXT, "  ": TEXT,
    "東京": TEXT,
}


class ValueTypeTests(SynchronousTestCase):
    def test_each_value_gets_the_narrowest_type_that_holds_it_without_loss(self) -> None:
        for text, kind in EXAMPLES.items():
            self.assertEqual(value_type(text), kind, text)

    def test_none_is_null(self) -> None:
        self.assertIsNone(value_type(None))


class WideningTests(SynchronousTestCase):
    def test_widening_follows_the_two_chains_and_ends_in_text(self) -> None:
        cases = [
            (None, BIGINT, BIGINT), (BIGINT, None, BIGINT), (BIGINT, BIGINT, BIGINT),
            (BIGINT, DOUBLE, DOUBLE), (DOUBLE, BIGINT, DOUBLE),
            (DATE, TIMESTAMP, TIMESTAMP), (TIMESTAMP, DATE, TIMESTAMP),
            (BIGINT, DATE, TEXT), (BOOLEAN, BIGINT, TEXT), (DOUBLE, TIMESTAMP, TEXT),
            (DATE, TIMESTAMPTZ, TEXT), (TIMESTAMP, TIMESTAMPTZ, TEXT), (TEXT, BIGINT, TEXT),
            (None, None, None),
        ]
        for current, other, expected in cases:
            self.assertEqual(widen(current, other), expected, (current, other))

    def test_wider_types_are_the_chain_from_a_guess(self) -> None:
        self.assertEqual(wider_types(BIGINT), [BIGINT, DOUBLE])
        self.assertEqual(wider_types(DATE), [DATE, TIMESTAMP])
        self.assertEqual(wider_types(BOOLEAN), [BOOLEAN])
        self.assertEqual(wider_types(TIMESTAMPTZ), [TIMESTAMPTZ])
        self.assertEqual(wider_types(TEXT), [])
        self.assertEqual(wider_types(None), list(INFERRED))

    def test_the_first_type_every_value_fits_is_chosen(self) -> None:
        self.assertEqual(choose_type(BIGINT, {BIGINT: True, DOUBLE: True}), BIGINT)
        self.assertEqual(choose_type(BIGINT, {BIGINT: False, DOUBLE: True}), DOUBLE)
        self.assertEqual(choose_type(BIGINT, {BIGINT: False, DOUBLE: False}), TEXT)
        self.assertEqual(choose_type(DATE, {DATE: False, TIMESTAMP: True}), TIMESTAMP)
        self.assertEqual(choose_type(BOOLEAN, {BOOLEAN: False}), TEXT)
        # Nothing in the first rows: every type is a candidate; no value at all is TEXT.
        fits: dict[str, bool | None] = {kind: False for kind in INFERRED}
        self.assertEqual(choose_type(None, dict(fits, **{BIGINT: True, DOUBLE: True})), BIGINT)
        self.assertEqual(choose_type(None, dict(fits, **{TIMESTAMP: True})), TIMESTAMP)
        self.assertEqual(choose_type(None, {kind: None for kind in INFERRED}), TEXT)

    def test_a_column_of_json_values_gets_one_type(self) -> None:
        self.assertEqual(infer_type([1, 2, None]), BIGINT)
        self.assertEqual(infer_type([1, 2.5]), DOUBLE)
        self.assertEqual(infer_type([True, False, None]), BOOLEAN)
        self.assertEqual(infer_type(["2024-01-02", "2024-01-03 10:00"]), TIMESTAMP)
        self.assertEqual(infer_type([1, True]), TEXT)
        self.assertEqual(infer_type([{"a": 1}]), TEXT)
        self.assertEqual(infer_type([None, ""]), TEXT)


class SchemaTests(SynchronousTestCase):
    def test_schema_gives_types_by_column(self) -> None:
        self.assertEqual(schema_types(["a", "b", "c"], {"c": " NUMERIC(18, 2) ", "a": "text"}),
                         {0: "text", 2: "NUMERIC(18, 2)"})
        self.assertEqual(schema_types(["a"], {"a": "TIMESTAMP(3) WITH TIME ZONE"}),
                         {0: "TIMESTAMP(3) WITH TIME ZONE"})
        self.assertEqual(schema_types(["a"], None), {})

    def test_a_column_the_data_lacks_is_named(self) -> None:
        with self.assertRaises(ToolFailure) as caught:
            schema_types(["a", "b"], {"z": "BIGINT"})
        self.assertIn("'z'", str(caught.exception))
        self.assertIn("'a', 'b'", str(caught.exception))

    def test_text_that_is_not_a_type_name_is_refused(self) -> None:
        for bad in ["BIGINT); DROP TABLE x; --", "TEXT, b TEXT", "", "INT[]", "1NT", None]:
            with self.assertRaises(ToolFailure, msg=bad) as caught:
                schema_types(["a"], {"a": bad})
            self.assertIn("not a type name", str(caught.exception))


def _stop() -> None:
    pass


class InlineSourceTests(SynchronousTestCase):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.folder = tmp_path

    def test_data_over_the_cap_is_refused_with_the_way_to_load_it(self) -> None:
        self.patch(loading, "MAX_INLINE_CHARS", 10)
        inline_source("a\n12345678", None)  # at the cap
        with self.assertRaises(ToolFailure) as caught:
            inline_source("a\n123456789", None)
        self.assertIn("load_file", str(caught.exception))

    def test_empty_data_and_unknown_formats_are_refused(self) -> None:
        for data, fmt, needle in [(" \n ", None, "empty"), ("a\n1", "xml", "csv, json, jsonl")]:
            with self.assertRaises(ToolFailure) as caught:
                inline_source(data, fmt)
            self.assertIn(needle, str(caught.exception))

    def staged(self, data: str, fmt: str | None = None) -> Any:
        return inline_source(data, fmt).staged(self.folder, _stop)

    def test_csv_is_staged_as_it_is_in_a_private_file_removed_after(self) -> None:
        data = "\n  city , n ,day\nLyon,1,2024-01-02\nNice,,2024-01-03\n\n"
        with self.staged(data) as staged:
            self.assertEqual(staged.columns, ["city", "n", "day"])
            self.assertEqual(staged.guess, [TEXT, BIGINT, DATE])
            (part,) = staged.parts
            self.assertEqual((part.width, part.header), (3, True))
            self.assertEqual(part.path.parent, self.folder)
            self.assertEqual(stat.S_IMODE(os.stat(part.path).st_mode), 0o600)
            self.assertEqual(part.path.read_text(), data.strip() + "\n")
        self.assertFalse(part.path.exists())

    def test_the_guess_reads_only_the_first_rows(self) -> None:
        self.patch(loading, "INFER_ROWS", 2)
        with self.staged("n\n1\n2\nabc\n") as staged:
            self.assertEqual(staged.guess, [BIGINT])

    def test_bad_headers_are_named(self) -> None:
        for data, needle in [("a,,b\n1,2,3", "empty column name"),
                             ("a,b,a\n1,2,3", "'a' more than once")]:
            with self.assertRaises(ToolFailure) as caught:
                with self.staged(data):
                    pass
            self.assertIn(needle, str(caught.exception))
        self.assertEqual(list(self.folder.iterdir()), [])

    def test_json_records_become_csv_rows_and_new_keys_a_new_file(self) -> None:
        records = [{"a": 1, "b": "x"}, {"b": 'say "hi"', "a": None},
                   {"a": 2.5, "c": [1, "東京"], "b": ""}, {"c": True}]
        for data in [json.dumps(records), "\n".join(map(json.dumps, records))]:
            with self.staged(data) as staged:
                self.assertEqual(staged.columns, ["a", "b", "c"])
                self.assertEqual(staged.guess, [DOUBLE, TEXT, TEXT])
                first, second = staged.parts
                self.assertEqual((first.width, first.header, second.width), (2, False, 3))
                self.assertEqual(first.path.read_text(), '"1","x"\n,"say ""hi"""\n')
                self.assertEqual(second.path.read_text(encoding="utf-8"),
                                 '"2.5","","[1, ""東京""]"\n,,"true"\n')
            self.assertEqual(list(self.folder.iterdir()), [])

    def test_json_that_is_not_records_is_refused(self) -> None:
        for data, needle in [("[1, 2]", "array of objects"), ('[{"a": 1} {"a": 2}]', "','"),
                             ('[{"a": 1}] x', "more after"), ('{"a": 1}\n{"a": ', "not valid"),
                             ("[]", "no records"), ('[{"": 1}]', "empty key")]:
            with self.assertRaises(ToolFailure, msg=data) as caught:
                with self.staged(data, "json"):
                    pass
            self.assertIn(needle, str(caught.exception), data)
        self.assertEqual(list(self.folder.iterdir()), [])

    def test_a_stop_ends_staging_and_removes_its_files(self) -> None:
        stopping = threading.Event()

        def stop() -> None:
            if stopping.is_set():
                raise ToolFailure("stopped")

        self.patch(loading, "CHUNK", 4)
        stopping.set()
        for data in ["a\n1\n2\n3\n", json.dumps([{"a": i} for i in range(5000)])]:
            with self.assertRaises(ToolFailure):
                with inline_source(data, None).staged(self.folder, stop):
                    pass
            self.assertEqual(list(self.folder.iterdir()), [])


class JsonFileTests(SynchronousTestCase):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.folder = tmp_path

    def test_a_json_array_file_is_read_in_pieces(self) -> None:
        # Pieces of 7 characters cut numbers, strings and objects in two.
        self.patch(loading, "CHUNK", 7)
        records = [{"n": 123456789 + i, "s": "x" * (i % 11), "f": i / 3} for i in range(50)]
        path = self.folder / "in.json"
        path.write_text(" \n" + json.dumps(records, indent=1) + "\n")
        self.assertEqual(self.records(path), records)
        path.write_text("\n".join(map(json.dumps, records)))
        self.assertEqual(self.records(path), records)

    def test_a_json_extract_path_finds_the_array(self) -> None:
        path = self.folder / "in.json"
        path.write_text(json.dumps({"data": {"items": [{"a": 1}, {"a": 2}]}}))
        with file_source(path, "json", "data.items").staged(self.folder, _stop) as staged:
            self.assertEqual(staged.guess, [BIGINT])
        for extract, needle in [("data.nope", "'nope'"), ("data", "an object there")]:
            with self.assertRaises(ToolFailure) as caught:
                with file_source(path, "json", extract).staged(self.folder, _stop):
                    pass
            self.assertIn(needle, str(caught.exception))
        path.write_text('{"data": ')
        with self.assertRaises(ToolFailure) as caught:
            with file_source(path, "json", "data").staged(self.folder, _stop):
                pass
        self.assertIn("not valid JSON", str(caught.exception))

    def records(self, path: Path) -> list[dict[str, Any]]:
        with file_source(path, "json", None).staged(self.folder, _stop) as staged:
            rows = []
            for part in staged.parts:
                import csv

                rows += list(csv.reader(io.StringIO(part.path.read_text())))
        return [{"n": int(n), "s": s, "f": float(f)} for n, s, f in rows]


class HyperdReadsThePatternsAlikeTests(TestCase):
    """Python's classification against hyperd's, on the same values."""

    timeout = 180

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.state, self.ports, self.env = client_environment(tmp_path)

    async def test_hyperd_matches_each_pattern_as_python_does_and_casts_without_loss(self) -> None:
        session = await Session.open(reactor, environ=self.env, no_daemon=True,
                                     ephemeral_only=True)
        self.addCleanup(session.close)
        values = list(EXAMPLES)
        rows = ", ".join(f"({quote_literal(v)})" for v in values)
        tests = ", ".join(f"({fits_sql('v', kind)})" for kind in INFERRED)
        result = await session.query(f"SELECT v, {tests} FROM (VALUES {rows}) AS t(v)")
        by_hyperd = {row[0]: row[1:] for row in result.rows}
        for text in values:
            if not text:
                continue
            python = tuple(fits(text, kind) for kind in INFERRED)
            self.assertEqual(by_hyperd[text], python, text)
        # What fits a type converts to it with nothing lost: hyperd finds it
        # equal to the canonical text of the value Python reads.
        typed = [(text, kind) for text, kind in EXAMPLES.items() if kind not in (None, TEXT)]
        same = ", ".join(f"CAST({quote_literal(text)} AS {kind}) = "
                         f"CAST({quote_literal(_canonical(text, kind))} AS {kind})"
                         for text, kind in typed)
        found = (await session.query(f"SELECT {same}")).rows[0]
        self.assertEqual(dict(zip([t for t, _ in typed], found)),
                         dict.fromkeys([t for t, _ in typed], True))


class LoaderTests(TestCase):
    """L{loading.Loader} on a real hyperd, for the paths the MCP tests do not reach."""

    timeout = 180

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state, self.ports, self.env = client_environment(tmp_path)

    async def load(self, source: Any, schema: dict[str, str] | None = None) -> tuple[Any, list]:
        session = await Session.open(reactor, environ=self.env, no_daemon=True,
                                     ephemeral_only=True)
        self.addCleanup(session.close)
        loader = loading.Loader(source, schema, self.tmp, threading.Event())

        def work(conn: Any) -> tuple[Any, list]:
            def create(definition: str) -> str:
                conn.execute(f"CREATE TEMPORARY TABLE t ({definition})")
                return "t"

            loaded = loader.load(conn, create)
            return loaded, conn.execute("SELECT * FROM t ORDER BY 1").fetchall()

        return await session.call(work)

    async def test_records_whose_keys_come_late_are_joined_with_nulls(self) -> None:
        records = [{"a": 1}, {"a": 2, "b": "x"}, {"c": "2024-01-02", "a": 3}]
        loaded, rows = await self.load(inline_source(json.dumps(records), None))
        self.assertEqual((loaded.columns, loaded.types, loaded.rows),
                         (["a", "b", "c"], [BIGINT, TEXT, DATE], 3))
        from datetime import date

        self.assertEqual(rows, [(1, None, None), (2, "x", None), (3, None, date(2024, 1, 2))])
        self.assertEqual(list(self.tmp.glob("load-*")), [])

    async def test_a_value_hyperd_refuses_after_all_leaves_its_column_text_with_a_note(
            self) -> None:
        # Were the patterns wrong (here: made to accept anything), a value
        # hyperd cannot convert keeps its column TEXT rather than failing the load.
        self.patch(loading, "fits_sql", lambda column, kind: "true")
        data = "n,d\n" + "".join(f"{i},2024-01-02\n" for i in range(1500)) + "7,2023-02-29\n"
        loaded, rows = await self.load(inline_source(data, None))
        self.assertEqual(loaded.types, [BIGINT, TEXT])
        (note,) = loaded.notes
        self.assertIn("column 'd'", note)
        self.assertIn("loaded as TEXT", note)
        self.assertIn((7, "2023-02-29"), rows)


def _canonical(text: str, kind: str) -> str:
    """The value Python reads in C{text}, written out in full."""
    from datetime import date, datetime

    text = text.strip()
    if kind == BOOLEAN:
        return str(text.lower() == "true")
    if kind == BIGINT:
        return str(int(text))
    if kind == DOUBLE:
        return repr(float(text))
    if kind == DATE:
        return date.fromisoformat(text).isoformat()
    return datetime.fromisoformat(text).isoformat(" ", "microseconds")
