"""
The MCP resources (L{hyperdaemon.mcp.resources}), through the SDK's stdio
client against real servers: upstream's URIs, what each holds, clear errors,
and the change notifications.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, AsyncIterator

from mcp_support import McpTestCase


class ResourceTestCase(McpTestCase):
    @contextlib.asynccontextmanager
    async def watched(self, *args: str) -> AsyncIterator[tuple[Any, list[Any], Any]]:
        """A server whose client keeps every notification it gets, and its initialize result."""
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        received: list[Any] = []

        async def keep(message: Any) -> None:
            received.append(message)

        params = StdioServerParameters(command=sys.executable,
                                       args=["-m", "hyperdaemon", *args], env=self.env)
        with open(self.tmp / "server-stderr.log", "a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write, message_handler=keep) as session:
                    init = await session.initialize()
                    yield session, received, init

    async def read_json(self, session: Any, uri: str) -> Any:
        return json.loads(await self.read_text(session, uri))

    async def read_text(self, session: Any, uri: str) -> str:
        result = await session.read_resource(uri)
        return result.contents[0].text


def _methods(received: list[Any]) -> list[str]:
    return [getattr(getattr(m, "root", m), "method", None) for m in received]


class ResourceListingTests(ResourceTestCase):
    def test_lists_upstreams_resources_and_templates(self) -> None:
        async def go() -> None:
            async with self.server() as session:
                listed = {r.uri: r for r in (await session.list_resources()).resources}
                templates = {t.uri_template: t for t in
                             (await session.list_resource_templates()).resource_templates}
            self.assertEqual(set(listed), {"hyper://workspace", "hyper://tables",
                                           "hyper://readme", "hyper://schema/kv"})
            self.assertEqual(listed["hyper://readme"].mime_type, "text/markdown")
            self.assertEqual(set(templates), {
                "hyper://tables/{name}/schema", "hyper://tables/{name}/sample",
                "hyper://tables/{name}/csv-sample", "hyper://queries/{name}/definition",
                "hyper://queries/{name}/result"})
            self.assertEqual(templates["hyper://tables/{name}/csv-sample"].mime_type,
                             "text/csv")
            for item in [*listed.values(), *templates.values()]:
                self.assertTrue(item.description, item)

        self.drive(go())

    def test_declares_list_changed_and_subscriptions(self) -> None:
        async def go() -> Any:
            async with self.watched() as (_, _received, init):
                return init.capabilities.resources

        resources = self.drive(go())
        self.assertTrue(resources.list_changed)
        self.assertTrue(resources.subscribe)


class ResourceContentTests(ResourceTestCase):
    def test_tables_workspace_and_readme_show_a_loaded_table(self) -> None:
        async def go() -> tuple[Any, ...]:
            async with self.server() as session:
                empty = await self.read_json(session, "hyper://tables")
                await self.call(session, "load_file", table="cities", path=str(self.csv))
                found = await self.read_json(session, "hyper://tables")
                workspace = await self.read_json(session, "hyper://workspace")
                readme = await self.read_text(session, "hyper://readme")
                listed = [r.uri for r in (await session.list_resources()).resources]
                return empty, found, workspace, readme, listed

        empty, found, workspace, readme, listed = self.drive(go())
        self.assertEqual(empty, {"tables": []})
        [cities] = found["tables"]
        self.assertEqual(cities["name"], "cities")
        self.assertEqual(cities["database"], "local")
        self.assertEqual(cities["row_count"], 3)
        self.assertEqual([(c["name"], c["type"]) for c in cities["columns"]],
                         [("city", "text"), ("population", "int8"),
                          ("area", "float8")])
        self.assertEqual(workspace["table_count"], 1)
        self.assertEqual(workspace["total_rows"], 3)
        aliases = {d["alias"]: d for d in workspace["databases"]}
        self.assertEqual(set(aliases), {"local", "persistent"})
        self.assertEqual(aliases["local"]["table_count"], 1)
        self.assertGreater(aliases["local"]["disk_usage_bytes"], 0)
        self.assertIn("| `cities` | 3 |", readme)
        self.assertIn("hyper://tables/cities/schema", readme)
        self.assertIn("hyper://tables/cities/schema", listed)
        self.assertIn("hyper://tables/cities/csv-sample", listed)

    def test_a_persistent_table_is_named_in_full(self) -> None:
        async def go() -> tuple[Any, Any]:
            async with self.server() as session:
                await self.call(session, "load_file", table="towns", path=str(self.csv),
                                persist=True)
                found = await self.read_json(session, "hyper://tables")
                schema = await self.read_json(
                    session, "hyper://tables/persistent.public.towns/schema")
                return found, schema

        found, schema = self.drive(go())
        self.assertEqual([(t["name"], t["database"]) for t in found["tables"]],
                         [("persistent.public.towns", "persistent")])
        self.assertEqual(schema["row_count"], 3)

    def test_table_templates_give_schema_and_samples(self) -> None:
        async def go() -> tuple[Any, Any, str]:
            async with self.server() as session:
                await self.call(session, "load_file", table="cities", path=str(self.csv))
                return (await self.read_json(session, "hyper://tables/cities/schema"),
                        await self.read_json(session, "hyper://tables/cities/sample"),
                        await self.read_text(session, "hyper://tables/cities/csv-sample"))

        schema, sample, csv = self.drive(go())
        self.assertEqual(schema["name"], "cities")
        self.assertEqual(schema["row_count"], 3)
        self.assertEqual([c["name"] for c in schema["columns"]], ["city", "population", "area"])
        self.assertEqual(sample["sample_size"], 3)
        self.assertEqual(sample["rows"][0], {"city": "Lyon", "population": 522000,
                                             "area": 47.87})
        self.assertEqual(csv, "city,population,area\nLyon,522000,47.87\nNice,342000,71.92\n"
                              "Brest,139000,49.51\n")

    def test_a_missing_table_is_a_clear_error_and_the_session_goes_on(self) -> None:
        from mcp.shared.exceptions import MCPError

        async def go() -> tuple[str, Any]:
            async with self.server() as session:
                try:
                    await session.read_resource("hyper://tables/nope/schema")
                except MCPError as e:
                    message = str(e)
                else:
                    message = "no error"
                return message, await self.read_json(session, "hyper://tables")

        message, after = self.drive(go())
        self.assertIn("'nope'", message)
        self.assertIn("hyper://tables", message)
        self.assertEqual(after, {"tables": []})

    def test_kv_schema_names_the_store_table(self) -> None:
        async def go() -> str:
            async with self.server() as session:
                return await self.read_text(session, "hyper://schema/kv")

        text = self.drive(go())
        self.assertIn("_hyperdb_kv_store", text)
        self.assertIn("store_name", text)


class ResourceChangeTests(ResourceTestCase):
    def test_list_changed_is_sent_after_a_load_and_not_after_a_read(self) -> None:
        async def go() -> tuple[list[str], list[str]]:
            async with self.watched() as (session, received, _):
                await self.call(session, "query", sql="SELECT 1")
                after_read = _methods(received)
                await self.call(session, "load_file", table="cities", path=str(self.csv))
                return after_read, _methods(received)

        after_read, after_load = self.drive(go())
        self.assertNotIn("notifications/resources/list_changed", after_read)
        self.assertIn("notifications/resources/list_changed", after_load)

    def test_a_failed_load_announces_nothing(self) -> None:
        async def go() -> list[str]:
            async with self.watched() as (session, received, _):
                result = await session.call_tool("load_file", {"table": "t",
                                                               "path": str(self.tmp / "no.csv")})
                self.assertTrue(result.is_error)
                return _methods(received)

        self.assertNotIn("notifications/resources/list_changed", self.drive(go()))

    def test_a_subscribed_resource_is_announced_updated_after_a_change(self) -> None:
        async def go() -> list[Any]:
            async with self.watched() as (session, received, _):
                await session.subscribe_resource("hyper://tables")
                await session.subscribe_resource("hyper://workspace")
                await session.unsubscribe_resource("hyper://workspace")
                await self.call(session, "execute", sql=["CREATE TABLE t (a int)"])
                return [getattr(m, "root", m) for m in received]

        received = self.drive(go())
        updated = [m.params.uri for m in received
                   if getattr(m, "method", None) == "notifications/resources/updated"]
        self.assertEqual(updated, ["hyper://tables"])


class SavedQueryResourceTests(ResourceTestCase):
    def test_a_saved_querys_result_reflects_a_table_loaded_after_it_was_saved(self) -> None:
        from mcp.shared.exceptions import MCPError

        async def go() -> tuple[Any, ...]:
            async with self.watched() as (session, received, _):
                await self.call(session, "save_query", name="big",
                                sql="SELECT city FROM later WHERE population > 200000 "
                                    "ORDER BY city",
                                description="the big cities")
                saved_announced = "notifications/resources/list_changed" in _methods(received)
                try:
                    await session.read_resource("hyper://queries/big/result")
                except MCPError as e:
                    before = str(e)
                else:
                    before = "no error"
                await self.call(session, "load_file", table="later", path=str(self.csv))
                after = await self.read_json(session, "hyper://queries/big/result")
                definition = await self.read_json(session, "hyper://queries/big/definition")
                listed = [r.uri for r in (await session.list_resources()).resources]
                readme = await self.read_text(session, "hyper://readme")
                return saved_announced, before, after, definition, listed, readme

        saved_announced, before, after, definition, listed, readme = self.drive(go())
        self.assertTrue(saved_announced)
        self.assertIn("'big'", before)
        self.assertIn("later", before)
        self.assertEqual(after["columns"], ["city"])
        self.assertEqual(after["rows"], [["Lyon"], ["Nice"]])
        self.assertEqual(after["name"], "big")
        self.assertEqual(definition["sql"], "SELECT city FROM later WHERE population > 200000 "
                                            "ORDER BY city")
        self.assertEqual(definition["description"], "the big cities")
        self.assertIn("hyper://queries/big/result", listed)
        self.assertIn("hyper://queries/big/definition", listed)
        self.assertIn("`big`: the big cities", readme)

    def test_an_unknown_saved_query_is_a_clear_error(self) -> None:
        from mcp.shared.exceptions import MCPError

        async def go() -> str:
            async with self.server() as session:
                try:
                    await session.read_resource("hyper://queries/nope/definition")
                except MCPError as e:
                    return str(e)
                return "no error"

        message = self.drive(go())
        self.assertIn("no saved query 'nope'", message)
        self.assertIn("save_query", message)


class SubscriptionTests(ResourceTestCase):
    def test_one_clients_subscriptions_are_not_announced_to_another(self) -> None:
        async def go() -> list[Any]:
            async with self.watched() as (first, _, _):
                async with self.watched() as (second, received, _):
                    await first.subscribe_resource("hyper://tables")
                    await self.call(second, "execute", sql=["CREATE TABLE t (a int)"])
                    return [getattr(m, "root", m) for m in received]

        methods = [getattr(m, "method", None) for m in self.drive(go())]
        self.assertIn("notifications/resources/list_changed", methods)
        self.assertNotIn("notifications/resources/updated", methods)
