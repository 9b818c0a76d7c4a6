"""
Getting rows into C{hyperd}: inline CSV or JSON, and CSV or JSON files,
streamed, with each column's type inferred from every row.

C{hyperd} does the heavy part.  CSV reaches it as a file that it reads
itself: the user's own file, or for inline data a private staging file (0600,
made exclusively in the session's folder, removed after).  JSON is turned
into such CSV files on the way, one record at a time.  Memory stays bounded
by the inline payload, which is capped (L{MAX_INLINE_CHARS}), and one record.

Types are inferred in two steps.  The first L{INFER_ROWS} rows are classified
here (the guess); then one query, run by C{hyperd} over every row of the file
read as text, checks the guess and the types it may widen to (BIGINT to DOUBLE
PRECISION, DATE to TIMESTAMP, and past those TEXT).  A column that a later row
widened is named in the result's notes.  The rows are then inserted with casts
into the target table.  The patterns that classify a value are written so that
Python's C{re} and C{hyperd}'s C{~} read them alike, and they only accept text
that C{hyperd} converts without loss: C{hyperd} itself would take
C{'2024-01-02 10:00'} as a DATE by dropping the time, or C{'007'} as 7.

L{Loader} is what the tools use; the pure pieces (L{value_type}, L{widen},
L{choose_type}) are tested on their own.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import tempfile
import threading
from functools import reduce
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import attrs

from hyperdaemon.mcp.tools import ToolFailure, quote_identifier, quote_literal

#: Inline data (load_data, query_data) longer than this, in characters, is
#: refused: bigger data goes through a file and load_file.
MAX_INLINE_CHARS = 64 * 1024 * 1024
#: Rows whose values make the first guess of the column types.
INFER_ROWS = 1000
#: Characters written to (or read from) a staging file at a time, and how
#: often a load looks whether it should stop.
CHUNK = 1024 * 1024
#: Distinct keys that the records of a JSON source may have.
MAX_COLUMNS = 1600

BOOLEAN = "BOOLEAN"
BIGINT = "BIGINT"
DOUBLE = "DOUBLE PRECISION"
DATE = "DATE"
TIMESTAMP = "TIMESTAMP"
TIMESTAMPTZ = "TIMESTAMPTZ"
TEXT = "TEXT"
#: The types inferred, narrowest first; anything else is TEXT.
INFERRED = (BOOLEAN, BIGINT, DOUBLE, DATE, TIMESTAMP, TIMESTAMPTZ)
#: The type a column widens to when a value does not fit (past it: TEXT).
WIDER = {BIGINT: DOUBLE, DATE: TIMESTAMP}

_YEAR = "([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_MULTIPLE_OF_4 = "(0[48]|[2468][048]|[13579][26])"
_MONTH_DAY = ("(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)"
              "|(0[13578]|1[02])-31")
_LEAP_DAY = f"([0-9]{{2}}{_MULTIPLE_OF_4}|{_MULTIPLE_OF_4}00)-02-29"
_CALENDAR_DATE = f"({_YEAR}-({_MONTH_DAY})|{_LEAP_DAY})"
_TIME = r"[T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
_ZONE = "(Z|[+-]([01][0-9]|2[0-3])(:?[0-5][0-9])?)"
#: What a value of each inferred type looks like (blanks around it aside).
#: Integers keep to 18 digits and have no leading zero (an identifier such as
#: a postal code stays TEXT); dates are real calendar dates.
PATTERNS = {
    BOOLEAN: "[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]",
    BIGINT: "[+-]?(0|[1-9][0-9]{0,17})",
    DOUBLE: r"[+-]?(([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+"
            "|0|[1-9][0-9]{0,17})",
    DATE: _CALENDAR_DATE,
    TIMESTAMP: f"{_CALENDAR_DATE}({_TIME})?",
    TIMESTAMPTZ: f"{_CALENDAR_DATE}{_TIME}{_ZONE}",
}
_BLANKS = r"[ \t]*"
_MATCHES = {t: re.compile(f"{_BLANKS}({p}){_BLANKS}").fullmatch for t, p in PATTERNS.items()}
#: A type name that schema may give: words, each perhaps with (n) or (n, m).
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\s*\(\s*[0-9]+\s*(,\s*[0-9]+\s*)?\))?"
                        r"(\s+[A-Za-z_][A-Za-z0-9_]*(\s*\(\s*[0-9]+\s*(,\s*[0-9]+\s*)?\))?)*")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_SPACE = re.compile(r"\s*")
_decode = json.JSONDecoder().raw_decode


# -- inference: pure -------------------------------------------------------------

def fits(text: str, kind: str) -> bool:
    """Whether C{text} reads as a value of C{kind} (one of L{INFERRED}) without loss."""
    if not _MATCHES[kind](text):
        return False
    # hyperd would read 1e400 as Infinity: only finite numbers fit.
    return kind != DOUBLE or math.isfinite(float(text))


def value_type(text: str | None) -> str | None:
    """
    The narrowest type that holds C{text} (a field as C{hyperd} reads it)
    without loss; None for a null (None or the empty string).
    """
    if not text:
        return None
    for kind in INFERRED:
        if fits(text, kind):
            return kind
    return TEXT


def widen(current: str | None, other: str | None) -> str | None:
    """The narrowest type holding values of both types (None: no value yet)."""
    if current is None or current == other:
        return other if current is None else current
    if other is None:
        return current
    if WIDER.get(current) == other:
        return other
    if WIDER.get(other) == current:
        return current
    return TEXT


def wider_types(guess: str | None) -> list[str]:
    """The types a column guessed as C{guess} may end as, narrowest first (TEXT aside)."""
    if guess is None:
        return list(INFERRED)
    chain = []
    kind: str | None = guess
    while kind is not None and kind != TEXT:
        chain.append(kind)
        kind = WIDER.get(kind)
    return chain


def choose_type(guess: str | None, fits: dict[str, bool | None]) -> str:
    """
    A column's type: the first of L{wider_types}C{(guess)} that every value
    fits (C{fits}: per type, whether all do; None when there was no value),
    else TEXT.
    """
    for kind in wider_types(guess):
        if fits.get(kind):
            return kind
    return TEXT


def infer_type(values: Iterable[Any]) -> str:
    """The type of a column holding C{values} (CSV fields, or JSON values)."""
    return reduce(widen, (value_type(_json_text(v)) for v in values), None) or TEXT


def fits_sql(column: str, kind: str) -> str:
    """L{fits} in SQL: true when C{column} (a quoted name, text) holds a value of C{kind}."""
    pattern = quote_literal(f"^{_BLANKS}({PATTERNS[kind]}){_BLANKS}$")
    if kind == DOUBLE:
        return (f"CASE WHEN {column} ~ {pattern} THEN abs(CAST({column} AS DOUBLE PRECISION)) "
                f"< CAST('Infinity' AS DOUBLE PRECISION) ELSE false END")
    return f"{column} ~ {pattern}"


def converted_sql(column: str, kind: str) -> str:
    """SQL for C{column} (text) as C{kind}: empty text is null, except in TEXT."""
    if kind.strip().upper() == TEXT:
        return column
    return f"CAST(NULLIF({column}, '') AS {kind})"


def guarded_sql(column: str, kind: str) -> str:
    """
    L{converted_sql} for an inferred C{kind}, which fails (a cast error)
    on a value that does not fit C{kind}, where hyperd would take some such
    values by losing part of them: '!' makes each one unreadable.
    """
    if kind == TEXT:
        return column
    return (f"CAST(NULLIF(CASE WHEN {column} = '' OR {fits_sql(column, kind)} THEN {column} "
            f"ELSE '!' || {column} END, '') AS {kind})")


def schema_types(columns: list[str], schema: dict[str, str] | None) -> dict[int, str]:
    """
    The types that C{schema} gives, by column index.

    @raise ToolFailure: for a column the data does not have, or text that is
        not a type name.
    """
    schema = schema or {}
    unknown = [name for name in schema if name not in columns]
    if unknown:
        raise ToolFailure(f"schema names {', '.join(map(repr, unknown))}, which the data does "
                          f"not have; its columns are {', '.join(map(repr, columns))}")
    given = {}
    for index, name in enumerate(columns):
        if name not in schema:
            continue
        kind = schema[name]
        if not isinstance(kind, str) or not _TYPE_NAME.fullmatch(kind.strip()):
            raise ToolFailure(f"schema gives column {name!r} the type {kind!r}, which is not a "
                              f"type name; use one such as BIGINT, DOUBLE PRECISION, "
                              f"NUMERIC(18,2), TEXT, BOOLEAN, DATE or TIMESTAMP")
        given[index] = kind.strip()
    return given


def _json_text(value: Any) -> str | None:
    """A JSON value as the text of a CSV field (None: null)."""
    if value is None or isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def _field(text: str | None) -> str:
    """A CSV field: quoted, so that an empty string stays one; nothing for null."""
    return "" if text is None else '"' + text.replace('"', '""') + '"'


# -- sources ---------------------------------------------------------------------

@attrs.frozen
class Part:
    """A CSV file for C{hyperd} to read: its first C{width} columns, maybe a header."""

    path: Path
    width: int
    header: bool


@attrs.frozen
class Staged:
    """A source as CSV files, with its columns and the guess of their types."""

    parts: list[Part]
    columns: list[str]
    guess: list[str | None]


class Source:
    """Rows to load; L{staged} makes them readable by C{hyperd}."""

    #: How errors name the source.
    name: str
    #: Said after an error reading it: what such a source must be like.
    advice = ""

    def staged(self, folder: Path,
               stop: Callable[[], None]) -> contextlib.AbstractContextManager[Staged]:
        """
        The source as L{Staged} CSV files for the block (staging files go in
        C{folder}, and are removed after).  C{stop} raises when the load
        should end; it is called at least once per L{CHUNK}.
        """
        raise NotImplementedError


def inline_source(data: str, fmt: str | None) -> Source:
    """
    Inline data: CSV with a header, a JSON array of objects, or JSON lines.
    C{fmt} is C{csv}, C{json}, C{jsonl}, C{ndjson} or None (guessed from the
    first character).  Cheap: nothing is read yet.

    @raise ToolFailure: for data over the cap, empty data or an unknown format.
    """
    if not isinstance(data, str):
        raise ToolFailure("data must be text: CSV with a header, a JSON array of objects, or "
                          "JSON lines")
    if len(data) > MAX_INLINE_CHARS:
        raise ToolFailure(
            f"data holds {len(data):,} characters, more than the {MAX_INLINE_CHARS:,} "
            f"({MAX_INLINE_CHARS / 2**20:g} MB) that inline data may hold; write it to a file "
            f"and load that with load_file (or query it with query_file)")
    start = _SPACE.match(data).end()
    if start == len(data):
        raise ToolFailure("data is empty; pass CSV with a header, a JSON array of objects, or "
                          "JSON lines")
    kind = (fmt or ("json" if data[start] in "[{" else "csv")).lower()
    if kind == "csv":
        return InlineCsv(data, start)
    if kind in ("json", "jsonl", "ndjson"):
        return JsonSource("data", lambda: contextlib.nullcontext(
            _json_items(_JsonText(data, start))))
    raise ToolFailure(f"format {fmt!r} is not one of csv, json, jsonl: give one of those, or "
                      f"leave it out to have it guessed")


def file_source(path: Path, fmt: str, extract: str | None) -> Source:
    """A CSV, JSON (array) or JSON-lines file; C{extract}: a dotted path to the array."""
    if fmt == "csv":
        return CsvFile(path)

    @contextlib.contextmanager
    def records() -> Iterator[Iterator[Any]]:
        with open(path, encoding="utf-8-sig") as f:
            yield (_extracted(f, extract, path) if extract
                   else _json_items(_JsonText("", 0, f.read)))

    return JsonSource(str(path), records)


def _extracted(f: Any, extract: str, path: Path) -> Iterator[Any]:
    """The records of the array at C{extract} (read whole: a path needs the document)."""
    document = json.load(f)
    for key in extract.split("."):
        if isinstance(document, dict) and key in document:
            document = document[key]
        elif isinstance(document, list) and key.isdigit() and int(key) < len(document):
            document = document[int(key)]
        else:
            raise ToolFailure(f"json_extract_path {extract!r}: {path} has nothing at {key!r}; "
                              f"give the dotted path of the array of records")
    if not isinstance(document, list):
        raise ToolFailure(f"json_extract_path {extract!r}: {path} has {_kind(document)} there, "
                          f"not an array of records; give the path of the array")
    yield from document


def _header(rows: Iterator[list[str]], name: str) -> list[str]:
    try:
        header = [h.strip().lstrip("\ufeff").strip() for h in next(rows)]
    except StopIteration:
        raise ToolFailure(f"{name} is empty; CSV needs a header row") from None
    except csv.Error as e:
        raise ToolFailure(f"{name}: the CSV header cannot be read ({e})") from None
    if not header or any(not h for h in header):
        raise ToolFailure(f"{name}: the CSV header has an empty column name; name every column")
    doubled = sorted({h for h in header if header.count(h) > 1})
    if doubled:
        raise ToolFailure(f"{name}: the CSV header names {', '.join(map(repr, doubled))} more "
                          f"than once; give each column its own name")
    return header


def _guess(columns: list[str], rows: Iterator[list[str]]) -> list[str | None]:
    guess: list[str | None] = [None] * len(columns)
    try:
        for _, row in zip(range(INFER_ROWS), rows):
            for index, text in enumerate(row[:len(columns)]):
                if guess[index] != TEXT:
                    guess[index] = widen(guess[index], value_type(text))
    except csv.Error:
        pass  # hyperd reads the whole file, and says what is wrong with it
    return guess


def _lines(text: str, start: int) -> Iterator[str]:
    """The lines of C{text} from C{start}, each a small copy."""
    find = text.find
    while start < len(text):
        end = find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


@contextlib.contextmanager
def _staging_file(folder: Path) -> Iterator[tuple[Path, Any]]:
    """A new private file (0600, made exclusively) in C{folder}, removed after the block."""
    fd, name = tempfile.mkstemp(prefix="load-", suffix=".csv", dir=folder)
    path = Path(name)
    try:
        with open(fd, "w", encoding="utf-8", newline="") as f:
            yield path, f
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


#: What CSV must be like, said after an error reading it.
_CSV_ADVICE = ("; CSV needs a header row, then one field per column on every row (blank lines "
               "are rows too), in UTF-8")


class InlineCsv(Source):
    """CSV text with a header, written as it is to a staging file."""

    name = "data"
    advice = _CSV_ADVICE

    def __init__(self, data: str, start: int) -> None:
        self._data = data
        self._start = start

    @contextlib.contextmanager
    def staged(self, folder: Path, stop: Callable[[], None]) -> Iterator[Staged]:
        data, start = self._data, self._start
        rows = csv.reader(_lines(data, start))
        columns = _header(rows, self.name)
        guess = _guess(columns, rows)
        end = len(data)
        while data[end - 1] in " \t\r\n":  # trailing blank lines would be rows
            end -= 1
        with _staging_file(folder) as (path, f):
            for offset in range(start, end, CHUNK):
                stop()
                f.write(data[offset:min(offset + CHUNK, end)])
            f.write("\n")
            f.close()
            yield Staged([Part(path, len(columns), header=True)], columns, guess)


class CsvFile(Source):
    """A CSV file with a header, which C{hyperd} reads where it is."""

    advice = _CSV_ADVICE

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    @contextlib.contextmanager
    def staged(self, folder: Path, stop: Callable[[], None]) -> Iterator[Staged]:
        with open(self.path, newline="", encoding="utf-8-sig", errors="replace") as f:
            rows = csv.reader(f)
            columns = _header(rows, self.name)
            guess = _guess(columns, rows)
        yield Staged([Part(self.path, len(columns), header=True)], columns, guess)


class _JsonText:
    """
    JSON text, decoded one value at a time: a string (inline data, read from
    C{start}), then whatever C{read(n)} returns until it returns nothing (a
    file).  Only the text not yet decoded is kept.
    """

    def __init__(self, text: str, start: int = 0,
                 read: Callable[[int], str] | None = None) -> None:
        self._text = text
        self._pos = start
        self._read = read

    def _more(self) -> bool:
        """Read on (at least doubling what is pending); False at the end."""
        if self._read is None:
            return False
        pending = len(self._text) - self._pos
        chunk = self._read(max(CHUNK, pending))
        if not chunk:
            self._read = None
            return False
        self._text = self._text[self._pos:] + chunk
        self._pos = 0
        return True

    def peek(self) -> str:
        """The next character after blanks, or "" at the end."""
        while True:
            self._pos = _JSON_SPACE.match(self._text, self._pos).end()
            if self._pos < len(self._text):
                return self._text[self._pos]
            if not self._more():
                return ""

    def take(self) -> None:
        """Step over the character L{peek} returned."""
        self._pos += 1

    def value(self) -> Any:
        """The value that starts at the next character after blanks."""
        self.peek()
        while True:
            try:
                value, end = _decode(self._text, self._pos)
            except json.JSONDecodeError:
                if self._more():
                    continue
                raise
            if end == len(self._text) and self._more():
                continue  # a number may go on in what comes next
            self._pos = end
            return value


def _json_items(text: _JsonText) -> Iterator[Any]:
    """The items of one top-level array, or each value of a sequence (JSON lines)."""
    if text.peek() != "[":
        while text.peek():
            yield text.value()
        return
    text.take()
    if text.peek() == "]":
        text.take()
    else:
        while True:
            yield text.value()
            after = text.peek()
            text.take()
            if after == "]":
                break
            if after != ",":
                raise ValueError("expected ',' or ']' after an item of the array")
    if text.peek():
        raise ValueError("there is more after the array")


class JsonSource(Source):
    """JSON records, written as CSV rows to staging files as they are read."""

    def __init__(self, name: str,
                 open_records: Callable[[], contextlib.AbstractContextManager[Iterator[Any]]]
                 ) -> None:
        self.name = name
        self._open = open_records

    @contextlib.contextmanager
    def staged(self, folder: Path, stop: Callable[[], None]) -> Iterator[Staged]:
        with contextlib.ExitStack() as files, self._open() as records:
            parts: list[Part] = []
            outs: list[Any] = []
            columns: list[str] = []
            known: set[str] = set()
            guess: list[str | None] = []
            count = 0
            for count, record in enumerate(self._checked(records), 1):
                if not isinstance(record, dict):
                    raise ToolFailure(
                        f"{self.name}: record {count} is {_kind(record)}, not an object; give a "
                        f"JSON array of objects, or one object per line")
                if not outs or not known.issuperset(record):
                    # New keys: the rows before lack them, so a new file starts.
                    self._add_columns(record, columns, known, guess)
                    path, out = files.enter_context(_staging_file(folder))
                    parts.append(Part(path, len(columns), header=False))
                    outs.append(out)
                texts = [_json_text(record.get(name)) for name in columns]
                out.write(",".join(map(_field, texts)) + "\n")
                if count <= INFER_ROWS:
                    guess[:] = [g if g == TEXT else widen(g, value_type(t))
                                for g, t in zip(guess, texts)]
                if count % 4096 == 0:
                    stop()
            if count == 0:
                raise ToolFailure(f"{self.name} holds no records; give a JSON array of "
                                  f"objects, or one object per line")
            stop()
            for out in outs:
                out.close()
            yield Staged(parts, columns, guess)

    def _checked(self, records: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from records
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError included
            detail = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise ToolFailure(f"{self.name} is not valid JSON ({detail}); give a JSON array "
                              f"of objects, or one object per line") from None

    def _add_columns(self, record: dict[str, Any], columns: list[str], known: set[str],
                     guess: list[str | None]) -> None:
        for key in record:
            if key in known:
                continue
            if not key:
                raise ToolFailure(f"{self.name}: a record has an empty key; name every field")
            if len(columns) == MAX_COLUMNS:
                raise ToolFailure(f"{self.name}: the records have more than {MAX_COLUMNS} "
                                  f"distinct keys; give records that share their fields")
            columns.append(key)
            known.add(key)
            guess.append(None)


def _kind(value: Any) -> str:
    return {list: "an array", dict: "an object", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


# -- loading ---------------------------------------------------------------------

@attrs.frozen
class Loaded:
    """What a load made: its columns, their types, what to tell about them, its rows."""

    columns: list[str]
    types: list[str]
    notes: list[str]
    rows: int


@attrs.frozen
class Inferred:
    """A source's columns, their types as a load would choose them, and its rows as SQL."""

    columns: list[str]
    types: list[str]
    notes: list[str]
    #: The rows as text columns, to put after FROM (L{rows_sql}).
    rows: str
    #: When the types are the first rows' guess, unchecked: the columns
    #: (by index) whose types were given, which are not guarded.
    guarded: dict[int, str] | None = None

    def select(self) -> str:
        """SQL for the rows converted to their types, with the columns' names."""
        def one(index: int, column: str, kind: str) -> str:
            guarded = self.guarded is not None and index not in self.guarded
            convert = guarded_sql if guarded else converted_sql
            return f"{convert(quote_identifier(column), kind)} AS {quote_identifier(column)}"

        converted = ", ".join(one(i, c, t)
                              for i, (c, t) in enumerate(zip(self.columns, self.types)))
        return f"SELECT {converted} FROM {self.rows}"


def rows_sql(parts: list[Part], columns: list[str]) -> str:
    """
    SQL for the rows of staged C{parts} as text columns (null where a part
    lacks a column), to put after FROM.
    """
    selects = []
    for part in parts:
        described = ", ".join(f"{quote_identifier(c)} TEXT" for c in columns[:part.width])
        missing = "".join(f", CAST(NULL AS TEXT) AS {quote_identifier(c)}"
                          for c in columns[part.width:])
        selects.append(
            f"SELECT *{missing} FROM external({quote_literal(str(part.path))}, "
            f"COLUMNS => DESCRIPTOR({described}), FORMAT => 'csv', "
            f"HEADER => {'true' if part.header else 'false'})")
    return "(" + " UNION ALL ".join(selects) + ") AS source"


@attrs.define
class Loader:
    """
    Loads a L{Source} into a new table, on the session's worker thread (see
    L{load}).  C{schema} gives some columns their types; staging files go in
    C{folder}; once C{stopping} is set, the load ends at its next step.
    """

    source: Source
    schema: dict[str, str] | None
    folder: Path
    stopping: threading.Event

    def load(self, conn: Any, create: Callable[[str], str]) -> Loaded:
        """
        Stage the source, infer its types over every row, make the table
        with C{create(column definitions)} (which returns its name), and
        fill it.

        Most often the first rows tell the types right: the rows then go in
        with those types in one pass, which fails if a value does not fit
        (L{guarded_sql}).  Only then, and when the first rows left a column
        without any value, does C{hyperd} check every row first.

        @raise ToolFailure: for a source that cannot be read, a type from
            C{schema} that a value does not fit, or a stop.
        """
        import psycopg

        with self.source.staged(self.folder, self._stop) as staged:
            columns, guess = staged.columns, staged.guess
            given = schema_types(columns, self.schema)
            rows = rows_sql(staged.parts, columns)
            self._stop()
            if all(i in given or first is not None for i, first in enumerate(guess)):
                types = [given.get(i) or str(first) for i, first in enumerate(guess)]
                target = self._create(create, columns, types, given)
                try:
                    count = self._insert(conn, target, columns, types, rows, guarded=given)
                    return Loaded(columns, types, [], count)
                except psycopg.DataError:
                    # A later row does not fit, or the source cannot be read: see below.
                    conn.execute(f"DROP TABLE {target}")
                self._stop()
            types, notes = self._infer(conn, staged, given, rows)
            self._stop()
            target = self._create(create, columns, types, given)
            count, more = self._fill(conn, create, target, columns, types, given, rows)
            return Loaded(columns, types, notes + more, count)

    @contextlib.contextmanager
    def inferred(self, conn: Any, guess: bool = False) -> Iterator[Inferred]:
        """
        The source staged, with the types a load would give its columns
        (every row checked, as L{load} does when the first rows do not
        tell), for the block; nothing is loaded (inspect_file).  With
        C{guess}, and if the first rows gave every column a type, those
        types unchecked: L{Inferred.select} then fails (C{DataError}) on a
        value that does not fit, as L{load}'s first pass does.

        @raise ToolFailure: as L{load}.
        """
        with self.source.staged(self.folder, self._stop) as staged:
            given = schema_types(staged.columns, self.schema)
            rows = rows_sql(staged.parts, staged.columns)
            self._stop()
            if guess and all(i in given or g is not None for i, g in enumerate(staged.guess)):
                types = [given.get(i) or str(g) for i, g in enumerate(staged.guess)]
                yield Inferred(staged.columns, types, [], rows, guarded=given)
                return
            types, notes = self._infer(conn, staged, given, rows)
            yield Inferred(staged.columns, types, notes, rows)

    def _insert(self, conn: Any, target: str, columns: list[str], types: list[str], rows: str,
                guarded: dict[int, str] | None = None) -> int:
        """
        Insert the rows, converted; with C{guarded}, the columns not in it
        (the inferred ones) fail on a value that does not fit.  The count.
        """
        converted = ", ".join(
            guarded_sql(quote_identifier(c), t) if guarded is not None and i not in guarded
            else converted_sql(quote_identifier(c), t)
            for i, (c, t) in enumerate(zip(columns, types)))
        return conn.execute(f"INSERT INTO {target} SELECT {converted} FROM {rows}").rowcount

    def _stop(self) -> None:
        if self.stopping.is_set():
            raise ToolFailure("the load was stopped: the server is shutting down")

    def _infer(self, conn: Any, staged: Staged, given: dict[int, str],
               rows: str) -> tuple[list[str], list[str]]:
        """The types (C{given} ones kept), and notes on columns a later row widened."""
        import psycopg

        columns, guess = staged.columns, staged.guess
        checks = [(index, kind) for index, first in enumerate(guess)
                  if index not in given and first != TEXT for kind in wider_types(first)]
        tests = [f"bool_and({fits_sql(quote_identifier(columns[i]), kind)}) "
                 f"FILTER (WHERE {quote_identifier(columns[i])} <> '')" for i, kind in checks]
        try:
            # count(*) has hyperd read the whole source even with nothing to check.
            found = conn.execute(f"SELECT {', '.join(['count(*)', *tests])} FROM {rows}").fetchone()
        except psycopg.DataError as e:
            raise ToolFailure(self._unreadable(e, staged.parts)) from None
        fits: dict[int, dict[str, bool | None]] = {}
        for (index, kind), fit in zip(checks, found[1:]):
            fits.setdefault(index, {})[kind] = fit
        types = [given.get(i) or (TEXT if first == TEXT else choose_type(first, fits.get(i, {})))
                 for i, first in enumerate(guess)]
        widened = [i for i, first in enumerate(guess)
                   if i not in given and first not in (None, TEXT) and types[i] != first]
        return types, self._widening_notes(conn, rows, columns, guess, types, widened)

    def _widening_notes(self, conn: Any, rows: str, columns: list[str],
                        guess: list[str | None], types: list[str], widened: list[int]) -> list[str]:
        if not widened:
            return []
        quoted = [quote_identifier(columns[i]) for i in widened]
        examples = conn.execute(
            "SELECT " + ", ".join(
                f"min({q}) FILTER (WHERE {q} <> '' AND NOT ({fits_sql(q, str(guess[i]))}))"
                for i, q in zip(widened, quoted)) + f" FROM {rows}").fetchone()
        notes = []
        for index, example in zip(widened, examples):
            shown = (f"holds {_shortened(example)!r}" if example is not None
                     else "holds a value that does not fit")
            notes.append(f"column {columns[index]!r}: its first {INFER_ROWS} rows read as "
                         f"{guess[index]}, but a later row {shown}: loaded as {types[index]}")
        return notes

    def _create(self, create: Callable[[str], str], columns: list[str], types: list[str],
                given: dict[int, str]) -> str:
        import psycopg

        definition = ", ".join(f"{quote_identifier(c)} {t}" for c, t in zip(columns, types))
        try:
            return create(definition)
        except (psycopg.errors.UndefinedObject, psycopg.errors.SyntaxError) as e:
            if not given:
                raise
            named = ", ".join(f"{columns[i]!r}: {t!r}" for i, t in given.items())
            raise ToolFailure(f"schema gives types that Hyper does not know ({named}): "
                              f"{e.diag.message_primary}; use types such as BIGINT, DOUBLE "
                              f"PRECISION, NUMERIC(18,2), TEXT, BOOLEAN, DATE or "
                              f"TIMESTAMP") from None

    def _fill(self, conn: Any, create: Callable[[str], str], target: str, columns: list[str],
              types: list[str], given: dict[int, str], rows: str) -> tuple[int, list[str]]:
        """
        Insert the rows, converted: their count, and notes on any column
        that had to stay TEXT.  Hyper converts a statement's rows all or
        none, so a failed insert leaves the table empty.
        """
        import psycopg

        try:
            return self._insert(conn, target, columns, types, rows), []
        except psycopg.DataError:
            misfits = self._misfits(conn, columns, types, rows)
            if not misfits:
                raise
        notes = []
        for index, message in misfits.items():
            if index in given:
                raise ToolFailure(
                    f"schema gives column {columns[index]!r} the type {types[index]}, and a "
                    f"value in it does not fit: {message}; give a type that holds every "
                    f"value, or leave the column out of schema to have its type inferred")
            # The inference let through a value hyperd does not take.
            notes.append(f"column {columns[index]!r}: a value could not be read as "
                         f"{types[index]} ({message}): loaded as TEXT")
            types[index] = TEXT
        conn.execute(f"DROP TABLE {target}")
        target = self._create(create, columns, types, given)
        return self._insert(conn, target, columns, types, rows), notes

    def _misfits(self, conn: Any, columns: list[str], types: list[str],
                 rows: str) -> dict[int, str]:
        """The columns whose conversion fails, one query each, with hyperd's message."""
        import psycopg

        found = {}
        for index, (column, kind) in enumerate(zip(columns, types)):
            if kind.strip().upper() == TEXT:
                continue
            self._stop()
            try:
                conn.execute(f"SELECT count({converted_sql(quote_identifier(column), kind)}) "
                             f"FROM {rows}")
            except psycopg.DataError as e:
                found[index] = e.diag.message_primary or str(e)
        return found

    def _unreadable(self, error: Any, parts: list[Part]) -> str:
        detail = error.diag.message_detail or ""
        for part in parts:
            detail = detail.replace(str(part.path), self.source.name)
        primary = error.diag.message_primary or str(error).strip()
        where = f" ({detail.strip()})" if detail.strip() else ""
        return f"{self.source.name} cannot be read: {primary}{where}{self.source.advice}"


def _shortened(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# -- files that hyperd reads itself: Parquet, Arrow IPC --------------------------
#
# hyperd reads Parquet with its schema.  It reads Arrow IPC files (FORMAT
# arrowfile) and streams (arrowstream) too, but cannot infer their schema,
# reads no compressed record batch, and lacks some types (large and view
# strings, dictionaries, nanoseconds, 64-bit unsigned integers, nested types).
# pyarrow, imported only when an Arrow file is read, gives the schema; a file
# that hyperd cannot read as it is gets rewritten as an uncompressed stream of
# types it reads, one record batch at a time, in the session's folder.

#: The extensions of Arrow IPC files (Feather 2 is the Arrow IPC file format).
ARROW_EXTENSIONS = ("arrow", "feather", "ipc")


def arrow_column(kind: Any) -> tuple[Any, str]:
    """
    For an Arrow type: the Arrow type that hyperd reads it as (C{kind}
    itself, or one to convert it to) and the SQL type of the column.  Types
    with no counterpart (lists, structs, maps, durations, ...) become JSON
    text.  Pure.
    """
    import pyarrow as pa

    t = pa.types
    if t.is_dictionary(kind):
        return arrow_column(kind.value_type)
    simple = [(t.is_boolean, "BOOLEAN"), (t.is_int8, "SMALLINT"), (t.is_int16, "SMALLINT"),
              (t.is_int32, "INTEGER"), (t.is_int64, "BIGINT"), (t.is_float32, "REAL"),
              (t.is_float64, "DOUBLE PRECISION"), (t.is_string, "TEXT"),
              (t.is_binary, "BYTEA"), (t.is_date32, "DATE")]
    for test, sql in simple:
        if test(kind):
            return kind, sql
    converted = [(t.is_uint8, pa.int16(), "SMALLINT"), (t.is_uint16, pa.int32(), "INTEGER"),
                 (t.is_uint32, pa.int64(), "BIGINT"),
                 # Hyper's databases keep no 128-bit NUMERIC: a value past
                 # BIGINT's range is an error (L{_converted_batch}).
                 (t.is_uint64, pa.int64(), "BIGINT"),
                 (t.is_float16, pa.float32(), "REAL"),
                 (t.is_large_string, pa.string(), "TEXT"),
                 (t.is_large_binary, pa.binary(), "BYTEA"),
                 (t.is_fixed_size_binary, pa.binary(), "BYTEA"),
                 (t.is_date64, pa.date32(), "DATE"),
                 (t.is_time, pa.time64("us"), "TIME")]
    for test, target, sql in converted:
        if test(kind):
            return target, sql
    if t.is_string_view(kind):
        return pa.string(), "TEXT"
    if t.is_binary_view(kind):
        return pa.binary(), "BYTEA"
    if t.is_timestamp(kind):
        target = kind if kind.unit != "ns" else pa.timestamp("us", kind.tz)
        return target, "TIMESTAMPTZ" if kind.tz else "TIMESTAMP"
    if t.is_decimal128(kind) and kind.precision <= 38:
        return kind, f"NUMERIC({kind.precision},{kind.scale})"
    return pa.string(), "TEXT"


def _arrow_reader(path: Path) -> tuple[Any, str]:
    """
    An open reader of the Arrow IPC file or stream at C{path}, and hyperd's
    name for its format (C{arrowfile} or C{arrowstream}).

    @raise ToolFailure: for a file that is neither.
    """
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source), "arrowfile"
    except (pa.ArrowInvalid, OSError):
        source.seek(0)
    try:
        return pa.ipc.open_stream(source), "arrowstream"
    except (pa.ArrowInvalid, OSError):
        source.close()
        raise ToolFailure(f"path: {path} is not an Arrow IPC file or stream (Feather 1 files "
                          f"are not read either); give an Arrow IPC file (.arrow, .feather, "
                          f".ipc), or convert the data to Parquet or CSV") from None


def _arrow_batches(reader: Any) -> Iterator[Any]:
    if hasattr(reader, "num_record_batches"):
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)
    else:
        yield from reader


def _as_json_text(column: Any) -> Any:
    """Values of a type hyperd does not read (a list, a struct...), as JSON text."""
    import pyarrow as pa

    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                     for v in column.to_pylist()], pa.string())


def _converted_batch(batch: Any, schema: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for column, field in zip(batch.columns, schema):
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        if column.type != field.type:
            if pa.types.is_string(field.type) and not (
                    pa.types.is_large_string(column.type) or pa.types.is_string_view(column.type)):
                column = _as_json_text(column)
            else:
                # Unsafe only where precision goes: nanoseconds to microseconds.
                try:
                    column = pc.cast(column, field.type, safe=not (
                        pa.types.is_timestamp(column.type) or pa.types.is_time(column.type)))
                except pa.ArrowInvalid:
                    raise ToolFailure(
                        f"path: column {field.name!r} holds a value past what Hyper can store "
                        f"as {field.type} (an unsigned 64-bit integer above "
                        f"{2**63 - 1:,}, say); convert that column to text or a floating-point "
                        f"type before loading, or use another file") from None
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)


@contextlib.contextmanager
def file_rows(conn: Any, path: Path, fmt: str, folder: Path,
              stopping: threading.Event | None = None) -> Iterator[str]:
    """
    C{hyperd}'s table function that reads the Parquet or Arrow IPC file at
    C{path} (C{fmt}: C{parquet} or C{arrow}), to put after FROM, for the
    block.  An Arrow file that hyperd cannot read as it is (compressed, or
    of types it lacks) is rewritten first, one record batch at a time, as an
    uncompressed Arrow stream in C{folder} (removed after).  Converted
    values: nanoseconds are cut to microseconds, unsigned 64-bit integers
    become BIGINT (one past its range is an error), nested values JSON text.

    @raise ToolFailure: for an Arrow file that cannot be read, or a stop.
    """
    import psycopg

    if fmt != "arrow":
        yield f"external({quote_literal(str(path))})"
        return
    import pyarrow as pa

    reader, kind = _arrow_reader(path)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(getattr(reader, "close", lambda: None))
        schema = reader.schema
        names = schema.names
        doubled = sorted({n for n in names if names.count(n) > 1 or not n})
        if doubled or not names:
            raise ToolFailure(f"path: {path} has columns without a name, or with the same "
                              f"name ({', '.join(map(repr, doubled))}); give each column its own "
                              f"name")
        targets = [arrow_column(field.type) for field in schema]
        described = ", ".join(f"{quote_identifier(n)} {sql}"
                              for n, (_, sql) in zip(names, targets))
        readable = all(target == field.type for field, (target, _) in zip(schema, targets))

        def external(file: Path, format: str) -> str:
            return (f"external({quote_literal(str(file))}, FORMAT => {quote_literal(format)}, "
                    f"COLUMNS => DESCRIPTOR({described}))")

        if readable:
            direct = external(path, kind)
            try:
                # The first batch tells whether hyperd reads them (compression).
                conn.execute(f"SELECT * FROM {direct} LIMIT 1").fetchall()
            except psycopg.Error:
                pass
            else:
                yield direct
                return
        target = pa.schema([pa.field(n, t) for n, (t, _) in zip(names, targets)])
        fd, name = tempfile.mkstemp(prefix="load-", suffix=".arrows", dir=folder)
        os.close(fd)
        copy = Path(name)
        cleanup.callback(lambda: copy.unlink(missing_ok=True))
        try:
            with pa.OSFile(name, "wb") as out, pa.ipc.new_stream(out, target) as writer:
                for batch in _arrow_batches(reader):
                    if stopping is not None and stopping.is_set():
                        raise ToolFailure("the load was stopped: the server is shutting down")
                    writer.write_batch(_converted_batch(batch, target))
        except (pa.ArrowException, ValueError) as e:
            raise ToolFailure(f"path: {path} cannot be read as Arrow IPC ({e}); check that "
                              f"the file is complete, or convert it to Parquet") from None
        yield external(copy, "arrowstream")
