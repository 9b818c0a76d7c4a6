"""
The session's databases as MCP resources, at upstream's URIs.

Fixed resources: C{hyper://workspace} (the databases, their tables, rows
and disk use), C{hyper://tables} (every table with its columns and row
count), C{hyper://readme} (the same as Markdown, with the URIs to read
next) and C{hyper://schema/kv} (how the key-value scratchpad is kept).
Templates: one table's schema (C{hyper://tables/{name}/schema}), its first
rows as JSON (C{.../sample}) and as CSV (C{.../csv-sample}), and a saved
query's definition (C{hyper://queries/{name}/definition}) and result
(C{.../result}: reading it runs the query, so it always shows the tables as
they are now).  C{resources/list} also names each table's and each saved
query's own URIs, as upstream does.

Everything is read through the session's L{Tools}, so the same rules apply
as to the tools: read-only SQL only, results capped and shaped alike.
Saved queries come from L{hyperdaemon.mcp.memory} (C{saved_queries},
C{saved_query}), imported when first read.

Changes: after every successful call of a tool that may change data (its
annotations do not say read-only), the server sends
C{notifications/resources/list_changed}, and C{notifications/resources/updated}
for each URI the client subscribed to with C{resources/subscribe}; clients
of the 2026-07-28 protocol get the same events on their
C{subscriptions/listen} stream.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
from typing import Any, Awaitable, Callable
from urllib.parse import quote

from twisted.internet import defer

from hyperdaemon.mcp.tools import ToolFailure, quote_identifier, table_reference

WORKSPACE = "hyper://workspace"
TABLES = "hyper://tables"
README = "hyper://readme"
KV_SCHEMA = "hyper://schema/kv"
TABLE_SCHEMA = "hyper://tables/{name}/schema"
TABLE_SAMPLE = "hyper://tables/{name}/sample"
TABLE_CSV_SAMPLE = "hyper://tables/{name}/csv-sample"
QUERY_DEFINITION = "hyper://queries/{name}/definition"
QUERY_RESULT = "hyper://queries/{name}/result"

#: Rows in a table's JSON sample, and in its CSV sample (upstream's sizes).
SAMPLE_ROWS = 5
CSV_SAMPLE_ROWS = 20

JSON = "application/json"

KV_SCHEMA_TEXT = """\
The key-value scratchpad (the kv_* tools) keeps its entries in a table of the
database each call names: `local` by default (this session's scratch database,
gone when the session ends), `persistent` (or persist=true) to keep them and
share them with the user's other assistants, or an attached database's alias.
Each database has its own table, made by its first write; a store in one is
not seen from another.  With --read-only, the `local` store still takes writes
(it is private to the session); `persistent` and attached databases do not.

  _hyperdb_kv_store (
      store_name TEXT,   -- the `store` argument of the kv_* tools
      key        TEXT,   -- the entry's key within its store
      value      TEXT    -- the entry's value, as JSON text
  )

Change entries only through the kv_* tools: they keep one entry per key and
store, and kv_pop hands each entry to exactly one caller, even when several
assistants pop one persistent store at once.  Read the table with SQL to join
entries onto data, always filtering on the store:

  SELECT t.*, kv.value AS note
  FROM sales t
  LEFT JOIN _hyperdb_kv_store kv
         ON kv.key = CAST(t.id AS TEXT) AND kv.store_name = 'notes';

The table must be in the same database as the one it is joined to, or both
written in full (persistent.public._hyperdb_kv_store).
"""


def register(kit: Any) -> None:
    """No tools: this family adds resources only (see L{serve})."""


# -- what the resources hold -------------------------------------------------------

def _wait(d: Any) -> Awaitable[Any]:
    return defer.maybeDeferred(lambda: d).asFuture(asyncio.get_running_loop())


async def _ask(method: Callable[..., Any], **kwargs: Any) -> Any:
    """A L{Tools} method's result, awaited (its L{ToolFailure} raised as it is)."""
    return await defer.maybeDeferred(method, **kwargs).asFuture(asyncio.get_running_loop())


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def table_name(alias: str, table: str) -> str:
    """How the tools and the URIs name C{table} of database C{alias}."""
    return table if alias == "local" else f"{alias}.public.{table}"


def table_uri(template: str, name: str) -> str:
    return template.replace("{name}", quote(name, safe=""))


async def tables(tools: Any) -> list[dict[str, Any]]:
    """Every table of every database of the session: its name, columns and row count."""
    listed = (await _ask(tools.list_attached_databases))["databases"]
    found: list[dict[str, Any]] = []
    for database in listed:
        alias = database["alias"]
        described = await _ask(tools.describe, database=alias)
        for table in described.get("tables") or []:
            found.append({"name": table_name(alias, table["table"]), "database": alias,
                          "table": table["table"], "columns": table["columns"]})
    if not found:
        return found
    references = [table_reference(t["table"], t["database"]) if t["database"] == "local"
                  else f"{quote_identifier(t['database'])}.public.{quote_identifier(t['table'])}"
                  for t in found]

    def count(conn: Any) -> list[int]:
        return [conn.execute(f"SELECT count(*) FROM {reference}").fetchone()[0]
                for reference in references]

    counts = await _wait(tools.session.call(count, retry=True, writes=False))
    for table, rows in zip(found, counts):
        table["row_count"] = rows
    return found


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


async def workspace(tools: Any) -> dict[str, Any]:
    """The databases with their tables, rows and file sizes, and where the server runs."""
    listed = (await _ask(tools.list_attached_databases))["databases"]
    found = await tables(tools)
    databases = []
    for database in listed:
        own = [t for t in found if t["database"] == database["alias"]]
        databases.append({**database, "table_count": len(own),
                          "total_rows": sum(t["row_count"] for t in own),
                          "disk_usage_bytes": _file_size(database["path"])})
    status = await _ask(tools.status)
    return {
        "databases": databases,
        "has_persistent": any(d["alias"] == "persistent" for d in listed),
        "table_count": len(found),
        "total_rows": sum(t["row_count"] for t in found),
        "disk_usage_bytes": sum(d["disk_usage_bytes"] or 0 for d in databases),
        "server": status,
    }


async def saved_queries(tools: Any) -> list[dict[str, Any]]:
    """The saved queries."""
    from hyperdaemon.mcp import memory

    return list(await _wait(memory.saved_queries(tools)))


async def saved_query(tools: Any, name: str) -> dict[str, Any]:
    """
    The saved query C{name}.

    @raise ResourceNotFoundError: if there is none of that name.
    """
    from mcp.server.mcpserver.exceptions import ResourceNotFoundError

    from hyperdaemon.mcp import memory

    found = await _wait(memory.saved_query(tools, name))
    if found is None:
        known = [q["name"] for q in await saved_queries(tools)]
        listed = ", ".join(map(repr, known)) if known else "none"
        raise ResourceNotFoundError(
            f"there is no saved query {name!r} (saved queries: {listed}); save one with "
            f"save_query, or read hyper://readme for what there is")
    return dict(found)


async def query_result(tools: Any, name: str) -> dict[str, Any]:
    """The saved query C{name}, run now: its definition and its rows."""
    from mcp.server.mcpserver.exceptions import ResourceError

    query = await saved_query(tools, name)
    try:
        rows = await _ask(tools.query, sql=query["sql"])
    except ToolFailure as e:
        raise ResourceError(f"the saved query {name!r} failed: {e}") from None
    return {"name": query["name"], "sql": query["sql"],
            "description": query.get("description"), **rows}


async def table_schema(tools: Any, name: str) -> dict[str, Any]:
    described = await _described(tools, name)
    return {"name": name, "columns": described["columns"],
            "row_count": described["row_count"]}


async def table_sample(tools: Any, name: str, rows: int = SAMPLE_ROWS) -> dict[str, Any]:
    described = await _described(tools, name)
    sample = await _ask(tools.sample, table=name, n=rows)
    return {"table": name, "row_count": described["row_count"],
            "sample_size": len(sample["rows"]), "schema": described["columns"],
            "rows": [dict(zip(sample["columns"], row)) for row in sample["rows"]]}


async def table_csv_sample(tools: Any, name: str, rows: int = CSV_SAMPLE_ROWS) -> str:
    await _described(tools, name)
    sample = await _ask(tools.sample, table=name, n=rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(sample["columns"])
    for row in sample["rows"]:
        writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, list) else v
                         for v in row])
    return out.getvalue()


async def _described(tools: Any, name: str) -> dict[str, Any]:
    """C{describe} of one table; a missing table is L{ResourceNotFoundError}."""
    from mcp.server.mcpserver.exceptions import ResourceNotFoundError

    try:
        return await _ask(tools.describe, table=name)
    except ToolFailure as e:
        # The tools' sentence names their parameter; here the name is in the URI.
        message = str(e).removeprefix("table: ")
        raise ResourceNotFoundError(
            f"{message}; hyper://tables lists every table by the name its URIs use") from None


async def readme(tools: Any) -> str:
    """The databases, tables and saved queries as Markdown, with the URIs to read next."""
    found = await tables(tools)
    listed = (await _ask(tools.list_attached_databases))["databases"]
    queries = await saved_queries(tools)
    lines = ["# This session's databases", ""]
    for database in listed:
        lines.append(f"- `{database['alias']}` ({database['kind']}): `{database['path']}`")
    lines += ["", "Unqualified table names mean `local`; write other databases' tables in "
              "full, e.g. `persistent.public.sales`.", ""]
    if found:
        lines += ["## Tables", "", "| Table | Rows | Columns |", "|---|---:|---|"]
        for t in found:
            columns = ", ".join(f"`{c['name']}` {c['type']}" for c in t["columns"])
            lines.append(f"| `{t['name']}` | {t['row_count']} | {columns} |")
        lines += ["", "## Resources for each table", ""]
        for t in found:
            lines.append(f"- `{table_uri(TABLE_SCHEMA, t['name'])}`: columns and row count; "
                         f"`.../sample`: the first {SAMPLE_ROWS} rows as JSON; "
                         f"`.../csv-sample`: the first {CSV_SAMPLE_ROWS} as CSV")
    else:
        lines += ["No tables yet: load_file or load_data loads CSV, JSON or Parquet data."]
    if queries:
        lines += ["", "## Saved queries", ""]
        for q in queries:
            about = f": {q['description']}" if q.get("description") else ""
            lines.append(f"- `{q['name']}`{about} (`{table_uri(QUERY_RESULT, q['name'])}` "
                         f"runs it)")
    lines += ["", "## Tools", "",
              "- describe and sample show tables; query runs read-only SQL; execute changes "
              "data.",
              "- load_file and load_data load data; export writes a query's rows to a file.",
              "- get_readme explains every tool.", ""]
    return "\n".join(lines)


# -- the server side ---------------------------------------------------------------

def serve(server: Any, kit: Any) -> None:
    """Add the resources to C{server}, and announce changes to them."""
    from mcp.server.mcpserver.exceptions import ResourceError

    tools = kit.tools

    def resource(uri: str, name: str, title: str, description: str,
                 mime_type: str = JSON) -> Callable[[Any], Any]:
        return server.resource(uri, name=name, title=title, description=description,
                               mime_type=mime_type)

    async def checked(work: Awaitable[Any]) -> Any:
        try:
            return await work
        except ToolFailure as e:
            raise ResourceError(str(e)) from None

    @resource(WORKSPACE, "Databases of this session", "Workspace",
              "This session's databases (local scratch, persistent, attached files) with "
              "their table counts, rows and file sizes, and where the server runs.")
    async def read_workspace() -> str:
        return _dumps(await checked(workspace(tools)))

    @resource(TABLES, "All tables", "All tables",
              "Every table of every database of this session, with its columns and row "
              "count; `name` is how tools and the table URIs name it.")
    async def read_tables() -> str:
        return _dumps({"tables": await checked(tables(tools))})

    @resource(README, "Database overview", "Overview of this session's databases",
              "A Markdown overview of this session's databases, tables and saved queries, "
              "with the resource URIs to read next.", "text/markdown")
    async def read_readme() -> str:
        return await checked(readme(tools))

    @resource(KV_SCHEMA, "Key-value store schema", "Key-value scratchpad schema",
              "How the kv_* tools keep their entries: the table, its columns, which "
              "database holds it, and how to join entries onto a table with SQL.",
              "text/plain")
    async def read_kv_schema() -> str:
        return KV_SCHEMA_TEXT

    @resource(TABLE_SCHEMA, "Table schema", "Table schema",
              "One table's columns with their SQL types, and its row count. `name` is as "
              "in hyper://tables: plain for `local`, in full for other databases.")
    async def read_table_schema(name: str) -> str:
        return _dumps(await checked(table_schema(tools, name)))

    @resource(TABLE_SAMPLE, "Table sample (JSON)", "Table sample",
              f"One table's first {SAMPLE_ROWS} rows as JSON objects, with its columns and "
              f"row count; the sample tool takes any number of rows.")
    async def read_table_sample(name: str) -> str:
        return _dumps(await checked(table_sample(tools, name)))

    @resource(TABLE_CSV_SAMPLE, "Table sample (CSV)", "Table sample (CSV)",
              f"One table's first {CSV_SAMPLE_ROWS} rows as CSV, with a header line.",
              "text/csv")
    async def read_table_csv_sample(name: str) -> str:
        return await checked(table_csv_sample(tools, name))

    @resource(QUERY_DEFINITION, "Saved query definition", "Saved query definition",
              "A query saved with save_query: its name, SQL and description.")
    async def read_query_definition(name: str) -> str:
        return _dumps(await checked(saved_query(tools, name)))

    @resource(QUERY_RESULT, "Saved query result", "Saved query result",
              "A saved query run now (nothing is cached): its SQL and its rows, at most "
              "200, as the query tool gives them.")
    async def read_query_result(name: str) -> str:
        return _dumps(await checked(query_result(tools, name)))

    _list_each_table_and_query(server, tools)
    _announce_changes(server, kit)


def _list_each_table_and_query(server: Any, tools: Any) -> None:
    """Have C{resources/list} name each table's and saved query's own URIs too."""
    from mcp.types import Resource as Listed

    fixed = server.list_resources

    async def list_resources() -> list[Any]:
        listed = list(await fixed())
        try:
            found = await tables(tools)
            queries = await saved_queries(tools)
        except Exception:
            # The list of fixed resources is still worth having.
            return listed
        for t in found:
            name = t["name"]
            listed += [
                Listed(uri=table_uri(TABLE_SCHEMA, name), name=f"Schema of {name}",
                       title=f"{name}: schema", mime_type=JSON,
                       description=f"Columns and row count ({t['row_count']} rows) of "
                                   f"{name}."),
                Listed(uri=table_uri(TABLE_SAMPLE, name), name=f"Sample of {name}",
                       title=f"{name}: sample", mime_type=JSON,
                       description=f"The first {SAMPLE_ROWS} rows of {name} as JSON."),
                Listed(uri=table_uri(TABLE_CSV_SAMPLE, name), name=f"CSV sample of {name}",
                       title=f"{name}: sample (CSV)", mime_type="text/csv",
                       description=f"The first {CSV_SAMPLE_ROWS} rows of {name} as CSV."),
            ]
        for q in queries:
            name = q["name"]
            listed += [
                Listed(uri=table_uri(QUERY_DEFINITION, name), name=f"Query {name}",
                       title=f"{name}: definition", mime_type=JSON,
                       description=q.get("description") or f"The saved query {name}."),
                Listed(uri=table_uri(QUERY_RESULT, name), name=f"Result of {name}",
                       title=f"{name}: result", mime_type=JSON,
                       description=f"The saved query {name}, run when read."),
            ]
        return listed

    # MCPServer lists only resources added one by one; tables come and go.
    server.list_resources = list_resources


def _announce_changes(server: Any, kit: Any) -> None:
    """
    After a tool that may change data succeeds, tell the client that the
    resource list may have changed, and that each resource it subscribed to
    may have; serve C{resources/subscribe} and C{resources/unsubscribe}.
    """
    import weakref

    import mcp.types as types
    from mcp.server.lowlevel.server import NotificationOptions
    from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated

    lowlevel = server._lowlevel_server
    # Per session: one server may serve several (the MCP host), each with
    # its own client and its own subscriptions.
    by_session: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()
    read_only: dict[str, bool] = {}

    def subscribed() -> set[str]:
        return by_session.setdefault(kit.tools.session, set())

    async def subscribe(ctx: Any, params: Any) -> Any:
        subscribed().add(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: Any) -> Any:
        subscribed().discard(str(params.uri))
        return types.EmptyResult()

    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams,
                                 subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams,
                                 unsubscribe)

    # The SDK declares listChanged only when asked to at start: ask it.
    made = lowlevel.create_initialization_options

    def with_changes(notification_options: Any = None, *args: Any, **kwargs: Any) -> Any:
        return made(notification_options or NotificationOptions(resources_changed=True),
                    *args, **kwargs)

    lowlevel.create_initialization_options = with_changes

    async def may_change(name: Any) -> bool:
        if not read_only:
            for listed in await server.list_tools():
                hints = listed.annotations
                read_only[listed.name] = bool(hints is not None and hints.read_only_hint)
        return not read_only.get(name, False)

    async def announce(ctx: Any, call_next: Any) -> Any:
        outcome = await call_next(ctx)
        if ctx.method != "tools/call" or ctx.request_id is None:
            return outcome
        failed = (outcome.get("isError") if isinstance(outcome, dict)
                  else getattr(outcome, "is_error", False))
        if failed or not await may_change((ctx.params or {}).get("name")):
            return outcome
        try:
            from mcp_types.version import MODERN_PROTOCOL_VERSIONS

            if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
                bus = server._subscriptions
                await bus.publish(ResourcesListChanged())
                for uri in sorted(subscribed()):
                    await bus.publish(ResourceUpdated(uri=uri))
            else:
                await ctx.session.send_resource_list_changed()
                for uri in sorted(subscribed()):
                    await ctx.session.send_resource_updated(uri)
        except Exception as e:  # an announcement must never fail the call
            import sys

            print(f"hyperdb-mcp: could not announce a change: {e}", file=sys.stderr)
        return outcome

    server.middleware.append(announce)
