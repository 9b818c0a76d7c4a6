"""
MCP prompts, with upstream's names and arguments: C{analyze-table(table)},
C{compare-tables(table_a, table_b)}, C{data-quality(table)} and
C{suggest-queries(table, goal?)}.

Each reads the table's real columns, row count and first rows through the
session's L{Tools} when it is rendered, and returns a user message that
walks the model through this server's tools (describe, sample, query) with
SQL already written for those columns, and the start of the assistant's
answer.  A table that does not exist is an error that names the tables
there are, so that the user can pick again.
"""

# No "from __future__ import annotations": the prompts' parameters are
# annotated with described types that the SDK reads at run time.
import asyncio
import json
from typing import Annotated, Any

from twisted.internet import defer

from hyperdaemon.mcp.tools import ToolFailure, quote_identifier

#: Rows of the table shown in a prompt.
PROMPT_SAMPLE_ROWS = 5

NUMERIC_TYPES = {"int2", "int4", "int8", "smallint", "integer", "bigint", "float4", "float8",
                 "real", "double precision", "numeric", "decimal"}
TEMPORAL_TYPES = {"date", "timestamp", "timestamptz", "time", "timetz",
                  "timestamp without time zone", "timestamp with time zone"}


def register(kit: Any) -> None:
    """No tools: this family adds prompts only (see L{serve})."""


# -- the table as a prompt shows it -------------------------------------------------

async def _ask(method: Any, **kwargs: Any) -> Any:
    return await defer.maybeDeferred(method, **kwargs).asFuture(asyncio.get_running_loop())


async def table_context(tools: Any, table: str, argument: str = "table") -> dict[str, Any]:
    """
    C{table}'s columns, row count and first rows.

    @raise MCPError: (invalid params) naming C{argument}, for a table that
        is not there.
    """
    from mcp.shared.exceptions import MCPError
    from mcp_types import INVALID_PARAMS

    try:
        described = await _ask(tools.describe, table=table)
        sample = await _ask(tools.sample, table=table, n=PROMPT_SAMPLE_ROWS)
    except ToolFailure as e:
        message = str(e).removeprefix("table: ")
        raise MCPError(INVALID_PARAMS, f"{argument}: {message}") from None
    return {"table": table, "row_count": described["row_count"],
            "columns": described["columns"],
            "sample": [dict(zip(sample["columns"], row)) for row in sample["rows"]]}


def describe_table(context: dict[str, Any]) -> str:
    """The table's columns, size and first rows, as Markdown for a prompt."""
    columns = "\n".join(f"- `{c['name']}` {c['type']}" for c in context["columns"])
    shown = json.dumps(context["sample"], indent=2, ensure_ascii=False, default=str)
    return (f"Table `{context['table']}`: {context['row_count']} rows.\n\n"
            f"Columns:\n{columns}\n\n"
            f"First rows:\n```json\n{shown}\n```")


def _kinds(context: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """The table's numeric, temporal and other columns, by name."""
    numeric, temporal, other = [], [], []
    for column in context["columns"]:
        kind = column["type"].lower().split("(")[0].strip()
        (numeric if kind in NUMERIC_TYPES else temporal if kind in TEMPORAL_TYPES
         else other).append(column["name"])
    return numeric, temporal, other


def _sql_name(table: str) -> str:
    """The table as SQL names it: a plain name quoted, a full one as given."""
    return table if "." in table else quote_identifier(table)


def statistics_sql(context: dict[str, Any]) -> list[str]:
    """One query of basic statistics per kind of column."""
    table = _sql_name(context["table"])
    numeric, temporal, other = _kinds(context)
    queries = []
    if numeric:
        parts = ", ".join(f"min({q}) AS {quote_identifier('min_' + n)}, "
                          f"max({q}) AS {quote_identifier('max_' + n)}, "
                          f"avg({q}) AS {quote_identifier('avg_' + n)}"
                          for n in numeric for q in [quote_identifier(n)])
        queries.append(f"SELECT {parts} FROM {table}")
    if temporal:
        parts = ", ".join(f"min({q}) AS {quote_identifier('first_' + n)}, "
                          f"max({q}) AS {quote_identifier('last_' + n)}"
                          for n in temporal for q in [quote_identifier(n)])
        queries.append(f"SELECT {parts} FROM {table}")
    for name in other[:3]:
        q = quote_identifier(name)
        queries.append(f"SELECT {q}, count(*) AS n FROM {table} GROUP BY {q} "
                       f"ORDER BY n DESC LIMIT 10")
    return queries


def null_rates_sql(context: dict[str, Any]) -> str:
    table = _sql_name(context["table"])
    parts = ", ".join(f"count(*) FILTER (WHERE {q} IS NULL) AS {quote_identifier(n + '_nulls')}"
                      for n in (c["name"] for c in context["columns"])
                      for q in [quote_identifier(n)])
    return f"SELECT count(*) AS row_count, {parts} FROM {table}"


def duplicates_sql(context: dict[str, Any]) -> str:
    table = _sql_name(context["table"])
    columns = ", ".join(quote_identifier(c["name"]) for c in context["columns"])
    return (f"SELECT count(*) AS duplicated_rows FROM (SELECT {columns}, count(*) AS n "
            f"FROM {table} GROUP BY {columns} HAVING count(*) > 1) AS d")


def cardinality_sql(context: dict[str, Any]) -> str:
    table = _sql_name(context["table"])
    parts = ", ".join(f"count(DISTINCT {quote_identifier(c['name'])}) AS "
                      f"{quote_identifier(c['name'] + '_distinct')}"
                      for c in context["columns"])
    return f"SELECT {parts} FROM {table}"


def outliers_sql(context: dict[str, Any]) -> list[str]:
    table = _sql_name(context["table"])
    numeric, _, _ = _kinds(context)
    queries = []
    for name in numeric[:3]:
        q = quote_identifier(name)
        queries.append(
            f"WITH s AS (SELECT avg({q}) AS mean, stddev_samp({q}) AS sd FROM {table}) "
            f"SELECT count(*) AS outliers FROM {table}, s WHERE abs({q} - s.mean) > 3 * s.sd")
    return queries


def _sql_block(queries: list[str]) -> str:
    return "\n".join(f"```sql\n{q}\n```" for q in queries)


def _messages(user: str, assistant: str) -> list[Any]:
    from mcp.server.mcpserver.prompts.base import AssistantMessage, UserMessage

    return [UserMessage(user), AssistantMessage(assistant)]


# -- the prompts --------------------------------------------------------------------

async def analyze_table(tools: Any, table: str) -> list[Any]:
    context = await table_context(tools, table)
    user = (
        f"Analyze the table `{table}` of this Hyper session.\n\n{describe_table(context)}\n\n"
        f"Work through it with the hyperdb tools:\n"
        f"1. Say what each column most likely holds, from its name, type and the rows above.\n"
        f"2. Run these with the `query` tool for basic statistics (adapt them as you learn "
        f"more):\n{_sql_block(statistics_sql(context))}\n"
        f"3. Look for quality problems: unexpected NULLs, outliers, inconsistent formats "
        f"(the `data-quality` prompt goes further).\n"
        f"4. Sum up what the table holds and what stands out, in plain words.\n\n"
        f"`sample` shows more rows; `query` runs any read-only SQL (PostgreSQL dialect).")
    return _messages(user, f"I'll start with the statistics queries on `{table}`, then "
                           f"look at what they show.")


async def compare_tables(tools: Any, table_a: str, table_b: str) -> list[Any]:
    a = await table_context(tools, table_a, "table_a")
    b = await table_context(tools, table_b, "table_b")
    types_a = {c["name"]: c["type"] for c in a["columns"]}
    types_b = {c["name"]: c["type"] for c in b["columns"]}
    shared = [n for n in types_a if n in types_b]
    if shared:
        same = "\n".join(f"- `{n}`: {types_a[n]} in A, {types_b[n]} in B" for n in shared)
        first = quote_identifier(shared[0])
        join = (f"```sql\nSELECT count(*) AS matched FROM {_sql_name(table_a)} a "
                f"JOIN {_sql_name(table_b)} b ON a.{first} = b.{first}\n```")
        shared_text = (f"Columns with the same name in both:\n{same}\n\nCheck how well "
                       f"they match, e.g.:\n{join}")
    else:
        shared_text = ("No column has the same name in both: look for columns that mean the "
                       "same thing under other names.")
    user = (
        f"Compare two tables of this Hyper session.\n\n## A\n{describe_table(a)}\n\n"
        f"## B\n{describe_table(b)}\n\n{shared_text}\n\n"
        f"With the `query` tool:\n"
        f"1. Find the columns that correspond (by name or meaning) and where their types "
        f"differ.\n"
        f"2. Propose join keys and the kind of join, and measure how many rows match.\n"
        f"3. Propose 3 to 5 queries that combine both tables, each with what it shows.")
    return _messages(user, f"I'll line up the columns of `{table_a}` and `{table_b}`, then "
                           f"test the likely join keys.")


async def data_quality(tools: Any, table: str) -> list[Any]:
    context = await table_context(tools, table)
    _, temporal, _ = _kinds(context)
    steps = [
        f"1. NULLs per column:\n{_sql_block([null_rates_sql(context)])}",
        f"2. Duplicated rows:\n{_sql_block([duplicates_sql(context)])}",
        f"3. Distinct values per column (a column with very few may be a code or a "
        f"constant):\n{_sql_block([cardinality_sql(context)])}",
    ]
    outliers = outliers_sql(context)
    if outliers:
        steps.append(f"4. Values more than 3 standard deviations from the mean:\n"
                     f"{_sql_block(outliers)}")
    if temporal:
        dates = ", ".join(f"min({quote_identifier(n)}), max({quote_identifier(n)})"
                          for n in temporal)
        steps.append(f"5. Dates out of range (in the future, or implausibly old):\n"
                     f"{_sql_block([f'SELECT {dates} FROM {_sql_name(table)}'])}")
    user = (
        f"Assess the data quality of the table `{table}` of this Hyper session.\n\n"
        f"{describe_table(context)}\n\nRun each check with the `query` tool:\n\n"
        + "\n\n".join(steps)
        + "\n\nReport each problem found with its severity (critical, warning or info) and "
          "how to fix it (with `execute` where SQL can).")
    return _messages(user, f"I'll run each check on `{table}` in turn and grade what I find.")


async def suggest_queries(tools: Any, table: str, goal: str | None = None) -> list[Any]:
    context = await table_context(tools, table)
    numeric, temporal, other = _kinds(context)
    hints = []
    if temporal and numeric:
        hints.append(f"trends of `{numeric[0]}` over `{temporal[0]}` (date_trunc)")
    if other and numeric:
        hints.append(f"`{numeric[0]}` by `{other[0]}` (GROUP BY, ranking with window "
                     f"functions)")
    if numeric:
        hints.append(f"the distribution of `{numeric[0]}` (percentile_cont, width_bucket)")
    aim = f"The goal: {goal}\n\n" if goal else ""
    ideas = ("Ideas that fit these columns: " + "; ".join(hints) + ".\n\n") if hints else ""
    user = (
        f"Suggest analytical SQL queries for the table `{table}` of this Hyper session.\n\n"
        f"{describe_table(context)}\n\n{aim}{ideas}"
        f"Give 5 queries. For each: a short title, the SQL (Hyper's PostgreSQL dialect; "
        f"aggregates, GROUP BY, window functions and CTEs are all available), and one "
        f"sentence on what it reveals. Run each with the `query` tool to check that it works "
        f"before you give it.")
    return _messages(user, f"Here are 5 queries for `{table}`, each checked with the query "
                           f"tool.")


def serve(server: Any, kit: Any) -> None:
    """Add the prompts to C{server}."""
    from pydantic import Field

    tools = kit.tools

    def described(text: str) -> Any:
        return Annotated[str, Field(description=text)]

    table_arg = ("The table: plain (`sales`, in the session's `local` database) or in full "
                 "(`persistent.public.sales`).")

    @server.prompt("analyze-table", title="Analyze a table",
                   description="Guides an analysis of one table: what its columns hold, "
                               "statistics, quality problems, a summary.")
    async def analyze(table: described(table_arg)) -> list[Any]:
        return await analyze_table(tools, table)

    @server.prompt("compare-tables", title="Compare two tables",
                   description="Guides a comparison of two tables: corresponding columns, "
                               "join keys, and queries that combine them.")
    async def compare(table_a: described("The first table, named as for analyze-table."),
                      table_b: described("The second table, named the same way.")) -> list[Any]:
        return await compare_tables(tools, table_a, table_b)

    @server.prompt("data-quality", title="Check data quality",
                   description="Guides a data-quality check of one table: NULLs, duplicates, "
                               "cardinality, outliers, dates out of range.")
    async def quality(table: described(table_arg)) -> list[Any]:
        return await data_quality(tools, table)

    @server.prompt("suggest-queries", title="Suggest queries",
                   description="Asks for five analytical queries on one table, checked "
                               "with the query tool, optionally towards a goal.")
    async def suggest(table: described(table_arg),
                      goal: Annotated[str | None, Field(
                          description="What the queries should help with, e.g. `find the "
                                      "best customers`. Default: general exploration.")] = None
                      ) -> list[Any]:
        return await suggest_queries(tools, table, goal)
