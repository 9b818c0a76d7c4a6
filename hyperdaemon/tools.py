"""
The MCP tools: what each one does to the session's databases.

Each tool is a method of L{Tools} that returns a Deferred (the MCP server
awaits it).  The database work itself is a plain function of a psycopg
connection, run on the session's worker thread by L{Session.call}.  Errors a
model can cause become L{ToolFailure} with the database's message and a
hint; the session and the daemon are unharmed.  The pure helpers (SQL
classification, type inference, result shaping) are tested on their own.
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

from . import __version__
from .session import EPHEMERAL_ALIAS, PERSISTENT_ALIAS, Session

#: Rows a result shows at most; the rest is counted and noted.
ROW_CAP = 200
#: Characters of one cell shown at most.
CELL_CAP = 2000

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


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    return text if len(text) <= CELL_CAP else text[:CELL_CAP] + "..."


def shape_result(columns: list[str], rows: list[tuple[Any, ...]], total: int | None = None,
                 cap: int = ROW_CAP) -> dict[str, Any]:
    """A compact result for a model: columns, at most C{cap} rows, a note if cut."""
    total = len(rows) if total is None else total
    shown = [[_cell(v) for v in row] for row in rows[:cap]]
    result: dict[str, Any] = {"columns": columns, "rows": shown, "row_count": total}
    if total > len(shown):
        result["truncated"] = True
        result["note"] = (f"showing {len(shown)} of {total} rows; add LIMIT/OFFSET or an "
                          f"aggregate to see the rest")
    return result


def file_format(path: Path, fmt: str | None = None) -> str:
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    fmt = {"ndjson": "jsonl", "pq": "parquet"}.get(fmt, fmt)
    if fmt not in ("csv", "json", "jsonl", "parquet"):
        raise ToolFailure(
            f"cannot tell the format of {path.name}: name it .csv, .json, .jsonl or .parquet"
        )
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

    # helpers

    @property
    def _attachments(self) -> dict[str, str]:
        """Databases attached with attach_database: alias -> path."""
        return {alias: str(path) for alias, path in self.session.attached_files.items()
                if alias != PERSISTENT_ALIAS}

    def _database(self, database: str | None, persist: bool | None = None) -> str:
        if persist:
            database = PERSISTENT_ALIAS
        database = database or EPHEMERAL_ALIAS
        if database == PERSISTENT_ALIAS and self.session.persistent_db is None:
            raise ToolFailure("this session has no persistent database (--ephemeral-only)")
        return database

    def _refuse_writes(self, tool: str) -> None:
        if self.read_only:
            raise ToolFailure(f"{tool} writes, and the server runs with --read-only; "
                              f"use query, query_data or query_file")

    def _call(self, work: Callable[[Any], Any], retry: bool = False,
              writes: bool | set[str] = True) -> defer.Deferred[Any]:
        """
        Run C{work} in the session; C{writes}: which databases it may change
        (those are on disk before the result is returned).
        """
        d = self.session.call(work, retry, writes)
        return d.addErrback(_explain)

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
        self._refuse_writes("execute")
        statements = [sql] if isinstance(sql, str) else list(sql)
        if not statements:
            raise ToolFailure("execute needs at least one statement")
        for statement in statements:
            if statement_count(statement) != 1:
                raise ToolFailure("give each statement as its own list item")
        db = self._database(database)

        def work(conn: Any) -> dict[str, Any]:
            affected = 0
            with _search_path(conn, db), conn.transaction():
                for statement in statements:
                    affected += max(conn.execute(statement).rowcount, 0)
            return {"statements": len(statements), "rows_affected": affected,
                    "atomic": len(statements) > 1}

        return self._call(work)

    # describing

    def describe(self, table: str | None = None,
                 database: str | None = None) -> defer.Deferred[dict[str, Any]]:
        db = self._database(database)

        def work(conn: Any) -> dict[str, Any]:
            if table is None:
                return {"database": db, "tables": _tables(conn, db)}
            cursor = conn.execute(f"SELECT * FROM {table_reference(table, db)} LIMIT 0")
            count = conn.execute(f"SELECT count(*) FROM {table_reference(table, db)}").fetchone()[0]
            return {"database": db, "table": table, "row_count": count,
                    "columns": [{"name": c.name, "type": _type_name(conn, c.type_code)}
                                for c in cursor.description]}

        return self._call(work, retry=True, writes=False)

    def sample(self, table: str, n: int | None = None,
               database: str | None = None) -> defer.Deferred[dict[str, Any]]:
        db = self._database(database)
        limit = max(1, min(int(n or 10), ROW_CAP))
        return self.query(f"SELECT * FROM {table_reference(table, db)} LIMIT {limit}")

    # loading

    def load_data(self, table: str, data: str, format: str | None = None,
                  mode: str | None = None, schema: dict[str, str] | None = None,
                  database: str | None = None,
                  persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        """Load inline CSV or JSON into C{table} (see L{hyperdaemon.loading})."""
        self._refuse_writes("load_data")
        db = self._database(database, persist)
        return self._load(table, db, self._inline_loader(data, format, schema), mode,
                          source="inline data")

    def load_file(self, table: str, path: str, mode: str | None = None,
                  schema: dict[str, str] | None = None, json_extract_path: str | None = None,
                  merge_key: Any = None, database: str | None = None,
                  persist: bool | None = None,
                  format: str | None = None) -> defer.Deferred[dict[str, Any]]:
        self._refuse_writes("load_file")
        if merge_key:
            raise ToolFailure("merge_key is not supported yet; use mode append or replace")
        db = self._database(database, persist)
        source = _readable(path)
        fmt = file_format(source, format)
        if fmt == "parquet":
            return self._load_parquet(table, db, source, mode)
        loader = self._file_loader(source, fmt, schema, json_extract_path)
        return self._load(table, db, loader, mode, source=str(source))

    def stop(self) -> None:
        """
        The server is shutting down: a load under way ends at its next step,
        without finishing.  (Closing the session cancels the statement that
        hyperd runs meanwhile.)
        """
        self._stopping.set()

    def _inline_loader(self, data: str, fmt: str | None,
                       schema: dict[str, str] | None) -> Any:
        """A L{hyperdaemon.loading.Loader} of inline data; raises L{ToolFailure} for bad data."""
        from .loading import Loader, inline_source

        return Loader(inline_source(data, fmt), schema, self.session.ephemeral_db.parent,
                      self._stopping)

    def _file_loader(self, source: Path, fmt: str, schema: dict[str, str] | None,
                     extract: str | None) -> Any:
        """A L{hyperdaemon.loading.Loader} of a CSV or JSON file."""
        from .loading import Loader, file_source

        return Loader(file_source(source, fmt, extract), schema,
                      self.session.ephemeral_db.parent, self._stopping)

    def _load_parquet(self, table: str, db: str, source: Path,
                      mode: str | None) -> defer.Deferred[dict[str, Any]]:
        mode = _mode(mode)
        final = table_reference(table, db)

        def work(conn: Any) -> dict[str, Any]:
            staging = table_reference(f"{table}__loading_{secrets.token_hex(4)}", db)
            external = f"external({quote_literal(str(source))})"
            try:
                conn.execute(f"CREATE TABLE {staging} AS SELECT * FROM {external}")
                rows = _swap_in(conn, staging, final, table, mode)
            except BaseException:
                conn.execute(f"DROP TABLE IF EXISTS {staging}")
                raise
            return {"table": table, "database": db, "rows_loaded": rows, "mode": mode,
                    "source": str(source)}

        return self._call(work, writes={db})

    def _load(self, table: str, db: str, loader: Any, mode: str | None,
              source: str) -> defer.Deferred[dict[str, Any]]:
        """
        Load into a staging table, then swap it in: a failed load leaves no
        partial table (Hyper's DDL is not undone by ROLLBACK).
        """
        mode = _mode(mode)
        final = table_reference(table, db)

        def work(conn: Any) -> dict[str, Any]:
            staging = table_reference(f"{table}__loading_{secrets.token_hex(4)}", db)

            def create(definition: str) -> str:
                conn.execute(f"CREATE TABLE {staging} ({definition})")
                return staging

            try:
                loaded = loader.load(conn, create)
                rows = _swap_in(conn, staging, final, table, mode, loaded.rows)
            except BaseException:
                _drop_quietly(conn, staging)
                raise
            result = {"table": table, "database": db, "rows_loaded": rows, "mode": mode,
                      "columns": dict(zip(loaded.columns, loaded.types)), "source": source}
            if loaded.notes:
                result["notes"] = loaded.notes
            return result

        return self._call(work, writes={db})

    # one-shot analysis

    def query_data(self, data: str, sql: str, format: str | None = None,
                   table_name: str | None = None,
                   schema: dict[str, str] | None = None) -> defer.Deferred[dict[str, Any]]:
        return self._one_shot(table_name or "data", self._inline_loader(data, format, schema),
                              sql)

    def query_file(self, path: str, sql: str, table_name: str | None = None,
                   schema: dict[str, str] | None = None,
                   json_extract_path: str | None = None) -> defer.Deferred[dict[str, Any]]:
        source = _readable(path)
        fmt = file_format(source)
        name = table_name or "data"
        if fmt == "parquet":
            return self._one_shot_select(
                name, f"SELECT * FROM external({quote_literal(str(source))})", sql)
        return self._one_shot(name, self._file_loader(source, fmt, schema, json_extract_path),
                              sql)

    def _one_shot(self, name: str, loader: Any, sql: str) -> defer.Deferred[dict[str, Any]]:
        """C{sql} over a loader's rows, as temporary table C{name} for this call only."""

        def work(conn: Any) -> dict[str, Any]:
            _require_read_only(conn, sql)
            target = quote_identifier(name)
            made = []

            def create(definition: str) -> str:
                conn.execute(f"CREATE TEMPORARY TABLE {target} ({definition})")
                made.append(target)
                return target

            try:
                loaded = loader.load(conn, create)
                result = _read_only_fetch(conn, sql)
            finally:
                if made:
                    _drop_quietly(conn, target)
            if loaded.notes:
                result["notes"] = loaded.notes
            return result

        return self._call(work, writes=False)

    def _one_shot_select(self, name: str, select: str, sql: str) -> defer.Deferred[dict[str, Any]]:
        def work(conn: Any) -> dict[str, Any]:
            _require_read_only(conn, sql)
            target = quote_identifier(name)
            conn.execute(f"CREATE TEMPORARY TABLE {target} AS {select}")
            try:
                return _read_only_fetch(conn, sql)
            finally:
                conn.execute(f"DROP TABLE IF EXISTS {target}")

        return self._call(work, writes=False)

    # databases

    def attach_database(self, alias: str, kind: str, path: str | None = None,
                        writable: bool | None = None,
                        on_missing: str | None = None) -> defer.Deferred[dict[str, Any]]:
        if not IDENTIFIER.match(alias) or alias in (EPHEMERAL_ALIAS, PERSISTENT_ALIAS):
            raise ToolFailure(f"alias {alias!r} must be a plain name other than "
                              f"{EPHEMERAL_ALIAS!r} and {PERSISTENT_ALIAS!r}")
        if kind not in ("file", "hyper"):
            raise ToolFailure("kind must be 'file' (a .hyper file at path)")
        if not path:
            raise ToolFailure("attach_database needs path, the .hyper file")
        if writable and self.read_only:
            raise ToolFailure("attach_database with writable=true is refused: the server runs "
                              "with --read-only; leave writable unset to attach the file for "
                              "reading")
        target = Path(os.path.abspath(os.path.expanduser(path)))
        create = (on_missing or "error") == "create"
        if not target.exists() and not create:
            raise ToolFailure(f"{target} does not exist; pass on_missing='create' to make it")
        if create and self.read_only:
            raise ToolFailure("attach_database with on_missing='create' would create a file, "
                              "and the server runs with --read-only; attach an existing file")

        # A shared file: attached around calls, writes to it made durable.
        d = self.session.attach(alias, target, create=create)
        d.addCallback(lambda _: {"alias": alias, "path": str(target)})
        return d.addErrback(_explain)

    def detach_database(self, alias: str) -> defer.Deferred[dict[str, Any]]:
        if alias in (EPHEMERAL_ALIAS, PERSISTENT_ALIAS):
            raise ToolFailure(f"{alias!r} belongs to the session and cannot be detached")

        if alias not in self._attachments:
            attached = ", ".join(sorted(self._attachments)) or "none"
            raise ToolFailure(f"alias: no database is attached as {alias!r} (attached with "
                              f"attach_database: {attached}); list_attached_databases shows "
                              f"every alias")
        d = self.session.detach(alias)
        d.addCallback(lambda _: {"detached": alias})
        return d.addErrback(_explain)

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
        Write a query's or a table's rows to a new file at C{path}.  The file
        is written beside C{path} and takes its place only once complete, so
        a failed export leaves what was there intact.  Never writes onto an
        attached database's file; replaces an existing file only with
        C{overwrite}, and never under --read-only.
        """
        if (sql is None) == (table is None):
            raise ToolFailure("export takes either sql or table")
        db = self._database(database)
        select = sql if sql is not None else f"SELECT * FROM {table_reference(table, db)}"
        fmt = format.lower()
        if fmt not in ("csv", "parquet", "hyper"):
            raise ToolFailure("format must be csv, parquet or hyper")
        target = self._export_target(path, bool(overwrite))
        name = table.split(".")[-1] if table else "result"

        def work(conn: Any) -> dict[str, Any]:
            with _search_path(conn, db):
                _require_read_only(conn, select)
                _export(conn, _one_statement(select), fmt, target, name, bool(overwrite))
            return {"path": str(target), "format": fmt, "bytes": target.stat().st_size}

        return self._call(work, writes=False)

    def _export_target(self, path: str, overwrite: bool) -> Path:
        """The absolute path to export to, if export may write there."""
        target = Path(os.path.abspath(os.path.expanduser(path)))
        if not target.parent.is_dir():
            raise ToolFailure(f"path: the folder {target.parent} does not exist; create it or "
                              f"choose another path")
        for alias, database in self._database_files():
            if _same_file(target, database):
                raise ToolFailure(f"path {target} is the file of the attached database "
                                  f"{alias!r}, and export never writes onto a database in "
                                  f"use; choose another path")
        if not os.path.lexists(target):
            return target
        if target.is_dir():
            raise ToolFailure(f"path {target} is a folder; give a file name in it")
        if self.read_only:
            raise ToolFailure(f"path {target} exists, and with --read-only export never "
                              f"replaces a file; choose a new path")
        if not overwrite:
            raise ToolFailure(f"path {target} exists, and export replaces a file only when "
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


def _explain(failure: Any) -> Any:
    """Turn a database error into a L{ToolFailure} with the message and a hint."""
    import psycopg

    error = failure.value
    if isinstance(error, ToolFailure):
        return failure
    if isinstance(error, psycopg.Error):
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = "check the SQL (Hyper speaks PostgreSQL's dialect)"
        if isinstance(error, psycopg.errors.UndefinedTable):
            hint = "list the tables with describe"
        elif "does not exist" in message and "database" in message:
            hint = "list the databases with list_attached_databases"
        raise ToolFailure(f"{message} (hint: {hint})")
    return failure


def _mode(mode: str | None) -> str:
    mode = (mode or "replace").lower()
    if mode not in ("replace", "append"):
        raise ToolFailure("mode must be replace or append")
    return mode


def _swap_in(conn: Any, staging: str, final: str, table: str, mode: str,
             rows: int | None = None) -> int:
    """Put the staging table's C{rows} (counted if not given) in C{final}; their number."""
    if rows is None:
        rows = conn.execute(f"SELECT count(*) FROM {staging}").fetchone()[0]
    if mode == "append" and _exists(conn, final):
        conn.execute(f"INSERT INTO {final} SELECT * FROM {staging}")
        conn.execute(f"DROP TABLE {staging}")
    else:
        conn.execute(f"DROP TABLE IF EXISTS {final}")
        conn.execute(f"ALTER TABLE {staging} RENAME TO {quote_identifier(table.split('.')[-1])}")
    return rows


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


def _tables(conn: Any, db: str) -> list[dict[str, Any]]:
    prefix = quote_identifier(db)
    rows = conn.execute(
        f"SELECT c.relname FROM {prefix}.pg_catalog.pg_class c "
        f"JOIN {prefix}.pg_catalog.pg_namespace n ON c.relnamespace = n.oid "
        f"WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY c.relname"
    ).fetchall()
    tables = []
    for (name,) in rows:
        cursor = conn.execute(f"SELECT * FROM {prefix}.public.{quote_identifier(name)} LIMIT 0")
        tables.append({"table": name,
                       "columns": [{"name": c.name, "type": _type_name(conn, c.type_code)}
                                   for c in cursor.description]})
    return tables


def _type_name(conn: Any, oid: int) -> str:
    info = conn.adapters.types.get(oid)
    return info.name if info is not None else f"oid {oid}"


def _fetch(conn: Any, sql: str) -> dict[str, Any]:
    cursor = conn.execute(sql)
    columns = [c.name for c in cursor.description or []]
    rows = cursor.fetchmany(ROW_CAP + 1) if cursor.description else []
    total = len(rows)
    if total > ROW_CAP:
        total += len(cursor.fetchall())
    return shape_result(columns, rows, total)


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
            raise ToolFailure(f"{error} (hint: check the SQL; Hyper speaks PostgreSQL's dialect)")
    raise ToolFailure(check.problem)


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


def _export(conn: Any, select: str, fmt: str, target: Path, name: str, replace: bool) -> None:
    """
    Write C{select}'s rows to C{target} as C{fmt}: hyperd writes them into a
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
            options = "FORMAT csv, HEADER" if fmt == "csv" else "FORMAT parquet"
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
        raise ToolFailure(f"path {target} was created while exporting; choose a new path, or "
                          f"pass overwrite=true to replace it") from None
    except OSError:
        # A file system without hard links: look, then rename.
        if os.path.lexists(target):
            raise ToolFailure(f"path {target} was created while exporting; choose a new "
                              f"path") from None
        os.rename(written, target)


def _readable(path: str) -> Path:
    source = Path(os.path.abspath(os.path.expanduser(path)))
    if not source.is_file():
        raise ToolFailure(f"{source} is not a readable file; check the path")
    if not os.access(source, os.R_OK):
        raise ToolFailure(f"{source} cannot be read; check its permissions")
    return source
