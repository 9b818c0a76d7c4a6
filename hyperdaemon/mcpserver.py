"""
The MCP server process: C{hyperdb-mcp} on stdio.

Twisted and the MCP SDK share one asyncio event loop (Twisted's asyncio
reactor): the session's Deferreds are awaited as futures, the SDK serves
stdio.  Before it serves, the server opens its session (finding or spawning
the daemon, or a private C{hyperd} with C{--no-daemon}), so that
C{hyperdb-mcp daemon status} lists it at once.  When stdin closes, or on
SIGTERM/SIGINT, it closes the session (its ephemeral database goes) and
exits promptly, even in the middle of a tool call: a load under way stops,
the statement under way is cancelled, and neither the SDK's stdin reader
thread nor its unwinding can keep the process alive.

Start-up is mostly the SDK's import, Python work that holds the GIL: it runs
in a thread while the reactor opens the session, so that waiting on the
daemon (or its spawn) and on C{hyperd} adds nothing to it.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys
from typing import Any, Awaitable, Callable

from . import __version__

INSTRUCTIONS = """\
SQL analytics over Hyper (PostgreSQL dialect) for this session.
Databases: `local` is your private scratch database (the default for unqualified
table names; it is deleted when the session ends); `persistent` is shared with the
user's other assistants and kept. Qualify tables as persistent.public.name.
Start with get_readme, then describe, then query."""

README = """\
# hyperdb-mcp

SQL analytics over Hyper, shared by every assistant of this user.

## Databases
- `local`: this session's private scratch database. Unqualified table names go
  here. It is deleted when the session ends.
- `persistent`: the user's shared database (absent with --ephemeral-only). Every
  assistant of this user sees the same tables. Write `persistent.public.t`.
- more: attach_database attaches a .hyper file under an alias of your choice.

## Tools
- query(sql, database?): one read-only statement (SELECT, WITH, VALUES, EXPLAIN,
  SHOW); results are capped at 200 rows with a note when cut.
- execute(sql: [statements], database?): changes; several statements run in one
  transaction (all or nothing).
- load_data(table, data, format?, mode?, schema?, database?, persist?): inline CSV
  (with a header), a JSON array of objects, or JSON lines. mode: replace (default)
  or append. persist=true loads into `persistent`.
- load_file(table, path, ...): CSV, JSON/JSONL or Parquet from a file path.
- query_data(data, sql, table_name?) / query_file(path, sql, table_name?):
  one-shot analysis of inline data or a file, exposed as table `data` (or
  table_name); nothing is kept.
- describe(table?, database?): tables and columns; sample(table, n?, database?).
- attach_database(alias, kind='file', path, writable?, on_missing?),
  detach_database(alias), list_attached_databases().
- export(path, format: csv|parquet|hyper, sql? | table?, overwrite?).
- status(): mode, daemon, endpoint, session, paths.

## SQL tips
- Hyper speaks PostgreSQL's dialect: date_trunc, window functions, CTEs, COPY.
- Read files directly: SELECT * FROM external('/abs/path/file.parquet').
- Errors come back as tool errors with Hyper's message and a hint.
"""


def _as_future(d: Any) -> Awaitable[Any]:
    import asyncio

    return d.asFuture(asyncio.get_running_loop())


def build_server(tools: Any) -> Any:
    """The MCP server with every tool bound to C{tools} (a L{hyperdaemon.tools.Tools})."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from twisted.internet import defer

    from .tools import ToolFailure

    server = MCPServer("hyperdb-mcp", instructions=INSTRUCTIONS)

    async def call(method: Callable[..., Any], **kwargs: Any) -> str:
        try:
            result = await _as_future(defer.maybeDeferred(method, **kwargs))
        except ToolFailure as e:
            raise ToolError(str(e)) from None
        except Exception as e:  # never crash the server over one call
            raise ToolError(f"{type(e).__name__}: {e}") from None
        return json.dumps(result, default=str, separators=(",", ":"))

    @server.tool(description="Run one read-only SQL statement; returns columns and rows.")
    async def query(sql: str, database: str | None = None) -> str:
        return await call(tools.query, sql=sql, database=database)

    @server.tool(description="Run SQL statements that change data; several run atomically.")
    async def execute(sql: list[str], database: str | None = None) -> str:
        return await call(tools.execute, sql=sql, database=database)

    @server.tool(description="Load inline CSV, a JSON array or JSON lines into a table.")
    async def load_data(table: str, data: str, format: str | None = None,
                        mode: str | None = None, schema: dict[str, str] | None = None,
                        database: str | None = None, persist: bool | None = None) -> str:
        return await call(tools.load_data, table=table, data=data, format=format, mode=mode,
                          schema=schema, database=database, persist=persist)

    @server.tool(description="Load a CSV, JSON/JSONL or Parquet file into a table.")
    async def load_file(table: str, path: str, mode: str | None = None,
                        schema: dict[str, str] | None = None,
                        json_extract_path: str | None = None, merge_key: Any = None,
                        database: str | None = None, persist: bool | None = None) -> str:
        return await call(tools.load_file, table=table, path=path, mode=mode, schema=schema,
                          json_extract_path=json_extract_path, merge_key=merge_key,
                          database=database, persist=persist)

    @server.tool(description="One-shot SQL over inline data, exposed as table `data`.")
    async def query_data(data: str, sql: str, format: str | None = None,
                         table_name: str | None = None,
                         schema: dict[str, str] | None = None) -> str:
        return await call(tools.query_data, data=data, sql=sql, format=format,
                          table_name=table_name, schema=schema)

    @server.tool(description="One-shot SQL over a file, exposed as table `data`.")
    async def query_file(path: str, sql: str, table_name: str | None = None,
                         schema: dict[str, str] | None = None,
                         json_extract_path: str | None = None) -> str:
        return await call(tools.query_file, path=path, sql=sql, table_name=table_name,
                          schema=schema, json_extract_path=json_extract_path)

    @server.tool(description="List the tables of a database, or one table's columns.")
    async def describe(table: str | None = None, database: str | None = None) -> str:
        return await call(tools.describe, table=table, database=database)

    @server.tool(description="The first n rows of a table (default 10).")
    async def sample(table: str, n: int | None = None, database: str | None = None) -> str:
        return await call(tools.sample, table=table, n=n, database=database)

    @server.tool(description="Attach a .hyper file under an alias.")
    async def attach_database(alias: str, kind: str, path: str | None = None,
                              writable: bool | None = None,
                              on_missing: str | None = None) -> str:
        return await call(tools.attach_database, alias=alias, kind=kind, path=path,
                          writable=writable, on_missing=on_missing)

    @server.tool(description="Detach a database attached with attach_database.")
    async def detach_database(alias: str) -> str:
        return await call(tools.detach_database, alias=alias)

    @server.tool(description="The databases attached to this session.")
    async def list_attached_databases() -> str:
        return await call(tools.list_attached_databases)

    @server.tool(description="Write a query's or a table's rows to CSV, Parquet or .hyper.")
    async def export(path: str, format: str, sql: str | None = None, table: str | None = None,
                     overwrite: bool | None = None, format_options: Any = None,
                     database: str | None = None) -> str:
        return await call(tools.export, path=path, format=format, sql=sql, table=table,
                          overwrite=overwrite, format_options=format_options,
                          database=database)

    @server.tool(description="Mode, daemon, hyperd endpoint, session and paths.")
    async def status() -> str:
        return await call(tools.status)

    @server.tool(description="A guide to these tools and databases; read it first.")
    async def get_readme() -> str:
        return README

    return server


def run(options: dict[str, Any]) -> int:
    """Serve MCP on stdio until stdin closes or a signal comes; the exit code."""
    import asyncio

    # Start-up makes some 160,000 objects that live as long as the process
    # (the SDK's models, mostly): collecting while they are made would cost
    # 70 ms for nothing.  They are frozen once the server is built.
    gc.disable()
    from twisted.internet import asyncioreactor

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # stdout is the protocol: every log line goes to stderr.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    outcome = {"code": 1}

    async def main() -> None:
        import asyncio

        from twisted.internet.threads import deferToThread

        from .session import Session
        from .tools import Tools

        opening = _as_future(Session.open(
            reactor, name=options.get("name") or "hyperdb-mcp",
            persistent_db=options.get("persistent_db"),
            ephemeral_only=bool(options.get("ephemeral_only")),
            no_daemon=bool(options.get("no_daemon")),
        ))
        importing = _as_future(deferToThread(importlib.import_module, "mcp.server.mcpserver"))
        try:
            session = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # A signal while opening: finish opening, so that we can close.
            session = await opening
            await _as_future(session.close())
            raise
        tools = None
        try:
            await importing

            def facts() -> dict[str, Any]:
                address = getattr(session._source, "address", None)
                return {
                    "daemon_port": address.port if address else None,
                    "daemon_version": address.version if address else None,
                }

            tools = Tools(session, read_only=bool(options.get("read_only")),
                          mode="private hyperd" if options.get("no_daemon") else "daemon",
                          status_facts=facts)
            server = build_server(tools)
            gc.freeze()
            gc.enable()
            serving = asyncio.ensure_future(server.run_stdio_async())
            try:
                # Shielded, so that a signal ends main at once: the SDK reads
                # stdin in a thread that no cancellation interrupts, and the
                # server would not finish unwinding before the client's next
                # line.  That thread goes with the process (os._exit).
                await asyncio.shield(serving)
            finally:
                serving.cancel()
            outcome["code"] = 0
        finally:
            if tools is not None:
                # A load under way stops at its next step; the close cancels
                # its statement: neither holds the exit up.
                tools.stop()
            await _as_future(session.close())

    def start() -> None:
        task = loop.create_task(main())
        # Not loop.add_signal_handler: it would take over the wakeup fd that
        # Twisted's SIGCHLD handling (the private hyperd's exit) relies on.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(task.cancel))

        def done(finished: asyncio.Task[None]) -> None:
            if finished.cancelled():
                outcome["code"] = 0
            elif finished.exception() is not None:
                print(f"hyperdb-mcp: {finished.exception()}", file=sys.stderr)
            reactor.stop()

        task.add_done_callback(done)

    reactor.callWhenRunning(start)
    # Twisted's handlers are needed for SIGCHLD (a private hyperd's exit);
    # start() then replaces its SIGTERM/SIGINT ones, so that a signal closes
    # the session before the reactor stops.
    reactor.run(installSignalHandlers=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # The SDK reads stdin in a thread that would keep the process alive.
    os._exit(outcome["code"])
