"""
The MCP conventions of the server, through the SDK's own stdio client: what
it says about itself (version, title), its tools (described parameters,
hints, output schemas), its results (structured, and the same JSON as
text), its answer to arguments of the wrong shape, and the name its session
takes from the client.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from typing import Any, AsyncIterator

from hyperdaemon import __version__

from support import QUICK, wait_for
from mcp_support import CSV, UPSTREAM_TOOLS, McpTestCase, ToolCallError

#: The tools that change nothing, so that they work under --read-only.
READ_ONLY_TOOLS = {"query", "query_data", "query_file", "describe", "sample",
                   "list_attached_databases", "status", "get_readme", "inspect_file",
                   "kv_get", "kv_list", "kv_list_stores", "kv_size"}
#: Words of a library's error text that a model should never read.
LIBRARY_TEXT = ("pydantic", "http", "validation error", "input should", "input_value",
                "type=", "[type")


class NamedClientTestCase(McpTestCase):
    @contextlib.asynccontextmanager
    async def client(self, name: str, *args: str, handshake: bool = True) -> AsyncIterator[Any]:
        """A server driven by a client that calls itself C{name}."""
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.types import Implementation

        params = StdioServerParameters(command=sys.executable,
                                       args=["-m", "hyperdaemon", *args], env=self.env)
        with open(self.tmp / "server-stderr.log", "a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(
                    read, write, client_info=Implementation(name=name, version="1.2.3"),
                ) as session:
                    if handshake:
                        await session.initialize()
                    else:
                        await session.discover()  # the per-request protocol
                    yield session

    def listed_names(self) -> list[Any]:
        """The names of the sessions, as C{hyperdb-mcp daemon status --json} shows them."""
        done = subprocess.run(
            [sys.executable, "-m", "hyperdaemon", "daemon", "status", "--json",
             "--port", str(self.ports[0])],
            env=self.env, capture_output=True, text=True, timeout=QUICK,
        )
        if done.returncode != 0:
            return []
        return [s.get("name") for s in json.loads(done.stdout)["sessions"]]


class ServerInfoTests(McpTestCase):
    def test_server_info_gives_the_package_version_and_a_title(self) -> None:
        async def go() -> Any:
            async with self.server() as s:
                return s.server_info

        info = self.drive(go())
        self.assertEqual(info.name, "hyperdb-mcp")
        self.assertEqual(info.version, __version__)
        self.assertTrue(info.title)


class ToolListTests(McpTestCase):
    def listed(self, *args: str) -> dict[str, Any]:
        async def go() -> Any:
            async with self.server(*args) as s:
                return {t.name: t for t in (await s.list_tools()).tools}

        return self.drive(go())

    def test_every_parameter_of_every_tool_is_described_with_its_default(self) -> None:
        tools = self.listed()
        self.assertEqual(set(tools), UPSTREAM_TOOLS)
        for name, tool in tools.items():
            self.assertTrue(tool.title, name)
            self.assertTrue(tool.description, name)
            schema = tool.input_schema
            required = set(schema.get("required", ()))
            for parameter, prop in schema.get("properties", {}).items():
                where = f"{name}({parameter})"
                description = prop.get("description", "")
                self.assertGreater(len(description.split()), 5, where)
                if parameter not in required:
                    # An optional parameter says what leaving it out means.
                    self.assertIn("default", description.lower(), where)
            self.assertFalse(schema.get("additionalProperties", True), name)

    def test_each_tool_has_all_four_hints_and_an_output_schema(self) -> None:
        tools = self.listed()
        for name, tool in tools.items():
            hints = tool.annotations
            self.assertIsNotNone(hints, name)
            for hint in ("read_only_hint", "destructive_hint", "idempotent_hint",
                         "open_world_hint"):
                self.assertIsInstance(getattr(hints, hint), bool, (name, hint))
            self.assertIs(hints.open_world_hint, False, name)
            self.assertEqual(tool.output_schema.get("type"), "object", name)
            self.assertTrue(tool.output_schema.get("properties"), name)
        self.assertEqual({n for n, t in tools.items() if t.annotations.read_only_hint},
                         READ_ONLY_TOOLS)
        # A tool that only reads cannot destroy anything.
        for name in READ_ONLY_TOOLS:
            self.assertFalse(tools[name].annotations.destructive_hint, name)


class HintTests(McpTestCase):
    """The hints say what the tools do."""

    def test_every_read_only_tool_works_under_read_only(self) -> None:
        tmp = self.tmp

        async def go() -> None:
            async with self.server() as writer:
                await self.call(writer, "load_file", table="cities", path=str(self.csv),
                                persist=True)
                await self.call(writer, "export", path=str(tmp / "cities.hyper"),
                                format="hyper", table="persistent.public.cities")
            async with self.server("--read-only") as s:
                tools = {t.name: t for t in (await s.list_tools()).tools}
                examples = {
                    "query": {"sql": "SELECT count(*) FROM persistent.public.cities"},
                    "query_data": {"data": CSV, "sql": "SELECT count(*) FROM data"},
                    "query_file": {"path": str(self.csv), "sql": "SELECT count(*) FROM data"},
                    "describe": {"database": "persistent"},
                    "sample": {"table": "cities", "database": "persistent", "n": 2},
                    "list_attached_databases": {},
                    "status": {},
                    "get_readme": {},
                    "inspect_file": {"path": str(self.csv)},
                    "kv_get": {"store": "s", "key": "k"},
                    "kv_list": {"store": "s"},
                    "kv_list_stores": {},
                    "kv_size": {"store": "s"},
                }
                reading = {n for n, t in tools.items() if t.annotations.read_only_hint}
                self.assertEqual(reading, set(examples))
                for name in sorted(reading):
                    await self.call(s, name, **examples[name])
                # What --read-only refuses is not marked read-only.
                for name, arguments in [
                    ("execute", {"sql": ["CREATE TABLE t (a int)"]}),
                    ("load_data", {"table": "t", "data": CSV}),
                    ("load_file", {"table": "t", "path": str(self.csv)}),
                    ("attach_database", {"alias": "w", "kind": "file",
                                         "path": str(tmp / "cities.hyper"), "writable": True}),
                ]:
                    self.assertFalse(tools[name].annotations.read_only_hint, name)
                    with self.assertRaises(ToolCallError):
                        await self.call(s, name, **arguments)

        self.drive(go())

    def test_destructive_and_idempotent_hints_match_what_the_tools_do(self) -> None:
        tmp = self.tmp

        async def go() -> None:
            async with self.server() as s:
                tools = {t.name: t.annotations for t in (await s.list_tools()).tools}
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                count = lambda table: c("query", sql=f"SELECT count(*) FROM {table}")  # noqa: E731

                # Destructive: each can take data away.
                await c("load_data", table="t", data=CSV)
                await c("load_data", table="t", data="city\nParis\n")
                self.assertEqual((await count("t"))["rows"], [[1]])  # replaced
                await c("load_file", table="f", path=str(self.csv))
                await c("load_file", table="f", path=str(self.csv))
                self.assertEqual((await count("f"))["rows"], [[3]])  # replaced, not added
                out = tmp / "out.csv"
                await c("export", path=str(out), format="csv", sql="SELECT 1 AS a")
                await c("export", path=str(out), format="csv", sql="SELECT 2 AS a",
                        overwrite=True)
                self.assertEqual(out.read_text().split(), ["a", "2"])  # replaced
                await c("execute", sql=["DROP TABLE t"])
                with self.assertRaises(ToolCallError):
                    await count("t")
                for name in ("execute", "load_data", "load_file", "export"):
                    self.assertTrue(tools[name].destructive_hint, name)

                # Not idempotent: the same call twice does twice as much.
                await c("execute", sql=["CREATE TABLE n (a int)"])
                for _ in range(2):
                    await c("execute", sql=["INSERT INTO n VALUES (1)"])
                self.assertEqual((await count("n"))["rows"], [[2]])
                for _ in range(2):
                    await c("load_data", table="n2", data="a\n1\n", mode="append")
                self.assertEqual((await count("n2"))["rows"], [[2]])
                for _ in range(2):
                    await c("load_file", table="n3", path=str(self.csv), mode="append")
                self.assertEqual((await count("n3"))["rows"], [[6]])
                for name in ("execute", "load_data", "load_file"):
                    self.assertFalse(tools[name].idempotent_hint, name)

                # Neither destructive nor read-only: attaching and detaching
                # keep every row; twice is the same as once.
                db = tmp / "kept.hyper"
                await c("attach_database", alias="kept", kind="file", path=str(db),
                        on_missing="create")
                await c("execute", sql=["CREATE TABLE kept.public.k (a int)",
                                        "INSERT INTO kept.public.k VALUES (1), (2)"])
                once = await c("list_attached_databases")
                with contextlib.suppress(ToolCallError):
                    await c("attach_database", alias="kept", kind="file", path=str(db))
                self.assertEqual(await c("list_attached_databases"), once)
                await c("detach_database", alias="kept")
                detached = await c("list_attached_databases")
                with contextlib.suppress(ToolCallError):
                    await c("detach_database", alias="kept")
                self.assertEqual(await c("list_attached_databases"), detached)
                await c("attach_database", alias="kept", kind="file", path=str(db))
                self.assertEqual((await count("kept.public.k"))["rows"], [[2]])
                for name in ("attach_database", "detach_database"):
                    self.assertFalse(tools[name].destructive_hint, name)
                    self.assertTrue(tools[name].idempotent_hint, name)

                # Export twice with the same arguments: the same file.
                first = out.read_bytes()
                await c("export", path=str(out), format="csv", sql="SELECT 2 AS a",
                        overwrite=True)
                self.assertEqual(out.read_bytes(), first)
                self.assertTrue(tools["export"].idempotent_hint)

        self.drive(go())


class StructuredResultTests(McpTestCase):
    def test_every_tool_returns_structured_content_that_fits_its_output_schema(self) -> None:
        from jsonschema import Draft202012Validator

        tmp = self.tmp
        watched = tmp / "watched"
        watched.mkdir()

        async def go() -> None:
            async with self.server() as s:
                schemas = {t.name: t.output_schema for t in (await s.list_tools()).tools}
                calls = [
                    ("status", {}),
                    ("get_readme", {}),
                    ("load_file", {"table": "cities", "path": str(self.csv)}),
                    ("load_data", {"table": "kv", "data": '[{"k": "a", "v": 1}]'}),
                    ("execute", {"sql": ["CREATE TABLE e (a int)", "INSERT INTO e VALUES (1)"]}),
                    ("query", {"sql": "SELECT city, area FROM cities ORDER BY city"}),
                    ("query", {"sql": "SELECT i FROM generate_series(1, 300) AS g(i)"}),
                    ("query_data", {"data": CSV, "sql": "SELECT count(*) AS n FROM data"}),
                    ("query_file", {"path": str(self.csv), "sql": "SELECT max(area) FROM data"}),
                    ("describe", {}),
                    ("describe", {"table": "cities"}),
                    ("sample", {"table": "cities", "n": 2}),
                    ("export", {"path": str(tmp / "c.parquet"), "format": "parquet",
                                "table": "cities"}),
                    ("attach_database", {"alias": "x", "kind": "file",
                                         "path": str(tmp / "x.hyper"), "on_missing": "create"}),
                    ("list_attached_databases", {}),
                    ("detach_database", {"alias": "x"}),
                    ("inspect_file", {"path": str(self.csv)}),
                    ("load_files", {"files": [{"table": "c3", "path": str(self.csv)},
                                              {"table": "c4", "path": str(tmp / "no.csv")}]}),
                    ("copy_query", {"sql": "SELECT * FROM cities", "target_table": "c2",
                                    "mode": "create"}),
                    ("set_table_metadata", {"table": "cities", "purpose": "tests"}),
                    ("execute", {"sql": [f"COPY (SELECT 1 AS a) TO '{tmp / 'ice'}' WITH "
                                         f"(FORMAT iceberg, table_scheme 'filesystem')"]}),
                    ("load_iceberg", {"table": "ice", "path": str(tmp / "ice")}),
                    ("kv_set", {"store": "s", "key": "a", "value": "1"}),
                    ("kv_set_many", {"store": "s", "entries": [{"key": "b", "value": "[2]"}]}),
                    ("kv_get", {"store": "s", "key": "a"}),
                    ("kv_list", {"store": "s", "values": True}),
                    ("kv_list_stores", {}),
                    ("kv_size", {"store": "s"}),
                    ("kv_pop", {"store": "s"}),
                    ("kv_delete", {"store": "s", "key": "b"}),
                    ("kv_clear", {"store": "s"}),
                    ("save_query", {"name": "big", "sql": "SELECT * FROM cities"}),
                    ("delete_query", {"name": "big"}),
                    ("watch_directory", {"path": str(watched), "table": "dropped"}),
                    ("unwatch_directory", {"path": str(watched)}),
                    ("chart", {"sql": "SELECT city, area FROM cities", "chart_type": "bar",
                               "x": "city", "y": "area"}),
                ]
                seen = set()
                for name, arguments in calls:
                    # The SDK's client checks the result against the schema
                    # itself (it raises if they differ); so does this test.
                    result = await s.call_tool(name, arguments)
                    self.assertFalse(result.is_error, (name, result.content))
                    structured = result.structured_content
                    Draft202012Validator(schemas[name]).validate(structured)
                    self.assertNotEqual(set(structured), {"result"}, name)
                    if name != "get_readme":
                        # A chart comes with its image; the JSON is the text.
                        text = [c.text for c in result.content if c.type == "text"]
                        self.assertEqual(json.loads(text[0]), structured, name)
                    seen.add(name)
                self.assertEqual(seen, UPSTREAM_TOOLS)

                rows = (await s.call_tool("query", {"sql": "SELECT 'Lyon' AS city, 2 AS n"}))
                self.assertEqual(rows.structured_content["columns"], ["city", "n"])
                self.assertEqual(rows.structured_content["rows"], [["Lyon", 2]])
                readme = await s.call_tool("get_readme", {})
                self.assertEqual(readme.content[0].text, readme.structured_content["readme"])
                self.assertTrue(readme.content[0].text.startswith("# "))

        self.drive(go())

    def test_text_content_is_compact_json_in_utf8(self) -> None:
        async def go() -> Any:
            async with self.server() as s:
                return await s.call_tool("query", {"sql": "SELECT '東京' AS city, 'Zürich' AS b"})

        result = self.drive(go())
        text = result.content[0].text
        self.assertIn("東京", text)
        self.assertIn("Zürich", text)
        self.assertNotIn("\\u", text)
        value = json.loads(text)
        self.assertEqual(value["rows"], [["東京", "Zürich"]])
        self.assertEqual(text, json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class ArgumentErrorTests(McpTestCase):
    def test_wrong_arguments_get_a_plain_sentence_naming_the_parameter(self) -> None:
        cases = [
            # tool, arguments, words the answer must hold
            ("sample", {"table": "t", "n": "ten"}, ["n", "whole number", '"ten"']),
            ("query", {"sql": 42}, ["sql", "a string", "the number 42"]),
            ("query", {}, ["needs the parameter sql"]),
            ("execute", {"sql": "CREATE TABLE t (a int)"}, ["sql", "a list of strings"]),
            ("execute", {"sql": ["SELECT 1", 7]}, ["sql", "item 2 is the number 7"]),
            ("load_data", {"table": "t", "data": CSV, "schema": {"city": 5}},
             ["schema", "whose values are strings", "'city' is the number 5"]),
            ("load_data", {"table": "t", "data": CSV, "persist": "maybe"},
             ["persist", "true or false"]),
            ("describe", {"table": ["a", "b"]}, ["table", "a string", "a list"]),
            ("query", {"sql": "SELECT 1", "limt": 5},
             ["no parameter limt", "sql, database"]),
            ("query_file", {"path": "/x.csv", "sql": "SELECT 1", "tablename": "x"},
             ["no parameter tablename", "did you mean table_name?"]),
        ]

        async def go() -> list[str]:
            answers = []
            async with self.server() as s:
                for tool, arguments, _ in cases:
                    with self.assertRaises(ToolCallError) as caught:
                        await self.call(s, tool, **arguments)
                    answers.append(str(caught.exception))
                # The server carries on.
                self.assertEqual((await self.call(s, "query", sql="SELECT 1"))["rows"], [[1]])
            return answers

        answers = self.drive(go())
        for (tool, arguments, words), answer in zip(cases, answers):
            for word in words:
                self.assertIn(word, answer, (tool, arguments))
            for jargon in LIBRARY_TEXT:
                self.assertNotIn(jargon, answer.lower(), (tool, arguments, answer))
            self.assertTrue(answer.rstrip().endswith("."), answer)
            self.assertNotIn("\n", answer.strip())


class SessionNameTests(NamedClientTestCase):
    def test_the_session_takes_the_clients_name(self) -> None:
        async def go() -> None:
            async with self.client("claude-code") as s:
                await self.call(s, "status")
                wait_for(lambda: self.listed_names() == ["claude-code"], QUICK,
                         "daemon status to list the session as claude-code")

        self.drive(go())

    def test_two_clients_are_told_apart(self) -> None:
        async def go() -> None:
            async with self.client("claude-code") as one, self.client("cursor") as two:
                await self.call(one, "status")
                await self.call(two, "status")
                wait_for(lambda: sorted(self.listed_names()) == ["claude-code", "cursor"],
                         QUICK, "daemon status to list both clients by name")

        self.drive(go())

    def test_a_client_of_the_per_request_protocol_names_it_too(self) -> None:
        async def go() -> None:
            async with self.client("vscode", handshake=False) as s:
                await self.call(s, "status")
                wait_for(lambda: self.listed_names() == ["vscode"], QUICK,
                         "daemon status to list the session as vscode")

        self.drive(go())

    def test_without_the_daemon_a_named_client_is_served_as_ever(self) -> None:
        async def go() -> Any:
            async with self.client("claude-code", "--no-daemon") as s:
                return await s.call_tool("query", {"sql": "SELECT 1 AS one"})

        result = self.drive(go())
        self.assertFalse(result.is_error, result.content)
        self.assertEqual(result.structured_content["rows"], [[1]])


def test_a_client_label_is_printable_and_fits_the_daemon() -> None:
    from hyperdaemon.mcp.server import MAX_CLIENT_NAME, client_label

    assert client_label({"name": "claude-code"}) == "claude-code"
    assert client_label({"name": " my\nclient\x00 "}) == "myclient"
    assert client_label({"name": "x" * 500}) == "x" * MAX_CLIENT_NAME
    assert client_label({"name": "\n\t"}) is None
    assert client_label({"name": 42}) is None
    assert client_label({}) is None
