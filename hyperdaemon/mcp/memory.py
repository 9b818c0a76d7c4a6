"""
The assistant's memory, a family of MCP tools: key-value scratchpads and
saved queries, with upstream's names, parameters and tables.

Key-value stores (C{kv_*}): named stores of JSON values, kept in the table
C{_hyperdb_kv_store(store_name TEXT, key TEXT, value TEXT)} of the database
chosen: C{local} (the session's scratch, gone when the session ends) by
default, C{persistent} to keep them and share them with the user's other
assistants, or any attached alias.  The table is upstream's, so that SQL
written against it (a LEFT JOIN on C{key}, say) carries over; it is made
by the first write, and a read of a database without it finds nothing.

Saved queries (C{save_query}, C{delete_query}): one read-only statement
under a name, kept in C{_hyperdb_saved_queries(name, sql, description,
created_at)} of C{persistent}, or of C{local} (for the session only) under
C{--ephemeral-only}.  L{saved_queries} and L{saved_query} read them for the
resources (L{hyperdaemon.mcp.resources}).

Several assistants at once: they all reach C{persistent} through one
C{hyperd}.  Hyper runs each transaction on a snapshot and fails the second
of two transactions that change the same row (SQLSTATE 40001, "conflict
with concurrent transaction"), but two inserts of the same new key never
conflict.  So every write of these tools to a database other than C{local}
holds an exclusive C{flock} beside the database's file (C{.NAME.memory.lock},
L{memory_lock_path}) for the length of its transaction: C{kv_set}'s
look-then-write, C{kv_set_many}, C{kv_pop}, C{save_query}'s duplicate check.
(Taking turns also spares C{hyperd} concurrent UPDATEs of one table, which
crash it: see L{hyperdaemon.mcp.catalog}.)
C{kv_pop} is moreover one C{DELETE ... RETURNING} statement, retried on a
conflict: even a writer that does not take the lock (SQL through
C{execute}) cannot make it hand one entry to two callers.

C{--read-only}: the user's files stay as they are.  Writes to
C{persistent} and to attached databases are refused; the C{local} scratch
store (private to the session and deleted with it) still takes writes, so
that an assistant can keep notes.  Reads work everywhere.

Writes go through L{Session.call} with the database they change, so that a
write to C{persistent} is on disk before the tool returns.
"""


import contextlib
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from twisted.internet import defer

from hyperdaemon.client.session import EPHEMERAL_ALIAS, LOCKS_NAME, PERSISTENT_ALIAS
from hyperdaemon.client.sharedfiles import LockFile
from hyperdaemon.mcp.tools import ToolFailure, quote_identifier, read_only_problem

#: Upstream's tables.
KV_TABLE = "_hyperdb_kv_store"
QUERIES_TABLE = "_hyperdb_saved_queries"
#: Characters a store, a key or a saved query's name may hold (upstream's
#: for stores and keys; safe in a resource URI).
NAME_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
#: The longest store name or key, in characters (all ASCII), as upstream.
MAX_NAME = 512
#: The longest saved query name.
MAX_QUERY_NAME = 128
#: The largest value, in bytes of UTF-8, given inline or by value_path.
MAX_VALUE_BYTES = 64 * 1024 * 1024
#: Above this a value is stored with a warning: the store is for small things.
LARGE_VALUE_BYTES = 1024 * 1024
#: The most entries one kv_set_many takes.
MAX_ENTRIES = 10_000
#: Tries of a pop that conflicts with another transaction, and the most
#: seconds to wait between two.
POP_ATTEMPTS = 50
POP_BACKOFF = 0.02


# -- checks (pure) -------------------------------------------------------------------

def check_name(parameter: str, name: Any, limit: int = MAX_NAME) -> str:
    """
    C{name} if it can name a store, a key or a saved query: 1 to C{limit}
    characters of A-Z, a-z, 0-9, C{_}, C{.} and C{-}.

    @raise ToolFailure: naming C{parameter}, what is wrong, and what to give.
    """
    allowed = "letters, digits, _, . and -"
    if not isinstance(name, str) or not name:
        raise ToolFailure(f"{parameter}: give a name of 1 to {limit} characters ({allowed}), "
                          f"e.g. 'notes'")
    if len(name) > limit:
        raise ToolFailure(f"{parameter}: {len(name):,} characters is longer than the {limit} "
                          f"allowed; use a shorter name")
    bad = next((c for c in name if c not in NAME_CHARACTERS), None)
    if bad is not None:
        raise ToolFailure(f"{parameter}: {name[:60]!r} holds {bad!r}, and a name holds only "
                          f"{allowed}; replace it, e.g. with _")
    return name


def check_value(parameter: str, text: str) -> int:
    """
    The size in bytes of C{text}, a value to store, once known to be one
    JSON document of at most L{MAX_VALUE_BYTES}.

    @raise ToolFailure: for text too large or not JSON.
    """
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ToolFailure(f"{parameter}: the value holds half of a UTF-16 pair (a \\ud800 to "
                          f"\\udfff escape alone), which is not text; write the character "
                          f"itself, or both halves of its pair") from None
    if size > MAX_VALUE_BYTES:
        raise ToolFailure(f"{parameter}: the value is {size:,} bytes, more than the "
                          f"{MAX_VALUE_BYTES:,} a value may hold; store a smaller value, or "
                          f"load large data into a table with load_file")
    try:
        json.loads(text)
    except ValueError as e:
        where = (f" (line {e.lineno}, column {e.colno}: {e.msg})"
                 if isinstance(e, json.JSONDecodeError) else "")
        raise ToolFailure(f"{parameter}: the value is not JSON{where}; give a JSON document, "
                          f"e.g. {{\"rows\": 3}} or [1, 2], and write text as a JSON string in "
                          f"double quotes: \"like this\"") from None
    return size


def read_value_file(path: Any) -> str:
    """
    The text of the file at C{path} (absolute), to store as a value: its
    size is checked before it is read.

    @raise ToolFailure: for a path that is not a readable file, a file over
        L{MAX_VALUE_BYTES}, or one that is not UTF-8 text.
    """
    if not isinstance(path, str) or not os.path.isabs(os.path.expanduser(path)):
        raise ToolFailure(f"value_path: {path!r} is not an absolute path; give the file's "
                          f"full path, e.g. /home/me/notes.json")
    source = Path(os.path.expanduser(path))
    try:
        facts = source.stat()
    except OSError as e:
        raise ToolFailure(f"value_path: {source} cannot be read ({e.strerror}); check the "
                          f"path") from None
    if not source.is_file():
        raise ToolFailure(f"value_path: {source} is not a file; give the path of a file")
    if facts.st_size > MAX_VALUE_BYTES:
        raise ToolFailure(f"value_path: {source} is {facts.st_size:,} bytes, more than the "
                          f"{MAX_VALUE_BYTES:,} a value may hold; load it into a table with "
                          f"load_file instead")
    try:
        return source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ToolFailure(f"value_path: {source} is not UTF-8 text; a value is a JSON "
                          f"document") from None
    except OSError as e:
        raise ToolFailure(f"value_path: {source} cannot be read ({e.strerror}); check its "
                          f"permissions") from None


def _read_and_check(path: str) -> tuple[str, int]:
    """The value in the file at C{path} and its size (L{read_value_file}, L{check_value})."""
    text = read_value_file(path)
    return text, check_value("value_path", text)


def check_entries(entries: Any) -> list[tuple[str, str, int]]:
    """
    kv_set_many's entries as (key, value, size), all checked before
    anything is written.

    @raise ToolFailure: for no entries, too many, a bad item, key or value
        (named by its place), or a key given twice.
    """
    if not isinstance(entries, list) or not entries:
        raise ToolFailure("entries: give at least one entry, e.g. [{\"key\": \"a\", "
                          "\"value\": \"1\"}]")
    if len(entries) > MAX_ENTRIES:
        raise ToolFailure(f"entries: {len(entries):,} entries is more than the {MAX_ENTRIES:,} "
                          f"one call takes; split them over several calls")
    checked: list[tuple[str, str, int]] = []
    first: dict[str, int] = {}
    for number, entry in enumerate(entries, 1):
        item = f"entries item {number}"
        if not (isinstance(entry, dict) and set(entry) == {"key", "value"}
                and isinstance(entry["key"], str) and isinstance(entry["value"], str)):
            raise ToolFailure(f"{item}: give an object with exactly a key and a value, both "
                              f"strings, e.g. {{\"key\": \"a\", \"value\": \"1\"}}")
        key = check_name(f"{item} key", entry["key"])
        if key in first:
            raise ToolFailure(f"{item}: the key {key!r} is item {first[key]}'s too; give each "
                              f"key once")
        first[key] = number
        checked.append((key, entry["value"], check_value(f"{item} value", entry["value"])))
    return checked


def memory_lock_path(database: Path, fallback_dir: Path) -> Path:
    """
    The lock that the writers of these tools take for C{database}: beside
    it, so that every session of every state directory meets on it; in
    C{fallback_dir} when its folder cannot be written to.
    """
    folder = database.parent
    if os.access(folder, os.W_OK):
        return folder / f".{database.name}.memory.lock"
    fallback_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = hashlib.sha256(os.fsencode(database)).hexdigest()[:32]
    return fallback_dir / f"{key}.memory.lock"


@contextlib.contextmanager
def _holding(path: Path | None) -> Iterator[None]:
    """An exclusive flock on C{path} (nothing for None) while the block runs."""
    if path is None:
        yield
        return
    lock = LockFile(path)
    try:
        lock.lock(exclusive=True)
        yield
    finally:
        lock.close()


# -- SQL ---------------------------------------------------------------------------

def _table(db: str, name: str) -> str:
    return f"{quote_identifier(db)}.public.{quote_identifier(name)}"


def _missing_table() -> type:
    import psycopg

    return psycopg.errors.UndefinedTable


def _create_kv(conn: Any, table: str) -> None:
    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (store_name TEXT NOT NULL, "
                 f"key TEXT NOT NULL, value TEXT)")


def _create_queries(conn: Any, table: str) -> None:
    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (name TEXT NOT NULL, sql TEXT NOT NULL, "
                 f"description TEXT, created_at TIMESTAMP NOT NULL)")


def _rows(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The rows of a read; none when the table is not there yet."""
    try:
        return conn.execute(sql, params).fetchall()
    except _missing_table():
        return []


def _pop(conn: Any, table: str, store: str) -> tuple[str, str] | None:
    """
    Remove and return the entry of C{store} with the lowest key, in one
    statement: of two transactions that pick the same row, Hyper fails the
    second, which tries again on a fresh snapshot.
    """
    import psycopg

    for attempt in range(POP_ATTEMPTS):
        try:
            rows = conn.execute(
                f"DELETE FROM {table} WHERE store_name = %s AND key = "
                f"(SELECT min(key) FROM {table} WHERE store_name = %s) RETURNING key, value",
                (store, store)).fetchall()
        except psycopg.errors.SerializationFailure:
            if attempt == POP_ATTEMPTS - 1:
                raise ToolFailure(f"store: other sessions kept changing {store!r} for "
                                  f"{POP_ATTEMPTS} tries; call kv_pop again") from None
            time.sleep(random.uniform(0, POP_BACKOFF))
            continue
        except _missing_table():
            return None
        if not rows:
            return None
        key, value = rows[0]
        return key, value
    return None


def _utc(moment: Any) -> str:
    """A TIMESTAMP kept in UTC, in ISO 8601 with its offset."""
    return moment.isoformat() + "+00:00" if hasattr(moment, "isoformat") else str(moment)


def _saved(row: tuple[Any, ...]) -> dict[str, Any]:
    name, sql, description, created = row
    return {"name": name, "sql": sql, "description": description, "created_at": _utc(created)}


# -- the tools -----------------------------------------------------------------------

class Memory:
    """The key-value and saved-query tools over the session of C{tools} (a L{Tools})."""

    def __init__(self, tools: Any) -> None:
        self.tools = tools

    @property
    def session(self) -> Any:
        # Read at each call: the server may be built before its session opens.
        return self.tools.session

    # where

    def _target(self, tool: str, database: str | None, persist: bool | None,
                writes: bool) -> str:
        """The database alias to use; a write to a user's file is refused with --read-only."""
        db = self.tools._database(database, persist)
        if writes and self.tools.read_only and db != EPHEMERAL_ALIAS:
            raise ToolFailure(f"database: {tool} would change {db!r}, and the server runs with "
                              f"--read-only, which keeps the user's databases as they are; "
                              f"use the session's scratch store (leave database and persist "
                              f"out)")
        return db

    def _lock(self, db: str) -> Path | None:
        """The lock file that writers to C{db} take, or None for the session's own."""
        if db == EPHEMERAL_ALIAS:
            return None
        fallback = Path(self.session.ephemeral_db).parent.parent.parent / LOCKS_NAME
        return memory_lock_path(Path(self.session.attached_files[db]), fallback)

    def _read(self, work: Callable[[Any], Any], parameter: str = "store") -> defer.Deferred[Any]:
        return self.tools._call(work, retry=True, writes=False, parameter=parameter)

    def _write(self, db: str, work: Callable[[Any], Any],
               parameter: str = "store") -> defer.Deferred[Any]:
        lock = self._lock(db)

        def locked(conn: Any) -> Any:
            with _holding(lock):
                return work(conn)

        # The scratch database is the session's own: nothing to write out.
        writes = False if db == EPHEMERAL_ALIAS else {db}
        return self.tools._call(locked, writes=writes, parameter=parameter)

    # key-value

    def kv_set(self, store: str, key: str, value: str | None = None,
               value_path: str | None = None, overwrite: bool | None = None,
               database: str | None = None,
               persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        check_name("store", store)
        check_name("key", key)
        if (value is None) == (value_path is None):
            raise ToolFailure("value, value_path: give exactly one of them: value for the JSON "
                              "itself, value_path for a file that holds it")
        parameter = "value" if value_path is None else "value_path"
        inline = None if value is None else (value, check_value(parameter, value))
        db = self._target("kv_set", database, persist, writes=True)
        table = _table(db, KV_TABLE)
        replace = overwrite is None or bool(overwrite)

        def work(conn: Any) -> dict[str, Any]:
            # A file (up to MAX_VALUE_BYTES) is read and parsed here, in the
            # session's thread, never on the reactor's.
            text, size = inline or _read_and_check(value_path)
            _create_kv(conn, table)
            with conn.transaction():
                existed = conn.execute(
                    f"SELECT 1 FROM {table} WHERE store_name = %s AND key = %s LIMIT 1",
                    (store, key)).fetchone() is not None
                if existed and not replace:
                    return {"stored": False, "created": False, "existed": True,
                            "value_bytes": size}
                if existed:
                    conn.execute(f"UPDATE {table} SET value = %s WHERE store_name = %s AND "
                                 f"key = %s", (text, store, key))
                else:
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (store, key, text))
            return {"stored": True, "created": not existed, "value_bytes": size}

        def shaped(outcome: dict[str, Any]) -> dict[str, Any]:
            result = {**outcome, "store": store, "key": key, "resolved_database": db}
            size = outcome["value_bytes"]
            if size > LARGE_VALUE_BYTES and outcome["stored"]:
                result["warning"] = (f"the value is {size:,} bytes; the store is meant for "
                                     f"small things: keep large data in a table (load_data, "
                                     f"load_file)")
            return result

        return self._write(db, work, parameter).addCallback(shaped)

    def kv_set_many(self, store: str, entries: Any, overwrite: bool | None = None,
                    database: str | None = None,
                    persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        check_name("store", store)
        checked = check_entries(entries)
        db = self._target("kv_set_many", database, persist, writes=True)
        table = _table(db, KV_TABLE)
        replace = overwrite is None or bool(overwrite)
        keys = [key for key, _, _ in checked]

        def work(conn: Any) -> dict[str, Any]:
            _create_kv(conn, table)
            # Hyper cannot tell the type of a parameter in a list: it is said.
            marks = ", ".join(["%s::text"] * len(keys))
            with conn.transaction():
                existing = {key for (key,) in conn.execute(
                    f"SELECT DISTINCT key FROM {table} WHERE store_name = %s AND key IN "
                    f"({marks})", (store, *keys)).fetchall()}
                if replace and existing:
                    conn.execute(f"DELETE FROM {table} WHERE store_name = %s AND key IN "
                                 f"({', '.join(['%s::text'] * len(existing))})",
                                 (store, *sorted(existing)))
                written = [(k, v, n) for k, v, n in checked if replace or k not in existing]
                if written:
                    conn.execute(
                        f"INSERT INTO {table} VALUES "
                        f"{', '.join(['(%s::text, %s::text, %s::text)'] * len(written))}",
                        tuple(x for k, v, _ in written for x in (store, k, v)))
            created = sum(1 for k, _, _ in written if k not in existing)
            result = {"stored": len(written), "created": created,
                      "total_bytes": sum(n for _, _, n in written), "resolved_database": db}
            if replace:
                result["overwritten"] = len(written) - created
            else:
                result["skipped"] = len(checked) - len(written)
            return result

        return self._write(db, work, "entries")

    def kv_get(self, store: str, key: str, database: str | None = None,
               persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        check_name("store", store)
        check_name("key", key)
        db = self._target("kv_get", database, persist, writes=False)
        table = _table(db, KV_TABLE)

        def work(conn: Any) -> dict[str, Any]:
            rows = _rows(conn, f"SELECT value FROM {table} WHERE store_name = %s AND key = %s "
                               f"LIMIT 1", (store, key))
            return {"found": bool(rows), "value": rows[0][0] if rows else None,
                    "resolved_database": db}

        return self._read(work)

    def kv_list(self, store: str, values: bool | None = None, database: str | None = None,
                persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        check_name("store", store)
        db = self._target("kv_list", database, persist, writes=False)
        table = _table(db, KV_TABLE)

        def work(conn: Any) -> dict[str, Any]:
            rows = _rows(conn, f"SELECT key, value FROM {table} WHERE store_name = %s "
                               f"ORDER BY key", (store,))
            result: dict[str, Any] = {"store": store, "count": len(rows)}
            if values:
                result["entries"] = [{"key": k, "value": v} for k, v in rows]
            else:
                result["keys"] = [k for k, _ in rows]
            result["resolved_database"] = db
            return result

        return self._read(work)

    def kv_list_stores(self, database: str | None = None,
                       persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        db = self._target("kv_list_stores", database, persist, writes=False)
        table = _table(db, KV_TABLE)

        def work(conn: Any) -> dict[str, Any]:
            stores = [s for (s,) in _rows(
                conn, f"SELECT DISTINCT store_name FROM {table} ORDER BY store_name")]
            return {"count": len(stores), "stores": stores, "resolved_database": db}

        return self._read(work, parameter="database")

    def kv_size(self, store: str, database: str | None = None,
                persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        check_name("store", store)
        db = self._target("kv_size", database, persist, writes=False)
        table = _table(db, KV_TABLE)

        def work(conn: Any) -> dict[str, Any]:
            rows = _rows(conn, f"SELECT count(*), coalesce(sum(octet_length(value)), 0) "
                               f"FROM {table} WHERE store_name = %s", (store,))
            size, size_bytes = rows[0] if rows else (0, 0)
            return {"store": store, "size": int(size), "bytes": int(size_bytes),
                    "resolved_database": db}

        return self._read(work)

    def kv_pop(self, store: str, database: str | None = None,
               persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        check_name("store", store)
        db = self._target("kv_pop", database, persist, writes=True)
        table = _table(db, KV_TABLE)

        def work(conn: Any) -> dict[str, Any]:
            popped = _pop(conn, table, store)
            if popped is None:
                return {"found": False, "store": store, "resolved_database": db}
            key, value = popped
            return {"found": True, "store": store, "key": key, "value": value,
                    "resolved_database": db}

        return self._write(db, work)

    def kv_delete(self, store: str, key: str, database: str | None = None,
                  persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        check_name("store", store)
        check_name("key", key)
        db = self._target("kv_delete", database, persist, writes=True)
        table = _table(db, KV_TABLE)

        def work(conn: Any) -> dict[str, Any]:
            try:
                deleted = conn.execute(f"DELETE FROM {table} WHERE store_name = %s AND key = %s",
                                       (store, key)).rowcount
            except _missing_table():
                deleted = 0
            return {"deleted": deleted > 0, "store": store, "key": key,
                    "resolved_database": db}

        return self._write(db, work)

    def kv_clear(self, store: str, database: str | None = None,
                 persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        check_name("store", store)
        db = self._target("kv_clear", database, persist, writes=True)
        table = _table(db, KV_TABLE)

        def work(conn: Any) -> dict[str, Any]:
            try:
                removed = conn.execute(f"DELETE FROM {table} WHERE store_name = %s",
                                       (store,)).rowcount
            except _missing_table():
                removed = 0
            return {"store": store, "removed": max(removed, 0), "resolved_database": db}

        return self._write(db, work)

    # saved queries

    def _queries_db(self) -> str:
        return PERSISTENT_ALIAS if self.session.persistent_db is not None else EPHEMERAL_ALIAS

    def save_query(self, name: str, sql: str,
                   description: str | None = None) -> defer.Deferred[dict[str, Any]]:
        check_name("name", name, MAX_QUERY_NAME)
        if not isinstance(sql, str) or not sql.strip():
            raise ToolFailure("sql: give the statement to save, e.g. SELECT count(*) FROM sales")
        problem = read_only_problem(sql)
        if problem is not None:
            raise ToolFailure(f"sql: a saved query is one statement that query can run, and "
                              f"{problem}")
        if description is not None and not isinstance(description, str):
            raise ToolFailure("description: give text that says what the query answers, or "
                              "leave it out")
        db = self._queries_db()
        if self.tools.read_only and db != EPHEMERAL_ALIAS:
            raise ToolFailure("save_query keeps queries in the persistent database, and the "
                              "server runs with --read-only; run the SQL with query instead")
        table = _table(db, QUERIES_TABLE)

        def work(conn: Any) -> dict[str, Any]:
            _create_queries(conn, table)
            with conn.transaction():
                found = conn.execute(f"SELECT created_at FROM {table} WHERE name = %s LIMIT 1",
                                     (name,)).fetchone()
                if found is not None:
                    raise ToolFailure(
                        f"name: a saved query named {name!r} exists already (saved "
                        f"{found[0].isoformat(timespec='seconds')}); delete it first with "
                        f"delete_query to replace it, or choose another name")
                created = conn.execute(
                    f"INSERT INTO {table} VALUES (%s, %s, %s, "
                    f"CAST(current_timestamp AT TIME ZONE 'UTC' AS TIMESTAMP)) "
                    f"RETURNING created_at", (name, sql, description)).fetchone()[0]
            return {"saved": True, "name": name,
                    "resources": [f"hyper://queries/{name}/definition",
                                  f"hyper://queries/{name}/result"],
                    "created_at": _utc(created), "resolved_database": db}

        return self._write(db, work, "sql")

    def delete_query(self, name: str) -> defer.Deferred[dict[str, Any]]:
        if not isinstance(name, str) or not name:
            raise ToolFailure("name: give the name of the saved query to delete")
        db = self._queries_db()
        if self.tools.read_only and db != EPHEMERAL_ALIAS:
            raise ToolFailure("delete_query would change the persistent database, and the "
                              "server runs with --read-only; the saved query stays")
        table = _table(db, QUERIES_TABLE)

        def work(conn: Any) -> dict[str, Any]:
            try:
                deleted = conn.execute(f"DELETE FROM {table} WHERE name = %s",
                                       (name,)).rowcount
            except _missing_table():
                deleted = 0
            return {"deleted": deleted > 0, "name": name}

        return self._write(db, work, "name")


# -- for the resources ---------------------------------------------------------------

def _all_saved(tools: Any, name: str | None) -> defer.Deferred[list[dict[str, Any]]]:
    memory = Memory(tools)
    table = _table(memory._queries_db(), QUERIES_TABLE)
    where, params = ("WHERE name = %s", (name,)) if name is not None else ("", ())

    def work(conn: Any) -> list[dict[str, Any]]:
        return [_saved(row) for row in _rows(
            conn, f"SELECT name, sql, description, created_at FROM {table} {where} "
                  f"ORDER BY name", params)]

    return memory._read(work, parameter=None)


def saved_queries(tools: Any) -> defer.Deferred[list[dict[str, Any]]]:
    """
    Every saved query of the session's store (C{persistent}, or C{local}
    under --ephemeral-only), by name: C{{"name", "sql", "description",
    "created_at"}} (description may be None; created_at is ISO 8601, UTC).
    """
    return _all_saved(tools, None)


def saved_query(tools: Any, name: str) -> defer.Deferred[dict[str, Any] | None]:
    """The saved query C{name} (as L{saved_queries} gives them), or None."""
    return _all_saved(tools, name).addCallback(lambda found: found[0] if found else None)


# -- the MCP tools -------------------------------------------------------------------

STORE = ("The store's name: 1 to 512 letters, digits, _, . or -. A store is made by its "
         "first write; each database has its own stores.")
KEY = "The key within the store: 1 to 512 letters, digits, _, . or -."
KV_DATABASE = ("The database the store is in. Default `local`, this session's scratch "
               "database, deleted when the session ends; `persistent` keeps the store and "
               "shares it with the user's other assistants; an alias given to "
               "attach_database works too.")
KV_PERSIST = ("Whether the store is in `persistent` (the same as database=\"persistent\"). "
              "Default false.")
VALUE = ("The value: one JSON document as text, at most 64 MiB, e.g. {\"rows\": 3}, [1, 2] or "
         "\"plain text in quotes\". Give value or value_path, not both; neither has a "
         "default.")
VALUE_PATH = ("A file whose content is the value, by absolute path: UTF-8 JSON of at most 64 "
              "MiB, read by the server. Give value or value_path, not both; neither has a "
              "default.")
OVERWRITE = ("Whether to replace the value of a key that exists. Default true; with false an "
             "existing key is left as it is and reported as skipped.")
ENTRIES = ("The entries to write, as a list of {\"key\": ..., \"value\": ...} objects (value "
           "is JSON text, as kv_set's), each key once, at most 10,000. All are written or "
           "none.")
VALUES = ("Whether to return each key's value too, as `entries`. Default false: the keys "
          "only.")
QUERY_NAME = ("The saved query's name: 1 to 128 letters, digits, _, . or -; it names its "
              "resources, hyper://queries/NAME/definition and .../result.")
QUERY_SQL = ("The statement to save: one read-only statement (SELECT, WITH, VALUES, EXPLAIN "
             "or SHOW) in Hyper's PostgreSQL dialect; tables it names need not exist yet.")
QUERY_DESCRIPTION = "What the query answers, in a sentence. Default: none."
DELETE_NAME = "The saved query's name, as given to save_query."


def register(kit: Any) -> None:
    """Add the key-value and saved-query tools to the server being built."""
    from typing import Annotated

    from mcp.types import CallToolResult
    from pydantic import Field, WrapValidator

    memory = Memory(kit.tools)

    def Text(description: str) -> Any:  # noqa: N802 (reads as a type)
        # Typed as str, not str | None, so that the SDK hands over JSON text
        # as given instead of parsing it first; null still means "not given".
        keep_null = WrapValidator(lambda value, handler: None if value is None
                                  else handler(value))
        return Annotated[str, Field(description=description), keep_null]

    tool, Arg, call = kit.tool, kit.arg, kit.call  # noqa: N806 (Arg reads as a type)
    Result = kit.Result  # noqa: N806
    write = kit.hints(read_only=False, destructive=True, idempotent=True)
    Store, Key = Arg(str, STORE), Arg(str, KEY)  # noqa: N806
    Database, Persist = Arg(str | None, KV_DATABASE), Arg(bool | None, KV_PERSIST)  # noqa: N806
    entry_schema = {
        "type": "object",
        "properties": {"key": {"type": "string", "description": KEY},
                       "value": {"type": "string",
                                 "description": "The value, one JSON document as text."}},
        "required": ["key", "value"],
        "additionalProperties": False,
    }
    Entries = Annotated[list[dict[str, str]],  # noqa: N806
                        Field(description=ENTRIES, json_schema_extra={"items": entry_schema})]

    where = Field(description="The database the store is in.")

    class Set(Result):
        """What kv_set did."""

        stored: bool = Field(description="Whether the value was written.")
        created: bool = Field(description="Whether the key is new.")
        existed: bool | None = Field(
            None, description="True when overwrite=false left an existing key as it was.")
        store: str
        key: str
        value_bytes: int = Field(description="The value's size in bytes of UTF-8.")
        warning: str | None = Field(None, description="Why a large value is better elsewhere.")
        resolved_database: str = where

    class SetMany(Result):
        """What kv_set_many did."""

        stored: int = Field(description="How many entries were written.")
        created: int = Field(description="How many of those keys are new.")
        overwritten: int | None = Field(
            None, description="How many existing keys got a new value (overwrite=true).")
        skipped: int | None = Field(
            None, description="How many existing keys were left as they were (overwrite=false).")
        total_bytes: int = Field(description="The size of the values written, in bytes.")
        resolved_database: str = where

    class Got(Result):
        """One key's value."""

        found: bool = Field(description="Whether the key is in the store.")
        value: str | None = Field(description="The value (JSON text), or null if not found.")
        resolved_database: str = where

    class Entry(Result):
        key: str
        value: str | None

    class Listed(Result):
        """A store's keys, in order, or its entries."""

        store: str
        count: int = Field(description="How many keys the store holds.")
        keys: list[str] | None = Field(None, description="The keys, lowest first.")
        entries: list[Entry] | None = Field(
            None, description="The keys with their values, lowest key first (values=true).")
        resolved_database: str = where

    class Stores(Result):
        """The stores that hold at least one key."""

        count: int
        stores: list[str] = Field(description="Their names, in order.")
        resolved_database: str = where

    class Size(Result):
        """How much a store holds."""

        store: str
        size: int = Field(description="How many keys.")
        bytes: int = Field(description="The size of its values, in bytes.")
        resolved_database: str = where

    class Popped(Result):
        """The entry taken from the store, if there was one."""

        found: bool = Field(description="Whether the store had an entry to pop.")
        store: str
        key: str | None = Field(None, description="The lowest key, now removed.")
        value: str | None = Field(None, description="Its value.")
        resolved_database: str = where

    class Deleted(Result):
        """Whether the key was there to delete."""

        deleted: bool
        store: str
        key: str
        resolved_database: str = where

    class Cleared(Result):
        """How many keys the store lost."""

        store: str
        removed: int
        resolved_database: str = where

    class Saved(Result):
        """The query saved, and where to read it."""

        saved: bool
        name: str
        resources: list[str] = Field(description="Its definition's and its result's URIs.")
        created_at: str = Field(description="When it was saved (ISO 8601, UTC).")
        resolved_database: str = Field(description="The database that keeps it.")

    class QueryDeleted(Result):
        """Whether the saved query was there to delete."""

        deleted: bool
        name: str

    @tool("Remember a value", write)
    async def kv_set(store: Store, key: Key,
                     value: Text(VALUE) = None,
                     value_path: Arg(str | None, VALUE_PATH) = None,
                     overwrite: Arg(bool | None, OVERWRITE) = None,
                     database: Database = None,
                     persist: Persist = None) -> Annotated[CallToolResult, Set]:
        """
        Keep a JSON value under a key of a named store, to read it back later
        without making a table. Without database or persist it goes to this
        session's scratch database and is lost when the session ends;
        persist=true keeps it and shares it with the user's other assistants.
        """
        return await call(memory.kv_set, store=store, key=key, value=value,
                          value_path=value_path, overwrite=overwrite, database=database,
                          persist=persist)

    @tool("Remember several values", write)
    async def kv_set_many(store: Store, entries: Entries,
                          overwrite: Arg(bool | None, OVERWRITE) = None,
                          database: Database = None,
                          persist: Persist = None) -> Annotated[CallToolResult, SetMany]:
        """
        Write several keys of one store at once, all or nothing: every key and
        value is checked first, and one bad entry writes none.
        """
        return await call(memory.kv_set_many, store=store, entries=entries,
                          overwrite=overwrite, database=database, persist=persist)

    @tool("Read a value", kit.reads)
    async def kv_get(store: Store, key: Key, database: Database = None,
                     persist: Persist = None) -> Annotated[CallToolResult, Got]:
        """Read the value of one key of a store; a missing key is found=false, not an error."""
        return await call(memory.kv_get, store=store, key=key, database=database,
                          persist=persist)

    @tool("List a store", kit.reads)
    async def kv_list(store: Store, values: Arg(bool | None, VALUES) = None,
                      database: Database = None,
                      persist: Persist = None) -> Annotated[CallToolResult, Listed]:
        """List the keys of a store, lowest first, or with values=true its whole content."""
        return await call(memory.kv_list, store=store, values=values, database=database,
                          persist=persist)

    @tool("List the stores", kit.reads)
    async def kv_list_stores(database: Database = None,
                             persist: Persist = None) -> Annotated[CallToolResult, Stores]:
        """The stores of a database that hold at least one key."""
        return await call(memory.kv_list_stores, database=database, persist=persist)

    @tool("Size of a store", kit.reads)
    async def kv_size(store: Store, database: Database = None,
                      persist: Persist = None) -> Annotated[CallToolResult, Size]:
        """How many keys a store holds, and the size of their values in bytes."""
        return await call(memory.kv_size, store=store, database=database, persist=persist)

    @tool("Take the first value", kit.hints(read_only=False, destructive=True,
                                             idempotent=False))
    async def kv_pop(store: Store, database: Database = None,
                     persist: Persist = None) -> Annotated[CallToolResult, Popped]:
        """
        Remove and return the entry of a store with the lowest key (in
        character order), as from a work queue: however many assistants pop
        one store at once, each entry goes to exactly one of them.
        """
        return await call(memory.kv_pop, store=store, database=database, persist=persist)

    @tool("Forget a value", write)
    async def kv_delete(store: Store, key: Key, database: Database = None,
                        persist: Persist = None) -> Annotated[CallToolResult, Deleted]:
        """Delete one key of a store; a key that is not there is deleted=false, not an error."""
        return await call(memory.kv_delete, store=store, key=key, database=database,
                          persist=persist)

    @tool("Empty a store", write)
    async def kv_clear(store: Store, database: Database = None,
                       persist: Persist = None) -> Annotated[CallToolResult, Cleared]:
        """Delete every key of a store, and say how many there were."""
        return await call(memory.kv_clear, store=store, database=database, persist=persist)

    @tool("Save a query", kit.hints(read_only=False, destructive=False, idempotent=True))
    async def save_query(name: Arg(str, QUERY_NAME), sql: Arg(str, QUERY_SQL),
                         description: Text(QUERY_DESCRIPTION) = None
                         ) -> Annotated[CallToolResult, Saved]:
        """
        Keep a read-only query under a name, for every assistant of this user
        and across restarts (for this session only with --ephemeral-only);
        its result resource runs it on the tables as they are when read. A
        name in use is an error: delete_query first to replace it.
        """
        return await call(memory.save_query, name=name, sql=sql, description=description)

    @tool("Delete a saved query", write)
    async def delete_query(name: Arg(str, DELETE_NAME)) -> Annotated[CallToolResult,
                                                                     QueryDeleted]:
        """Delete a saved query; a name that is not saved is deleted=false, not an error."""
        return await call(memory.delete_query, name=name)
