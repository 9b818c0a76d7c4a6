"""
Tools over data files: C{inspect_file} and C{load_files}.

C{inspect_file} is a dry run of C{load_file}: the columns and the types a
load would give them, found as the load finds them (for CSV and JSON, the
first rows' guess checked over every row by C{hyperd}, L{Loader.inferred};
Parquet and Arrow IPC carry their types), then per column the nulls, the
least and greatest values and a few samples.  C{hyperd} reads the file where
it is (C{external()}), so that memory stays bounded however large it is;
nothing is loaded and no table is made.  (JSON is staged as CSV in the
session's folder on the way, and the staging files removed, as a load does.)

C{load_files} runs several C{load_file}s at once, each on a short-lived
connection of its own (L{Lane}).  The whole batch is one call of the
session (L{Session.call} with the target database among its writes): while
it runs, the session holds its shared files as for any call, so the lanes
may attach the target too; every lane detaches it and closes before the
call ends, and the session then writes the database out as after any write
(L{hyperdaemon.client.sharedfiles}): a table that C{load_files} reports
loaded into a shared database is on disk before the tool returns.  Each
file's outcome, success or failure, is its own entry; one failure does not
stop the others.
"""

# No "from __future__ import annotations": the SDK reads the tools'
# parameter types from their annotations, which must be real types.
import concurrent.futures
import threading
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from hyperdaemon.mcp.tools import ToolFailure, Tools, file_format, json_value, quote_identifier

#: Sample values per column (and sample rows) that inspect_file shows unless
#: told; at most.
SAMPLE_DEFAULT = 5
SAMPLE_MAX = 50
#: Rows read from the file's start to find each column's sample values.
SAMPLE_SCAN = 1000
#: Characters of a text value shown at most in min, max and samples.
VALUE_CAP = 200
#: Files that load_files loads at once unless told; at most.
CONCURRENCY_DEFAULT = 8
CONCURRENCY_MAX = 16
#: Seconds between two looks, while lanes work, at whether the server stops.
STOP_POLL = 0.1

#: SQL names of the types hyperd reports, where psycopg names them otherwise.
_SQL_TYPES = {"int2": "SMALLINT", "int4": "INTEGER", "int8": "BIGINT", "float4": "REAL",
              "float8": "DOUBLE PRECISION", "bool": "BOOLEAN", "text": "TEXT", "date": "DATE",
              "timestamp": "TIMESTAMP", "timestamptz": "TIMESTAMPTZ", "time": "TIME",
              "interval": "INTERVAL", "bytea": "BYTEA", "varchar": "VARCHAR",
              "bpchar": "CHAR", "json": "JSON"}
#: Types whose values min and max order (the others get none).
_ORDERED = {"SMALLINT", "INTEGER", "BIGINT", "REAL", "DOUBLE PRECISION", "TEXT", "DATE",
            "TIMESTAMP", "TIMESTAMPTZ", "TIME", "VARCHAR", "CHAR", "INTERVAL"}


# -- inspect_file ------------------------------------------------------------------

def sample_size(sample_rows: Any) -> int:
    """
    How many sample values (and rows) to show: C{sample_rows}, default
    L{SAMPLE_DEFAULT}, at most L{SAMPLE_MAX}.  Pure.

    @raise ToolFailure: for anything but a whole number from 0.
    """
    if sample_rows is None:
        return SAMPLE_DEFAULT
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 0:
        raise ToolFailure(f"sample_rows: {sample_rows!r} is not a number of rows; give a whole "
                          f"number from 0 to {SAMPLE_MAX} (default {SAMPLE_DEFAULT})")
    return min(sample_rows, SAMPLE_MAX)


def sql_type(name: str, precision: int | None = None, scale: int | None = None) -> str:
    """The SQL name of a type as psycopg names it (C{int8} is BIGINT).  Pure."""
    if name == "numeric":
        return f"NUMERIC({precision},{scale})" if precision is not None else "NUMERIC"
    if name.startswith("_"):
        return sql_type(name[1:]) + "[]"
    return _SQL_TYPES.get(name, name.upper())


def _shown(value: Any) -> Any:
    """A value as JSON, with long text cut to L{VALUE_CAP} characters."""
    value = json_value(value)
    if isinstance(value, str) and len(value) > VALUE_CAP:
        return value[:VALUE_CAP] + "..."
    return value


def _stats_sql(columns: list[str], types: list[str], relation: str) -> str:
    """One pass over C{relation}: the row count, then per column nulls, least, greatest."""
    parts = ["count(*)"]
    for column, kind in zip(columns, types):
        q = quote_identifier(column)
        base = kind.split("(")[0].strip().upper()
        parts.append(f"count(*) - count({q})")
        if base == "BOOLEAN":
            parts += [f"bool_and({q})", f"bool_or({q})"]
        elif base in _ORDERED or base == "NUMERIC":
            parts += [f"min({q})", f"max({q})"]
        else:
            parts += ["NULL", "NULL"]
    return f"SELECT {', '.join(parts)} FROM {relation}"


def inspect_relation(conn: Any, columns: list[str], types: list[str], relation: str,
                     samples: int) -> dict[str, Any]:
    """
    What inspect_file tells of C{relation} (SQL after FROM, whose columns
    are C{columns} of C{types}): its rows, and per column the nulls, the
    least and greatest values and up to C{samples} distinct sample values
    from the first L{SAMPLE_SCAN} rows; the first C{samples} rows.
    """
    from hyperdaemon.mcp.tools import _result_cursor  # reads every value hyperd sends

    conn.execute("SET extra_float_digits = 1")  # floats in their shortest exact form
    cursor = _result_cursor(conn)
    found = cursor.execute(_stats_sql(columns, types, relation)).fetchone()
    first = cursor.execute(f"SELECT * FROM {relation} LIMIT {SAMPLE_SCAN}").fetchall()
    described = []
    for index, (column, kind) in enumerate(zip(columns, types)):
        nulls, least, greatest = found[1 + 3 * index:4 + 3 * index]
        values: list[Any] = []
        for row in first:
            value = _shown(row[index])
            if value is not None and value not in values:
                values.append(value)
                if len(values) == samples:
                    break
        entry = {"name": column, "type": kind, "null_count": nulls, "sample_values": values}
        if least is not None:
            entry.update(min=_shown(least), max=_shown(greatest))
        described.append(entry)
    rows = [{column: _shown(value) for column, value in zip(columns, row)}
            for row in first[:samples]]
    return {"row_count": found[0], "columns": described, "sample_rows": rows}


def inspect_work(session: Any, stopping: threading.Event, path: str, sample_rows: Any,
                 json_extract_path: Any) -> Any:
    """The work of inspect_file on a connection, once its arguments are checked."""
    from hyperdaemon.mcp.loading import Loader, file_rows, file_source
    from hyperdaemon.mcp.tools import _readable

    samples = sample_size(sample_rows)
    source = _readable(path)
    fmt = file_format(source)
    if json_extract_path is not None and fmt != "json":
        raise ToolFailure(f"json_extract_path: {source.name} is not a .json file, and only a "
                          f"JSON document has a path to its records; leave json_extract_path "
                          f"out")
    folder = session.ephemeral_db.parent

    def work(conn: Any) -> dict[str, Any]:
        if fmt in ("parquet", "arrow"):
            with file_rows(conn, source, fmt, folder, stopping) as external:
                relation = f"{external} AS data"
                described = conn.execute(f"SELECT * FROM {relation} LIMIT 0").description
                columns = [c.name for c in described]
                types = [_described_type(conn, c) for c in described]
                result = inspect_relation(conn, columns, types, relation, samples)
            notes: list[str] = []
        else:
            import psycopg

            loader = Loader(file_source(source, fmt, json_extract_path), None, folder,
                            stopping)
            # First, as a load does, the first rows' types, which one pass checks
            # while it counts; only if a later value does not fit, every row's.
            for guess in (True, False):
                with loader.inferred(conn, guess=guess) as inferred:
                    columns, types, notes = inferred.columns, inferred.types, inferred.notes
                    relation = f"({inferred.select()}) AS data"
                    try:
                        result = inspect_relation(conn, columns, types, relation, samples)
                        break
                    except psycopg.DataError:
                        if inferred.guarded is None:
                            raise
        result = {"path": str(source), "file_format": fmt,
                  "file_size_bytes": source.stat().st_size, **result,
                  "schema": dict(zip(columns, types)), "loaded": False}
        if notes:
            result["notes"] = notes
        return result

    return work


def _described_type(conn: Any, column: Any) -> str:
    info = conn.adapters.types.get(column.type_code)
    name = info.name if info is not None else "text"
    return sql_type(name, column.precision, column.scale)


def inspect(tools: Tools, path: str, sample_rows: Any = None,
            json_extract_path: Any = None) -> defer.Deferred[dict[str, Any]]:
    """inspect_file's result: read-only, run on the session's worker."""
    from hyperdaemon.mcp.tools import _explain

    # Read here, in the request: an MCP host's tools are the session's only there.
    session = tools.session
    work = inspect_work(session, tools.stopping, path, sample_rows, json_extract_path)
    d = session.call(work, retry=True, writes=False)
    return d.addErrback(_explain, "path", "check that the file is complete and in the "
                                          "format its name says")


# -- load_files --------------------------------------------------------------------

def concurrency_for(concurrency: Any, files: int) -> int:
    """
    How many files load_files loads at once: C{concurrency}, by default
    C{min(files, CONCURRENCY_DEFAULT)}, never more than the files nor
    L{CONCURRENCY_MAX}.  Pure.

    @raise ToolFailure: for anything but a whole number from 1.
    """
    if concurrency is None:
        return max(1, min(files, CONCURRENCY_DEFAULT))
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ToolFailure(f"concurrency: {concurrency!r} is not a number of files to load at "
                          f"once; give a whole number from 1 to {CONCURRENCY_MAX} (default: "
                          f"the number of files, at most {CONCURRENCY_DEFAULT})")
    return max(1, min(concurrency, CONCURRENCY_MAX, files))


def same_table_groups(files: list[dict[str, Any]]) -> list[list[int]]:
    """
    The indexes of C{files}, grouped by the table each loads into, in the
    order given: load_files runs the groups at once and each group's loads
    one after the other, since hyperd may crash when several connections
    change one table at once (and a replace then an append must stay in
    that order).  Names that Hyper may read alike (C{Sales}, C{sales})
    share a group.  Pure.
    """
    groups: dict[str, list[int]] = {}
    for index, entry in enumerate(files):
        groups.setdefault(str(entry.get("table")).strip().lower(), []).append(index)
    return list(groups.values())


@attrs.define(eq=False)
class Lane:
    """
    A stand-in for the session in one load of load_files: the same
    databases under the same aliases, on a connection of its own.  Its
    C{call} runs the work at once on the calling thread; the batch it is part
    of is one call of the session, which makes the writes durable.
    """

    session: Any
    connection: Any
    #: The alias of the shared file it attached, if any (L{close} detaches it).
    shared: str | None = None

    @property
    def ephemeral_db(self) -> Path:
        return self.session.ephemeral_db

    @property
    def persistent_db(self) -> Path | None:
        return self.session.persistent_db

    @property
    def attached_files(self) -> dict[str, Path]:
        return self.session.attached_files

    @property
    def credentials(self) -> Any:
        return self.session.credentials

    @classmethod
    def open(cls, session: Any, database: str) -> "Lane":
        """
        A new connection to the session's hyperd with its ephemeral database
        attached as C{local} (the search path) and C{database} under its
        alias, attached as the session attaches it: one attach at a time
        per file (L{SharedFile.attaching}).  Runs on a worker thread, within
        a call of the session, which holds the shared files meanwhile.
        """
        from hyperdaemon.client.session import EPHEMERAL_ALIAS, connect_hyperd
        from hyperdaemon.client.sharedfiles import LockFile
        from hyperdaemon.mcp.catalog import catalog_lock

        connection = connect_hyperd(session.credentials)
        try:
            connection.execute(f"ATTACH DATABASE {quote_identifier(str(session.ephemeral_db))} "
                               f"AS {EPHEMERAL_ALIAS}")
            connection.execute(f"SET schema_search_path = '{EPHEMERAL_ALIAS}'")
            path = session.attached_files.get(database)
            if path is not None:
                # The file's attach lock, which catalog writes take too.
                attaching = LockFile(catalog_lock(session, database))
                try:
                    attaching.lock(exclusive=True)
                    connection.execute(f"ATTACH DATABASE {quote_identifier(str(path))} AS "
                                       f"{quote_identifier(database)}")
                finally:
                    attaching.close()
        except BaseException:
            connection.close()
            raise
        return cls(session, connection, database if path is not None else None)

    def call(self, work: Any, retry: bool = False, writes: Any = True) -> defer.Deferred[Any]:
        try:
            return defer.succeed(work(self.connection))
        except BaseException:
            return defer.fail()

    def close(self) -> str | None:
        """
        Detach the shared file, then close the connection.  The detach is
        waited for: a connection's close lets hyperd drop its databases
        later, and the session's own detach must be the last one, which
        writes the file out (L{hyperdaemon.client.sharedfiles}).

        @return: why this lane's changes to the shared file cannot be
            told written, if its detach failed (hyperd went away, or the
            load was cancelled); C{None} once detached.
        """
        problem = None
        try:
            if self.shared is not None:
                self.connection.execute(f"DETACH DATABASE {quote_identifier(self.shared)}")
        except Exception as e:
            problem = (f"its connection could not detach {self.shared} ({type(e).__name__}: "
                       f"{e}), so the load cannot be told written to disk; check the table "
                       f"and load the file again if it is missing or short")
        finally:
            try:
                self.connection.close()
            except Exception:
                pass
        return problem


class LaneTools(Tools):
    """
    The tools over a L{Lane}, for the session's client (C{client}, which
    the table catalog records), stopping when the session's tools stop
    (C{stopping}).
    """

    def __init__(self, lane: Lane, mode: str, stopping: threading.Event,
                 client: str | None) -> None:
        super().__init__(lane, read_only=False, mode=mode)
        self._stopping = stopping
        self.client = client


def _settled(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (a lane's); its failure, raised."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def load_all(tools: Tools, files: list[dict[str, Any]], concurrency: Any = None,
               database: str | None = None,
               persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
    """
    Load each of C{files} (load_file's C{table}, C{path} and options) into
    C{database}, several at once; each file's result or error in its own
    entry, in the order given.
    """
    from hyperdaemon.mcp.tools import _explain

    tools._refuse_writes("load_files")
    if not isinstance(files, list) or not files:
        raise ToolFailure("files: the list is empty; give one object per file, e.g. "
                          "[{\"table\": \"sales\", \"path\": \"/data/sales.csv\"}]")
    db = tools._database(database, persist)
    width = concurrency_for(concurrency, len(files))
    # Read here, in the request: an MCP host's tools are the session's only there.
    session, mode, stopping = tools.session, tools.mode, tools.stopping
    client = getattr(tools, "client", None)
    lanes: set[Lane] = set()
    guard = threading.Lock()

    def one(entry: dict[str, Any]) -> dict[str, Any]:
        shown = {"table": entry.get("table"), "path": entry.get("path")}
        lane = None
        problem = None
        try:
            if stopping.is_set():
                raise ToolFailure("the load was stopped: the server is shutting down")
            lane = Lane.open(session, db)
            with guard:
                lanes.add(lane)
            d = LaneTools(lane, mode, stopping, client).load_file(**entry, database=db)
            d.addErrback(_explain, None)
            outcome = {"path": entry.get("path"), **_settled(d)}
        except ToolFailure as e:
            outcome = {**shown, "error": str(e)}
        except Exception as e:  # one file's trouble is that entry's, never the batch's
            outcome = {**shown, "error": f"{type(e).__name__}: {e}"}
        finally:
            if lane is not None:
                with guard:
                    lanes.discard(lane)
                problem = lane.close()
        return entry_result(outcome, problem, shown)

    def in_turn(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [one(dict(entry)) for entry in entries]

    def work(conn: Any) -> dict[str, Any]:
        groups = same_table_groups(files)
        with concurrent.futures.ThreadPoolExecutor(
                width, thread_name_prefix="hyperdaemon-load") as pool:
            futures = [pool.submit(in_turn, [files[i] for i in group]) for group in groups]
            cancelled = False
            while not all(f.done() for f in futures):
                concurrent.futures.wait(futures, timeout=STOP_POLL)
                if stopping.is_set() and not cancelled:
                    cancelled = True
                    with guard:
                        for lane in lanes:
                            _cancel(lane.connection)
            results: list[dict[str, Any]] = [{}] * len(files)
            for group, future in zip(groups, futures):
                for index, outcome in zip(group, future.result()):
                    results[index] = outcome
        failed = sum(1 for r in results if "error" in r)
        return {"results": results, "database": db,
                "summary": {"total": len(results), "succeeded": len(results) - failed,
                            "failed": failed, "concurrency": min(width, len(groups))}}

    return session.call(work, writes={db}).addErrback(_explain, None)


def entry_result(outcome: dict[str, Any], problem: str | None,
                 shown: dict[str, Any]) -> dict[str, Any]:
    """
    A load_files entry's result: C{outcome}, unless its lane could not
    detach the file (L{Lane.close}'s C{problem}), in which case a load that
    went well is an error all the same: it is not known to be on disk.
    """
    if problem is None or "error" in outcome:
        return outcome
    return {**shown, "error": f"the file was loaded, but {problem}"}


def _cancel(connection: Any) -> None:
    try:
        connection.cancel_safe(timeout=5.0)
    except Exception:
        pass


# -- the tools ----------------------------------------------------------------------

PATH_TO_INSPECT = ("The file to inspect, by absolute path: .csv (with a header line), .json "
                   "(an array of objects), .jsonl or .ndjson (JSON lines), .parquet, or Arrow "
                   "IPC (.arrow, .feather, .ipc). The extension tells the format.")
SAMPLE_ROWS = (f"How many sample values per column, and sample rows, to show: a whole number "
               f"from 0 to {SAMPLE_MAX}. Default {SAMPLE_DEFAULT}.")
INSPECT_EXTRACT = ("Where the records are inside a JSON document, as a dot-separated path "
                   "of keys, with numbers indexing arrays: `data.items`, `results.0.rows`. "
                   "Only for .json files. Default: the document itself is the array of "
                   "records.")
FILES = ("The files to load, one object per file: `table` (the table to make or add to) "
         "and `path` (the file, by absolute path) are required; `mode`, `schema`, "
         "`json_extract_path` and `merge_key` are optional and mean what they mean for "
         "load_file.")
CONCURRENCY = (f"How many files to load at once, each on its own connection: a whole "
               f"number from 1 to {CONCURRENCY_MAX}. Default: the number of files, at most "
               f"{CONCURRENCY_DEFAULT}.")


def register(kit: Any) -> None:
    from typing import Annotated

    from mcp.types import CallToolResult
    from pydantic import BaseModel, ConfigDict, Field

    from hyperdaemon.mcp import server

    tools, Arg = kit.tools, kit.arg

    class InspectedColumn(kit.Result):
        name: str
        type: str = Field(description="The SQL type a load would give the column.")
        null_count: int = Field(description="Rows where the column is null.")
        min: Any = Field(None, description="The least value (absent for types without an "
                                           "order, and for a column of nulls only).")
        max: Any = Field(None, description="The greatest value.")
        sample_values: list[Any] = Field(
            description="Distinct values from the first rows, nulls left out.")

    class Inspected(kit.Result):
        """What loading the file would make, found without loading it."""

        path: str
        file_format: str = Field(description="csv, json, jsonl, parquet or arrow.")
        file_size_bytes: int
        row_count: int = Field(description="The rows a load would read.")
        columns: list[InspectedColumn]
        schema_: dict[str, str] = Field(
            alias="schema", description="Each column's type, as load_file's schema takes it.")
        sample_rows: list[dict[str, Any]] = Field(description="The first rows, as objects.")
        notes: list[str] | None = Field(
            None, description="Columns whose later rows changed the type the first ones "
                              "suggested.")
        loaded: bool = Field(description="Always false: nothing was loaded.")

    class FileToLoad(BaseModel):
        """One file of load_files."""

        model_config = ConfigDict(extra="forbid")

        table: str = Field(description=server.TABLE_TO_WRITE)
        path: str = Field(description=server.FILE_PATH)
        mode: str | None = Field(None, description=server.FILE_LOAD_MODE)
        schema_: dict[str, str] | None = Field(None, alias="schema", description=server.SCHEMA)
        json_extract_path: str | None = Field(None, description=server.JSON_EXTRACT_PATH)
        merge_key: str | list[str] | None = Field(
            None, description="The column, or list of columns, that identifies a row when "
                              "mode=merge: required with merge, unused otherwise. Default: none.")

    class FileLoaded(kit.Result):
        table: str | None = None
        path: str | None = None
        rows_loaded: int | None = Field(None, description="Rows read into the table.")
        error: str | None = Field(None, description="Why this file was not loaded (the "
                                                    "table is as it was).")

    class Summary(kit.Result):
        total: int
        succeeded: int
        failed: int
        concurrency: int = Field(description="How many files were loaded at once, at "
                                              "most (loads into one table run in turn).")

    class FilesLoaded(kit.Result):
        """Each file's outcome, in the order given."""

        results: list[FileLoaded] = Field(
            description="Per file: load_file's result, or `error`.")
        database: str
        summary: Summary

    @kit.tool("Inspect a file", kit.reads)
    async def inspect_file(
        path: Arg(str, PATH_TO_INSPECT),
        sample_rows: Arg(int | None, SAMPLE_ROWS) = None,
        json_extract_path: Arg(str | None, INSPECT_EXTRACT) = None,
    ) -> Annotated[CallToolResult, Inspected]:
        """
        Show what load_file would make of a CSV, JSON, Parquet or Arrow IPC
        file without loading it: each column's type (checked over every
        row, as the load does), its nulls, least and greatest values and a
        few samples, and the row count. Use it to choose a schema override.
        """
        return await kit.call(inspect, tools=tools, path=path, sample_rows=sample_rows,
                              json_extract_path=json_extract_path)

    @kit.tool("Load several files", kit.replaces)
    async def load_files(
        files: Arg(list[FileToLoad], FILES),
        concurrency: Arg(int | None, CONCURRENCY) = None,
        database: Arg(str | None, server.TARGET_DATABASE) = None,
        persist: Arg(bool | None, server.PERSIST) = None,
    ) -> Annotated[CallToolResult, FilesLoaded]:
        """
        Load several files into tables at once, as load_file would load each
        one, each on its own connection (files for one table load in turn,
        in the order given). A file that fails is reported in its own entry
        and leaves its table as it was; the others still load.
        """
        entries = [f.model_dump(by_alias=True, exclude_none=True) for f in files]
        return await kit.call(load_all, tools=tools, files=entries,
                              concurrency=concurrency, database=database, persist=persist)

