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
import pytest_twisted

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
from hyperdaemon.mcp.tools import ToolFailure, quote_literal
from support import Clients, noted

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


class ValueTypeTests:
    def test_each_value_gets_the_narrowest_type_that_holds_it_without_loss(self) -> None:
        for text, kind in EXAMPLES.items():
            assert value_type(text) == kind, text

    def test_none_is_null(self) -> None:
        assert value_type(None) is None


class WideningTests:
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
            assert widen(current, other) == expected, (current, other)

    def test_wider_types_are_the_chain_from_a_guess(self) -> None:
        assert wider_types(BIGINT) == [BIGINT, DOUBLE]
        assert wider_types(DATE) == [DATE, TIMESTAMP]
        assert wider_types(BOOLEAN) == [BOOLEAN]
        assert wider_types(TIMESTAMPTZ) == [TIMESTAMPTZ]
        assert wider_types(TEXT) == []
        assert wider_types(None) == list(INFERRED)

    def test_the_first_type_every_value_fits_is_chosen(self) -> None:
        assert choose_type(BIGINT, {BIGINT: True, DOUBLE: True}) == BIGINT
        assert choose_type(BIGINT, {BIGINT: False, DOUBLE: True}) == DOUBLE
        assert choose_type(BIGINT, {BIGINT: False, DOUBLE: False}) == TEXT
        assert choose_type(DATE, {DATE: False, TIMESTAMP: True}) == TIMESTAMP
        assert choose_type(BOOLEAN, {BOOLEAN: False}) == TEXT
        # Nothing in the first rows: every type is a candidate; no value at all is TEXT.
        fits: dict[str, bool | None] = {kind: False for kind in INFERRED}
        assert choose_type(None, dict(fits, **{BIGINT: True, DOUBLE: True})) == BIGINT
        assert choose_type(None, dict(fits, **{TIMESTAMP: True})) == TIMESTAMP
        assert choose_type(None, {kind: None for kind in INFERRED}) == TEXT

    def test_a_column_of_json_values_gets_one_type(self) -> None:
        assert infer_type([1, 2, None]) == BIGINT
        assert infer_type([1, 2.5]) == DOUBLE
        assert infer_type([True, False, None]) == BOOLEAN
        assert infer_type(["2024-01-02", "2024-01-03 10:00"]) == TIMESTAMP
        assert infer_type([1, True]) == TEXT
        assert infer_type([{"a": 1}]) == TEXT
        assert infer_type([None, ""]) == TEXT


class SchemaTests:
    def test_schema_gives_types_by_column(self) -> None:
        assert (schema_types(["a", "b", "c"], {"c": " NUMERIC(18, 2) ", "a": "text"})
                == {0: "text", 2: "NUMERIC(18, 2)"})
        assert (schema_types(["a"], {"a": "TIMESTAMP(3) WITH TIME ZONE"})
                == {0: "TIMESTAMP(3) WITH TIME ZONE"})
        assert schema_types(["a"], None) == {}

    def test_a_column_the_data_lacks_is_named(self) -> None:
        with pytest.raises(ToolFailure) as caught:
            schema_types(["a", "b"], {"z": "BIGINT"})
        assert "'z'" in str(caught.value)
        assert "'a', 'b'" in str(caught.value)

    def test_text_that_is_not_a_type_name_is_refused(self) -> None:
        for bad in ["BIGINT); DROP TABLE x; --", "TEXT, b TEXT", "", "INT[]", "1NT", None]:
            with noted(repr(bad)), pytest.raises(ToolFailure) as caught:
                schema_types(["a"], {"a": bad})
            assert "not a type name" in str(caught.value)


def _stop() -> None:
    pass


class InlineSourceTests:
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.folder = tmp_path

    def test_data_over_the_cap_is_refused_with_the_way_to_load_it(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(loading, "MAX_INLINE_CHARS", 10)
        inline_source("a\n12345678", None)  # at the cap
        with pytest.raises(ToolFailure) as caught:
            inline_source("a\n123456789", None)
        assert "load_file" in str(caught.value)

    def test_empty_data_and_unknown_formats_are_refused(self) -> None:
        for data, fmt, needle in [(" \n ", None, "empty"), ("a\n1", "xml", "csv, json, jsonl")]:
            with pytest.raises(ToolFailure) as caught:
                inline_source(data, fmt)
            assert needle in str(caught.value)

    def staged(self, data: str, fmt: str | None = None) -> Any:
        return inline_source(data, fmt).staged(self.folder, _stop)

    def test_csv_is_staged_as_it_is_in_a_private_file_removed_after(self) -> None:
        data = "\n  city , n ,day\nLyon,1,2024-01-02\nNice,,2024-01-03\n\n"
        with self.staged(data) as staged:
            assert staged.columns == ["city", "n", "day"]
            assert staged.guess == [TEXT, BIGINT, DATE]
            (part,) = staged.parts
            assert (part.width, part.header) == (3, True)
            assert part.path.parent == self.folder
            assert stat.S_IMODE(os.stat(part.path).st_mode) == 0o600
            assert part.path.read_text() == data.strip() + "\n"
        assert not part.path.exists()

    def test_the_guess_reads_only_the_first_rows(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(loading, "INFER_ROWS", 2)
        with self.staged("n\n1\n2\nabc\n") as staged:
            assert staged.guess == [BIGINT]

    def test_bad_headers_are_named(self) -> None:
        for data, needle in [("a,,b\n1,2,3", "empty column name"),
                             ("a,b,a\n1,2,3", "'a' more than once")]:
            with pytest.raises(ToolFailure) as caught:
                with self.staged(data):
                    pass
            assert needle in str(caught.value)
        assert list(self.folder.iterdir()) == []

    def test_json_records_become_csv_rows_and_new_keys_a_new_file(self) -> None:
        records = [{"a": 1, "b": "x"}, {"b": 'say "hi"', "a": None},
                   {"a": 2.5, "c": [1, "東京"], "b": ""}, {"c": True}]
        for data in [json.dumps(records), "\n".join(map(json.dumps, records))]:
            with self.staged(data) as staged:
                assert staged.columns == ["a", "b", "c"]
                assert staged.guess == [DOUBLE, TEXT, TEXT]
                first, second = staged.parts
                assert (first.width, first.header, second.width) == (2, False, 3)
                assert first.path.read_text() == '"1","x"\n,"say ""hi"""\n'
                assert (second.path.read_text(encoding="utf-8")
                        == '"2.5","","[1, ""東京""]"\n,,"true"\n')
            assert list(self.folder.iterdir()) == []

    def test_json_that_is_not_records_is_refused(self) -> None:
        for data, needle in [("[1, 2]", "array of objects"), ('[{"a": 1} {"a": 2}]', "','"),
                             ('[{"a": 1}] x', "more after"), ('{"a": 1}\n{"a": ', "not valid"),
                             ("[]", "no records"), ('[{"": 1}]', "empty key")]:
            with noted(data), pytest.raises(ToolFailure) as caught:
                with self.staged(data, "json"):
                    pass
            assert needle in str(caught.value), data
        assert list(self.folder.iterdir()) == []

    def test_a_stop_ends_staging_and_removes_its_files(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        stopping = threading.Event()

        def stop() -> None:
            if stopping.is_set():
                raise ToolFailure("stopped")

        monkeypatch.setattr(loading, "CHUNK", 4)
        stopping.set()
        for data in ["a\n1\n2\n3\n", json.dumps([{"a": i} for i in range(5000)])]:
            with pytest.raises(ToolFailure):
                with inline_source(data, None).staged(self.folder, stop):
                    pass
            assert list(self.folder.iterdir()) == []


class JsonFileTests:
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.folder = tmp_path

    def test_a_json_array_file_is_read_in_pieces(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Pieces of 7 characters cut numbers, strings and objects in two.
        monkeypatch.setattr(loading, "CHUNK", 7)
        records = [{"n": 123456789 + i, "s": "x" * (i % 11), "f": i / 3} for i in range(50)]
        path = self.folder / "in.json"
        path.write_text(" \n" + json.dumps(records, indent=1) + "\n")
        assert self.records(path) == records
        path.write_text("\n".join(map(json.dumps, records)))
        assert self.records(path) == records

    def test_a_json_extract_path_finds_the_array(self) -> None:
        path = self.folder / "in.json"
        path.write_text(json.dumps({"data": {"items": [{"a": 1}, {"a": 2}]}}))
        with file_source(path, "json", "data.items").staged(self.folder, _stop) as staged:
            assert staged.guess == [BIGINT]
        for extract, needle in [("data.nope", "'nope'"), ("data", "an object there")]:
            with pytest.raises(ToolFailure) as caught:
                with file_source(path, "json", extract).staged(self.folder, _stop):
                    pass
            assert needle in str(caught.value)
        path.write_text('{"data": ')
        with pytest.raises(ToolFailure) as caught:
            with file_source(path, "json", "data").staged(self.folder, _stop):
                pass
        assert "not valid JSON" in str(caught.value)

    def records(self, path: Path) -> list[dict[str, Any]]:
        with file_source(path, "json", None).staged(self.folder, _stop) as staged:
            rows = []
            for part in staged.parts:
                import csv

                rows += list(csv.reader(io.StringIO(part.path.read_text())))
        return [{"n": int(n), "s": s, "f": float(f)} for n, s, f in rows]


@pytest.mark.deadline(180)
class HyperdReadsThePatternsAlikeTests:
    """Python's classification against hyperd's, on the same values."""

    @pytest_twisted.ensureDeferred
    async def test_hyperd_matches_each_pattern_as_python_does_and_casts_without_loss(
            self, clients: Clients) -> None:
        session = await clients.open(no_daemon=True, ephemeral_only=True)
        values = list(EXAMPLES)
        rows = ", ".join(f"({quote_literal(v)})" for v in values)
        tests = ", ".join(f"({fits_sql('v', kind)})" for kind in INFERRED)
        result = await session.query(f"SELECT v, {tests} FROM (VALUES {rows}) AS t(v)")
        by_hyperd = {row[0]: row[1:] for row in result.rows}
        for text in values:
            if not text:
                continue
            python = tuple(fits(text, kind) for kind in INFERRED)
            assert by_hyperd[text] == python, text
        # What fits a type converts to it with nothing lost: hyperd finds it
        # equal to the canonical text of the value Python reads.
        typed = [(text, kind) for text, kind in EXAMPLES.items() if kind not in (None, TEXT)]
        same = ", ".join(f"CAST({quote_literal(text)} AS {kind}) = "
                         f"CAST({quote_literal(_canonical(text, kind))} AS {kind})"
                         for text, kind in typed)
        found = (await session.query(f"SELECT {same}")).rows[0]
        assert (dict(zip([t for t, _ in typed], found))
                == dict.fromkeys([t for t, _ in typed], True))


@pytest.mark.deadline(180)
class LoaderTests:
    """L{loading.Loader} on a real hyperd, for the paths the MCP tests do not reach."""

    @pytest.fixture(autouse=True)
    def _clients(self, clients: Clients) -> None:
        self.clients = clients
        self.tmp = clients.tmp

    async def load(self, source: Any, schema: dict[str, str] | None = None) -> tuple[Any, list]:
        """Load C{source} into a temporary table on a private hyperd; its facts and rows."""
        session = await self.clients.open(no_daemon=True, ephemeral_only=True)
        loader = loading.Loader(source, schema, self.tmp, threading.Event())

        def work(conn: Any) -> tuple[Any, list]:
            def create(definition: str) -> str:
                conn.execute(f"CREATE TEMPORARY TABLE t ({definition})")
                return "t"

            loaded = loader.load(conn, create)
            return loaded, conn.execute("SELECT * FROM t ORDER BY 1").fetchall()

        return await session.call(work)

    @pytest_twisted.ensureDeferred
    async def test_records_whose_keys_come_late_are_joined_with_nulls(self) -> None:
        records = [{"a": 1}, {"a": 2, "b": "x"}, {"c": "2024-01-02", "a": 3}]
        loaded, rows = await self.load(inline_source(json.dumps(records), None))
        assert ((loaded.columns, loaded.types, loaded.rows)
                == (["a", "b", "c"], [BIGINT, TEXT, DATE], 3))
        from datetime import date

        assert rows == [(1, None, None), (2, "x", None), (3, None, date(2024, 1, 2))]
        assert list(self.tmp.glob("load-*")) == []

    @pytest_twisted.ensureDeferred
    async def test_a_value_hyperd_refuses_after_all_leaves_its_column_text_with_a_note(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Were the patterns wrong (here: made to accept anything), a value
        # hyperd cannot convert keeps its column TEXT rather than failing the load.
        monkeypatch.setattr(loading, "fits_sql", lambda column, kind: "true")
        data = "n,d\n" + "".join(f"{i},2024-01-02\n" for i in range(1500)) + "7,2023-02-29\n"
        loaded, rows = await self.load(inline_source(data, None))
        assert loaded.types == [BIGINT, TEXT]
        (note,) = loaded.notes
        assert "column 'd'" in note
        assert "loaded as TEXT" in note
        assert (7, "2023-02-29") in rows


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
