"""
The table catalog, and the tools that fill tables from elsewhere.

Every load (load_data, load_file, copy_query, load_iceberg) records where
its table came from in a table named L{CATALOG_TABLE} of that table's own
database: the tool, its parameters (never inline data), when, and the
table's row count afterwards.  Prose about the table (its source, purpose,
license, notes, download URL) is the user's, set with set_table_metadata,
and survives reloads.  The table and its columns are upstream's
(C{_table_catalog}), so that a .hyper file reads the same under either
server; unlike upstream, each database keeps the entries of its own tables
(a scratch table's entry goes with the scratch database).

The catalog is kept out of the way: describe's table list and the "its
tables" of error messages leave it out, and describe shows each entry next
to its table instead.  An entry is only ever shown for a table that exists,
and each recording drops the entries of tables that are gone (dropped with
execute, say), so that a new table of an old name never inherits old prose.
A table named explicitly (sample, query) is still reachable.

copy_query copies a read-only query's rows (across every attached database,
and databases attached for the call only) into a table; load_iceberg reads
an Apache Iceberg table with hyperd's own reader (C{external(..., format =>
'iceberg')}).  Both load into a staging table and swap it in, as the other
loads do: a failure leaves the target as it was.  Writes are durable before
the tool returns, and refused under --read-only.  export's format C{iceberg}
(L{export_iceberg}) writes such a table, with hyperd's own writer.
"""

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Callable

from twisted.internet import defer

from hyperdaemon.mcp.tools import (
    ATTACH_KINDS,
    IDENTIFIER,
    ToolFailure,
    _described,
    _drop_quietly,
    _exists,
    _mode,
    _one_statement,
    _parse,
    _put_in,
    _require_read_only,
    _table_to_read,
    _type_name,
    json_value,
    quote_identifier,
    quote_literal,
    table_reference,
)

#: The catalog's table, in each database (upstream's name).
CATALOG_TABLE = "_table_catalog"
#: Its columns, in upstream's order.
CATALOG_COLUMNS = (
    ("table_name", "TEXT NOT NULL"), ("source_url", "TEXT"), ("source_description", "TEXT"),
    ("purpose", "TEXT"), ("load_tool", "TEXT"), ("load_params", "TEXT"), ("license", "TEXT"),
    ("loaded_at", "TIMESTAMP NOT NULL"), ("last_refreshed_at", "TIMESTAMP NOT NULL"),
    ("row_count", "BIGINT"), ("notes", "TEXT"), ("created_by", "TEXT"),
    ("last_modified_by", "TEXT"), ("data_url", "TEXT"),
)
#: The fields that set_table_metadata edits; the others are the loads'.
PROSE_FIELDS = ("source_url", "source_description", "purpose", "license", "notes", "data_url")
#: What copy_query does with a table already there.
COPY_MODES = ("create", "append", "replace")
#: The statements that copy_query copies rows from.
COPY_KINDS = "SELECT, WITH ... SELECT or VALUES"
#: Iceberg's folder of metadata inside a table's root, and its files' suffix.
ICEBERG_METADATA = "metadata"
METADATA_SUFFIX = ".metadata.json"
#: The current UTC time as hyperd's TIMESTAMP (the catalog's columns are
#: upstream's, without a time zone).
NOW_UTC = "CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP)"
#: How often a catalog write that conflicts with another session's is
#: tried, and the pause before the next try (times the attempt's number).
CONFLICT_ATTEMPTS = 6
CONFLICT_PAUSE = 0.05
#: Held by each catalog write of this process (load_files loads at once).
_writing = threading.Lock()


# -- the catalog: functions of a connection, run on the session's worker --------

def catalog_reference(db: str) -> str:
    return f"{quote_identifier(db)}.public.{CATALOG_TABLE}"


def table_place(table: str, db: str) -> tuple[str, str]:
    """
    The database and the name under which hyperd keeps C{table} as a load
    names it (L{table_reference}): a plain name in C{db}, lower-cased unless
    it had to be quoted; a name in full in its own database.  Pure.
    """
    import sqlglot
    from sqlglot.errors import SqlglotError

    if "." not in table:
        return db, table.lower() if IDENTIFIER.match(table) else table
    try:
        parsed = sqlglot.parse_one(table, into=sqlglot.exp.Table, read="postgres")
    except SqlglotError:
        return db, table
    identifier = parsed.this
    name = identifier.this if identifier.quoted else identifier.this.lower()
    return (parsed.catalog or db), name


def _ensure_catalog(conn: Any, db: str) -> None:
    columns = ", ".join(f"{name} {kind}" for name, kind in CATALOG_COLUMNS)
    conn.execute(f"CREATE TABLE IF NOT EXISTS {catalog_reference(db)} ({columns})")


def _stale_entries(conn: Any, db: str) -> list[str]:
    """The names in C{db}'s catalog of tables no longer there (dropped with execute, say)."""
    prefix = quote_identifier(db)
    # Two plain reads: a DELETE whose condition reads pg_class crashes
    # hyperd when other connections write the catalog at the same time.
    tables = {name for (name,) in conn.execute(
        f"SELECT c.relname FROM {prefix}.pg_catalog.pg_class c "
        f"JOIN {prefix}.pg_catalog.pg_namespace n ON c.relnamespace = n.oid "
        f"WHERE n.nspname = 'public' AND c.relkind = 'r'")}
    named = [name for (name,) in conn.execute(f"SELECT table_name FROM {catalog_reference(db)}")]
    return [name for name in named if name not in tables]


def catalog_lock(session: Any, db: str) -> Path | None:
    """
    The lock file that sessions hold around a write to C{db}'s catalog: the
    attach lock of its file (L{hyperdaemon.client.sharedfiles.lock_paths});
    None for the session's own scratch database, which no other process
    writes.
    """
    from hyperdaemon.client.session import LOCKS_NAME
    from hyperdaemon.client.sharedfiles import lock_paths

    path = session.attached_files.get(db) if session is not None else None
    if path is None:
        return None
    # The state directory's lock folder, where a read-only folder's locks go.
    fallback = Path(session.ephemeral_db).parent.parent.parent / LOCKS_NAME
    return lock_paths(Path(path), fallback)[2]


def _one_writer_at_a_time(write: Callable[[], Any], lock: Path | None) -> Any:
    """
    C{write()}, the writes to a catalog: one writer at a time, in this
    process (load_files loads on several connections) and across sessions
    (C{lock}), since concurrent UPDATEs of one table from several
    connections can crash hyperd (SIGSEGV, seen with 0.0.26963); and again
    after a conflict with a writer that does not take the lock (hyperd
    refuses concurrent writes to one table with a serialization failure).
    """
    import psycopg

    from hyperdaemon.client.sharedfiles import LockFile

    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        held = LockFile(lock) if lock is not None else None
        try:
            with _writing:
                if held is not None:
                    held.lock(exclusive=True)
                return write()
        except psycopg.errors.SerializationFailure:
            if attempt == CONFLICT_ATTEMPTS:
                raise
        finally:
            if held is not None:
                held.close()
        time.sleep(CONFLICT_PAUSE * attempt)


def record_load(conn: Any, db: str, name: str, tool: str, params: dict[str, Any],
                by: str | None, lock: Path | None = None) -> None:
    """
    Record that C{tool} (with C{params}) has just loaded table C{name} of
    C{db}: the entry is made, or its load fields are brought up to date (its
    prose and first load time stay); entries of tables no longer there go.
    """
    catalog = catalog_reference(db)
    table = f"{quote_identifier(db)}.public.{quote_identifier(name)}"
    shown = json.dumps({k: v for k, v in params.items() if v is not None}, sort_keys=True,
                       default=str)

    def write() -> None:
        _ensure_catalog(conn, db)
        rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        stale = _stale_entries(conn, db)
        with conn.transaction():
            if stale:
                conn.execute(f"DELETE FROM {catalog} WHERE table_name IN "
                             f"({', '.join('%s::text' for _ in stale)})", stale)
            updated = conn.execute(
                f"UPDATE {catalog} SET load_tool = %s, load_params = %s, last_refreshed_at = "
                f"{NOW_UTC}, row_count = %s, last_modified_by = %s WHERE table_name = %s",
                (tool, shown, rows, by, name)).rowcount
            if not updated:
                conn.execute(
                    f"INSERT INTO {catalog} (table_name, load_tool, load_params, loaded_at, "
                    f"last_refreshed_at, row_count, created_by, last_modified_by) "
                    f"VALUES (%s, %s, %s, {NOW_UTC}, {NOW_UTC}, %s, %s, %s)",
                    (name, tool, shown, rows, by, by))

    _one_writer_at_a_time(write, lock)


def record_quietly(conn: Any, db: str, table: str, tool: str, params: dict[str, Any],
                   by: str | None, session: Any = None) -> str | None:
    """
    L{record_load} for a load that has succeeded, which a catalog that
    cannot be written must not undo: None, or a note saying why the entry
    was not recorded.
    """
    import psycopg

    db, name = table_place(table, db)
    try:
        record_load(conn, db, name, tool, params, by, catalog_lock(session, db))
    except psycopg.Error as e:
        return (f"the table was loaded, but its entry in {db}.public.{CATALOG_TABLE} could not "
                f"be recorded ({e.diag.message_primary or type(e).__name__}); if that table is "
                f"not the catalog, rename it")
    return None


def recorded(work: Callable[[Any], dict[str, Any]], tool: str, params: dict[str, Any],
             by: str | None, keys: tuple[str, str] = ("table", "database"),
             session: Any = None) -> Callable[[Any], dict[str, Any]]:
    """
    C{work} (a load, whose result names the table and its database under
    C{keys}) followed, on the same connection and in the same durable call,
    by the catalog's record of it; C{session}: the one whose databases
    these are (for L{catalog_lock}).
    """

    def run(conn: Any) -> dict[str, Any]:
        result = work(conn)
        table, database = (result[key] for key in keys)
        note = record_quietly(conn, database, table, tool, params, by, session)
        if note is not None:
            result["notes"] = [*result.get("notes", []), note]
        return result

    return run


def entries(conn: Any, db: str) -> dict[str, dict[str, Any]]:
    """
    The catalog entries of C{db}'s tables, by table name, as JSON values
    (C{load_params} as an object); none if C{db} has no catalog, or one
    this server cannot read.
    """
    import psycopg

    try:
        cursor = conn.execute(f"SELECT * FROM {catalog_reference(db)}")
        columns = [c.name for c in cursor.description]
        rows = cursor.fetchall()
    except psycopg.Error:
        return {}
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = {column: json_value(value) for column, value in zip(columns, row)}
        name = entry.pop("table_name", None)
        if isinstance(entry.get("load_params"), str):
            try:
                entry["load_params"] = json.loads(entry["load_params"])
            except ValueError:
                pass  # written by someone else: shown as it is
        if isinstance(name, str):
            found[name] = entry
    return found


def annotate(conn: Any, db: str, tables: list[dict[str, Any]]) -> None:
    """Add to each of describe's C{tables} its catalog entry, where it has one."""
    known = entries(conn, db)
    for table in tables:
        if table["table"] in known:
            table["catalog"] = known[table["table"]]


def entry_of(conn: Any, db: str, table: str) -> dict[str, Any] | None:
    """The catalog entry of C{table} (as describe names it), or None."""
    db, name = table_place(table, db)
    return entries(conn, db).get(name)


# -- the tools -----------------------------------------------------------------

class CatalogTools:
    """
    copy_query, load_iceberg and set_table_metadata over a session's
    L{Tools} (C{kit.tools}: touched only while a request is handled, never
    from the work that runs on the session's worker thread).
    """

    def __init__(self, tools: Any) -> None:
        self.tools = tools

    @property
    def _by(self) -> str | None:
        """Who the session serves, for the catalog (C{Tools.client})."""
        return getattr(self.tools, "client", None)

    def _target(self, database: str | None, parameter: str) -> str:
        """The alias C{database} names, with errors that name C{parameter}."""
        try:
            return self.tools._database(database)
        except ToolFailure as e:
            text = str(e)
            if parameter != "database" and text.startswith("database:"):
                text = parameter + text[len("database"):]
            raise ToolFailure(text) from None

    # copy_query

    def copy_query(self, sql: str, target_table: str, mode: str,
                   target_database: str | None = None,
                   temp_attach: list[dict[str, Any]] | None = None) -> defer.Deferred[Any]:
        """
        Copy the rows of C{sql} (one read-only query) into C{target_table}
        of C{target_database}, all or nothing; C{temp_attach}: databases
        attached for this call only, detached however it ends.
        """
        self.tools._refuse_writes("copy_query")
        chosen = mode.lower() if isinstance(mode, str) else mode
        if chosen not in COPY_MODES:
            raise ToolFailure(f"mode: {mode!r} is not one of create, append, replace; give "
                              f"create (a new table), append (add to an existing one) or "
                              f"replace (make the table anew)")
        if (not isinstance(target_table, str) or not target_table.strip()
                or "." in target_table):
            raise ToolFailure(f"target_table: {target_table!r} is not a plain table name; give "
                              f"one such as 'sales', and the database as target_database")
        db = self._target(target_database, "target_database")
        specs = self._temp_specs(temp_attach)
        params = {"sql": sql, "mode": chosen, "target_database": db,
                  "temp_attach": [dict(s) for s in specs] or None}

        def work(conn: Any) -> dict[str, Any]:
            return _copy(conn, sql, target_table, chosen, db)

        return defer.ensureDeferred(self._with_attached(
            specs, recorded(work, "copy_query", params, self._by,
                            ("target_table", "target_database"), self.tools.session), db))

    def _temp_specs(self, temp_attach: Any) -> list[dict[str, Any]]:
        if temp_attach is None:
            return []
        if not isinstance(temp_attach, list):
            raise ToolFailure("temp_attach: give a list of databases to attach, e.g. "
                              "[{\"alias\": \"src\", \"kind\": \"local_file\", \"path\": "
                              "\"/abs/src.hyper\"}]")
        specs, aliases = [], set()
        for number, spec in enumerate(temp_attach, 1):
            if hasattr(spec, "model_dump"):
                spec = spec.model_dump(exclude_none=True)
            if not isinstance(spec, dict) or not spec.get("alias") or not spec.get("kind"):
                raise ToolFailure(f"temp_attach item {number}: give an object with alias, kind "
                                  f"and path, e.g. {{\"alias\": \"src\", \"kind\": "
                                  f"\"local_file\", \"path\": \"/abs/src.hyper\"}}")
            if spec["alias"] in aliases:
                raise ToolFailure(f"temp_attach item {number}: the alias {spec['alias']!r} is "
                                  f"given twice; give each database its own alias")
            if spec["kind"] not in ATTACH_KINDS:
                raise ToolFailure(f"temp_attach item {number}: kind {spec['kind']!r} is not "
                                  f"one that attach_database knows; use 'local_file'")
            aliases.add(spec["alias"])
            specs.append({k: spec[k] for k in ("alias", "kind", "path", "writable",
                                               "on_missing") if spec.get(k) is not None})
        return specs

    async def _with_attached(self, specs: list[dict[str, Any]],
                             work: Callable[[Any], dict[str, Any]], db: str) -> dict[str, Any]:
        attached: list[str] = []
        try:
            for number, spec in enumerate(specs, 1):
                try:
                    await defer.maybeDeferred(self.tools.attach_database, **spec)
                except ToolFailure as e:
                    raise ToolFailure(f"temp_attach item {number}: {e}") from None
                attached.append(spec["alias"])
            return await self.tools._call(work, writes={db}, parameter="sql")
        finally:
            for alias in reversed(attached):
                try:
                    await self.tools.detach_database(alias)
                except Exception:
                    pass  # the session detaches it at its end all the same

    # load_iceberg

    def load_iceberg(self, table: str, path: str, mode: str | None = None,
                     metadata_filename: str | None = None,
                     version_as_of: int | None = None) -> defer.Deferred[Any]:
        """
        Load the Apache Iceberg table whose root folder is C{path} into
        C{table} of C{local}, through hyperd's own reader: its latest
        version, or the one that C{metadata_filename} or C{version_as_of}
        pins.
        """
        self.tools._refuse_writes("load_iceberg")
        chosen = _mode(mode, merge=False)
        if not isinstance(table, str) or not table.strip():
            raise ToolFailure("table: give the name of the table to load into, e.g. 'trips'")
        root = iceberg_root(path)
        options = iceberg_options(root, metadata_filename, version_as_of)
        db = self._target(None, "database")
        params = {"path": str(root), "mode": chosen, "metadata_filename": metadata_filename,
                  "version_as_of": version_as_of}
        source = f"external({quote_literal(str(root))}, {options})"

        def work(conn: Any) -> dict[str, Any]:
            final = table_reference(table, db)
            staging = table_reference(f"{table}__loading_{secrets.token_hex(4)}", db)
            try:
                conn.execute(f"CREATE TABLE {staging} AS SELECT * FROM {source}")
                put = _put_in(conn, staging, final, table, chosen)
            except BaseException:
                _drop_quietly(conn, staging)
                raise
            columns = _column_types(conn, final)
            return {"table": table, "database": db, **put, "columns": columns,
                    "source": str(root)}

        return self.tools._call(recorded(work, "load_iceberg", params, self._by,
                                         session=self.tools.session),
                                writes={db}, parameter="path",
                                hint="path must be the root folder of an Apache Iceberg "
                                     "table, the one holding metadata/ and data/")

    # set_table_metadata

    def set_table_metadata(self, table: str, database: str | None = None,
                           **fields: str | None) -> defer.Deferred[Any]:
        """
        Set the prose of C{table}'s catalog entry (an empty string clears a
        field; a field not given stays); a table without an entry (made with
        execute, say) gets one.
        """
        self.tools._refuse_writes("set_table_metadata")
        db = self.tools._database(database)
        given = {k: v for k, v in fields.items() if v is not None}
        for name, value in given.items():
            if not isinstance(value, str):
                raise ToolFailure(f"{name}: give text, or \"\" to clear it")
        if not given:
            raise ToolFailure(f"set_table_metadata needs at least one of "
                              f"{', '.join(PROSE_FIELDS)}; give the fields to set (\"\" clears "
                              f"one)")
        by = self._by
        where, name = table_place(table, db) if isinstance(table, str) else (db, table)

        catalog = catalog_reference(where)
        values = [(v if v != "" else None) for v in given.values()]
        assignments = ", ".join(f"{k} = %s" for k in given)
        reference = f"{quote_identifier(where)}.public.{quote_identifier(name)}"
        lock = catalog_lock(self.tools.session, where)

        def write(conn: Any) -> None:
            _ensure_catalog(conn, where)
            rows = conn.execute(f"SELECT count(*) FROM {reference}").fetchone()[0]
            with conn.transaction():
                updated = conn.execute(
                    f"UPDATE {catalog} SET {assignments}, last_modified_by = %s "
                    f"WHERE table_name = %s", (*values, by, name)).rowcount
                if not updated:
                    conn.execute(
                        f"INSERT INTO {catalog} (table_name, {', '.join(given)}, loaded_at, "
                        f"last_refreshed_at, row_count, created_by, last_modified_by) VALUES "
                        f"(%s, {', '.join('%s' for _ in given)}, {NOW_UTC}, {NOW_UTC}, %s, %s, "
                        f"%s)", (name, *values, rows, by, by))

        def work(conn: Any) -> dict[str, Any]:
            _table_to_read(conn, table, db)
            _one_writer_at_a_time(lambda: write(conn), lock)
            return {"table": name, "database": where, "catalog": entries(conn, where)[name]}

        return self.tools._call(work, writes={where}, parameter="table")


def _copy(conn: Any, sql: str, target_table: str, mode: str, db: str) -> dict[str, Any]:
    """copy_query's work: stage the query's rows, then put them in place as C{mode} says."""
    import psycopg

    try:
        _require_read_only(conn, sql)
    except ToolFailure as e:
        # The check's words are query's: say whose rule it is.
        raise ToolFailure(str(e).replace("sql: query runs only", "sql: copy_query copies the "
                                         "rows of", 1).replace("sql: query takes",
                                                               "sql: copy_query takes", 1)
                          ) from None
    problem = _why_not_rows(sql)
    if problem is not None:
        raise ToolFailure(f"sql: {problem}")
    final = table_reference(target_table, db)
    exists = _exists(conn, final)
    if mode == "create" and exists:
        raise ToolFailure(f"target_table: {db}.public.{target_table} exists already; pass "
                          f"mode='append' to add the rows to it, mode='replace' to make it "
                          f"anew, or another target_table")
    if mode == "append" and not exists:
        raise ToolFailure(f"target_table: there is no table {target_table!r} in {db!r} to "
                          f"append to; pass mode='create' to make it from the query's rows")
    staging = table_reference(f"{target_table}__copying_{secrets.token_hex(4)}", db)
    try:
        try:
            conn.execute(f"CREATE TABLE {staging} AS SELECT * FROM ({_one_statement(sql)}\n) "
                         f"AS copied")
        except psycopg.Error as e:
            raise ToolFailure(_described(e, "sql")) from None
        put = _put_in(conn, staging, final, target_table,
                      "append" if mode == "append" else "replace")
    except BaseException:
        _drop_quietly(conn, staging)
        raise
    total = conn.execute(f"SELECT count(*) FROM {final}").fetchone()[0]
    result = {"target_table": target_table, "target_database": db, "mode": mode,
              "rows_copied": put["rows_loaded"], "row_count": total,
              "columns": _column_types(conn, final)}
    if put.get("notes"):
        result["notes"] = put["notes"]
    return result


def _why_not_rows(sql: str) -> str | None:
    """Why read-only C{sql} gives no rows to copy (EXPLAIN, SHOW), or None."""
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    try:
        statements = _parse(sql)
    except (SqlglotError, RecursionError):
        return None  # Hyper judges it
    if statements and isinstance(statements[0], exp.Command):
        return (f"copy_query copies the rows of a {COPY_KINDS} statement, and this one is "
                f"{statements[0].name.upper()}; run it with query instead")
    return None


def _column_types(conn: Any, reference: str) -> dict[str, str]:
    cursor = conn.execute(f"SELECT * FROM {reference} LIMIT 0")
    return {c.name: _type_name(conn, c.type_code) for c in cursor.description}


# -- Iceberg: what to read -------------------------------------------------------

def iceberg_root(path: Any) -> Path:
    """
    The root folder of an Iceberg table, from load_iceberg's C{path}.

    @raise ToolFailure: for a path that is not absolute, not there, not a
        folder, or a folder without C{metadata/}.
    """
    if not isinstance(path, str) or not path.strip():
        raise ToolFailure("path: give the Iceberg table's root folder by absolute path")
    root = Path(path).expanduser()
    if not root.is_absolute():
        raise ToolFailure(f"path: {path!r} is not an absolute path; give the Iceberg table's "
                          f"root folder by absolute path")
    if not root.exists():
        raise ToolFailure(f"path: {root} does not exist; give the root folder of an Iceberg "
                          f"table (the one holding metadata/ and data/)")
    if not root.is_dir():
        raise ToolFailure(f"path: {root} is a file, and an Iceberg table is a folder; give "
                          f"its root folder (the one holding metadata/ and data/)")
    if not (root / ICEBERG_METADATA).is_dir():
        raise ToolFailure(f"path: {root} has no metadata/ folder, so it is not the root of an "
                          f"Iceberg table; give the folder that holds metadata/ and data/")
    return root


def metadata_versions(root: Path) -> dict[str, int | None]:
    """
    The metadata files of the Iceberg table at C{root}, with the version
    each one's name gives (C{v3.metadata.json} or C{00003-<uuid>.metadata.json}
    is version 3; None where the name gives none).  Pure but for listing.
    """
    found: dict[str, int | None] = {}
    for file in sorted((root / ICEBERG_METADATA).iterdir()):
        if not file.name.endswith(METADATA_SUFFIX):
            continue
        stem = file.name[:-len(METADATA_SUFFIX)]
        head = stem[1:] if stem.startswith("v") else stem.partition("-")[0]
        found[file.name] = int(head) if head.isdigit() else None
    return found


def iceberg_options(root: Path, metadata_filename: Any, version_as_of: Any) -> str:
    """
    The options of hyperd's C{external()} that read the table at C{root}
    (its latest version, or the one pinned).

    @raise ToolFailure: for both pins at once, a file that is not one of the
        table's metadata files, or a version it does not have.
    """
    options = ["FORMAT => 'iceberg'"]
    if metadata_filename is not None and version_as_of is not None:
        raise ToolFailure("metadata_filename, version_as_of: give at most one of them; each "
                          "pins a version of the table on its own")
    files = metadata_versions(root)
    listed = ", ".join(files) or "none"
    if metadata_filename is not None:
        if (not isinstance(metadata_filename, str) or "/" in metadata_filename
                or metadata_filename not in files):
            raise ToolFailure(f"metadata_filename: {metadata_filename!r} is not a metadata "
                              f"file of this table; give the name of one in "
                              f"{root / ICEBERG_METADATA} ({listed})")
        options.append(f"METADATA_FILENAME => {quote_literal(metadata_filename)}")
    if version_as_of is not None:
        versions = sorted({v for v in files.values() if v is not None})
        if (isinstance(version_as_of, bool) or not isinstance(version_as_of, int)
                or version_as_of not in versions):
            raise ToolFailure(f"version_as_of: the table has no version {version_as_of!r}; its "
                              f"versions are {', '.join(map(str, versions)) or 'none'} (from "
                              f"its metadata files); give one of them, or leave it out for "
                              f"the latest")
        options.append(f"VERSION_AS_OF => {version_as_of}")
    return ", ".join(options)


# -- Iceberg: export ---------------------------------------------------------------

#: The options export takes for format iceberg, and the table schemes hyperd writes.
ICEBERG_EXPORT_OPTIONS = ("codec", "table_scheme")
ICEBERG_SCHEMES = ("metastore", "filesystem")


def iceberg_copy_options(options: Any) -> str:
    """
    The options of hyperd's C{COPY ... TO} for an Iceberg table, from
    export's C{format_options}.  Pure.

    @raise ToolFailure: for an option that Iceberg export does not take, or
        a value it cannot.
    """
    from hyperdaemon.mcp.tools import PARQUET_CODECS

    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ToolFailure(f"format_options: give an object of options (e.g. {{\"codec\": "
                          f"\"zstd\"}}), not {options!r}")
    unknown = [name for name in options if name not in ICEBERG_EXPORT_OPTIONS]
    if unknown:
        raise ToolFailure(f"format_options: format 'iceberg' has no option "
                          f"{', '.join(map(repr, unknown))}; it takes "
                          f"{', '.join(ICEBERG_EXPORT_OPTIONS)}")
    clauses = ["FORMAT iceberg"]
    codec = options.get("codec")
    if codec is not None:
        if not isinstance(codec, str) or codec.lower() not in PARQUET_CODECS:
            raise ToolFailure(f"format_options: codec {codec!r} is not one that Hyper writes; "
                              f"use one of {', '.join(PARQUET_CODECS)}")
        clauses.append(f"CODEC {quote_literal(codec.lower())}")
    scheme = options.get("table_scheme")
    if scheme is not None:
        if not isinstance(scheme, str) or scheme.lower() not in ICEBERG_SCHEMES:
            raise ToolFailure(f"format_options: table_scheme {scheme!r} is not one that Hyper "
                              f"writes; use metastore (the default) or filesystem "
                              f"(v0.metadata.json)")
        clauses.append(f"TABLE_SCHEME {quote_literal(scheme.lower())}")
    return ", ".join(clauses)


def set_aside_tables(target: Path) -> list[Path]:
    """The folders where replacing the Iceberg table at C{target} set the old one aside."""
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:
        return []
    prefix = f".{target.name}.replaced-"
    return [target.parent / name for name in names if name.startswith(prefix)
            and (target.parent / name).is_dir() and not (target.parent / name).is_symlink()]


def export_iceberg(tools: Any, path: str, sql: str | None, table: str | None,
                   overwrite: bool | None, format_options: Any,
                   database: str | None) -> defer.Deferred[Any]:
    """
    export's format C{iceberg}: an Apache Iceberg table (a folder holding
    metadata/ and data/) of a query's or a table's rows, written by hyperd
    at C{path} itself (its metadata names its files by absolute path, so it
    cannot be written elsewhere and moved).  A folder there is replaced only
    with C{overwrite}, never under --read-only, and only if it is an Iceberg
    table: it is moved aside first and put back if the export fails.
    """
    import os
    import shutil

    from hyperdaemon.mcp.tools import _search_path

    options = iceberg_copy_options(format_options)
    db = tools._database(database)
    select = sql if sql is not None else f"SELECT * FROM {table_reference(table, db)}"
    target = Path(os.path.abspath(os.path.expanduser(path)))
    if not target.parent.is_dir():
        raise ToolFailure(f"path: the folder {target.parent} does not exist; create it or "
                          f"choose another path")
    if os.path.lexists(target):
        if not target.is_dir() or target.is_symlink():
            raise ToolFailure(f"path: {target} exists and is not a folder, and an Iceberg table "
                              f"is one; choose a new path")
        if not (target / ICEBERG_METADATA).is_dir():
            raise ToolFailure(f"path: {target} is a folder that is not an Iceberg table (it has "
                              f"no metadata/), and export replaces only an Iceberg table; "
                              f"choose a new path")
        if tools.read_only:
            raise ToolFailure(f"path: {target} exists, and with --read-only export never "
                              f"replaces anything; choose a new path")
        if not overwrite:
            raise ToolFailure(f"path: {target} exists, and export replaces a table only when "
                              f"asked: pass overwrite=true to replace it, or choose a new path")

    replace = os.path.lexists(target)

    def work(conn: Any) -> dict[str, Any]:
        # In the worker: the folder may hold many entries to list.
        left = set_aside_tables(target)
        if left:
            # An export replacing this table was cut off (the process
            # killed): the table that was there waits beside it, hidden, and
            # which of the two is whole cannot be told here.  The user decides.
            raise ToolFailure(f"path: an earlier export to {target} was cut off while it "
                              f"replaced the table there, which was kept at {left[0]}; check "
                              f"both, then move the one to keep to {target} (or remove "
                              f"{left[0]}), and run the export again")
        with _search_path(conn, db):
            # Refused SQL must not get as far as moving the old table aside.
            _require_read_only(conn, select)
        aside = None
        if os.path.lexists(target):
            # The call may have waited its turn: a folder that appeared
            # meanwhile was never checked, nor asked to be replaced.
            if not replace:
                raise ToolFailure(f"path: {target} was created while the export waited its "
                                  f"turn; run the export again, or choose a new path")
            aside = target.with_name(f".{target.name}.replaced-{secrets.token_hex(4)}")
            os.rename(target, aside)
        try:
            with _search_path(conn, db):
                with conn.transaction(force_rollback=True):
                    conn.execute(f"COPY ({_one_statement(select)}\n) TO "
                                 f"{quote_literal(str(target))} WITH ({options})")
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            if aside is not None:
                try:
                    os.rename(aside, target)
                except OSError:
                    # Say where the old table is, rather than an errno.
                    raise ToolFailure(f"path: the export failed, and the table that was at "
                                      f"{target} could not be put back: it is at {aside}; "
                                      f"move it back by hand") from None
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        return {"path": str(target), "format": "iceberg", "bytes": size}

    return tools._call(work, writes=False, parameter="sql" if sql is not None else "table")


# -- the MCP tools ---------------------------------------------------------------

COPY_SQL = (f"One read-only statement ({COPY_KINDS}) whose rows to copy. It may read any "
            f"attached database (`persistent.public.t`, `alias.public.t`); unqualified names "
            f"are tables of `local`.")
TARGET_TABLE = ("The table to copy the rows into: a plain name such as `sales`, made in "
                "target_database.")
COPY_MODE = ("What to do about a table already there: `create` makes a new table and "
             "refuses one that exists; `append` adds the rows to an existing table (columns "
             "matched by name); `replace` makes the table anew from the rows. No default: "
             "always give it.")
COPY_TARGET = ("The database the table goes into. Default `local`, this session's scratch "
               "database; `persistent` keeps it and shares it with the user's other "
               "assistants; an alias given to attach_database works too.")
TEMP_ATTACH = ("Databases to attach for this call only, so that sql can read them, each as "
               "attach_database takes it: {\"alias\": \"src\", \"kind\": \"local_file\", "
               "\"path\": \"/abs/src.hyper\"}. They are detached when the call ends, however it "
               "ends. Default: none.")
SPEC_ALIAS = ("The name the database gets in sql (`src.public.t`): letters, digits and _, "
              "not starting with a digit, not an alias in use.")
SPEC_KIND = "What `path` is: `local_file`, a .hyper file (`file` and `hyper` mean the same)."
SPEC_PATH = "The .hyper file to attach, by absolute path."
SPEC_WRITABLE = ("Unused by copy_query, which only reads these databases; accepted for the "
                 "shape attach_database takes. Default false.")
SPEC_ON_MISSING = ("What to do when no file exists at `path`: `error` (default) or `create`, "
                   "which makes a new empty database there.")
ICEBERG_TABLE = "The table to load into, in `local`: a plain name such as `trips`."
ICEBERG_PATH = ("The Iceberg table's root folder, by absolute path: the folder that holds "
                "metadata/ and data/.")
ICEBERG_MODE = ("What to do with rows already in the table: `replace` (default) drops the "
                "table and makes it anew from these rows; `append` adds the rows to it.")
METADATA_FILENAME = ("The metadata file (a name in the table's metadata/ folder, such as "
                     "`v2.metadata.json`) whose version of the table to read. Default: the "
                     "latest version. Give this or version_as_of, not both.")
VERSION_AS_OF = ("The version of the table to read, the number that its metadata file's name "
                 "starts with (2 for v2.metadata.json or 00002-....metadata.json). Default: "
                 "the latest version. Give this or metadata_filename, not both.")
META_TABLE = ("The table whose catalog entry to edit: plain (`sales`, looked up in "
              "`database`) or in full (`persistent.public.sales`).")
META_DATABASE = ("The database of the table. Default `local`, this session's scratch "
                 "database; `persistent` and any alias given to attach_database work too.")
UNCHANGED = " Default: left as it is; \"\" clears it."
SOURCE_URL = ("A page that tells where the data comes from, for people to read (a URL, a "
              "bucket path, a system's name)." + UNCHANGED)
SOURCE_DESCRIPTION = "What the table holds and how to read it, in a few sentences." + UNCHANGED
PURPOSE = "What the table is for: the questions it is meant to answer." + UNCHANGED
LICENSE = "The license of the data, or what its use requires (attribution, say)." + UNCHANGED
NOTES = "Anything else worth knowing: how to refresh it, its quirks and caveats." + UNCHANGED
DATA_URL = ("Where a program can download the raw data file again (unlike source_url, which "
            "is for people)." + UNCHANGED)


def register(kit: Any) -> None:
    from mcp.types import CallToolResult
    from pydantic import BaseModel, ConfigDict, Field

    catalog = CatalogTools(kit.tools)
    Arg = kit.arg  # noqa: N806 (reads as a type)

    class AttachSpec(BaseModel):
        """A database attached for one copy_query call."""

        model_config = ConfigDict(extra="forbid")
        alias: str = Field(description=SPEC_ALIAS)
        kind: str = Field(description=SPEC_KIND)
        path: str | None = Field(None, description=SPEC_PATH)
        writable: bool | None = Field(None, description=SPEC_WRITABLE)
        on_missing: str | None = Field(None, description=SPEC_ON_MISSING)

    class Entry(kit.Result):
        """A table's catalog entry."""

        load_tool: str | None = Field(None, description="The tool that last loaded the table.")
        load_params: Any = Field(None, description="That load's parameters.")
        loaded_at: str | None = Field(None, description="When the table was first loaded (UTC).")
        last_refreshed_at: str | None = Field(
            None, description="When it was last loaded (UTC).")
        row_count: int | None = Field(None, description="Its rows after that load.")

    class Copied(kit.Result):
        """The rows copied, and the table they went into."""

        target_table: str
        target_database: str
        mode: str
        rows_copied: int = Field(description="How many rows the query gave and were copied.")
        row_count: int = Field(description="How many rows the table holds now.")
        columns: dict[str, str] | None = Field(None, description="Each column's SQL type.")
        notes: list[str] | None = None

    class Loaded(kit.Result):
        """The table loaded, and how."""

        table: str
        database: str
        rows_loaded: int = Field(description="How many rows were read into the table.")
        mode: str
        columns: dict[str, str] | None = Field(None, description="Each column's SQL type.")
        source: str | None = Field(None, description="Where the rows came from.")
        notes: list[str] | None = None

    class Metadata(kit.Result):
        """The table's catalog entry, as it is now."""

        table: str
        database: str
        catalog: Entry

    @kit.tool("Copy query rows into a table", kit.replaces)
    async def copy_query(
        sql: Arg(str, COPY_SQL),
        target_table: Arg(str, TARGET_TABLE),
        mode: Arg(str, COPY_MODE),
        target_database: Arg(str | None, COPY_TARGET) = None,
        temp_attach: Arg(list[AttachSpec] | None, TEMP_ATTACH) = None,
    ) -> Annotated[CallToolResult, Copied]:
        """
        Put the rows of one read-only query, which may join tables of several
        attached databases, into a table: a new one, added to an existing
        one, or replacing it. All or nothing; the query changes nothing.
        """
        return await kit.call(catalog.copy_query, sql=sql, target_table=target_table,
                              mode=mode, target_database=target_database,
                              temp_attach=temp_attach)

    @kit.tool("Load an Iceberg table", kit.replaces)
    async def load_iceberg(
        table: Arg(str, ICEBERG_TABLE),
        path: Arg(str, ICEBERG_PATH),
        mode: Arg(str | None, ICEBERG_MODE) = None,
        metadata_filename: Arg(str | None, METADATA_FILENAME) = None,
        version_as_of: Arg(int | None, VERSION_AS_OF) = None,
    ) -> Annotated[CallToolResult, Loaded]:
        """
        Load an Apache Iceberg table (a folder with metadata/ and data/) into a
        table of the local database, read by Hyper itself: its latest version,
        or an earlier one. A load that fails leaves no partial table.
        """
        return await kit.call(catalog.load_iceberg, table=table, path=path, mode=mode,
                              metadata_filename=metadata_filename,
                              version_as_of=version_as_of)

    @kit.tool("Describe where a table came from",
              kit.hints(read_only=False, destructive=False, idempotent=True))
    async def set_table_metadata(
        table: Arg(str, META_TABLE),
        source_url: Arg(str | None, SOURCE_URL) = None,
        source_description: Arg(str | None, SOURCE_DESCRIPTION) = None,
        purpose: Arg(str | None, PURPOSE) = None,
        license: Arg(str | None, LICENSE) = None,
        notes: Arg(str | None, NOTES) = None,
        data_url: Arg(str | None, DATA_URL) = None,
        database: Arg(str | None, META_DATABASE) = None,
    ) -> Annotated[CallToolResult, Metadata]:
        """
        Write what is known about a table (its source, purpose, license,
        notes, download URL) into its catalog entry, which describe shows;
        the loads record the rest (tool, parameters, time, row count).
        """
        return await kit.call(catalog.set_table_metadata, table=table, database=database,
                              source_url=source_url, source_description=source_description,
                              purpose=purpose, license=license, notes=notes,
                              data_url=data_url)


def serve(server: Any, kit: Any) -> None:
    """Learn who the session serves, for the catalog's created_by and last_modified_by."""
    from hyperdaemon.mcp.server import client_info, client_label

    async def learn_client(ctx: Any, call_next: Any) -> Any:
        outcome = await call_next(ctx)
        try:
            info = client_info(ctx)
            label = client_label(info) if info is not None else None
            if label is not None:
                version = (info.get("version") if isinstance(info, dict)
                           else getattr(info, "version", None))
                kit.tools.client = f"{label} {version}" if isinstance(version, str) else label
        except Exception:  # the catalog's byline must never fail a request
            pass
        return outcome

    server.middleware.append(learn_client)
