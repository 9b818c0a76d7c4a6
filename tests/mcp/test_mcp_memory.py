"""
The assistant's memory (hyperdaemon/mcp/memory.py): key-value stores and
saved queries, driven through the SDK's stdio client on the real daemon and
hyperd, with several servers at once where sharing is the point; the checks
of names, values and files on their own; the saved-query functions the
resources read, on a real session.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from hyperdaemon.mcp import memory
from hyperdaemon.mcp.memory import (MAX_ENTRIES, MAX_NAME, MAX_VALUE_BYTES, check_entries,
                                    check_name, check_value, memory_lock_path, read_value_file)
from hyperdaemon.mcp.tools import ToolFailure
from mcp_support import PlainRefusalsTestCase, ToolCallError
from support import QUICK, Clients, pid_alive, status, wait_for

#: The store the concurrency test fills, and how many entries it holds.
QUEUE = "jobs"
QUEUE_SIZE = 1000
POPPERS = 4


def refusal(call: Any) -> str:
    with pytest.raises(ToolFailure) as caught:
        call()
    return str(caught.value)


# -- checks, on their own ---------------------------------------------------------------

def test_a_name_is_1_to_512_letters_digits_and_marks() -> None:
    assert check_name("key", "a" * MAX_NAME) == "a" * MAX_NAME
    assert check_name("store", "run-2024_v1.2") == "run-2024_v1.2"
    assert refusal(lambda: check_name("key", "")).startswith("key: give a name of 1 to 512")
    assert refusal(lambda: check_name("key", "a" * (MAX_NAME + 1))).startswith(
        "key: 513 characters is longer than the 512 allowed")
    assert refusal(lambda: check_name("store", "a b")).startswith(
        "store: 'a b' holds ' ', and a name holds only letters, digits, _, . and -")
    assert "'é'" in refusal(lambda: check_name("key", "café"))
    assert refusal(lambda: check_name("key", None)).startswith("key: give a name")


def test_a_value_is_one_json_document_of_at_most_64_mib() -> None:
    for text in ('{"a": [1, 2]}', "3", '"text"', "true", "null", ' [ ] '):
        assert check_value("value", text) == len(text.encode())
    assert check_value("value", '"東京"') == 8
    not_json = refusal(lambda: check_value("value", "hello"))
    assert not_json.startswith("value: the value is not JSON (line 1, column 1")
    assert '"like this"' in not_json
    assert "line 1, column 5" in refusal(lambda: check_value("value", "[1,2"))
    assert refusal(lambda: check_value("value", '"\ud800"')).startswith(
        "value: the value holds half of a UTF-16 pair")
    too_big = '"' + "x" * (MAX_VALUE_BYTES - 1) + '"'
    assert refusal(lambda: check_value("value", too_big)).startswith(
        f"value: the value is {MAX_VALUE_BYTES + 1:,} bytes, more than the "
        f"{MAX_VALUE_BYTES:,} a value may hold")


def test_a_value_file_is_measured_before_it_is_read(tmp_path: Path) -> None:
    good = tmp_path / "v.json"
    good.write_text('{"k": "é"}', encoding="utf-8")
    assert read_value_file(str(good)) == '{"k": "é"}'
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: nothing to read, only its size
        f.truncate(MAX_VALUE_BYTES + 1)
    assert refusal(lambda: read_value_file(str(huge))).startswith(
        f"value_path: {huge} is {MAX_VALUE_BYTES + 1:,} bytes, more than the")
    assert refusal(lambda: read_value_file("v.json")).startswith(
        "value_path: 'v.json' is not an absolute path")
    assert "cannot be read (No such file or directory)" in refusal(
        lambda: read_value_file(str(tmp_path / "none.json")))
    assert refusal(lambda: read_value_file(str(tmp_path))).endswith("is not a file; give the "
                                                                    "path of a file")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'"caf\xe9"')
    assert "is not UTF-8 text" in refusal(lambda: read_value_file(str(latin)))


def test_a_batch_is_checked_whole_before_anything_is_written() -> None:
    assert check_entries([{"key": "a", "value": "1"}, {"key": "b", "value": "[2]"}]) == [
        ("a", "1", 1), ("b", "[2]", 3)]
    assert refusal(lambda: check_entries([])).startswith("entries: give at least one entry")
    assert refusal(lambda: check_entries([{"key": "a"}])).startswith(
        "entries item 1: give an object with exactly a key and a value")
    assert refusal(lambda: check_entries([{"key": "a", "value": "1"}, {"key": "b c",
                                                                       "value": "1"}])
                   ).startswith("entries item 2 key: 'b c' holds ' '")
    assert refusal(lambda: check_entries([{"key": "a", "value": "1"}, {"key": "b",
                                                                       "value": "x"}])
                   ).startswith("entries item 2 value: the value is not JSON")
    assert refusal(lambda: check_entries([{"key": "a", "value": "1"}] * 2)).startswith(
        "entries item 2: the key 'a' is item 1's too; give each key once")
    many = [{"key": f"k{i}", "value": "1"} for i in range(MAX_ENTRIES + 1)]
    assert refusal(lambda: check_entries(many)).startswith(
        f"entries: {MAX_ENTRIES + 1:,} entries is more than the {MAX_ENTRIES:,}")


def test_the_writers_lock_is_beside_the_database(tmp_path: Path) -> None:
    database = tmp_path / "shared.hyper"
    assert memory_lock_path(database, tmp_path / "locks") == tmp_path / ".shared.hyper.memory.lock"


# -- through the MCP client ----------------------------------------------------------

class MemoryTestCase(PlainRefusalsTestCase):
    pass


class ScratchStoreTests(MemoryTestCase):
    def test_each_kv_tool_on_the_session_s_scratch_store(self) -> None:
        value_file = self.tmp / "config.json"
        value_file.write_text('{"threshold": 0.5}')

        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                self.assertEqual(await c("kv_set", store="notes", key="b", value='{"x": 1}'), {
                    "stored": True, "created": True, "store": "notes", "key": "b",
                    "value_bytes": 8, "resolved_database": "local"})
                await c("kv_set", store="notes", key="a", value='"first"')
                replaced = await c("kv_set", store="notes", key="a", value="2")
                self.assertEqual((replaced["stored"], replaced["created"]), (True, False))
                kept = await c("kv_set", store="notes", key="a", value="3", overwrite=False)
                self.assertEqual((kept["stored"], kept["created"], kept["existed"]),
                                 (False, False, True))
                # null stands for a parameter left out, as upstream takes it.
                await c("kv_set", store="notes", key="c", value=None,
                        value_path=str(value_file))
                self.assertEqual(await c("kv_get", store="notes", key="a"),
                                 {"found": True, "value": "2", "resolved_database": "local"})
                self.assertEqual(await c("kv_get", store="notes", key="c"),
                                 {"found": True, "value": '{"threshold": 0.5}',
                                  "resolved_database": "local"})
                self.assertEqual(await c("kv_get", store="notes", key="zz"),
                                 {"found": False, "value": None, "resolved_database": "local"})
                self.assertEqual(await c("kv_list", store="notes"), {
                    "store": "notes", "count": 3, "keys": ["a", "b", "c"],
                    "resolved_database": "local"})
                listed = await c("kv_list", store="notes", values=True)
                self.assertEqual(listed["entries"][:2], [{"key": "a", "value": "2"},
                                                         {"key": "b", "value": '{"x": 1}'}])
                await c("kv_set", store="other", key="k", value="1")
                self.assertEqual((await c("kv_list_stores"))["stores"], ["notes", "other"])
                self.assertEqual(await c("kv_size", store="notes"), {
                    "store": "notes", "size": 3, "bytes": 1 + 8 + 18,
                    "resolved_database": "local"})
                # Lowest key first, whatever the order of writing.
                popped = await c("kv_pop", store="notes")
                self.assertEqual((popped["found"], popped["key"], popped["value"]),
                                 (True, "a", "2"))
                self.assertEqual((await c("kv_delete", store="notes", key="b"))["deleted"], True)
                self.assertEqual((await c("kv_delete", store="notes", key="b"))["deleted"],
                                 False)
                self.assertEqual((await c("kv_clear", store="notes"))["removed"], 1)
                self.assertEqual((await c("kv_pop", store="notes"))["found"], False)
                # An emptied store is no longer listed.
                self.assertEqual((await c("kv_list_stores"))["stores"], ["other"])
                # Upstream's table, in the database chosen.
                rows = await c("query", sql="SELECT store_name, key, value FROM "
                                            "_hyperdb_kv_store")
                self.assertEqual(rows["columns"], ["store_name", "key", "value"])
                self.assertEqual(rows["rows"], [["other", "k", "1"]])

        self.drive(go())

    def test_kv_set_many_is_all_or_nothing(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                c = lambda tool, **kw: self.call(s, tool, **kw)  # noqa: E731
                written = await c("kv_set_many", store="s", entries=[
                    {"key": "a", "value": "1"}, {"key": "b", "value": "[2]"}])
                self.assertEqual(written, {"stored": 2, "created": 2, "overwritten": 0,
                                           "total_bytes": 4, "resolved_database": "local"})
                message = await self.refused(s, "kv_set_many", store="s", entries=[
                    {"key": "a", "value": "10"}, {"key": "c", "value": "3"},
                    {"key": "d", "value": "not json"}])
                self.assertTrue(message.startswith("entries item 3 value: the value is not "
                                                   "JSON"), message)
                self.assertEqual((await c("kv_list", store="s", values=True))["entries"],
                                 [{"key": "a", "value": "1"}, {"key": "b", "value": "[2]"}])
                guarded = await c("kv_set_many", store="s", overwrite=False, entries=[
                    {"key": "a", "value": "10"}, {"key": "c", "value": "3"}])
                self.assertEqual((guarded["stored"], guarded["created"], guarded["skipped"]),
                                 (1, 1, 1))
                replaced = await c("kv_set_many", store="s", entries=[
                    {"key": "a", "value": "10"}, {"key": "d", "value": "4"}])
                self.assertEqual((replaced["stored"], replaced["created"],
                                  replaced["overwritten"]), (2, 1, 1))
                self.assertEqual((await c("kv_list", store="s", values=True))["entries"], [
                    {"key": "a", "value": "10"}, {"key": "b", "value": "[2]"},
                    {"key": "c", "value": "3"}, {"key": "d", "value": "4"}])

        self.drive(go())

    def test_limits_and_bad_input_are_one_clear_error_and_the_session_goes_on(self) -> None:
        huge = self.tmp / "huge.json"
        with open(huge, "wb") as f:
            f.truncate(MAX_VALUE_BYTES + 1)

        async def go() -> None:
            async with self.server() as s:
                for tool, arguments, start in [
                    ("kv_set", {"store": "s", "key": "k" * 513, "value": "1"},
                     "key: 513 characters is longer than the 512 allowed"),
                    ("kv_set", {"store": "my notes", "key": "k", "value": "1"},
                     "store: 'my notes' holds ' '"),
                    ("kv_set", {"store": "s", "key": "k", "value": "plain words"},
                     "value: the value is not JSON (line 1, column 1"),
                    ("kv_set", {"store": "s", "key": "k", "value_path": str(huge)},
                     f"value_path: {huge} is {MAX_VALUE_BYTES + 1:,} bytes, more than the"),
                    ("kv_set", {"store": "s", "key": "k", "value_path": "relative.json"},
                     "value_path: 'relative.json' is not an absolute path"),
                    ("kv_set", {"store": "s", "key": "k", "value": "1",
                                "value_path": str(huge)},
                     "value, value_path: give exactly one of them"),
                    ("kv_set", {"store": "s", "key": "k"},
                     "value, value_path: give exactly one of them"),
                    ("kv_set", {"store": "s", "key": "k", "value": "1", "database": "nope"},
                     "database: no database is attached as 'nope'"),
                    ("kv_get", {"store": "s", "key": "k", "database": "local",
                                "persist": True},
                     "persist: persist=true means database='persistent'"),
                    ("kv_set_many", {"store": "s", "entries": []},
                     "entries: give at least one entry"),
                    ("kv_pop", {"store": ""}, "store: give a name of 1 to 512 characters"),
                    ("save_query", {"name": "bad name", "sql": "SELECT 1"},
                     "name: 'bad name' holds ' '"),
                    ("save_query", {"name": "q", "sql": "DROP TABLE t"},
                     "sql: a saved query is one statement that query can run"),
                    ("save_query", {"name": "q", "sql": "SELECT 1; SELECT 2"},
                     "sql: a saved query is one statement that query can run"),
                ]:
                    message = await self.refused(s, tool, **arguments)
                    self.assertTrue(message.startswith(start), (tool, arguments, message))
                    self.assertNotIn("Traceback", message)
                # The session is unharmed, and nothing was written.
                self.assertEqual((await self.call(s, "kv_list_stores"))["stores"], [])
                await self.call(s, "kv_set", store="s", key="k", value='"fine"')
                self.assertEqual((await self.call(s, "kv_get", store="s", key="k"))["value"],
                                 '"fine"')

        self.drive(go())


class SharedStoreTests(MemoryTestCase):
    def test_a_value_set_with_persist_by_one_server_is_read_by_another(self) -> None:
        async def go() -> None:
            async with self.server() as one, self.server() as other:
                await self.call(one, "kv_set", store="handover", key="plan",
                                value='{"step": 2}', persist=True)
                await self.call(one, "kv_set", store="mine", key="k", value="1")
                self.assertEqual(
                    await self.call(other, "kv_get", store="handover", key="plan",
                                    database="persistent"),
                    {"found": True, "value": '{"step": 2}', "resolved_database": "persistent"})
                self.assertEqual((await self.call(other, "kv_list_stores", persist=True))[
                    "stores"], ["handover"])
                # What one keeps in its scratch store, the other cannot see.
                self.assertEqual((await self.call(other, "kv_get", store="mine", key="k"))[
                    "found"], False)
            # Kept after both servers are gone.
            async with self.server() as later:
                self.assertEqual((await self.call(later, "kv_get", store="handover",
                                                  key="plan", persist=True))["value"],
                                 '{"step": 2}')

        self.drive(go())

    def test_servers_popping_one_persistent_store_at_once_get_each_entry_exactly_once(
            self) -> None:
        keys = [f"job{i:04d}" for i in range(QUEUE_SIZE)]

        async def pop_all(session: Any) -> list[str]:
            taken = []
            while True:
                popped = await self.call(session, "kv_pop", store=QUEUE, persist=True)
                if not popped["found"]:
                    return taken
                self.assertEqual(popped["value"], json.dumps(popped["key"]))
                taken.append(popped["key"])

        async def go() -> list[list[str]]:
            async with self.server() as s0, self.server() as s1, self.server() as s2, \
                    self.server() as s3:
                await self.call(s0, "kv_set_many", store=QUEUE, persist=True,
                                entries=[{"key": k, "value": json.dumps(k)} for k in keys])
                taken = await asyncio.gather(*(pop_all(s) for s in (s0, s1, s2, s3)))
                self.assertEqual((await self.call(s1, "kv_size", store=QUEUE, persist=True))[
                    "size"], 0)
                return taken

        taken = asyncio.run(asyncio.wait_for(go(), 600))
        every = [key for popped in taken for key in popped]
        self.assertEqual(sorted(every), keys)  # each entry once: none lost, none twice
        self.assertEqual(len(taken), POPPERS)
        for popped in taken:
            self.assertEqual(popped, sorted(popped))  # each took the lowest key left

    def test_a_persistent_write_is_on_disk_when_the_tool_returns(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "kv_set", store="s", key="k", value='"kept"', persist=True)
                await self.call(s, "kv_set_many", store="s", persist=True,
                                entries=[{"key": "a", "value": "1"}, {"key": "b", "value": "2"}])
                await self.call(s, "kv_pop", store="s", persist=True)
                # Nothing graceful: hyperd's memory is lost, the file is what remains.
                before = status(self.ports[0])["hyperd_pid"]
                os.kill(before, 9)
                wait_for(lambda: not pid_alive(before), QUICK, "hyperd to die")
                wait_for(lambda: status(self.ports[0]).get("hyperd_pid") not in (None, before),
                         QUICK, "a new hyperd")
                listed = await self.call(s, "kv_list", store="s", values=True, persist=True)
                self.assertEqual(listed["entries"], [{"key": "b", "value": "2"},
                                                     {"key": "k", "value": '"kept"'}])

        self.drive(go())

    def test_a_store_in_an_attached_database_is_kept_in_its_file(self) -> None:
        path = self.tmp / "notes.hyper"

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "attach_database", alias="notes", kind="local_file",
                                path=str(path), on_missing="create")
                await self.call(s, "kv_set", store="s", key="k", value="[1]", database="notes")
                await self.call(s, "detach_database", alias="notes")
            async with self.server() as s:
                await self.call(s, "attach_database", alias="other", kind="local_file",
                                path=str(path))
                self.assertEqual((await self.call(s, "kv_get", store="s", key="k",
                                                  database="other"))["value"], "[1]")
                self.assertEqual((await self.call(s, "kv_get", store="s", key="k"))["found"],
                                 False)
            # Its writers met on a lock beside it.
            self.assertTrue((self.tmp / ".notes.hyper.memory.lock").exists())

        self.drive(go())

    def test_read_only_keeps_the_user_s_databases_and_leaves_the_scratch_store(self) -> None:
        async def go() -> None:
            async with self.server() as writer:
                await self.call(writer, "kv_set", store="s", key="k", value="1", persist=True)
                await self.call(writer, "save_query", name="kept", sql="SELECT 1")
            async with self.server("--read-only") as s:
                self.assertEqual((await self.call(s, "kv_get", store="s", key="k",
                                                  persist=True))["value"], "1")
                self.assertEqual((await self.call(s, "kv_list", store="s", persist=True))[
                    "keys"], ["k"])
                for tool, arguments in [
                    ("kv_set", {"store": "s", "key": "k", "value": "2", "persist": True}),
                    ("kv_set_many", {"store": "s", "database": "persistent",
                                     "entries": [{"key": "k", "value": "2"}]}),
                    ("kv_pop", {"store": "s", "persist": True}),
                    ("kv_delete", {"store": "s", "key": "k", "persist": True}),
                    ("kv_clear", {"store": "s", "persist": True}),
                ]:
                    message = await self.refused(s, tool, **arguments)
                    self.assertTrue(message.startswith(f"database: {tool} would change "
                                                       f"'persistent', and the server runs "
                                                       f"with --read-only"), message)
                for tool, arguments in [("save_query", {"name": "new", "sql": "SELECT 2"}),
                                        ("delete_query", {"name": "kept"})]:
                    message = await self.refused(s, tool, **arguments)
                    self.assertIn("--read-only", message)
                self.assertEqual((await self.call(s, "kv_get", store="s", key="k",
                                                  persist=True))["value"], "1")
                # The scratch store is the session's own: notes still work.
                await self.call(s, "kv_set", store="notes", key="n", value="1")
                self.assertEqual((await self.call(s, "kv_pop", store="notes"))["key"], "n")
            async with self.server() as later:
                message = await self.refused(later, "save_query", name="kept", sql="SELECT 3")
                self.assertTrue(message.startswith("name: a saved query named 'kept' exists"))

        self.drive(go())


class SavedQueryTests(MemoryTestCase):
    def test_saved_queries_are_kept_in_persistent_for_every_server(self) -> None:
        async def go() -> None:
            async with self.server() as one, self.server() as other:
                saved = await self.call(one, "save_query", name="big_cities",
                                        sql="SELECT city FROM persistent.public.cities "
                                            "WHERE population > 200000",
                                        description="Cities over 200,000 people")
                self.assertEqual(saved["resources"], ["hyper://queries/big_cities/definition",
                                                      "hyper://queries/big_cities/result"])
                self.assertTrue(saved["created_at"].endswith("+00:00"), saved)
                message = await self.refused(other, "save_query", name="big_cities",
                                             sql="SELECT 1")
                self.assertTrue(message.startswith(
                    "name: a saved query named 'big_cities' exists already"), message)
                self.assertIn("delete_query", message)
                rows = await self.call(other, "query", sql="SELECT name, description FROM "
                                                           "persistent.public."
                                                           "_hyperdb_saved_queries")
                self.assertEqual(rows["rows"], [["big_cities", "Cities over 200,000 people"]])
                self.assertEqual(await self.call(other, "delete_query", name="big_cities"),
                                 {"deleted": True, "name": "big_cities"})
                self.assertEqual(await self.call(one, "delete_query", name="big_cities"),
                                 {"deleted": False, "name": "big_cities"})
                again = await self.call(one, "save_query", name="big_cities", sql="SELECT 2",
                                        description=None)
                self.assertTrue(again["saved"])

        self.drive(go())

    def test_with_ephemeral_only_saved_queries_last_as_long_as_the_session(self) -> None:
        async def go() -> None:
            async with self.server("--ephemeral-only") as s:
                saved = await self.call(s, "save_query", name="q", sql="SELECT 1")
                self.assertEqual(saved["resolved_database"], "local")
                with self.assertRaises(ToolCallError):
                    await self.call(s, "save_query", name="q", sql="SELECT 1")
            async with self.server("--ephemeral-only") as s:
                self.assertTrue((await self.call(s, "save_query", name="q",
                                                 sql="SELECT 1"))["saved"])

        self.drive(go())


# -- what the resources read ---------------------------------------------------------

@pytest.mark.deadline(180)
@pytest_twisted.ensureDeferred
async def test_saved_queries_and_saved_query_read_what_save_query_kept(
        clients: Clients) -> None:
    from hyperdaemon.mcp.tools import Tools

    session = await clients.open(name="memory")
    tools = Tools(session)
    assert await memory.saved_queries(tools) == []
    assert await memory.saved_query(tools, "none") is None
    store = memory.Memory(tools)
    await store.save_query("b_second", "SELECT 2 AS two")
    await store.save_query("a_first", "SELECT 1 AS one", description="The first")
    found = await memory.saved_queries(tools)
    assert [(q["name"], q["sql"], q["description"]) for q in found] == [
        ("a_first", "SELECT 1 AS one", "The first"), ("b_second", "SELECT 2 AS two", None)]
    one = await memory.saved_query(tools, "b_second")
    assert (one["name"], one["sql"], one["description"]) == ("b_second", "SELECT 2 AS two", None)
    assert await memory.saved_query(tools, "none") is None
    assert os.path.exists(session.persistent_db)
