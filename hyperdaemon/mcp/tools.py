"""
The MCP tools: what each one does to the session's databases.

Each tool is a method of L{Tools} that returns a Deferred (the MCP server
awaits it).  The database work itself is a plain function of a psycopg
connection, run on the session's worker thread by L{Session.call}.  Errors a
model can cause become L{ToolFailure}: the parameter at fault, what was
wrong (the database's message where it has one) and what to try; the
session and the daemon are unharmed.  Results are JSON values only (see
"result values"), so that any strict JSON encoder takes them.  The pure
helpers (SQL classification, batch planning, result shaping, export
options) are tested on their own.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet import defer

from hyperdaemon import __version__
from hyperdaemon.client.session import EPHEMERAL_ALIAS, PERSISTENT_ALIAS, Session

#: Rows a result shows at most; the rest is counted and noted.
ROW_CAP = 200
#: Characters of one cell shown at most.
CELL_CAP = 2000
#: Rows that sample shows unless told.
SAMPLE_DEFAULT = 10
#: The kinds of database attach_database takes (upstream's name first).
ATTACH_KINDS = ("local_file", "file", "hyper")

#: What query runs, as a model is told when it asks for something else.
READ_ONLY_KINDS = "SELECT, WITH ... SELECT, VALUES, TABLE, EXPLAIN or SHOW"
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: SQLSTATE of a syntax error.
SYNTAX_ERROR = b"42601"


class ToolFailure(Exception):
    """A tool could not do what was asked; C{str()} says why and what to try."""


# -- the read-only check ---------------------------------------------------------
#
# SQL given to query (and the SQL of query_data, query_file and export) is
# classified by sqlglot's PostgreSQL parser: one statement, a query at its
# root, and nothing that writes anywhere inside it (a data-modifying WITH
# included).  Behind that check the SQL runs in a transaction that is always
# rolled back (L{_read_only_fetch}), which undoes any change to data that got
# past it; and Hyper itself refuses several statements in one call.

@attrs.frozen
class ReadOnlyCheck:
    """What the parser made of SQL given to a read-only tool."""

    #: Why the SQL is refused, for a model; None for one read-only statement.
    problem: str | None = None
    #: False when the parser could not read the SQL: Hyper is then asked
    #: whether it is a syntax error (L{_require_read_only}).
    parsed: bool = True


_dialect: Any = None


def _postgres() -> Any:
    """
    sqlglot's PostgreSQL dialect, imported on first use: the import takes
    about 0.1 s, which the MCP server's start should not pay.
    """
    global _dialect
    if _dialect is None:
        import logging

        from sqlglot.dialects.dialect import Dialect

        # sqlglot logs a warning whenever it keeps a statement as an opaque
        # Command (EXPLAIN, SHOW, ...); those are classified here instead.
        logging.getLogger("sqlglot").setLevel(logging.ERROR)
        _dialect = Dialect.get_or_raise("postgres")
    return _dialect


def _tokens(sql: str) -> list[Any]:
    """sqlglot's tokens of C{sql}; raises sqlglot's TokenError."""
    return _postgres().tokenize(sql)


def _parse(sql: str) -> list[Any]:
    """The statements of C{sql}; raises sqlglot's errors."""
    return [s for s in _postgres().parser().parse(_tokens(sql), sql) if s is not None]


def statement_count(sql: str) -> int:
    """
    How many statements C{sql} holds, split where the SQL lexer sees a
    semicolon (never one in a literal, a quoted name or a comment).  Text
    the lexer cannot read counts as one statement, for Hyper to judge.
    """
    from sqlglot.errors import SqlglotError
    from sqlglot.tokens import TokenType

    try:
        tokens = _tokens(sql)
    except SqlglotError:
        return 1
    count, pending = 0, False
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            count, pending = count + pending, False
        else:
            pending = True
    return count + pending


def warm_up() -> None:
    """
    Do now what a session's first statement would pay for otherwise
    (importing sqlglot, building its PostgreSQL dialect): the MCP host calls
    it as it prepares, before launchers come.
    """
    check_read_only("SELECT 1")


def check_read_only(sql: str) -> ReadOnlyCheck:
    """
    Whether C{sql} is exactly one statement that only reads: a SELECT, a set
    operation (UNION, ...), VALUES, TABLE, SHOW, or EXPLAIN of one of those,
    with nothing that writes anywhere inside it.  Never raises.
    """
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    try:
        tokens = _tokens(sql)
        statements = [s for s in _postgres().parser().parse(tokens, sql) if s is not None]
        for statement in statements:
            if isinstance(statement, exp.Command):
                # The lexer keeps a command's text whole, comments included.
                tokens = tokens + _tokens(_command_text(statement))
        if _nests_comments(tokens):
            return ReadOnlyCheck(
                "a /* comment holds another /* comment, and Hyper does not nest comments (it "
                "ends one at the first */), so it would read other SQL than checked; remove "
                "the inner comment")
        if not statements:
            return ReadOnlyCheck(f"sql holds no statement; give one {READ_ONLY_KINDS} statement")
        if len(statements) > 1:
            return ReadOnlyCheck(f"query takes exactly one statement and this SQL holds "
                                 f"{len(statements)}; run them one at a time")
        why = _why_not_read_only(statements[0])
    except SqlglotError as e:
        return _unparsed(e)
    except RecursionError:
        return ReadOnlyCheck("the statement nests too deeply to be checked; simplify it (a "
                             "WITH clause helps)")
    if why is None:
        return ReadOnlyCheck()
    return ReadOnlyCheck(f"query runs only read-only statements ({READ_ONLY_KINDS}), and this "
                         f"one {why}; use execute for changes")


def read_only_problem(sql: str) -> str | None:
    """Why C{sql} is not one read-only statement, or None (see L{check_read_only})."""
    return check_read_only(sql).problem


def _unparsed(error: Exception) -> ReadOnlyCheck:
    where = ""
    details = getattr(error, "errors", None)
    if details and details[0].get("line"):
        where = f" (line {details[0]['line']}, column {details[0]['col']})"
    return ReadOnlyCheck(
        f"query runs only statements it can check are read-only, and its SQL parser cannot "
        f"read this one{where}; write it as a plain PostgreSQL {READ_ONLY_KINDS} statement, "
        f"or use execute for changes", parsed=False)


def _nests_comments(tokens: list[Any]) -> bool:
    # sqlglot nests /* */ comments, as PostgreSQL does: a comment it read
    # with a */ inside is one that Hyper would have ended early.
    return any("*/" in comment for token in tokens for comment in token.comments)


def _command_text(command: Any) -> str:
    """What follows the keyword of a statement sqlglot keeps as a Command."""
    return command.expression.name if command.expression is not None else ""


#: sqlglot's statement types that write, or may, and what to call them.
_WRITES = {
    "Insert": "INSERT", "Update": "UPDATE", "Delete": "DELETE", "Merge": "MERGE",
    "Copy": "COPY", "Create": "CREATE", "Drop": "DROP", "Alter": "ALTER",
    "TruncateTable": "TRUNCATE", "Set": "SET", "Transaction": "BEGIN", "Commit": "COMMIT",
    "Rollback": "ROLLBACK", "Into": "SELECT ... INTO", "Lock": "FOR UPDATE", "Grant": "GRANT",
    "Revoke": "REVOKE", "Analyze": "ANALYZE", "LoadData": "LOAD DATA", "Use": "USE",
    "Pragma": "PRAGMA", "Declare": "DECLARE", "Execute": "EXECUTE", "Export": "EXPORT",
    "Cache": "CACHE", "Uncache": "UNCACHE", "Refresh": "REFRESH", "Kill": "KILL",
    "Command": "COMMAND",
}


def _write_types() -> tuple[type, ...]:
    from sqlglot import exp

    named = (getattr(exp, name, None) for name in _WRITES)
    return (exp.DML, *(t for t in named if t is not None))


def _write_name(node: Any) -> str:
    from sqlglot import exp

    if isinstance(node, exp.Command):
        return node.name.upper()
    return _WRITES.get(type(node).__name__, type(node).__name__.upper())


def _why_not_read_only(statement: Any) -> str | None:
    """Why one parsed statement is not read-only (to follow "this one"), or None."""
    from sqlglot import exp

    if isinstance(statement, exp.Command):
        keyword = statement.name.upper()
        if keyword == "SHOW":
            return None
        if keyword == "EXPLAIN":
            return _why_explained_not_read_only(_command_text(statement))
        return f"is a {keyword} statement"
    if isinstance(statement, exp.Subquery):
        return _why_not_read_only(statement.unnest())
    writes = _write_types()
    if not isinstance(statement, (exp.Query, exp.Values)):
        if isinstance(statement, writes):
            return f"writes ({_write_name(statement)})"
        return "is not a query"
    for node in statement.walk():
        if isinstance(node, writes):
            return f"writes ({_write_name(node)})"
    return None


def _why_explained_not_read_only(text: str) -> str | None:
    """EXPLAIN [(options)] statement: what it explains must be read-only itself."""
    from sqlglot import exp
    from sqlglot.tokens import TokenType

    start, depth = 0, 0
    for token in _tokens(text):
        if token.token_type == TokenType.L_PAREN:
            depth += 1
        elif token.token_type == TokenType.R_PAREN:
            depth -= 1
        if depth == 0:
            # The first token ends the options when it closes their list.
            start = token.end + 1 if token.token_type == TokenType.R_PAREN else 0
            break
    statements = _parse(text[start:])
    if len(statements) != 1:
        return "is an EXPLAIN of no single statement"
    if isinstance(statements[0], exp.Command):
        return f"is an EXPLAIN of a {statements[0].name.upper()} statement"
    why = _why_not_read_only(statements[0])
    return None if why is None else f"is an EXPLAIN of a statement that {why}"


# -- pure helpers ----------------------------------------------------------------

def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_reference(table: str, database: str) -> str:
    """
    C{database.public.table} for a plain table name; a name that already
    names its schema or database (C{a.b}, C{a.b.c}) is kept as given.
    """
    parts = table.split(".")
    if len(parts) == 1:
        if not IDENTIFIER.match(table):
            return f"{quote_identifier(database)}.public.{quote_identifier(table)}"
        return f"{quote_identifier(database)}.public.{table}"
    return table


# -- result values ---------------------------------------------------------------
#
# A result is JSON that a strict parser accepts, and says what the database
# holds: float8 in its shortest exact form (hyperd is asked for it with
# extra_float_digits), NaN and the infinities as the strings "NaN",
# "Infinity" and "-Infinity", NUMERIC as a string with every digit, bytea as
# PostgreSQL's hex text ("\x6162"), dates and times in ISO 8601 (hyperd's
# own text where Python's calendar ends: BC, or past year 9999), INTERVAL as
# hyperd's ISO 8601 duration ("P1DT2H"), arrays as JSON arrays.  Text longer
# than CELL_CAP characters is cut, and the result lists the cells cut.

#: The strings that stand for the floating-point values JSON has no number for.
NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_value(value: Any) -> Any:
    """
    A value as psycopg loads it (with L{_result_loaders}) as a JSON value:
    None, a bool, an int, a finite float, a string, or a list of those.
    """
    import datetime
    import decimal
    import math

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else NON_FINITE[repr(value)]
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return str(value)


def _cut(value: Any) -> tuple[Any, int]:
    """C{value} (a JSON value) with its text cut to CELL_CAP characters; its longest text."""
    if isinstance(value, str):
        return (value[:CELL_CAP], len(value)) if len(value) > CELL_CAP else (value, 0)
    if isinstance(value, list):
        pairs = [_cut(v) for v in value]
        return [v for v, _ in pairs], max((n for _, n in pairs), default=0)
    return value, 0


def shape_result(columns: list[str], rows: list[tuple[Any, ...]], total: int | None = None,
                 cap: int = ROW_CAP) -> dict[str, Any]:
    """
    A compact result for a model: columns, at most C{cap} rows of JSON
    values (L{json_value}), a note if rows were left out, and the cells
    whose text was cut (C{cut_cells}: row index from 0, column, length).
    """
    total = len(rows) if total is None else total
    shown: list[list[Any]] = []
    cut: list[dict[str, Any]] = []
    for index, row in enumerate(rows[:cap]):
        cells = []
        for column, value in zip(columns, row):
            cell, length = _cut(json_value(value))
            if length:
                cut.append({"row": index, "column": column, "length": length})
            cells.append(cell)
        shown.append(cells)
    result: dict[str, Any] = {"columns": columns, "rows": shown, "row_count": total}
    if total > len(shown):
        result["truncated"] = True
        result["note"] = (f"showing {len(shown)} of {total} rows; add LIMIT/OFFSET or an "
                          f"aggregate to see the rest")
    if cut:
        result["cut_cells"] = cut
        result["cut_note"] = (
            f"{len(cut)} value(s) longer than {CELL_CAP:,} characters show only their first "
            f"{CELL_CAP:,} (listed in cut_cells); read the rest with substring(column FROM "
            f"{CELL_CAP + 1} FOR {CELL_CAP}), and so on")
    return result


def parse_hyper_array(text: str) -> list[str | None]:
    """
    The elements of an array in hyperd's text form, as their own text (None
    for NULL): C{[1,NULL,3]}, C{["a","b \\"c\\""]}, elements in double quotes
    with backslash escapes.  Nested arrays come back as lists.

    @raise ValueError: for text not in that form.
    """
    items, end = _array_items(text, 0)
    if end != len(text):
        raise ValueError(f"unexpected text after the array at {end}")
    return items


def _array_items(text: str, pos: int) -> tuple[list[Any], int]:
    if text[pos:pos + 1] != "[":
        raise ValueError(f"expected '[' at {pos}")
    pos += 1
    items: list[Any] = []
    if text[pos:pos + 1] == "]":
        return items, pos + 1
    while True:
        if text[pos:pos + 1] == "[":
            item, pos = _array_items(text, pos)
        elif text[pos:pos + 1] == '"':
            chars, pos = [], pos + 1
            while pos < len(text) and text[pos] != '"':
                if text[pos] == "\\":
                    pos += 1
                chars.append(text[pos:pos + 1])
                pos += 1
            if pos >= len(text):
                raise ValueError("unterminated quoted element")
            item, pos = "".join(chars), pos + 1
        else:
            start = pos
            while pos < len(text) and text[pos] not in ",]":
                pos += 1
            item = text[start:pos]
            if not item:
                raise ValueError(f"empty element at {start}")
            if item == "NULL":
                item = None
        items.append(item)
        if text[pos:pos + 1] == "]":
            return items, pos + 1
        if text[pos:pos + 1] != ",":
            raise ValueError(f"expected ',' or ']' at {pos}")
        pos += 1


_loaders: dict[int, type] | None = None


def _result_loaders() -> dict[int, type]:
    """
    psycopg loaders, by type oid, for the values psycopg cannot read from
    hyperd or reads unfaithfully: INTERVAL (hyperd writes ISO 8601, which
    psycopg does not read), arrays (hyperd writes [1,2], not {1,2}), and
    dates and times (kept as hyperd's text where Python has no such date).
    """
    global _loaders
    if _loaders is not None:
        return _loaders
    import datetime

    from psycopg import postgres
    from psycopg.adapt import Loader
    from psycopg.pq import Format

    class IntervalText(Loader):
        def load(self, data: Any) -> str:
            return bytes(data).decode("utf-8")

    def iso(parse: Callable[[str], Any]) -> type:
        class IsoText(Loader):
            def load(self, data: Any) -> Any:
                text = bytes(data).decode("utf-8")
                try:
                    return parse(text)
                except ValueError:
                    return text  # BC, or a year past 9999

        return IsoText

    element_of = {info.array_oid: info.oid for info in postgres.types if info.array_oid}

    class HyperArray(Loader):
        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            element = element_of[oid]
            self._element = context.adapters.get_loader(element, Format.TEXT)(element, context)

        def load(self, data: Any) -> Any:
            text = bytes(data).decode("utf-8")
            try:
                return self._load(parse_hyper_array(text))
            except ValueError:
                return text  # a form not seen yet: hyperd's own text

        def _load(self, items: list[Any]) -> list[Any]:
            return [self._load(i) if isinstance(i, list) else
                    None if i is None else self._element.load(i.encode("utf-8"))
                    for i in items]

    loaders: dict[int, type] = {oid: HyperArray for oid in element_of}
    by_name = {"interval": IntervalText,
               "date": iso(datetime.date.fromisoformat),
               "time": iso(datetime.time.fromisoformat),
               "timetz": iso(datetime.time.fromisoformat),
               "timestamp": iso(datetime.datetime.fromisoformat),
               "timestamptz": iso(datetime.datetime.fromisoformat)}
    for name, loader in by_name.items():
        loaders[postgres.types[name].oid] = loader
    _loaders = loaders
    return loaders


def _result_cursor(conn: Any) -> Any:
    """A cursor of C{conn} that reads every value hyperd sends (L{_result_loaders})."""
    cursor = conn.cursor()
    for oid, loader in _result_loaders().items():
        cursor.adapters.register_loader(oid, loader)
    return cursor


def file_format(path: Path, fmt: str | None = None) -> str:
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    fmt = {"ndjson": "jsonl", "pq": "parquet", "feather": "arrow", "ipc": "arrow"}.get(fmt, fmt)
    if fmt not in ("csv", "json", "jsonl", "parquet", "arrow"):
        raise ToolFailure(
            f"path: cannot tell the format of {path.name} from its name; name the file .csv, "
            f".json, .jsonl, .parquet or .arrow (Arrow IPC; .feather and .ipc too)")
    return fmt


# -- the tools -------------------------------------------------------------------

class Tools:
    """
    The tools over one L{Session}.  C{read_only} refuses every tool that
    writes; C{ephemeral_only} sessions have no persistent database.
    """

    def __init__(self, session: Session, read_only: bool = False, mode: str = "daemon",
                 status_facts: Callable[[], dict[str, Any]] | None = None) -> None:
        self.session = session
        self.read_only = read_only
        self.mode = mode
        self._status_facts = status_facts or (lambda: {})
        #: Set when the server shuts down: loads under way stop.
        self._stopping = threading.Event()
        #: Who the session serves ("name version" of the MCP client), once
        #: known: the table catalog's created_by (L{hyperdaemon.mcp.catalog}).
        self.client: str | None = None
        #: Folders watched by watch_directory, by path (L{hyperdaemon.mcp.watch}).
        self.watches: dict[str, Any] = {}

    # helpers

    @property
    def _attachments(self) -> dict[str, str]:
        """Databases attached with attach_database: alias -> path."""
        return {alias: str(path) for alias, path in self.session.attached_files.items()
                if alias != PERSISTENT_ALIAS}

    def _aliases(self) -> list[str]:
        """Every database alias of the session, as list_attached_databases orders them."""
        aliases = [EPHEMERAL_ALIAS]
        if self.session.persistent_db is not None:
            aliases.append(PERSISTENT_ALIAS)
        return aliases + sorted(self._attachments)

    def _database(self, database: str | None, persist: bool | None = None) -> str:
        """
        The alias that C{database} (or C{persist}) names.

        @raise ToolFailure: for an alias that is not attached, or C{persist}
            with another database.
        """
        if persist:
            if database not in (None, PERSISTENT_ALIAS):
                raise ToolFailure(f"persist: persist=true means database='persistent', and "
                                  f"database is {database!r}; pass only one of them")
            database = PERSISTENT_ALIAS
        database = EPHEMERAL_ALIAS if database is None else database
        if database == PERSISTENT_ALIAS and self.session.persistent_db is None:
            raise ToolFailure("database: this session has no persistent database (the server "
                              "runs with --ephemeral-only); use 'local', or attach a .hyper "
                              "file with attach_database")
        aliases = self._aliases()
        if database not in aliases:
            raise ToolFailure(f"database: no database is attached as {database!r}; the "
                              f"attached ones are {', '.join(map(repr, aliases))}: pass one "
                              f"of those, or attach the file first with attach_database")
        return database

    def _refuse_writes(self, tool: str) -> None:
        if self.read_only:
            raise ToolFailure(f"{tool} writes, and the server runs with --read-only; "
                              f"use query, query_data or query_file")

    def _call(self, work: Callable[[Any], Any], retry: bool = False,
              writes: bool | set[str] = True, parameter: str | None = "sql",
              hint: str | None = None) -> defer.Deferred[Any]:
        """
        Run C{work} in the session; C{writes}: which databases it may change
        (those are on disk before the result is returned).  A database error
        becomes a L{ToolFailure} that blames C{parameter} (see L{_explain}).
        """
        d = self.session.call(work, retry, writes)
        return d.addErrback(_explain, parameter, hint)

    # query / execute

    def query(self, sql: str, database: str | None = None) -> defer.Deferred[dict[str, Any]]:
        db = self._database(database)

        def work(conn: Any) -> dict[str, Any]:
            with _search_path(conn, db):
                _require_read_only(conn, sql)
                return _read_only_fetch(conn, sql)

        return self._call(work, retry=True, writes=False)

    def execute(self, sql: list[str] | str,
                database: str | None = None) -> defer.Deferred[dict[str, Any]]:
        """
        Run C{sql}'s statements, all or nothing (L{plan_batch}): in one
        transaction, and a table that a failed batch created is dropped
        (Hyper does not undo DDL on ROLLBACK).
        """
        self._refuse_writes("execute")
        statements = [sql] if isinstance(sql, str) else list(sql)
        plan = plan_batch(statements)
        db = self._database(database)

        def work(conn: Any) -> dict[str, Any]:
            with _search_path(conn, db):
                affected = _run_batch(conn, statements, plan)
            return {"statements": len(statements), "rows_affected": affected, "atomic": True}

        return self._call(work, parameter=None)

    # describing

    def describe(self, table: str | None = None,
                 database: str | None = None) -> defer.Deferred[dict[str, Any]]:
        db = self._database(database)

        def work(conn: Any) -> dict[str, Any]:
            from hyperdaemon.mcp import catalog

            if table is None:
                tables = _tables(conn, db)
                catalog.annotate(conn, db, tables)
                return {"database": db, "tables": tables}
            reference = _table_to_read(conn, table, db)
            cursor = conn.execute(f"SELECT * FROM {reference} LIMIT 0")
            count = conn.execute(f"SELECT count(*) FROM {reference}").fetchone()[0]
            described = {"database": db, "table": table, "row_count": count,
                         "columns": [{"name": c.name, "type": _type_name(conn, c.type_code)}
                                     for c in cursor.description]}
            entry = catalog.entry_of(conn, db, table)
            if entry is not None:
                described["catalog"] = entry
            return described

        return self._call(work, retry=True, writes=False, parameter="table")

    def sample(self, table: str, n: int | None = None,
               database: str | None = None) -> defer.Deferred[dict[str, Any]]:
        """
        The first C{n} rows of C{table} (default 10; 0 gives its columns and
        no row; more than L{ROW_CAP} gives that many, with a note).
        """
        db = self._database(database)
        n = SAMPLE_DEFAULT if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ToolFailure(f"n: {n!r} is not a number of rows; give a whole number from 0 "
                              f"to {ROW_CAP} (default {SAMPLE_DEFAULT})")
        limit = min(n, ROW_CAP)

        def work(conn: Any) -> dict[str, Any]:
            reference = _table_to_read(conn, table, db)
            result = _read_only_fetch(conn, f"SELECT * FROM {reference} LIMIT {limit}")
            if n > limit:
                result["note"] = (f"n={n} is more than the {ROW_CAP} rows that sample shows: "
                                  f"showing the first {limit}; use query with LIMIT and "
                                  f"OFFSET for more")
            return result

        return self._call(work, retry=True, writes=False, parameter="table")

    # loading

    def load_data(self, table: str, data: str, format: str | None = None,
                  mode: str | None = None, schema: dict[str, str] | None = None,
                  database: str | None = None,
                  persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        """Load inline CSV or JSON into C{table} (see L{hyperdaemon.mcp.loading})."""
        self._refuse_writes("load_data")
        mode = _mode(mode, merge=False)
        db = self._database(database, persist)
        return self._load(table, db, self._inline_loader(data, format, schema), mode,
                          source="inline data",
                          record=("load_data", {"format": format, "mode": mode,
                                                "schema": schema, "database": db}))

    def load_file(self, table: str, path: str, mode: str | None = None,
                  schema: dict[str, str] | None = None, json_extract_path: str | None = None,
                  merge_key: Any = None, database: str | None = None,
                  persist: bool | None = None,
                  format: str | None = None) -> defer.Deferred[dict[str, Any]]:
        """
        Load a file into C{table}; C{mode} C{merge} updates the rows whose
        C{merge_key} columns match a row of the file and inserts the others,
        all in one transaction (L{_merge_in}).
        """
        self._refuse_writes("load_file")
        mode = _mode(mode)
        keys = merge_keys(mode, merge_key)
        db = self._database(database, persist)
        source = _readable(path)
        fmt = file_format(source, format)
        record = ("load_file", {"path": str(source), "mode": mode, "schema": schema,
                                "json_extract_path": json_extract_path,
                                "merge_key": keys or None, "database": db})
        if fmt == "arrow" and schema:
            raise ToolFailure("schema: an Arrow file carries its own column types, which the "
                              "load keeps; leave schema out (change a type afterwards with "
                              "execute: ALTER TABLE, or CREATE TABLE ... AS with casts)")
        if fmt in ("parquet", "arrow"):
            return self._load_parquet(table, db, source, mode, keys, fmt, record=record)
        loader = self._file_loader(source, fmt, schema, json_extract_path)
        return self._load(table, db, loader, mode, source=str(source), keys=keys,
                          record=record)

    def stop(self) -> None:
        """
        The server is shutting down: a load under way ends at its next step,
        without finishing, and watched folders are no longer watched.
        (Closing the session cancels the statement that hyperd runs
        meanwhile.)
        """
        self._stopping.set()
        for watch in self.watches.values():
            watch.stop()
        self.watches.clear()

    @property
    def stopping(self) -> threading.Event:
        """Set once L{stop} was called: work under way ends at its next step."""
        return self._stopping

    def _inline_loader(self, data: str, fmt: str | None,
                       schema: dict[str, str] | None) -> Any:
        """A L{hyperdaemon.mcp.loading.Loader} of inline data; raises L{ToolFailure} for bad data."""
        from hyperdaemon.mcp.loading import Loader, inline_source

        return Loader(inline_source(data, fmt), schema, self.session.ephemeral_db.parent,
                      self._stopping)

    def _file_loader(self, source: Path, fmt: str, schema: dict[str, str] | None,
                     extract: str | None) -> Any:
        """A L{hyperdaemon.mcp.loading.Loader} of a CSV or JSON file."""
        from hyperdaemon.mcp.loading import Loader, file_source

        return Loader(file_source(source, fmt, extract), schema,
                      self.session.ephemeral_db.parent, self._stopping)

    def _load_parquet(self, table: str, db: str, source: Path, mode: str,
                      keys: list[str], fmt: str = "parquet",
                      record: tuple[str, dict[str, Any]] | None = None
                      ) -> defer.Deferred[dict[str, Any]]:
        from hyperdaemon.mcp.loading import file_rows

        final = table_reference(table, db)
        progress = _progress(f"waiting for the session to load {source.name}", 3)

        def work(conn: Any) -> dict[str, Any]:
            progress.step(1, 3, f"reading the rows of {source.name}")
            staging = table_reference(f"{table}__loading_{secrets.token_hex(4)}", db)
            try:
                with file_rows(conn, source, fmt, self.session.ephemeral_db.parent,
                               self._stopping) as external:
                    conn.execute(f"CREATE TABLE {staging} AS SELECT * FROM {external}")
                progress.step(2, 3, f"putting the rows in {table}")
                result = _put_in(conn, staging, final, table, mode, keys=keys)
            except BaseException:
                _drop_quietly(conn, staging)
                raise
            return {"table": table, "database": db, **result, "source": str(source)}

        return self._call(self._recorded(work, record), writes={db}, parameter=None)

    def _load(self, table: str, db: str, loader: Any, mode: str, source: str,
              keys: list[str] | None = None,
              record: tuple[str, dict[str, Any]] | None = None
              ) -> defer.Deferred[dict[str, Any]]:
        """
        Load into a staging table, then swap it in: a failed load leaves no
        partial table (Hyper's DDL is not undone by ROLLBACK).  C{record}:
        the tool and parameters that the table catalog records.
        """
        final = table_reference(table, db)
        progress = _progress(f"waiting for the session to load {source}", 3)

        def work(conn: Any) -> dict[str, Any]:
            progress.step(1, 3, f"reading the rows of {source} and inferring their types")
            staging = table_reference(f"{table}__loading_{secrets.token_hex(4)}", db)

            def create(definition: str) -> str:
                conn.execute(f"CREATE TABLE {staging} ({definition})")
                return staging

            try:
                loaded = loader.load(conn, create)
                progress.step(2, 3, f"putting the rows in {table}")
                put = _put_in(conn, staging, final, table, mode, loaded.rows, keys or [])
            except BaseException:
                _drop_quietly(conn, staging)
                raise
            notes = loaded.notes + put.pop("notes", [])
            result = {"table": table, "database": db, **put,
                      "columns": dict(zip(loaded.columns, loaded.types)), "source": source}
            if notes:
                result["notes"] = notes
            return result

        return self._call(self._recorded(work, record), writes={db}, parameter=None)

    def _recorded(self, work: Callable[[Any], dict[str, Any]],
                  record: tuple[str, dict[str, Any]] | None) -> Callable[[Any], Any]:
        """A load's C{work}, then the table catalog's record of it (if C{record})."""
        if record is None:
            return work
        from hyperdaemon.mcp.catalog import recorded

        return recorded(work, *record, self.client, session=self.session)

    # one-shot analysis

    def query_data(self, data: str, sql: str, format: str | None = None,
                   table_name: str | None = None,
                   schema: dict[str, str] | None = None) -> defer.Deferred[dict[str, Any]]:
        """C{sql} over inline data, seen as table C{data} (or C{table_name})."""
        loader = self._inline_loader(data, format, schema)
        return self._one_shot((table_name or "data",), _loaded_into(loader), sql)

    def query_file(self, path: str, sql: str, table_name: str | None = None,
                   schema: dict[str, str] | None = None,
                   json_extract_path: str | None = None) -> defer.Deferred[dict[str, Any]]:
        """
        C{sql} over a file, seen as table C{table_name}; without it, as the
        file's stem (C{orders} for orders.csv) and as C{data}.
        """
        source = _readable(path)
        fmt = file_format(source)
        names = (table_name,) if table_name else (source.stem, "data")
        if fmt in ("parquet", "arrow"):
            from hyperdaemon.mcp.loading import file_rows

            def fill(conn: Any, target: str, made: Callable[[], None]) -> list[str]:
                with file_rows(conn, source, fmt, self.session.ephemeral_db.parent,
                               self._stopping) as external:
                    conn.execute(f"CREATE TEMPORARY TABLE {target} AS SELECT * FROM {external}")
                made()
                return []

            return self._one_shot(names, fill, sql)
        loader = self._file_loader(source, fmt, schema, json_extract_path)
        return self._one_shot(names, _loaded_into(loader), sql)

    def _one_shot(self, names: tuple[str, ...],
                  fill: Callable[[Any, str, Callable[[], None]], list[str]],
                  sql: str) -> defer.Deferred[dict[str, Any]]:
        """
        C{sql} over rows that C{fill(conn, target, made)} puts in a new
        temporary table C{target} (calling C{made} once it exists), for this
        call only.  The table is made under those of C{names} that C{sql}
        refers to (L{one_shot_names}), always as C{pg_temp.name}, so that
        dropping it afterwards can never touch a table of a database; it is
        dropped however the call ends.
        """

        def work(conn: Any) -> dict[str, Any]:
            _require_read_only(conn, sql)
            chosen = [f"pg_temp.{quote_identifier(n)}" for n in one_shot_names(sql, names)]
            made: list[str] = []
            try:
                try:
                    notes = fill(conn, chosen[0], lambda: made.append(chosen[0]))
                    for other in chosen[1:]:
                        conn.execute(f"CREATE TEMPORARY TABLE {other} AS "
                                     f"SELECT * FROM {chosen[0]}")
                        made.append(other)
                except _duplicate_table() as e:
                    raise ToolFailure(
                        f"table_name: this session has a temporary table of that name already "
                        f"({e.diag.message_primary}), made with execute; pass another "
                        f"table_name") from None
                try:
                    result = _read_only_fetch(conn, sql)
                except _database_error() as e:
                    raise ToolFailure(_described(e, "sql")) from None
            finally:
                for target in made:
                    _drop_quietly(conn, target)
            if notes:
                result["notes"] = notes
            return result

        return self._call(work, writes=False, parameter=None)

    # databases

    def attach_database(self, alias: str, kind: str, path: str | None = None,
                        writable: bool | None = None,
                        on_missing: str | None = None) -> defer.Deferred[dict[str, Any]]:
        if not isinstance(alias, str) or not IDENTIFIER.match(alias) or alias in (
                EPHEMERAL_ALIAS, PERSISTENT_ALIAS):
            raise ToolFailure(f"alias: {alias!r} cannot be used; give a plain name (letters, "
                              f"digits and _, not starting with a digit) other than "
                              f"{EPHEMERAL_ALIAS!r} and {PERSISTENT_ALIAS!r}")
        if kind not in ATTACH_KINDS:
            raise ToolFailure(f"kind: {kind!r} is not a kind that attach_database knows; use "
                              f"'local_file' (a .hyper file at path; 'file' and 'hyper' mean "
                              f"the same)")
        if not path:
            raise ToolFailure("path: attach_database needs path, the .hyper file to attach")
        if on_missing not in (None, "error", "create"):
            raise ToolFailure(f"on_missing: {on_missing!r} is neither 'error' (the default) nor "
                              f"'create' (make a new empty database at path)")
        if writable and self.read_only:
            raise ToolFailure("attach_database with writable=true is refused: the server runs "
                              "with --read-only; leave writable unset to attach the file for "
                              "reading")
        if alias in self._attachments:
            raise ToolFailure(f"alias: {alias!r} is attached already (to "
                              f"{self._attachments[alias]}); detach it first with "
                              f"detach_database, or choose another alias")
        target = Path(os.path.abspath(os.path.expanduser(path)))
        create = on_missing == "create"
        if target.is_dir():
            raise ToolFailure(f"path: {target} is a folder; give the .hyper file to attach")
        if not target.exists() and not create:
            raise ToolFailure(f"path: {target} does not exist; check the path, or pass "
                              f"on_missing='create' to make a new empty database there")
        if create and self.read_only:
            raise ToolFailure("attach_database with on_missing='create' would create a file, "
                              "and the server runs with --read-only; attach an existing file")

        # A shared file: attached around calls, writes to it made durable.
        d = self.session.attach(alias, target, create=create)
        d.addCallback(lambda _: {"alias": alias, "path": str(target)})
        return d.addErrback(_explain, "path", "path must be a Hyper database file (.hyper) "
                                              "that this user can read and write")

    def detach_database(self, alias: str) -> defer.Deferred[dict[str, Any]]:
        if alias in (EPHEMERAL_ALIAS, PERSISTENT_ALIAS):
            raise ToolFailure(f"alias: {alias!r} belongs to the session and cannot be detached; "
                              f"detach_database detaches what attach_database attached")

        if alias not in self._attachments:
            attached = ", ".join(map(repr, sorted(self._attachments))) or "none"
            raise ToolFailure(f"alias: no database is attached as {alias!r} (attached with "
                              f"attach_database: {attached}); list_attached_databases shows "
                              f"every alias")
        watched = sorted(key for key, watch in self.watches.items() if watch.database == alias)
        if watched:
            raise ToolFailure(f"alias: a watch_directory of {', '.join(watched)} writes to "
                              f"{alias!r}; call unwatch_directory first, then detach it")
        d = self.session.detach(alias)
        d.addCallback(lambda _: {"detached": alias})
        return d.addErrback(_explain, "alias", "list_attached_databases shows every alias")

    def list_attached_databases(self) -> defer.Deferred[dict[str, Any]]:
        found = [{"alias": EPHEMERAL_ALIAS, "path": str(self.session.ephemeral_db),
                  "kind": "ephemeral"}]
        if self.session.persistent_db is not None:
            found.append({"alias": PERSISTENT_ALIAS, "path": str(self.session.persistent_db),
                          "kind": "persistent"})
        found += [{"alias": alias, "path": path, "kind": "attached"}
                  for alias, path in sorted(self._attachments.items())]
        return defer.succeed({"databases": found})

    # export

    def export(self, path: str, format: str, sql: str | None = None, table: str | None = None,
               overwrite: bool | None = None, format_options: Any = None,
               database: str | None = None) -> defer.Deferred[dict[str, Any]]:
        """
        Write a query's or a table's rows to a new file at C{path}, with
        C{format_options} (L{copy_options}).  The file is written beside
        C{path} and takes its place only once complete, so a failed export
        leaves what was there intact.  Never writes onto an attached
        database's file; replaces an existing file only with C{overwrite},
        and never under --read-only.
        """
        if (sql is None) == (table is None):
            raise ToolFailure("sql, table: give exactly one of them: sql for the rows of a "
                              "query, table for a whole table")
        fmt = format.lower() if isinstance(format, str) else format
        if fmt == "iceberg":  # a folder, written in place (L{hyperdaemon.mcp.catalog})
            from hyperdaemon.mcp.catalog import export_iceberg

            return export_iceberg(self, path, sql, table, overwrite, format_options, database)
        if fmt not in EXPORT_OPTIONS:
            raise ToolFailure(f"format: {format!r} is not one of csv, parquet, hyper, "
                              f"arrow_ipc (an Arrow IPC stream); give one of those")
        options = copy_options(fmt, format_options)
        db = self._database(database)
        select = sql if sql is not None else f"SELECT * FROM {table_reference(table, db)}"
        target = self._export_target(path, bool(overwrite))
        name = table.split(".")[-1] if table else "result"
        progress = _progress(f"waiting for the session to export to {target}", 2)

        def work(conn: Any) -> dict[str, Any]:
            progress.step(1, 2, f"writing the rows to a file beside {target}")
            with _search_path(conn, db):
                _require_read_only(conn, select)
                _export(conn, _one_statement(select), fmt, options, target, name,
                        bool(overwrite))
            return {"path": str(target), "format": fmt, "bytes": target.stat().st_size}

        return self._call(work, writes=False, parameter="sql" if sql is not None else "table")

    def _export_target(self, path: str, overwrite: bool) -> Path:
        """The absolute path to export to, if export may write there."""
        target = Path(os.path.abspath(os.path.expanduser(path)))
        if not target.parent.is_dir():
            raise ToolFailure(f"path: the folder {target.parent} does not exist; create it or "
                              f"choose another path")
        for alias, database in self._database_files():
            if _same_file(target, database):
                raise ToolFailure(f"path: {target} is the file of the attached database "
                                  f"{alias!r}, and export never writes onto a database in "
                                  f"use; choose another path")
        if not os.path.lexists(target):
            return target
        if target.is_dir():
            raise ToolFailure(f"path: {target} is a folder; give a file name in it")
        if self.read_only:
            raise ToolFailure(f"path: {target} exists, and with --read-only export never "
                              f"replaces a file; choose a new path")
        if not overwrite:
            raise ToolFailure(f"path: {target} exists, and export replaces a file only when "
                              f"asked: pass overwrite=true to replace it, or choose a new path")
        return target

    def _database_files(self) -> list[tuple[str, Path]]:
        """Every attached database's alias and file."""
        files = [(EPHEMERAL_ALIAS, Path(self.session.ephemeral_db))]
        if self.session.persistent_db is not None:
            files.append((PERSISTENT_ALIAS, Path(self.session.persistent_db)))
        files += [(alias, Path(path)) for alias, path in self._attachments.items()]
        return files

    # about

    def status(self) -> dict[str, Any]:
        credentials = self.session.credentials
        facts = {
            "version": __version__,
            "mode": self.mode,
            "read_only": self.read_only,
            "hyperd_endpoint": f"{credentials.host}:{credentials.port}" if credentials else None,
            "ephemeral_db": str(self.session.ephemeral_db),
            "persistent_db": str(self.session.persistent_db) if self.session.persistent_db
            else None,
        }
        facts.update(self._status_facts())
        return facts


def _progress(waiting: str, steps: int) -> Any:
    """
    The tool call's progress (L{hyperdaemon.mcp.progress}), told that the
    first of C{steps} steps is C{waiting}; call on the event loop's thread.
    """
    from hyperdaemon.mcp.progress import current_progress

    progress = current_progress()
    progress.step(0, steps, waiting)
    return progress


class _search_path:
    """Point unqualified names at C{db} for one piece of work, then back at C{local}."""

    def __init__(self, conn: Any, db: str) -> None:
        self._conn, self._db = conn, db

    def __enter__(self) -> None:
        if self._db != EPHEMERAL_ALIAS:
            self._conn.execute(f"SET schema_search_path = {quote_literal(self._db)}")

    def __exit__(self, *exc: object) -> None:
        if self._db != EPHEMERAL_ALIAS and not self._conn.closed:
            self._conn.execute(f"SET schema_search_path = {quote_literal(EPHEMERAL_ALIAS)}")


# -- errors a model reads ----------------------------------------------------------

def _database_error() -> type:
    import psycopg

    return psycopg.Error


def _duplicate_table() -> type:
    import psycopg

    return psycopg.errors.DuplicateTable


def _hint(error: Any) -> str:
    """What to try after a database error, by its kind."""
    import psycopg.errors as e

    hints = [
        (e.UndefinedTable, "list the tables with describe, and the databases with "
                           "list_attached_databases"),
        (e.InvalidSchemaName, "a name's first part must be an attached database (see "
                              "list_attached_databases), its second a schema such as public"),
        (e.UndefinedColumn, "describe the table to see its columns"),
        (e.UndefinedFunction, "check the function's name and its arguments' types (cast them "
                              "if needed); Hyper speaks PostgreSQL's dialect"),
        (e.DuplicateTable, "choose another name, or drop the table first"),
        (e.SyntaxError, "check the SQL's syntax; Hyper speaks PostgreSQL's dialect"),
        (e.FeatureNotSupported, "Hyper does not support this; write it another way"),
        (e.DataError, "a value does not fit its type, or cannot be computed: check the data "
                      "and the casts"),
    ]
    for kind, hint in hints:
        if isinstance(error, kind):
            return hint
    return "check the SQL; Hyper speaks PostgreSQL's dialect"


def _described(error: Any, parameter: str | None, hint: str | None = None) -> str:
    """A database error for a model: what went wrong with C{parameter}, and a hint."""
    text = str(error).strip()
    message = getattr(error.diag, "message_primary", None) or (
        text.splitlines()[0] if text else type(error).__name__)
    prefix = f"{parameter}: " if parameter else ""
    return f"{prefix}{message} (hint: {hint or _hint(error)})"


def _explain(failure: Any, parameter: str | None = "sql", hint: str | None = None) -> Any:
    """
    Turn a database error into a L{ToolFailure} that names C{parameter} (the
    input it came from), with the database's message and a hint; a session
    error keeps its own sentence.
    """
    import psycopg

    from hyperdaemon.client.session import SessionError

    error = failure.value
    if isinstance(error, ToolFailure):
        return failure
    if isinstance(error, SessionError):
        raise ToolFailure(str(error))
    if isinstance(error, psycopg.Error):
        raise ToolFailure(_described(error, parameter, hint))
    return failure


# -- execute: all or nothing -------------------------------------------------------
#
# Hyper undoes the changes of INSERT, UPDATE, DELETE, TRUNCATE and COPY ...
# FROM on ROLLBACK, but not DDL: a CREATE TABLE stays (empty), and DROP or
# ALTER stay done.  It also refuses a CREATE TABLE after a statement that
# changed rows in the same transaction ("mixing DDL and DML").  So a batch
# may hold CREATE TABLE statements first, then changes to rows; a table it
# created is dropped if it fails.  Any other statement runs only alone.

@attrs.frozen
class BatchPlan:
    """What L{plan_batch} found: the tables the batch creates, as references."""

    #: The table of each CREATE TABLE, in order, as the statement names it.
    creates: list[str] = attrs.field(factory=list)


def plan_batch(statements: list[Any]) -> BatchPlan:
    """
    Check that C{statements} can run all or nothing, and find the tables
    they create.  Pure.

    @raise ToolFailure: for an empty list or item, an item of several
        statements, a statement that Hyper cannot undo in a batch of more
        than one, or a CREATE TABLE after a change to rows.
    """
    if not statements:
        raise ToolFailure("sql: the list is empty; give at least one statement, e.g. "
                          "[\"INSERT INTO t VALUES (1)\"]")
    creates: list[str] = []
    changed_rows_at = 0
    for number, statement in enumerate(statements, 1):
        item = "sql" if len(statements) == 1 else f"sql item {number}"
        if not isinstance(statement, str) or statement_count(statement) == 0:
            raise ToolFailure(f"{item} holds no statement; give one SQL statement per item")
        count = statement_count(statement)
        if count > 1:
            raise ToolFailure(f"{item} holds {count} statements; give each statement as its "
                              f"own list item")
        role, detail = batch_role(statement)
        if role == "creates":
            if changed_rows_at:
                raise ToolFailure(
                    f"{item} (CREATE TABLE) comes after item {changed_rows_at}, which changes "
                    f"rows, and Hyper runs a transaction's CREATE TABLE statements only before "
                    f"its changes to rows; put the CREATE TABLE statements first")
            creates.append(detail)
        elif role == "changes":
            changed_rows_at = changed_rows_at or number
        elif role == "other" and len(statements) > 1:
            raise ToolFailure(
                f"{item} ({detail}) cannot be part of a batch: Hyper does not undo {detail} "
                f"when a later statement fails, so the batch could not be all or nothing; "
                f"run it as its own execute call, before or after the others")
    return BatchPlan(creates)


def batch_role(statement: str) -> tuple[str, Any]:
    """
    What C{statement} is to a batch: C{("creates", reference)} for CREATE
    TABLE (a temporary one as C{pg_temp.name}), C{("changes", None)} for a
    change to rows that
    ROLLBACK undoes, C{("reads", None)} for a query, C{("other", what)}
    for anything else (what: its keyword, to name it).  Pure.
    """
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    try:
        parsed = _parse(statement)
    except (SqlglotError, RecursionError):
        return "other", "a statement the SQL parser cannot read"
    if len(parsed) != 1:
        return "other", "a statement the SQL parser cannot read"
    node = parsed[0]
    if isinstance(node, exp.Create):
        kind = str(node.args.get("kind") or "").upper()
        target = node.this.this if isinstance(node.this, exp.Schema) else node.this
        if kind == "TABLE" and isinstance(target, exp.Table):
            reference = target.sql(dialect="postgres")
            if node.find(exp.TemporaryProperty) and not target.db:
                reference = f"pg_temp.{reference}"
            return "creates", reference
        return "other", f"CREATE {kind}".strip()
    if isinstance(node, (exp.Insert, exp.Update, exp.Delete, exp.TruncateTable)):
        return "changes", None
    if isinstance(node, exp.Copy) and node.args.get("kind"):
        return "changes", None  # COPY ... FROM
    if isinstance(node, exp.Copy):
        return "other", "COPY ... TO (it writes a file)"
    if isinstance(node, (exp.Query, exp.Values)):
        if node.find(exp.Into):
            return "other", "SELECT ... INTO"
        if any(isinstance(n, _write_types()) for n in node.walk()):
            return "changes", None
        return "reads", None
    if isinstance(node, exp.Command):
        return "other", node.name.upper()
    return "other", _write_name(node)


def _run_batch(conn: Any, statements: list[str], plan: BatchPlan) -> int:
    """
    Run a planned batch: the rows it changed, summed.  A batch of more than
    one statement runs in a transaction; a table it created is dropped if
    it fails.

    @raise ToolFailure: naming the item that failed and saying that nothing
        of the batch was kept (or which table could not be dropped).
    """
    import psycopg

    # Only a table that is not there yet is the batch's to drop.
    fresh = [reference for reference in plan.creates if not _table_exists(conn, reference)]
    affected, number = 0, 0
    try:
        with conn.transaction() if len(statements) > 1 else contextlib.nullcontext():
            for number, statement in enumerate(statements, 1):
                affected += max(conn.execute(statement).rowcount, 0)
    except psycopg.Error as e:
        left = [reference for reference in fresh if not _dropped(conn, reference)]
        item = "sql" if len(statements) == 1 else f"sql item {number} of {len(statements)}"
        kept = (f"; the table(s) {', '.join(left)} that it created could not be dropped: drop "
                f"them with execute" if left else
                "" if len(statements) == 1 else "; nothing of the batch was kept")
        raise ToolFailure(_described(e, item) + kept) from None
    return affected


def _table_exists(conn: Any, reference: str) -> bool:
    """Whether C{reference} names a table now (False too if its database is not there)."""
    import psycopg

    try:
        conn.execute(f"SELECT 1 FROM {reference} LIMIT 0")
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName,
            psycopg.errors.InvalidCatalogName):
        return False
    except psycopg.Error:
        return True  # never drop what we cannot tell is new
    return True


def _dropped(conn: Any, reference: str) -> bool:
    """Drop C{reference} if it exists; whether that worked."""
    import psycopg

    try:
        conn.execute(f"DROP TABLE IF EXISTS {reference}")
    except psycopg.Error:
        return False
    return True


# -- loading: modes, merge ---------------------------------------------------------

def _mode(mode: str | None, merge: bool = True) -> str:
    """The load mode C{mode} names (default replace); C{merge}: whether the tool takes it."""
    chosen = mode.lower() if isinstance(mode, str) else mode
    chosen = chosen or "replace"
    modes = ("replace", "append", "merge") if merge else ("replace", "append")
    if chosen == "merge" and not merge:
        raise ToolFailure("mode: 'merge' needs merge_key, which only load_file takes; write "
                          "the data to a file and use load_file, or use replace or append")
    if chosen not in modes:
        raise ToolFailure(f"mode: {mode!r} is not one of {', '.join(modes)}; give one of those "
                          f"(default replace)")
    return chosen


def merge_keys(mode: str, merge_key: Any) -> list[str]:
    """
    The columns of C{merge_key} (a name or a list of names), required with
    mode merge and refused otherwise.  Pure.
    """
    if mode != "merge":
        if merge_key not in (None, "", []):
            raise ToolFailure(f"merge_key is used only with mode='merge' (mode is {mode!r}); "
                              f"pass mode='merge' to update rows by key, or leave merge_key "
                              f"out")
        return []
    keys = [merge_key] if isinstance(merge_key, str) else merge_key
    if (not isinstance(keys, list) or not keys
            or not all(isinstance(k, str) and k for k in keys)):
        raise ToolFailure(f"merge_key: mode='merge' needs the column(s) that identify a row, "
                          f"as a name or a list of names (e.g. \"id\" or [\"day\", \"city\"]); "
                          f"got {merge_key!r}")
    return list(dict.fromkeys(keys))


def _put_in(conn: Any, staging: str, final: str, table: str, mode: str,
            rows: int | None = None, keys: list[str] = ()) -> dict[str, Any]:
    """
    Put the staging table's rows in C{final} as C{mode} says; what to tell
    about it (rows_loaded, mode, and for a merge the rows updated and
    inserted).
    """
    if rows is None:
        rows = conn.execute(f"SELECT count(*) FROM {staging}").fetchone()[0]
    result: dict[str, Any] = {"rows_loaded": rows, "mode": mode}
    exists = mode in ("append", "merge") and _exists(conn, final)
    if mode == "merge":
        result["merge_key"] = list(keys)
    if exists and mode == "merge":
        result.update(_merge_in(conn, staging, final, table, list(keys)))
        conn.execute(f"DROP TABLE {staging}")
    elif exists:
        result.update(_append_by_name(conn, staging, final, table))
        conn.execute(f"DROP TABLE {staging}")
    else:
        if mode == "merge":
            _columns_have(conn, staging, keys, "the file")
            result.update(rows_updated=0, rows_inserted=rows,
                          notes=[f"table {table!r} did not exist: it was made from these rows"])
        _rename_over(conn, staging, final, table.split(".")[-1])
    return result


def _rename_over(conn: Any, staging: str, final: str, name: str) -> None:
    """
    Rename C{staging} to C{name} (C{final}), replacing what is there.  The
    old table is renamed aside first and dropped only once the new one is
    in place, so that no failure in between loses it (Hyper does not undo
    DDL on ROLLBACK); if the rename fails, the old table is put back.
    """
    aside = None
    if _exists(conn, final):
        aside_name = f"{name}__replaced_{secrets.token_hex(4)}"
        aside = _beside(final, aside_name)
        conn.execute(f"ALTER TABLE {final} RENAME TO {quote_identifier(aside_name)}")
    try:
        conn.execute(f"ALTER TABLE {staging} RENAME TO {quote_identifier(name)}")
    except BaseException:
        if aside is not None:
            conn.execute(f"ALTER TABLE {aside} RENAME TO {quote_identifier(name)}")
        raise
    if aside is not None:
        conn.execute(f"DROP TABLE {aside}")


def _beside(reference: str, name: str) -> str:
    """The reference of table C{name} in the same schema as C{reference}."""
    import sqlglot

    table = sqlglot.parse_one(reference, into=sqlglot.exp.Table, read="postgres")
    table.set("this", sqlglot.exp.to_identifier(name, quoted=True))
    return table.sql(dialect="postgres")


def _columns(conn: Any, reference: str) -> list[str]:
    return [c.name for c in conn.execute(f"SELECT * FROM {reference} LIMIT 0").description]


def _append_by_name(conn: Any, staging: str, final: str, table: str) -> dict[str, Any]:
    """
    Append the staged rows to C{final}, column by name (never by position:
    a file whose columns come in another order must not land in the wrong
    ones).  Table columns the data lacks get NULL, and a note says so.

    @raise ToolFailure: if the data has a column the table lacks.
    """
    incoming = _columns(conn, staging)
    existing = _columns(conn, final)
    extra = [c for c in incoming if c not in existing]
    if extra:
        raise ToolFailure(
            f"mode: the data has columns that table {table!r} lacks "
            f"({', '.join(map(repr, extra))}), so it cannot be appended; add them first with "
            f"execute (ALTER TABLE ... ADD COLUMN), or load with mode='replace'")
    names = ", ".join(quote_identifier(c) for c in incoming)
    conn.execute(f"INSERT INTO {final} ({names}) SELECT {names} FROM {staging}")
    missing = [c for c in existing if c not in incoming]
    if missing:
        return {"notes": [f"the data has no column {', '.join(map(repr, missing))}: "
                          f"the appended rows have NULL there"]}
    return {}


def _columns_have(conn: Any, reference: str, keys: list[str], what: str) -> list[str]:
    """The columns of C{reference}; raises L{ToolFailure} if a key is not one of them."""
    columns = _columns(conn, reference)
    missing = [k for k in keys if k not in columns]
    if missing:
        raise ToolFailure(f"merge_key: {what} has no column {', '.join(map(repr, missing))}; "
                          f"its columns are {', '.join(map(repr, columns))}")
    return columns


def _merge_in(conn: Any, staging: str, final: str, table: str,
              keys: list[str]) -> dict[str, int]:
    """
    Update the rows of C{final} whose C{keys} match a staged row, insert the
    other staged rows: both in one transaction, so that a failure changes
    nothing.  The counts.

    @raise ToolFailure: for a key or a column that the table lacks, or a
        key that several staged rows share.
    """
    incoming = _columns_have(conn, staging, keys, "the file")
    existing = _columns_have(conn, final, keys, f"table {table!r}")
    extra = [c for c in incoming if c not in existing]
    if extra:
        raise ToolFailure(
            f"path: the file has columns that table {table!r} lacks "
            f"({', '.join(map(repr, extra))}); add them first with execute (ALTER TABLE ... ADD "
            f"COLUMN), or load with mode='replace'")
    quoted = [quote_identifier(k) for k in keys]
    doubled = conn.execute(
        f"SELECT {', '.join(quoted)} FROM {staging} GROUP BY {', '.join(quoted)} "
        f"HAVING count(*) > 1 LIMIT 1").fetchone()
    if doubled is not None:
        shown = ", ".join(f"{k}={json_value(v)!r}" for k, v in zip(keys, doubled))
        raise ToolFailure(f"merge_key: several rows of the file have the same key ({shown}), "
                          f"so which one to keep is unclear; give columns that identify one "
                          f"row, or load with mode='append'")
    match = " AND ".join(f"t.{q} = s.{q}" for q in quoted)
    updated_columns = [quote_identifier(c) for c in incoming if c not in keys]
    names = ", ".join(quote_identifier(c) for c in incoming)
    values = ", ".join(f"s.{quote_identifier(c)}" for c in incoming)
    with conn.transaction():
        if updated_columns:
            updated = conn.execute(
                f"UPDATE {final} AS t SET {', '.join(f'{c} = s.{c}' for c in updated_columns)} "
                f"FROM {staging} AS s WHERE {match}").rowcount
        else:
            updated = conn.execute(
                f"SELECT count(*) FROM {final} AS t WHERE EXISTS (SELECT 1 FROM {staging} AS s "
                f"WHERE {match})").fetchone()[0]
        inserted = conn.execute(
            f"INSERT INTO {final} ({names}) SELECT {values} FROM {staging} AS s "
            f"WHERE NOT EXISTS (SELECT 1 FROM {final} AS t WHERE {match})"
        ).rowcount
    return {"rows_updated": updated, "rows_inserted": inserted}


def _drop_quietly(conn: Any, table: str) -> None:
    """Drop C{table} if it is there, on the way out of a failure (which it must not hide)."""
    import psycopg

    with contextlib.suppress(psycopg.Error):
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def _exists(conn: Any, reference: str) -> bool:
    import psycopg

    try:
        conn.execute(f"SELECT 1 FROM {reference} LIMIT 0")
    except psycopg.errors.UndefinedTable:
        return False
    return True


# -- one-shot tables ---------------------------------------------------------------

def _loaded_into(loader: Any) -> Callable[[Any, str, Callable[[], None]], list[str]]:
    """A one-shot C{fill} that loads with C{loader}: the notes of the load."""

    def fill(conn: Any, target: str, made: Callable[[], None]) -> list[str]:
        def create(definition: str) -> str:
            conn.execute(f"CREATE TEMPORARY TABLE {target} ({definition})")
            made()
            return target

        return list(loader.load(conn, create).notes)

    return fill


def one_shot_names(sql: str, names: tuple[str, ...]) -> list[str]:
    """
    The names under which a one-shot table must exist for C{sql}: those of
    C{names} that C{sql} refers to, as hyperd looks them up (an unquoted
    name in lower case).  If C{sql} names none of them (or cannot be
    parsed), each of C{names} as an unquoted reference would read it.  Pure.
    """
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    try:
        statements = _parse(sql)
    except (SqlglotError, RecursionError):
        statements = []
    found: dict[str, None] = {}
    for statement in statements:
        for table in statement.find_all(exp.Table):
            identifier = table.this
            if table.args.get("db") or table.args.get("catalog") or not isinstance(
                    identifier, exp.Identifier):
                continue
            looked_up = identifier.this if identifier.quoted else identifier.this.lower()
            if any(looked_up == (n if identifier.quoted else n.lower()) for n in names):
                found[looked_up] = None
    if found:
        return list(found)
    return list(dict.fromkeys(n.lower() if IDENTIFIER.match(n) else n for n in names))


def _table_to_read(conn: Any, table: str, db: str) -> str:
    """
    The reference to C{table} in C{db}, once known to name a table.

    @raise ToolFailure: for a table that is not there, listing those that are.
    """
    import psycopg

    if not isinstance(table, str) or not table.strip():
        raise ToolFailure("table: give a table's name, e.g. 'sales' or "
                          "'persistent.public.sales'")
    reference = table_reference(table, db)
    problem = check_read_only(f"SELECT * FROM {reference}").problem
    if problem is not None:
        raise ToolFailure(f"table: {table!r} is not a table name; give a plain name such as "
                          f"'sales', or one in full such as 'persistent.public.sales'")
    try:
        conn.execute(f"SELECT 1 FROM {reference} LIMIT 0")
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        names = _table_names(conn, db)
        listed = ", ".join(map(repr, names)) if names else "none"
        raise ToolFailure(f"table: there is no table {table!r} in database {db!r} (its tables: "
                          f"{listed}); check the name, or pass database (list_attached_databases "
                          f"shows them)") from None
    return reference


def _table_names(conn: Any, db: str) -> list[str]:
    """The tables of C{db}'s public schema, by name (the table catalog's left out)."""
    from hyperdaemon.mcp.catalog import CATALOG_TABLE

    prefix = quote_identifier(db)
    rows = conn.execute(
        f"SELECT c.relname FROM {prefix}.pg_catalog.pg_class c "
        f"JOIN {prefix}.pg_catalog.pg_namespace n ON c.relnamespace = n.oid "
        f"WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY c.relname"
    ).fetchall()
    return [name for (name,) in rows if name != CATALOG_TABLE]


# -- export options ----------------------------------------------------------------

#: The options export takes per format, for errors that list them.
EXPORT_OPTIONS = {"csv": ("header", "delimiter", "null", "quote"),
                  "parquet": ("codec", "rows_per_row_group"), "arrow_ipc": (), "hyper": ()}
#: The Parquet codecs hyperd writes.
PARQUET_CODECS = ("snappy", "zstd", "gzip", "uncompressed")


def copy_options(fmt: str, options: Any) -> str:
    """
    The options of hyperd's C{COPY ... TO} for C{fmt} and export's
    C{format_options} (an object, or its JSON text).  Pure.

    @raise ToolFailure: for an option the format does not have, or a value
        it cannot take.
    """
    import json

    if isinstance(options, str):
        try:
            options = json.loads(options) if options.strip() else None
        except ValueError:
            raise ToolFailure("format_options: not a JSON object; give an object such as "
                              "{\"delimiter\": \";\"}") from None
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ToolFailure(f"format_options: give an object of options (e.g. "
                          f"{{\"delimiter\": \";\"}}), not {options!r}")
    known = EXPORT_OPTIONS[fmt]
    unknown = [name for name in options if name not in known]
    if unknown:
        takes = (f"it takes {', '.join(known)}" if known else "it takes none")
        raise ToolFailure(f"format_options: format {fmt!r} has no option "
                          f"{', '.join(map(repr, unknown))}; {takes}")
    if fmt == "hyper":
        return ""
    if fmt == "arrow_ipc":
        return "FORMAT arrowstream"  # an Arrow IPC stream, as upstream writes it
    clauses = [f"FORMAT {fmt}"]
    if fmt == "csv":
        header = options.get("header", True)
        if not isinstance(header, bool):
            raise ToolFailure(f"format_options: header must be true or false, not {header!r}")
        clauses.append(f"HEADER {'true' if header else 'false'}")
        for name in ("delimiter", "quote"):
            if name in options:
                value = options[name]
                if not (isinstance(value, str) and len(value) == 1 and value.isascii()
                        and value not in "\r\n"):
                    raise ToolFailure(f"format_options: {name} must be one character (ASCII, "
                                      f"not a line break), not {value!r}")
                clauses.append(f"{name.upper()} {quote_literal(value)}")
        if "null" in options:
            if not isinstance(options["null"], str):
                raise ToolFailure(f"format_options: null must be the text written for a "
                                  f"missing value, not {options['null']!r}")
            clauses.append(f"NULL {quote_literal(options['null'])}")
    else:
        if "codec" in options:
            codec = options["codec"]
            if not isinstance(codec, str) or codec.lower() not in PARQUET_CODECS:
                raise ToolFailure(f"format_options: codec {codec!r} is not one that Hyper "
                                  f"writes; use one of {', '.join(PARQUET_CODECS)}")
            clauses.append(f"CODEC {quote_literal(codec.lower())}")
        if "rows_per_row_group" in options:
            size = options["rows_per_row_group"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ToolFailure(f"format_options: rows_per_row_group must be a whole number "
                                  f"above 0, not {size!r}")
            clauses.append(f"ROWS_PER_ROW_GROUP {size}")
    return ", ".join(clauses)


def _tables(conn: Any, db: str) -> list[dict[str, Any]]:
    prefix = quote_identifier(db)
    tables = []
    for name in _table_names(conn, db):
        cursor = conn.execute(f"SELECT * FROM {prefix}.public.{quote_identifier(name)} LIMIT 0")
        tables.append({"table": name,
                       "columns": [{"name": c.name, "type": _type_name(conn, c.type_code)}
                                   for c in cursor.description]})
    return tables


def _type_name(conn: Any, oid: int) -> str:
    info = conn.adapters.types.get(oid)
    return info.name if info is not None else f"oid {oid}"


def _fetch(conn: Any, sql: str) -> dict[str, Any]:
    cursor = _result_cursor(conn)
    cursor.execute(sql)
    columns = [c.name for c in cursor.description or []]
    # Only the rows shown are converted; rowcount counts the rest.
    rows = cursor.fetchmany(ROW_CAP) if cursor.description else []
    total = max(cursor.rowcount, len(rows)) if cursor.description else len(rows)
    return shape_result(columns, rows, total)


def _exact_floats(conn: Any) -> None:
    """
    Have hyperd write float8 and real in their shortest exact form (it
    writes 15 digits by default: 0.1 + 0.2 would read 0.3).  Set before each
    read (execute may have changed it), outside its transaction, which
    PostgreSQL's rollback would undo it with.
    """
    conn.execute("SET extra_float_digits = 1")


def _require_read_only(conn: Any, sql: str) -> None:
    """
    Refuse C{sql} (L{ToolFailure}) unless it is one read-only statement.
    SQL the parser cannot read is handed to Hyper to parse, never to run, so
    that a syntax error is reported as Hyper's own.
    """
    check = check_read_only(sql)
    if check.problem is None:
        return
    if not check.parsed:
        error = _hyper_parse_error(conn, sql)
        if error:
            raise ToolFailure(f"sql: {error} (hint: check the SQL's syntax; Hyper speaks "
                              f"PostgreSQL's dialect)")
    raise ToolFailure(f"sql: {check.problem}")


def _hyper_parse_error(conn: Any, sql: str) -> str | None:
    """
    Hyper's syntax error for C{sql}, found by preparing it (which runs
    nothing), or None if Hyper finds none.
    """
    from psycopg import pq

    result = conn.pgconn.prepare(b"", sql.encode("utf-8"))
    if result.status != pq.ExecStatus.FATAL_ERROR:
        return None
    if result.error_field(pq.DiagnosticField.SQLSTATE) != SYNTAX_ERROR:
        return None  # a table not there yet, say: what the parser said is the answer
    message = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"syntax error"
    return message.decode("utf-8", "replace")


def _read_only_fetch(conn: Any, sql: str) -> dict[str, Any]:
    """
    L{_fetch} in a transaction that is always rolled back: a change to data
    that got past the read-only check is undone.  (Hyper accepts BEGIN READ
    ONLY but does not enforce it; it does undo DML on ROLLBACK, though not
    DDL, which the check refuses.)
    """
    _exact_floats(conn)
    with conn.transaction(force_rollback=True):
        return _fetch(conn, sql)


def _one_statement(sql: str) -> str:
    """C{sql} without the semicolons that may end it, to be nested in other SQL."""
    from sqlglot.errors import SqlglotError
    from sqlglot.tokens import TokenType

    try:
        tokens = _tokens(sql)
    except SqlglotError:
        return sql
    while tokens and tokens[-1].token_type == TokenType.SEMICOLON:
        sql = sql[:tokens.pop().start]
    return sql


def _same_file(path: Path, other: Path) -> bool:
    """
    Whether two paths name one file: the same file on disk (through hard or
    symbolic links too) or, where either does not exist yet, the same path
    once symbolic links are resolved.
    """
    try:
        return os.path.samefile(path, other)
    except OSError:
        return path.resolve() == other.resolve()


def _export(conn: Any, select: str, fmt: str, options: str, target: Path, name: str,
            replace: bool) -> None:
    """
    Write C{select}'s rows to C{target} as C{fmt}, with C{options} (those of
    COPY, from L{copy_options}): hyperd writes them into a
    private folder (0700) made beside C{target}, and the finished file then
    takes C{target}'s place in one step: C{os.replace} when C{replace}, else
    a hard link, which never replaces a file that appeared meanwhile.  The
    folder goes in every case; a failure leaves C{target} as it was.  The
    user's SQL runs only inside transactions that are rolled back.
    """
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".export",
                                   dir=target.parent))
    try:
        written = folder / f"export.{fmt}"
        if fmt == "hyper":
            _export_hyper(conn, select, written, name)
        else:
            _exact_floats(conn)
            with conn.transaction(force_rollback=True):
                conn.execute(f"COPY ({select}\n) TO {quote_literal(str(written))} "
                             f"WITH ({options})")
        _put_in_place(written, target, replace)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _export_hyper(conn: Any, select: str, written: Path, name: str) -> None:
    """
    A new .hyper database at C{written} with C{select}'s rows as table
    C{name}.  The rows go through an Arrow stream beside it: C{CREATE TABLE
    AS} would run the user's SQL outside a rolled-back transaction.
    """
    alias = quote_identifier(f"export_{secrets.token_hex(4)}")
    stream = quote_literal(str(written.with_suffix(".arrows")))
    result = f"{alias}.public.{quote_identifier(name)}"
    conn.execute(f"CREATE DATABASE {quote_identifier(str(written))}")
    conn.execute(f"ATTACH DATABASE {quote_identifier(str(written))} AS {alias}")
    try:
        with conn.transaction(force_rollback=True):
            # The table's definition outlives the rollback (Hyper does not
            # undo DDL); its rows, like any other change, do not.
            conn.execute(f"CREATE TABLE {result} AS SELECT * FROM ({select}\n) AS q LIMIT 0")
            conn.execute(f"COPY ({select}\n) TO {stream} WITH (FORMAT arrowstream)")
        conn.execute(f"COPY {result} FROM {stream} WITH (FORMAT arrowstream)")
    finally:
        conn.execute(f"DETACH DATABASE {alias}")


def _put_in_place(written: Path, target: Path, replace: bool) -> None:
    if replace:
        with contextlib.suppress(OSError):
            # A replaced file keeps its permissions, as if written in place.
            old = os.lstat(target)
            if not os.path.islink(target):
                os.chmod(written, old.st_mode & 0o7777)
        os.replace(written, target)
        return
    try:
        os.link(written, target)
    except FileExistsError:
        raise ToolFailure(f"path: {target} was created while exporting; choose a new path, or "
                          f"pass overwrite=true to replace it") from None
    except OSError:
        # A file system without hard links: look, then rename.
        if os.path.lexists(target):
            raise ToolFailure(f"path: {target} was created while exporting; choose a new "
                              f"path") from None
        os.rename(written, target)


def _readable(path: str) -> Path:
    source = Path(os.path.abspath(os.path.expanduser(path)))
    if not source.is_file():
        what = "a folder" if source.is_dir() else "not a readable file"
        raise ToolFailure(f"path: {source} is {what}; check the path (give the file's absolute "
                          f"path)")
    if not os.access(source, os.R_OK):
        raise ToolFailure(f"path: {source} cannot be read; check its permissions")
    return source
