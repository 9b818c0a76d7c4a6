"""
The MCP prompts (L{hyperdaemon.mcp.prompts}), through the SDK's stdio
client against real servers: upstream's names and arguments, each rendered
for a loaded table with its real columns, and clear errors.
"""

from __future__ import annotations

from typing import Any

from mcp_support import McpTestCase

UPSTREAM_PROMPTS = {
    "analyze-table": [("table", True)],
    "compare-tables": [("table_a", True), ("table_b", True)],
    "data-quality": [("table", True)],
    "suggest-queries": [("table", True), ("goal", False)],
}


def _texts(result: Any) -> tuple[list[str], str]:
    return [m.role for m in result.messages], result.messages[0].content.text


class PromptTests(McpTestCase):
    def test_lists_upstreams_prompts_with_their_arguments(self) -> None:
        async def go() -> Any:
            async with self.server() as session:
                return (await session.list_prompts()).prompts

        prompts = {p.name: p for p in self.drive(go())}
        self.assertEqual({name: [(a.name, a.required) for a in p.arguments]
                          for name, p in prompts.items()}, UPSTREAM_PROMPTS)
        for prompt in prompts.values():
            self.assertTrue(prompt.description)
            for argument in prompt.arguments:
                self.assertTrue(argument.description, (prompt.name, argument.name))

    def test_every_prompt_renders_with_the_tables_real_schema(self) -> None:
        async def go() -> dict[str, Any]:
            async with self.server() as session:
                await self.call(session, "load_file", table="cities", path=str(self.csv))
                await self.call(session, "load_data", table="regions",
                                data="city,region\nLyon,ARA\nNice,PACA\n")
                return {
                    "analyze": await session.get_prompt("analyze-table", {"table": "cities"}),
                    "compare": await session.get_prompt(
                        "compare-tables", {"table_a": "cities", "table_b": "regions"}),
                    "quality": await session.get_prompt("data-quality", {"table": "cities"}),
                    "suggest": await session.get_prompt(
                        "suggest-queries", {"table": "cities", "goal": "the largest cities"}),
                    "plain": await session.get_prompt("suggest-queries", {"table": "cities"}),
                }

        rendered = self.drive(go())
        for name, result in rendered.items():
            roles, text = _texts(result)
            self.assertEqual(roles, ["user", "assistant"], name)
            # The real schema, size and rows are in each.
            self.assertIn("`population` int8", text, name)
            self.assertIn("3 rows", text, name)
            self.assertIn('"city": "Lyon"', text, name)
        analyze = _texts(rendered["analyze"])[1]
        self.assertIn('min("population")', analyze)
        self.assertIn('GROUP BY "city"', analyze)
        compare = _texts(rendered["compare"])[1]
        self.assertIn("`region` text", compare)
        self.assertIn('ON a."city" = b."city"', compare)
        quality = _texts(rendered["quality"])[1]
        self.assertIn('count(*) FILTER (WHERE "area" IS NULL)', quality)
        self.assertIn("stddev_samp", quality)
        self.assertIn("The goal: the largest cities", _texts(rendered["suggest"])[1])
        self.assertNotIn("The goal", _texts(rendered["plain"])[1])

    def test_the_prompts_sql_runs(self) -> None:
        from hyperdaemon.mcp import prompts

        async def go() -> list[Any]:
            async with self.server() as session:
                await self.call(session, "load_file", table="cities", path=str(self.csv))
                described = await self.call(session, "describe", table="cities")
                context = {"table": "cities", "row_count": 3,
                           "columns": described["columns"], "sample": []}
                queries = [*prompts.statistics_sql(context), prompts.null_rates_sql(context),
                           prompts.duplicates_sql(context), prompts.cardinality_sql(context),
                           *prompts.outliers_sql(context)]
                return [await self.call(session, "query", sql=q) for q in queries]

        results = self.drive(go())
        # statistics (numbers, then city's top values), NULLs, duplicates,
        # distinct counts, outliers of each number column
        self.assertEqual(len(results), 7)
        self.assertEqual(results[0]["rows"], [[139000, 522000, "334333.333333", 47.87, 71.92,
                                               56.43333333333333]])
        self.assertEqual(results[2]["rows"], [[3, 0, 0, 0]])
        self.assertEqual(results[3]["rows"], [[0]])
        self.assertEqual(results[4]["rows"], [[3, 3, 3]])
        self.assertEqual([r["rows"] for r in results[5:]], [[[0]], [[0]]])

    def test_a_missing_table_is_an_error_naming_the_argument_and_the_tables(self) -> None:
        from mcp.shared.exceptions import MCPError

        async def go() -> tuple[str, Any]:
            async with self.server() as session:
                await self.call(session, "load_file", table="cities", path=str(self.csv))
                try:
                    await session.get_prompt("compare-tables",
                                             {"table_a": "cities", "table_b": "nope"})
                except MCPError as e:
                    message = str(e)
                else:
                    message = "no error"
                after = await session.get_prompt("data-quality", {"table": "cities"})
                return message, after

        message, after = self.drive(go())
        self.assertIn("table_b", message)
        self.assertIn("'nope'", message)
        self.assertIn("'cities'", message)
        self.assertEqual(len(after.messages), 2)
