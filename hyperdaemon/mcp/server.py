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

What a client sees (L{build_server}): the package's version and a title;
every parameter described; hints on what each tool may change; results as
structured content that matches each tool's output schema, with the same
JSON as text for clients that read only text; arguments of the wrong shape
answered with one plain sentence naming the parameter.  Once the client says
who it is, the session takes its name, so that C{daemon status} tells the
assistants apart.
"""

import dataclasses
import gc
import importlib
import json
import os
import signal
import sys
from typing import Any, Awaitable, Callable, Iterable, Mapping

from hyperdaemon import __version__

TITLE = "hyperdb-mcp: SQL analytics over Hyper"
DESCRIPTION = ("SQL over CSV, JSON and Parquet data and .hyper files, in a Hyper database "
               "server shared by the user's assistants.")
#: The longest session name the daemon takes (the protocol's C{NAME}).
MAX_CLIENT_NAME = 200

# -- what each parameter is, for the input schemas --------------------------
# The first sentence says what the parameter is: errors quote it.

DATABASE = ("The database that unqualified table names refer to. Default `local`, this "
            "session's scratch database; `persistent` is the database shared with the "
            "user's other assistants; any alias given to attach_database works too. Names "
            "written in full (`alias.public.table`) reach any database whatever this is.")
TARGET_DATABASE = ("The database the table goes into. Default `local`, this session's "
                   "scratch database (deleted when the session ends); `persistent` keeps it "
                   "and shares it with the user's other assistants; an alias given to "
                   "attach_database works too.")
PERSIST = ("Whether to put the table in `persistent` (the same as "
           "database=\"persistent\"). Default false.")
TABLE_TO_WRITE = ("The name of the table to create or add to: a plain name such as "
                  "`sales`, made in `database`.")
SCHEMA = ("Column types to use instead of the inferred ones, as an object from column "
          "name to SQL type, e.g. {\"id\": \"BIGINT\", \"day\": \"DATE\"}. Columns not "
          "named keep their inferred type (BOOLEAN, BIGINT, DOUBLE PRECISION, DATE, "
          "TIMESTAMP, TIMESTAMPTZ or TEXT). Default: every type inferred.")
INLINE_DATA = ("The rows themselves, as text: CSV with a header line, a JSON array of "
               "objects, or JSON lines (one object per line).")
INLINE_FORMAT = ("The format of `data`: `csv`, `json` (an array of objects) or `jsonl` "
                 "(JSON lines). Default: guessed, JSON when the data starts with [ or {, "
                 "CSV otherwise.")
FILE_PATH = ("The file to read, by absolute path: .csv (with a header line), .json (an "
             "array of objects), .jsonl or .ndjson (JSON lines), .parquet, or Arrow IPC "
             "(.arrow, .feather, .ipc). The extension tells the format.")
JSON_EXTRACT_PATH = ("Where the records are inside a JSON document, as a dot-separated "
                     "path of keys, with numbers indexing arrays: `data.items`, "
                     "`results.0.rows`. Default: the document itself is the array of "
                     "records.")
LOAD_MODE = ("What to do with rows already in the table: `replace` (default) drops the "
             "table and makes it anew from these rows; `append` adds the rows to it.")
FILE_LOAD_MODE = ("What to do with rows already in the table: `replace` (default) drops "
                  "the table and makes it anew from these rows; `append` adds the rows to "
                  "it; `merge` updates the rows whose merge_key matches a row of the file "
                  "and adds the others.")
ONE_SHOT_SQL = ("One read-only statement (SELECT, WITH or VALUES) over the data, which "
                "it reads as the table named by `table_name`.")
READ_SQL = ("One read-only SQL statement in Hyper's PostgreSQL dialect: SELECT, WITH, "
            "VALUES, EXPLAIN or SHOW. Statements that change data go to execute.")
WRITE_SQL = ("The statements to run, one per item, in order, e.g. [\"CREATE TABLE t (a "
             "int)\", \"INSERT INTO t VALUES (1)\"]: DDL and DML in Hyper's PostgreSQL "
             "dialect.")
TABLE_TO_READ = ("The table's name: plain (`sales`, looked up in `database`) or in full "
                 "(`persistent.public.sales`).")
SAMPLE_SIZE = ("How many rows to return, from 0 (the columns only) to 200; more gives 200 "
               "with a note. Default 10.")
EXPORT_PATH = ("Where to write the file, by absolute path, in a folder that exists. An "
               "existing file is replaced only with overwrite=true.")
EXPORT_FORMAT = ("The file's format: `csv` (with a header line), `parquet`, `arrow_ipc` (an "
                 "Arrow IPC stream), or `hyper` (a new Hyper database holding one table); "
                 "`iceberg` writes an Apache Iceberg table, a folder at path holding "
                 "metadata/ and data/.")
EXPORT_SQL = ("A read-only query whose rows to write. Give either sql or table, not "
              "both; neither has a default.")
EXPORT_TABLE = ("A table whose rows to write, plain (looked up in `database`) or in full. "
                "Give either sql or table, not both; neither has a default.")
OVERWRITE = ("Whether to replace a file that already exists at `path` (never with "
             "--read-only). Default false: an existing file is an error and is left "
             "alone.")
FORMAT_OPTIONS = ("Options of the file format, as an object. csv: `delimiter` and `quote` "
                  "(one character each), `header` (true or false, default true), `null` "
                  "(the text written for a missing value); parquet: `codec` (snappy, zstd, "
                  "gzip or uncompressed) and `rows_per_row_group`; hyper: none. An option "
                  "the format does not have is an error. Default: none.")
ALIAS = ("The name the database gets in SQL (`alias.public.table`): letters, digits and "
         "_, not starting with a digit, and neither `local` nor `persistent`.")
KIND = ("What `path` is: `local_file`, a .hyper file (`file` and `hyper` mean the "
        "same).")
HYPER_PATH = "The .hyper file to attach, by absolute path. No default: always give it."
WRITABLE = ("Whether the database will be written to; true is refused when the server "
            "runs with --read-only. Default false.")
ON_MISSING = ("What to do when no file exists at `path`: `error` (default) or `create`, "
              "which makes a new empty database there (refused with --read-only).")
DETACH_ALIAS = ("The alias given to attach_database. `local` and `persistent` belong to "
                "the session and stay.")

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
- execute(sql: [statements], database?): changes, all or nothing. In a batch,
  CREATE TABLE statements come first, then row changes; DROP, ALTER and the like
  go alone, one per call.
- load_data(table, data, format?, mode?, schema?, database?, persist?): inline CSV
  (with a header), a JSON array of objects, or JSON lines, up to 64 MB (for more,
  write a file and use load_file). mode: replace (default) or append.
  persist=true loads into `persistent`. Types (BIGINT, DOUBLE PRECISION, BOOLEAN,
  DATE, TIMESTAMP, TIMESTAMPTZ, TEXT) are inferred from every row; `notes` says
  when a later row widened a column; schema={"col": "TYPE"} overrides.
- load_file(table, path, ...): CSV, JSON/JSONL or Parquet from a file path;
  mode merge with merge_key updates matching rows and inserts the others.
- query_data(data, sql, table_name?) / query_file(path, sql, table_name?):
  one-shot analysis of inline data or a file, exposed as table `data` (a file
  also under its name: `orders` for orders.csv) or table_name; nothing is kept.
- describe(table?, database?): tables and columns; sample(table, n?, database?).
- attach_database(alias, kind='local_file', path, writable?, on_missing?),
  detach_database(alias), list_attached_databases().
- export(path, format: csv|parquet|hyper, sql? | table?, overwrite?,
  format_options?).
- status(): mode, daemon, endpoint, session, paths.
- inspect_file(path): the types, counts, min/max and samples a load would give,
  without loading. load_files(files: [{table, path, ...}]): several loads at
  once, each failure in its own entry. Files may also be Arrow IPC (.arrow,
  .feather, .ipc); export writes arrow_ipc and iceberg too.
- copy_query(sql, target_table, mode: create|append|replace): a read-only
  query's rows into a table. load_iceberg(table, path): an Iceberg table.
- set_table_metadata(table, source_url?, purpose?, ...): notes on where a
  table came from; describe shows them with what each load recorded.
- watch_directory(path, table) / unwatch_directory(path): load each file
  dropped in a folder once its `name.ext.ready` sentinel appears.
- chart(sql, chart_type: bar|line|scatter|histogram, x?, y?, ...): an image.
- kv_set/kv_get/kv_list/kv_pop/kv_delete/... (store, key, database?|persist?):
  JSON notes; persist=true keeps them for the user's other assistants.
  save_query(name, sql) / delete_query(name): named read-only queries, kept.
- Resources: hyper://tables, hyper://workspace, hyper://tables/{name}/schema,
  hyper://queries/{name}/result; prompts: analyze-table, data-quality, ...

## SQL tips
- Hyper speaks PostgreSQL's dialect: date_trunc, window functions, CTEs, COPY.
- Read files directly: SELECT * FROM external('/abs/path/file.parquet').
- Errors come back as tool errors: the parameter at fault, what was wrong, and
  what to try.

## Values
- Floats in their shortest exact form; NaN and infinities as strings; NUMERIC as
  an exact string; dates and times in ISO 8601; intervals as ISO durations
  (P1DT2H); bytea as "\\x..." hex; arrays as JSON arrays.
- Text over 2,000 characters is cut: `cut_cells` lists the cells and `cut_note`
  says how to read the rest with substring().

## Safety
- A write to `persistent` or an attached file is on disk before the tool
  returns: it survives a crash of the database server.
- A load that fails leaves the table as it was.

## Results
- Each tool's parameters are described in its input schema, and its result
  follows its output schema (the same JSON is in the text).
"""


def _as_future(d: Any) -> Awaitable[Any]:
    import asyncio

    return d.asFuture(asyncio.get_running_loop())


# -- arguments of the wrong shape, in plain words ------------------------------

def _what(description: str) -> str:
    """A parameter's description cut to its first sentence, to quote in a sentence."""
    import re

    first = re.split(r"\.\s+(?=[A-Z`])", description.strip(), maxsplit=1)[0].rstrip(".")
    if first[:2].istitle():  # "The table" -> "the table"; "SQL ..." stays
        first = first[0].lower() + first[1:]
    return first


def _expected(schema: Mapping[str, Any]) -> str:
    """What a JSON schema (of one parameter) accepts, in words."""
    options = schema.get("anyOf")
    if options:
        kinds = [_expected(option) for option in options if option.get("type") != "null"]
        return " or ".join(dict.fromkeys(kinds))
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items") or {}
        return f"a list of {_plural(_expected(items))}" if items else "a list"
    if kind == "object":
        values = schema.get("additionalProperties")
        if isinstance(values, dict) and values.get("type"):
            return f"an object whose values are {_plural(_expected(values))}"
        return "an object"
    return {"string": "a string", "integer": "a whole number", "number": "a number",
            "boolean": "true or false"}.get(kind, "a value of another kind")


def _plural(expected: str) -> str:
    return {"a string": "strings", "a whole number": "whole numbers", "a number": "numbers",
            "true or false": "true or false"}.get(expected, expected)


def _described(value: Any) -> str:
    """A JSON value, as a reader would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"the string {json.dumps(shown, ensure_ascii=False)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _where_inside(value: Any, location: tuple[Any, ...]) -> str:
    """Which part of a list or object was wrong (from a pydantic error location)."""
    if len(location) > 1:
        part = location[1]
        if isinstance(value, list) and isinstance(part, int) and part < len(value):
            return f"a list whose item {part + 1} is {_described(value[part])}"
        if isinstance(value, dict) and isinstance(part, str) and part in value:
            return f"an object whose {part!r} is {_described(value[part])}"
    return _described(value)


def explain_arguments(tool: str, schema: Mapping[str, Any], arguments: Mapping[str, Any],
                      errors: Iterable[Mapping[str, Any]]) -> str:
    """
    One plain sentence per parameter that failed validation (from pydantic's
    C{errors()}): which parameter, what it must be, what it was, what to do.
    """
    properties = schema.get("properties", {})
    sentences: dict[str, str] = {}
    for error in errors:
        location = tuple(error.get("loc") or ())
        name = str(location[0]) if location else ""
        if name in sentences or name not in properties:
            continue
        prop = properties[name]
        what = _what(prop.get("description", ""))
        if error.get("type") == "missing":
            sentences[name] = (f"{tool} needs the parameter {name} ({what}). Call {tool} "
                               f"again with {name} set.")
            continue
        expected = _expected(prop)
        optional = "" if name in schema.get("required", ()) else ", or left out"
        sentences[name] = (
            f"{tool}: the parameter {name} ({what}) must be {expected}{optional}; it was "
            f"{_where_inside(arguments.get(name), location)}. Call {tool} again with {name} "
            f"as {expected}."
        )
    if not sentences:
        return (f"{tool} was given arguments it cannot use; check them against the tool's "
                f"parameters and call it again.")
    return " ".join(sentences.values())


def unknown_arguments(tool: str, schema: Mapping[str, Any],
                      arguments: Mapping[str, Any]) -> str | None:
    """The sentence refusing parameters C{tool} does not have, or C{None}."""
    import difflib

    known = list(schema.get("properties", {}))
    unknown = [name for name in arguments if name not in known]
    if not unknown:
        return None
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            hints.append(f"for {name}, did you mean {close[0]}?")
    listed = ", ".join(known) if known else "none"
    return (f"{tool} has no parameter {' or '.join(unknown)}"
            f"{' (' + '; '.join(hints) + ')' if hints else ''}; its parameters are: {listed}. "
            f"Call it again without {'it' if len(unknown) == 1 else 'them'}.")


def client_info(ctx: Any) -> Any:
    """
    The C{clientInfo} of the client behind a request's context (a dict at
    C{initialize}, the SDK's model later), or None.
    """
    if ctx.method == "initialize":
        return (ctx.params or {}).get("clientInfo")
    # Clients of the per-request protocol say who they are in every request.
    params = ctx.session.client_params
    return params.client_info if params is not None else None


def client_label(info: Any) -> str | None:
    """
    The session's name for an MCP client, from its C{clientInfo} (a mapping
    or the SDK's model): its C{name}, printable and at most
    L{MAX_CLIENT_NAME} characters; C{None} if it gave none.
    """
    name = info.get("name") if isinstance(info, Mapping) else getattr(info, "name", None)
    if not isinstance(name, str):
        return None
    label = "".join(char for char in name if char.isprintable()).strip()[:MAX_CLIENT_NAME]
    return label or None


# -- the server -----------------------------------------------------------------

#: Modules that add a family of tools (and resources or prompts) to the
#: server: each has C{register(kit)}, called before the server is made, and
#: may have C{serve(server, kit)}, called once it is made.
FAMILIES: tuple[str, ...] = ("hyperdaemon.mcp.watch", "hyperdaemon.mcp.chart",
                              "hyperdaemon.mcp.resources",
                              "hyperdaemon.mcp.files", "hyperdaemon.mcp.catalog",
                              "hyperdaemon.mcp.memory", "hyperdaemon.mcp.prompts",
                              "hyperdaemon.mcp.progress", "hyperdaemon.mcp.serverlog",)


@dataclasses.dataclass(frozen=True)
class Kit:
    """What a family of tools needs from L{build_server} to add its own."""

    #: The L{hyperdaemon.mcp.tools.Tools} of the session.
    tools: Any
    #: C{tool(title, annotations)}: a decorator that registers an async
    #: function as a tool (its docstring is the description).
    tool: Callable[[str, Any], Callable[[Any], Any]]
    #: C{arg(kind, description)}: a parameter's annotation.
    arg: Callable[[Any, str], Any]
    #: C{await call(method, **kwargs)}: a tool's result from a method that
    #: returns a dict or a Deferred of one; L{ToolFailure} becomes a tool error.
    call: Callable[..., Awaitable[Any]]
    #: C{result(value, text=None)}: a tool's result from a dict.
    result: Callable[..., Any]
    #: C{hints(read_only=, destructive=, idempotent=)}: tool annotations.
    hints: Callable[..., Any]
    #: The annotations of a tool that changes nothing, and of one that may
    #: replace or delete data.
    reads: Any
    replaces: Any
    #: The base of result models (extra fields allowed).
    Result: Any

def build_server(tools: Any, name_session: Callable[[str], None] | None = None) -> Any:
    """
    The MCP server with every tool bound to C{tools} (a L{hyperdaemon.mcp.tools.Tools}).

    C{name_session} is called with the client's name (L{client_label}) once it
    is known, and again if it changes.
    """
    from typing import Annotated

    import pydantic_core
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
    from mcp.server.mcpserver.tools import Tool
    from mcp.types import CallToolResult, TextContent, ToolAnnotations
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from twisted.internet import defer

    from hyperdaemon.mcp.tools import ToolFailure

    # -- results: what each tool returns (fields the tools add later are
    # allowed, and described where they are known) ---------------------------

    class Result(BaseModel):
        model_config = ConfigDict(extra="allow")

    class Rows(Result):
        """Rows of a query: the column names, and the rows as lists of values."""

        columns: list[str] = Field(description="The column names, in order.")
        rows: list[list[Any]] = Field(
            description="The rows, each a list of values in column order; at most 200.")
        row_count: int = Field(description="How many rows the statement gave in all.")
        truncated: bool = Field(False, description="Whether rows holds only the first ones.")
        note: str | None = Field(None, description="What was cut, and how to see the rest.")
        notes: list[str] | None = Field(
            None, description="How the data was read where it differs from what was given.")
        cut_cells: list[dict[str, Any]] | None = Field(
            None, description="The values shown only in part: their row (from 0), column "
                              "and full length.")
        cut_note: str | None = Field(None, description="How to read the rest of those values.")

    class Executed(Result):
        """What a batch of statements did."""

        statements: int = Field(description="How many statements ran.")
        rows_affected: int = Field(description="Rows inserted, updated or deleted, summed.")
        atomic: bool | None = Field(
            None, description="Whether the batch was applied all or nothing.")

    class Column(Result):
        name: str
        type: str = Field(description="Its SQL type.")

    class TableColumns(Result):
        table: str
        columns: list[Column]

    class Described(Result):
        """A database's tables with their columns, or one table's columns and size."""

        database: str = Field(description="The database described.")
        tables: list[TableColumns] | None = Field(
            None, description="Every table of the database (when no table was named).")
        table: str | None = Field(None, description="The table described.")
        row_count: int | None = Field(None, description="How many rows the table holds.")
        columns: list[Column] | None = Field(None, description="The table's columns.")

    class Loaded(Result):
        """The table loaded, and how."""

        table: str
        database: str
        rows_loaded: int = Field(description="How many rows were read into the table.")
        mode: str
        columns: dict[str, str] | None = Field(
            None, description="Each column's SQL type, inferred or given.")
        source: str | None = Field(None, description="Where the rows came from.")
        notes: list[str] | None = Field(
            None, description="How the data was read where it differs from what was given.")

    class Attached(Result):
        """The database attached."""

        alias: str
        path: str

    class Detached(Result):
        """The database detached (its file is kept)."""

        detached: str = Field(description="Its alias.")

    class Database(Result):
        alias: str
        path: str
        kind: str = Field(description="`ephemeral`, `persistent` or `attached`.")

    class Databases(Result):
        """The databases this session has attached."""

        databases: list[Database]

    class Exported(Result):
        """The file written."""

        path: str
        format: str
        bytes: int = Field(description="The file's size.")

    class Status(Result):
        """This server and where its data lives."""

        version: str
        mode: str = Field(description="`daemon` (the shared hyperd) or `private hyperd`.")
        read_only: bool
        hyperd_endpoint: str | None = None
        ephemeral_db: str
        persistent_db: str | None = None
        daemon_port: int | None = None
        daemon_version: str | None = None
        served_by: str | None = Field(
            None, description="`mcp host` (the user's one MCP host process serves this "
                              "session) or `in-process` (this server's own process).")

    class Readme(Result):
        """The guide."""

        readme: str = Field(description="The guide, in Markdown.")

    def result(value: dict[str, Any], text: str | None = None) -> CallToolResult:
        # The same JSON as text, compact and in UTF-8 (fewer tokens than
        # \u escapes), with what strict JSON lacks (NaN) as null.
        if text is None:
            text = pydantic_core.to_json(value, fallback=str).decode("utf-8")
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=value)

    async def call(method: Callable[..., Any], **kwargs: Any) -> CallToolResult:
        try:
            value = await _as_future(defer.maybeDeferred(method, **kwargs))
        except ToolFailure as e:
            raise ToolError(str(e)) from None
        except Exception as e:  # never crash the server over one call
            raise ToolError(f"{type(e).__name__}: {e}") from None
        return result(value)

    # -- the tools ------------------------------------------------------------

    def hints(*, read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations:
        return ToolAnnotations(read_only_hint=read_only, destructive_hint=destructive,
                               idempotent_hint=idempotent, open_world_hint=False)

    #: Reads and changes nothing: works under --read-only.
    reads = hints(read_only=True, destructive=False, idempotent=True)
    #: May drop, replace or delete data.
    replaces = hints(read_only=False, destructive=True, idempotent=False)

    registered: dict[str, Any] = {}

    def tool(title: str, annotations: ToolAnnotations) -> Callable[[Any], Any]:
        def register(fn: Any) -> Any:
            made = Tool.from_function(fn, title=title, annotations=annotations,
                                      description=" ".join(fn.__doc__.split()))
            made.parameters["additionalProperties"] = False  # refused by call_tool
            registered[made.name] = made
            return fn

        return register

    def Arg(kind: Any, description: str) -> Any:  # noqa: N802 (reads as a type)
        return Annotated[kind, Field(description=description)]

    DatabaseArg = Arg(str | None, DATABASE)

    @tool("Query", reads)
    async def query(sql: Arg(str, READ_SQL),
                    database: DatabaseArg = None) -> Annotated[CallToolResult, Rows]:
        """
        Run one read-only SQL statement and return its rows (at most 200, with a
        note when more were cut). Anything that would change data is refused.
        """
        return await call(tools.query, sql=sql, database=database)

    @tool("Execute statements", replaces)
    async def execute(sql: Arg(list[str], WRITE_SQL),
                      database: DatabaseArg = None) -> Annotated[CallToolResult, Executed]:
        """
        Run SQL statements that change data or tables (CREATE, INSERT, UPDATE,
        DELETE, DROP, ...), in order, as one batch that is applied all or
        nothing, and return how many rows they affected.
        """
        return await call(tools.execute, sql=sql, database=database)

    @tool("Load inline data", replaces)
    async def load_data(
        table: Arg(str, TABLE_TO_WRITE),
        data: Arg(str, INLINE_DATA),
        format: Arg(str | None, INLINE_FORMAT) = None,
        mode: Arg(str | None, LOAD_MODE) = None,
        schema: Arg(dict[str, str] | None, SCHEMA) = None,
        database: Arg(str | None, TARGET_DATABASE) = None,
        persist: Arg(bool | None, PERSIST) = None,
    ) -> Annotated[CallToolResult, Loaded]:
        """
        Load rows given inline (CSV, a JSON array of objects, or JSON lines)
        into a table, inferring column types; returns the table's columns and
        row count. A load that fails leaves no partial table.
        """
        return await call(tools.load_data, table=table, data=data, format=format, mode=mode,
                          schema=schema, database=database, persist=persist)

    @tool("Load a file", replaces)
    async def load_file(
        table: Arg(str, TABLE_TO_WRITE),
        path: Arg(str, FILE_PATH),
        mode: Arg(str | None, FILE_LOAD_MODE) = None,
        schema: Arg(dict[str, str] | None, SCHEMA) = None,
        json_extract_path: Arg(str | None, JSON_EXTRACT_PATH) = None,
        merge_key: Arg(str | list[str] | None,
                     "The column, or list of columns, that identifies a row when "
                     "mode=merge: required with merge, unused otherwise. No default.") = None,
        database: Arg(str | None, TARGET_DATABASE) = None,
        persist: Arg(bool | None, PERSIST) = None,
    ) -> Annotated[CallToolResult, Loaded]:
        """
        Load a CSV, JSON, JSON-lines or Parquet file into a table, inferring
        column types; returns the table's columns and row count. A load that
        fails leaves no partial table.
        """
        return await call(tools.load_file, table=table, path=path, mode=mode, schema=schema,
                          json_extract_path=json_extract_path, merge_key=merge_key,
                          database=database, persist=persist)

    @tool("Query inline data", reads)
    async def query_data(
        data: Arg(str, INLINE_DATA),
        sql: Arg(str, ONE_SHOT_SQL),
        format: Arg(str | None, INLINE_FORMAT) = None,
        table_name: Arg(str | None, "The name the SQL uses for the data. Default `data`.") = None,
        schema: Arg(dict[str, str] | None, SCHEMA) = None,
    ) -> Annotated[CallToolResult, Rows]:
        """
        Run one read-only statement over rows given inline, without keeping
        them: the data is a table for this call only.
        """
        return await call(tools.query_data, data=data, sql=sql, format=format,
                          table_name=table_name, schema=schema)

    @tool("Query a file", reads)
    async def query_file(
        path: Arg(str, FILE_PATH),
        sql: Arg(str, ONE_SHOT_SQL),
        table_name: Arg(str | None, "The name the SQL uses for the file's rows. Default: "
                      "`data`, and the file's name without its extension "
                      "(`orders` for orders.csv).") = None,
        schema: Arg(dict[str, str] | None, SCHEMA) = None,
        json_extract_path: Arg(str | None, JSON_EXTRACT_PATH) = None,
    ) -> Annotated[CallToolResult, Rows]:
        """
        Run one read-only statement over a CSV, JSON, JSON-lines or Parquet
        file, without loading it into a database.
        """
        return await call(tools.query_file, path=path, sql=sql, table_name=table_name,
                          schema=schema, json_extract_path=json_extract_path)

    @tool("Describe tables", reads)
    async def describe(
        table: Arg(str | None, "The table to describe: its columns and row count. Default: "
                 "every table of the database, with its columns.") = None,
        database: DatabaseArg = None,
    ) -> Annotated[CallToolResult, Described]:
        """List the tables of a database with their columns, or describe one table."""
        return await call(tools.describe, table=table, database=database)

    @tool("Sample a table", reads)
    async def sample(table: Arg(str, TABLE_TO_READ), n: Arg(int | None, SAMPLE_SIZE) = None,
                     database: DatabaseArg = None) -> Annotated[CallToolResult, Rows]:
        """Return the first rows of a table."""
        return await call(tools.sample, table=table, n=n, database=database)

    @tool("Attach a database",
          hints(read_only=False, destructive=False, idempotent=True))
    async def attach_database(
        alias: Arg(str, ALIAS),
        kind: Arg(str, KIND),
        path: Arg(str | None, HYPER_PATH) = None,
        writable: Arg(bool | None, WRITABLE) = None,
        on_missing: Arg(str | None, ON_MISSING) = None,
    ) -> Annotated[CallToolResult, Attached]:
        """
        Attach a .hyper database file under an alias, so that SQL reaches its
        tables as alias.public.table; with on_missing=create, make it first.
        """
        return await call(tools.attach_database, alias=alias, kind=kind, path=path,
                          writable=writable, on_missing=on_missing)

    @tool("Detach a database",
          hints(read_only=False, destructive=False, idempotent=True))
    async def detach_database(alias: Arg(str, DETACH_ALIAS)) -> Annotated[CallToolResult,
                                                                        Detached]:
        """Detach a database attached with attach_database; its file is kept."""
        return await call(tools.detach_database, alias=alias)

    @tool("List databases", reads)
    async def list_attached_databases() -> Annotated[CallToolResult, Databases]:
        """The databases this session can reach, with their aliases and files."""
        return await call(tools.list_attached_databases)

    @tool("Export rows to a file",
          hints(read_only=False, destructive=True, idempotent=True))
    async def export(
        path: Arg(str, EXPORT_PATH),
        format: Arg(str, EXPORT_FORMAT),
        sql: Arg(str | None, EXPORT_SQL) = None,
        table: Arg(str | None, EXPORT_TABLE) = None,
        overwrite: Arg(bool | None, OVERWRITE) = None,
        format_options: Arg(dict[str, Any] | None, FORMAT_OPTIONS) = None,
        database: DatabaseArg = None,
    ) -> Annotated[CallToolResult, Exported]:
        """
        Write the rows of a query or a table to a CSV, Parquet or .hyper file.
        The file appears only once complete.
        """
        return await call(tools.export, path=path, format=format, sql=sql, table=table,
                          overwrite=overwrite, format_options=format_options,
                          database=database)

    @tool("Server status", reads)
    async def status() -> Annotated[CallToolResult, Status]:
        """This server's version and mode, and where its databases are."""
        return await call(tools.status)

    @tool("Read the guide", reads)
    async def get_readme() -> Annotated[CallToolResult, Readme]:
        """A guide to these tools and databases; read it first."""
        # Text for the reader: the guide itself, not JSON around it.
        return result({"readme": README}, text=README)

    kit = Kit(tools=tools, tool=tool, arg=Arg, call=call, result=result, hints=hints,
              reads=reads, replaces=replaces, Result=Result)
    families = [importlib.import_module(name) for name in FAMILIES]
    for family in families:
        family.register(kit)

    class Server(MCPServer):  # type: ignore[misc,valid-type]
        async def call_tool(self, name: str, arguments: dict[str, Any],
                            context: Any = None) -> Any:
            made = registered.get(name)
            if made is not None:
                unknown = unknown_arguments(name, made.parameters, arguments)
                if unknown is not None:
                    raise ToolError(unknown)
            try:
                return await super().call_tool(name, arguments, context)
            except ToolError as e:
                cause = e.__cause__
                if (made is None or isinstance(e, UnexpectedToolError)
                        or not isinstance(cause, ValidationError)):
                    raise
                # pydantic's own text (a URL, its jargon) is for programmers.
                raise ToolError(explain_arguments(name, made.parameters, arguments,
                                                  cause.errors())) from cause

    server = Server("hyperdb-mcp", title=TITLE, description=DESCRIPTION,
                    version=__version__, instructions=INSTRUCTIONS,
                    tools=list(registered.values()))

    if name_session is not None:
        import weakref

        # By session (C{tools.session} is the one being served): one server
        # may serve many (the MCP host).
        named: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()

        async def learn_client_name(ctx: Any, call_next: Any) -> Any:
            outcome = await call_next(ctx)
            try:
                info = client_info(ctx)
                label = client_label(info) if info is not None else None
                session = tools.session
                if label is not None and named.get(session) != label:
                    named[session] = label
                    name_session(label)
            except Exception as e:  # a label must never fail a request
                print(f"hyperdb-mcp: could not name the session: {e}", file=sys.stderr)
            return outcome

        server.middleware.append(learn_client_name)
    for family in families:
        serve = getattr(family, "serve", None)
        if serve is not None:
            serve(server, kit)
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

        from hyperdaemon.client.session import Session
        from hyperdaemon.mcp.tools import Tools

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
                    "served_by": "in-process",
                }

            tools = Tools(session, read_only=bool(options.get("read_only")),
                          mode="private hyperd" if options.get("no_daemon") else "daemon",
                          status_facts=facts)
            server = build_server(tools, name_session=session.rename)
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
