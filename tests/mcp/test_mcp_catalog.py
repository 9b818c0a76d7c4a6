"""
copy_query, load_iceberg and the table catalog (set_table_metadata, and
describe's entries), driven through the MCP SDK's stdio client on the real
daemon and hyperd.  The Iceberg tables are written by hyperd itself (COPY
... TO ... WITH (FORMAT iceberg)).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest_twisted

from mcp_support import McpTestCase, ToolCallError

#: The table of the catalog, in each database.
CATALOG = "_table_catalog"
#: Rows of the data file that every tool is tried on.
ROWS = 1000
#: Connections writing the catalog at once, and the writes of each: without
#: turns, hyperd crashed in most runs of this size.
WRITERS, WRITES = 8, 60


def thousand_rows_csv(path: Path) -> Path:
    """1,000 rows with dates, NULLs (every 7th amount) and quoted text with commas and quotes."""
    lines = ["id,day,amount,note"]
    for i in range(ROWS):
        amount = "" if i % 7 == 0 else f"{i * 1.25}"
        lines.append(f'{i},2024-{i % 12 + 1:02d}-{i % 28 + 1:02d},{amount},'
                     f'"note {i}, with ""quotes"""')
    path.write_text("\n".join(lines) + "\n")
    return path


#: What the 1,000 rows add up to, as every copy of them must.
SUMMARY = ("SELECT count(*), count(amount), sum(id), min(day), max(day), "
           "max(note) FILTER (WHERE id = 5) FROM {}")
EXPECTED_SUMMARY = [[ROWS, ROWS - 143, ROWS * (ROWS - 1) // 2, "2024-01-01", "2024-12-28",
                     'note 5, with "quotes"']]


class CatalogTestCase(McpTestCase):
    async def refused(self, session: Any, tool: str, **arguments: Any) -> str:
        with self.assertRaises(ToolCallError) as caught:
            await self.call(session, tool, **arguments)
        message = str(caught.exception)
        self.assertNotIn("Traceback", message)
        return message

    async def rows(self, session: Any, sql: str) -> list[list[Any]]:
        return (await self.call(session, "query", sql=sql))["rows"]

    async def table_names(self, session: Any, database: str = "local") -> list[str]:
        described = await self.call(session, "describe", database=database)
        return sorted(t["table"] for t in described["tables"])

    async def all_table_names(self, session: Any, database: str = "local") -> list[str]:
        """Every table of the database, the catalog and any leftover included."""
        return [name for [name] in await self.rows(
            session, f"SELECT c.relname FROM {database}.pg_catalog.pg_class c JOIN "
                     f"{database}.pg_catalog.pg_namespace n ON c.relnamespace = n.oid "
                     f"WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1")]

    async def iceberg(self, session: Any, folder: Path, select: str) -> Path:
        """An Iceberg table of C{select}'s rows at C{folder}, written by hyperd."""
        await self.call(session, "execute", sql=[
            f"COPY ({select}) TO '{folder}' WITH (FORMAT iceberg, table_scheme 'filesystem')"])
        return folder


class CopyQueryTests(CatalogTestCase):
    def test_copy_query_creates_appends_and_replaces_across_databases(self) -> None:
        data = thousand_rows_csv(self.tmp / "thousand.csv")

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_file", table="events", path=str(data))
                await self.call(s, "execute", sql=[
                    "CREATE TABLE persistent.public.months (m int, name text)",
                    "INSERT INTO persistent.public.months VALUES (1, 'January'), (2, 'February')"])
                made = await self.call(s, "copy_query", sql="SELECT * FROM events",
                                       target_table="copied", mode="create",
                                       target_database="persistent")
                self.assertEqual(made["rows_copied"], ROWS)
                self.assertEqual(made["row_count"], ROWS)
                self.assertEqual(made["target_database"], "persistent")
                self.assertEqual(await self.rows(s, SUMMARY.format("persistent.public.copied")),
                                 EXPECTED_SUMMARY)
                # A join across the local and the persistent database.
                joined = await self.call(
                    s, "copy_query", target_table="winter", mode="create",
                    sql="SELECT e.id, m.name FROM events e JOIN persistent.public.months m "
                        "ON extract(month FROM e.day) = m.m")
                self.assertEqual(joined["rows_copied"], 168)
                again = await self.refused(s, "copy_query", sql="SELECT 1 AS id",
                                           target_table="winter", mode="create")
                self.assertIn("target_table", again)
                self.assertIn("mode='append'", again)
                appended = await self.call(s, "copy_query", target_table="winter",
                                           mode="append", sql="SELECT 9999 AS id")
                self.assertEqual((appended["rows_copied"], appended["row_count"]), (1, 169))
                # Columns are matched by name; one the query lacks is NULL.
                self.assertEqual(await self.rows(s, "SELECT name FROM winter WHERE id = 9999"),
                                 [[None]])
                replaced = await self.call(s, "copy_query", target_table="winter",
                                           mode="replace", sql="VALUES (1), (2)")
                self.assertEqual((replaced["rows_copied"], replaced["row_count"]), (2, 2))
                self.assertEqual(await self.table_names(s), ["events", "winter"])
            # Another assistant sees the copy in the shared database.
            async with self.server() as other:
                self.assertEqual(await self.rows(other, "SELECT count(*) FROM "
                                                        "persistent.public.copied"), [[ROWS]])

        self.drive(go())

    def test_bad_input_is_refused_clearly_and_leaves_nothing_behind(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_data", table="cities",
                                data="city,pop\nLyon,522000\nNice,342000\n")
                before = await self.rows(s, "SELECT * FROM cities ORDER BY city")
                cases = [
                    ({"sql": "SELECT * FROM cities", "target_table": "t", "mode": "upsert"},
                     "mode"),
                    ({"sql": "DELETE FROM cities", "target_table": "t", "mode": "create"},
                     "sql"),
                    ({"sql": "WITH x AS (DELETE FROM cities RETURNING *) SELECT * FROM x",
                      "target_table": "t", "mode": "create"}, "sql"),
                    ({"sql": "EXPLAIN SELECT * FROM cities", "target_table": "t",
                      "mode": "create"}, "sql"),
                    ({"sql": "SELECT * FROM nowhere", "target_table": "t", "mode": "create"},
                     "sql"),
                    # Fails only once rows are computed: the target must stay as it was.
                    ({"sql": "SELECT city, 1 / (pop - 342000) AS x FROM cities",
                      "target_table": "cities", "mode": "replace"}, "sql"),
                    ({"sql": "SELECT 1 AS a", "target_table": "t", "mode": "append"},
                     "target_table"),
                    ({"sql": "SELECT 1 AS a", "target_table": "persistent.public.t",
                      "mode": "create"}, "target_table"),
                    ({"sql": "SELECT 1 AS a", "target_table": "t", "mode": "create",
                      "target_database": "nowhere"}, "target_database"),
                    ({"sql": "SELECT 1 AS a", "target_table": "t", "mode": "create",
                      "temp_attach": [{"alias": "src", "kind": "local_file",
                                       "path": str(self.tmp / "missing.hyper")}]},
                     "temp_attach item 1: path"),
                ]
                for arguments, parameter in cases:
                    message = await self.refused(s, "copy_query", **arguments)
                    self.assertIn(f"{parameter}:", message, arguments)
                self.assertEqual(await self.all_table_names(s), [CATALOG, "cities"])
                self.assertEqual(await self.rows(s, "SELECT * FROM cities ORDER BY city"),
                                 before)
                databases = await self.call(s, "list_attached_databases")
                self.assertNotIn("src", [d["alias"] for d in databases["databases"]])
                # The session goes on.
                self.assertEqual((await self.call(s, "copy_query", sql="SELECT 1 AS a",
                                                  target_table="t", mode="create"))
                                 ["row_count"], 1)

        self.drive(go())

    def test_temp_attach_reads_a_database_for_one_call_only(self) -> None:
        source = self.tmp / "source.hyper"

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_data", table="cities",
                                data="city,pop\nLyon,522000\nNice,342000\n")
                await self.call(s, "export", path=str(source), format="hyper", table="cities")
                attach = [{"alias": "src", "kind": "local_file", "path": str(source)}]
                copied = await self.call(
                    s, "copy_query", sql="SELECT city FROM src.public.cities WHERE pop > 400000",
                    target_table="big", mode="create", temp_attach=attach)
                self.assertEqual(copied["rows_copied"], 1)
                self.assertEqual(await self.rows(s, "SELECT city FROM big"), [["Lyon"]])
                aliases = [d["alias"] for d in
                           (await self.call(s, "list_attached_databases"))["databases"]]
                self.assertNotIn("src", aliases)
                # Detached after a failure too: the same alias attaches again.
                await self.refused(s, "copy_query", sql="SELECT nothing FROM src.public.cities",
                                   target_table="big2", mode="create", temp_attach=attach)
                again = await self.call(s, "copy_query", sql="SELECT * FROM src.public.cities",
                                        target_table="big2", mode="create", temp_attach=attach)
                self.assertEqual(again["rows_copied"], 2)

        self.drive(go())


class IcebergTests(CatalogTestCase):
    def test_load_iceberg_reads_the_latest_version_or_a_pinned_one(self) -> None:
        data = thousand_rows_csv(self.tmp / "thousand.csv")
        table, later = self.tmp / "ice", self.tmp / "later"

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_file", table="events", path=str(data))
                await self.iceberg(s, table, "SELECT * FROM events")
                await self.iceberg(s, later, "SELECT * FROM events WHERE id < 10")
                # Version 1 of the table: the second one's metadata and files.
                for folder in ("metadata", "data"):
                    for file in (later / folder).iterdir():
                        name = "v1.metadata.json" if file.name == "v0.metadata.json" else file.name
                        shutil.copy(file, table / folder / name)
                latest = await self.call(s, "load_iceberg", table="latest", path=str(table))
                self.assertEqual((latest["rows_loaded"], latest["mode"]), (10, "replace"))
                first = await self.call(s, "load_iceberg", table="first", path=str(table),
                                        version_as_of=0)
                self.assertEqual(first["rows_loaded"], ROWS)
                self.assertEqual(await self.rows(s, SUMMARY.format("first")), EXPECTED_SUMMARY)
                self.assertEqual(first["columns"]["day"], "date")
                pinned = await self.call(s, "load_iceberg", table="first", path=str(table),
                                         metadata_filename="v1.metadata.json", mode="append")
                self.assertEqual(pinned["rows_loaded"], 10)
                self.assertEqual(await self.rows(s, "SELECT count(*) FROM first"),
                                 [[ROWS + 10]])

        self.drive(go())

    def test_bad_input_is_refused_clearly_and_leaves_no_table(self) -> None:
        not_a_table = self.tmp / "plain"
        not_a_table.mkdir()

        async def go() -> None:
            async with self.server() as s:
                table = await self.iceberg(s, self.tmp / "ice", "SELECT 1 AS a")
                cases = [
                    ({"path": "relative/ice"}, "path", "absolute"),
                    ({"path": str(self.tmp / "missing")}, "path", "does not exist"),
                    ({"path": str(self.csv)}, "path", "is a file"),
                    ({"path": str(not_a_table)}, "path", "no metadata/"),
                    ({"path": str(table), "version_as_of": 3}, "version_as_of", "versions are 0"),
                    ({"path": str(table), "metadata_filename": "v9.metadata.json"},
                     "metadata_filename", "v0.metadata.json"),
                    ({"path": str(table), "metadata_filename": "v0.metadata.json",
                      "version_as_of": 0}, "metadata_filename, version_as_of", "at most one"),
                    ({"path": str(table), "mode": "merge"}, "mode", "replace"),
                ]
                for arguments, parameter, detail in cases:
                    message = await self.refused(s, "load_iceberg", table="t", **arguments)
                    self.assertIn(f"{parameter}:", message, arguments)
                    self.assertIn(detail, message, arguments)
                # A folder that looks like a table but is not one: hyperd's own error.
                (not_a_table / "metadata").mkdir()
                (not_a_table / "metadata" / "v0.metadata.json").write_text("{}")
                message = await self.refused(s, "load_iceberg", table="t",
                                             path=str(not_a_table))
                self.assertIn("path:", message)
                self.assertEqual(await self.all_table_names(s), [])
                loaded = await self.call(s, "load_iceberg", table="t", path=str(table))
                self.assertEqual(loaded["rows_loaded"], 1)

        self.drive(go())


class IcebergExportTests(CatalogTestCase):
    def test_export_writes_an_iceberg_table_that_load_iceberg_reads_back(self) -> None:
        data = thousand_rows_csv(self.tmp / "thousand.csv")
        out, plain = self.tmp / "out", self.tmp / "plain"
        plain.mkdir()
        (plain / "keep.txt").write_text("mine")

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_file", table="events", path=str(data))
                written = await self.call(s, "export", path=str(out), format="iceberg",
                                          table="events")
                self.assertEqual(written["format"], "iceberg")
                self.assertGreater(written["bytes"], 0)
                self.assertTrue((out / "metadata").is_dir())
                await self.call(s, "load_iceberg", table="back", path=str(out))
                self.assertEqual(await self.rows(s, SUMMARY.format("back")), EXPECTED_SUMMARY)

                exists = await self.refused(s, "export", path=str(out), format="iceberg",
                                            table="events")
                self.assertIn("overwrite=true", exists)
                await self.call(s, "export", path=str(out), format="iceberg", overwrite=True,
                                sql="SELECT * FROM events WHERE id < 5",
                                format_options={"table_scheme": "filesystem", "codec": "zstd"})
                self.assertTrue((out / "metadata" / "v0.metadata.json").is_file())
                await self.call(s, "load_iceberg", table="back", path=str(out))
                self.assertEqual(await self.rows(s, "SELECT count(*) FROM back"), [[5]])
                # A failed replacement leaves the table that was there.
                failed = await self.refused(s, "export", path=str(out), format="iceberg",
                                            overwrite=True, sql="SELECT nothing FROM events")
                self.assertIn("sql:", failed)
                await self.call(s, "load_iceberg", table="back", path=str(out))
                self.assertEqual(await self.rows(s, "SELECT count(*) FROM back"), [[5]])
                # A folder that is not an Iceberg table is never replaced.
                message = await self.refused(s, "export", path=str(plain), format="iceberg",
                                             overwrite=True, table="events")
                self.assertIn("not an Iceberg table", message)
                self.assertEqual((plain / "keep.txt").read_text(), "mine")
                option = await self.refused(s, "export", path=str(self.tmp / "o2"),
                                            format="iceberg", table="events",
                                            format_options={"delimiter": ";"})
                self.assertIn("format_options:", option)
                self.assertFalse((self.tmp / "o2").exists())
                self.assertEqual([p.name for p in self.tmp.iterdir() if ".replaced-" in p.name],
                                 [])
                # An export cut off while it replaced the table leaves the old
                # one set aside: the next export says so, and touches neither.
                aside = self.tmp / ".out.replaced-0badf00d"
                out.rename(aside)
                (out / "metadata").mkdir(parents=True)  # the cut-off export's start
                for partial_there in (True, False):
                    if not partial_there:
                        shutil.rmtree(out)
                    message = await self.refused(s, "export", path=str(out), format="iceberg",
                                                 overwrite=True, table="events")
                    self.assertIn(f"was kept at {aside}", message)
                    self.assertTrue((aside / "metadata" / "v0.metadata.json").is_file())
                    self.assertEqual(out.exists(), partial_there)
                aside.rename(out)
                await self.call(s, "load_iceberg", table="back", path=str(out))
                self.assertEqual(await self.rows(s, "SELECT count(*) FROM back"), [[5]])

        self.drive(go())


class CatalogTests(CatalogTestCase):
    def test_each_load_records_where_its_table_came_from_and_describe_shows_it(self) -> None:
        data = thousand_rows_csv(self.tmp / "thousand.csv")

        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_data", table="cities", data="city,pop\nLyon,1\n")
                await self.call(s, "load_file", table="events", path=str(data), persist=True)
                await self.call(s, "copy_query", sql="SELECT * FROM persistent.public.events "
                                                     "WHERE amount IS NULL",
                                target_table="gaps", mode="create")
                table = await self.iceberg(s, self.tmp / "ice", "SELECT * FROM cities")
                await self.call(s, "load_iceberg", table="iced", path=str(table))

                local = await self.call(s, "describe")
                self.assertEqual([t["table"] for t in local["tables"]],
                                 ["cities", "gaps", "iced"])
                entries = {t["table"]: t["catalog"] for t in local["tables"]}
                self.assertEqual(entries["cities"]["load_tool"], "load_data")
                self.assertEqual(entries["cities"]["load_params"],
                                 {"mode": "replace", "database": "local"})
                self.assertEqual(entries["cities"]["row_count"], 1)
                self.assertEqual(entries["gaps"]["load_tool"], "copy_query")
                self.assertEqual(entries["gaps"]["row_count"], 143)
                self.assertIn("amount IS NULL", entries["gaps"]["load_params"]["sql"])
                self.assertEqual(entries["iced"]["load_tool"], "load_iceberg")
                self.assertEqual(entries["iced"]["load_params"]["path"], str(table))
                for entry in entries.values():
                    self.assertEqual(entry["loaded_at"], entry["last_refreshed_at"])
                    self.assertTrue(entry["created_by"])

                shared = await self.call(s, "describe", table="events", database="persistent")
                self.assertEqual(shared["catalog"]["load_tool"], "load_file")
                self.assertEqual(shared["catalog"]["load_params"]["path"], str(data))
                self.assertEqual(shared["catalog"]["row_count"], ROWS)
                # The catalog is in the table's own database.
                self.assertEqual(await self.rows(s, f"SELECT table_name FROM "
                                                    f"persistent.public.{CATALOG}"),
                                 [["events"]])
                # A later load refreshes the entry and keeps its first load time.
                await self.call(s, "load_data", table="cities", data="city,pop\nNice,2\n",
                                mode="append")
                cities = (await self.call(s, "describe", table="cities"))["catalog"]
                self.assertEqual(cities["row_count"], 2)
                self.assertEqual(cities["load_params"]["mode"], "append")
                self.assertEqual(cities["loaded_at"], entries["cities"]["loaded_at"])
                self.assertGreater(cities["last_refreshed_at"], cities["loaded_at"])

        self.drive(go())

    def test_load_files_records_every_table_though_they_load_at_once(self) -> None:
        paths = []
        for n in range(6):
            paths.append(self.tmp / f"part{n}.csv")
            paths[-1].write_text("k,v\n" + "".join(f"{i},{i * n}\n" for i in range(100 + n)))

        async def go() -> None:
            async with self.server() as s:
                loaded = await self.call(
                    s, "load_files", concurrency=6, persist=True,
                    files=[{"table": p.stem, "path": str(p)} for p in paths])
                self.assertEqual(loaded["summary"]["succeeded"], len(paths), loaded)
                self.assertFalse([r["notes"] for r in loaded["results"] if r.get("notes")])
                described = await self.call(s, "describe", database="persistent")
                counts = {t["table"]: t["catalog"]["row_count"] for t in described["tables"]}
                self.assertEqual(counts, {p.stem: 100 + n for n, p in enumerate(paths)})

        self.drive(go())

    def test_assistants_loading_at_once_share_one_catalog_and_hyperd_survives(self) -> None:
        # Concurrent UPDATEs of one table from several connections can crash
        # hyperd: every catalog write takes its turn, within a server and
        # across servers.
        import asyncio

        from support import status

        rounds, per_server = 3, 6
        paths = {}
        for who in ("a", "b"):
            for n in range(per_server):
                paths[f"{who}{n}"] = self.tmp / f"{who}{n}.csv"
                paths[f"{who}{n}"].write_text("k,v\n" + "".join(f"{i},x{i}\n"
                                                               for i in range(50 + n)))

        async def load(session: Any, who: str) -> None:
            for _ in range(rounds):
                loaded = await self.call(
                    session, "load_files", concurrency=per_server, persist=True,
                    files=[{"table": name, "path": str(path)} for name, path in paths.items()
                           if name.startswith(who)])
                self.assertEqual(loaded["summary"]["failed"], 0, loaded)

        async def go() -> None:
            async with self.server() as a, self.server() as b:
                await asyncio.gather(load(a, "a"), load(b, "b"))
                described = await self.call(a, "describe", database="persistent")
                counts = {t["table"]: t["catalog"]["row_count"] for t in described["tables"]}
                self.assertEqual(counts, {name: 50 + int(name[1:]) for name in paths})
            self.assertEqual(status(self.ports[0])["restarts"], 0)

        self.drive(go())

    def test_set_table_metadata_writes_prose_that_outlives_reloads(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_data", table="cities", data="city,pop\nLyon,1\n")
                set_ = await self.call(s, "set_table_metadata", table="cities",
                                       purpose="Population questions", license="CC0",
                                       source_url="https://example.org/cities")
                self.assertEqual(set_["catalog"]["purpose"], "Population questions")
                await self.call(s, "load_data", table="cities", data="city,pop\nNice,2\n")
                entry = (await self.call(s, "describe", table="cities"))["catalog"]
                self.assertEqual((entry["purpose"], entry["license"], entry["source_url"]),
                                 ("Population questions", "CC0", "https://example.org/cities"))
                # "" clears a field; one not given stays.
                await self.call(s, "set_table_metadata", table="cities", license="",
                                notes="Refreshed monthly")
                entry = (await self.call(s, "describe", table="cities"))["catalog"]
                self.assertEqual((entry["license"], entry["notes"], entry["purpose"]),
                                 (None, "Refreshed monthly", "Population questions"))
                # A table made with execute gets an entry of its own.
                await self.call(s, "execute", sql=["CREATE TABLE made (a int)"])
                made = await self.call(s, "set_table_metadata", table="made", purpose="scratch")
                self.assertEqual((made["catalog"]["purpose"], made["catalog"]["load_tool"]),
                                 ("scratch", None))

                missing = await self.refused(s, "set_table_metadata", table="nowhere",
                                             purpose="x")
                self.assertIn("table:", missing)
                self.assertIn("'cities'", missing)
                self.assertNotIn(CATALOG, missing)
                nothing = await self.refused(s, "set_table_metadata", table="cities")
                self.assertIn("purpose", nothing)

        self.drive(go())

    def test_the_catalog_stays_out_of_the_table_list_and_forgets_dropped_tables(self) -> None:
        async def go() -> None:
            async with self.server() as s:
                await self.call(s, "load_data", table="a", data="x\n1\n")
                await self.call(s, "set_table_metadata", table="a", purpose="old prose")
                await self.call(s, "execute", sql=["DROP TABLE a"])
                self.assertEqual(await self.table_names(s), [])
                await self.call(s, "load_data", table="b", data="x\n1\n")
                self.assertEqual(await self.table_names(s), ["b"])
                self.assertEqual(await self.rows(s, f"SELECT table_name FROM {CATALOG}"),
                                 [["b"]])
                # A new table of the old name inherits nothing.
                await self.call(s, "execute", sql=["CREATE TABLE a (x int)"])
                self.assertNotIn("catalog", await self.call(s, "describe", table="a"))
                # Named outright, the catalog is a table like any other.
                self.assertEqual((await self.call(s, "sample", table=CATALOG))["row_count"], 1)

        self.drive(go())

    def test_read_only_refuses_every_tool_that_writes_and_still_shows_the_catalog(self) -> None:
        async def go() -> None:
            async with self.server() as writer:
                await self.call(writer, "load_data", table="kept", data="x\n1\n", persist=True)
                table = await self.iceberg(writer, self.tmp / "ice", "SELECT 1 AS a")
            async with self.server("--read-only") as s:
                for tool, arguments in [
                    ("copy_query", {"sql": "SELECT 1 AS a", "target_table": "t",
                                    "mode": "create"}),
                    ("load_iceberg", {"table": "t", "path": str(table)}),
                    ("set_table_metadata", {"table": "kept", "purpose": "x",
                                            "database": "persistent"}),
                ]:
                    message = await self.refused(s, tool, **arguments)
                    self.assertIn("--read-only", message, tool)
                # export writes a new Iceberg table, and never replaces one.
                await self.call(s, "export", path=str(self.tmp / "new"), format="iceberg",
                                table="persistent.public.kept")
                replace = await self.refused(s, "export", path=str(table), format="iceberg",
                                             table="persistent.public.kept", overwrite=True)
                self.assertIn("--read-only", replace)
                kept = await self.call(s, "describe", table="kept", database="persistent")
                self.assertEqual(kept["catalog"]["load_tool"], "load_data")
                self.assertIsNone(kept["catalog"]["purpose"])

        self.drive(go())


@pytest_twisted.ensureDeferred
async def test_catalog_writes_from_many_connections_at_once_leave_hyperd_running(
        clients: Any) -> None:
    """
    Concurrent UPDATEs of one table from several connections can crash
    hyperd (SIGSEGV): catalog writes take turns (load_files records from
    several connections at once).
    """
    import threading

    from twisted.internet.threads import deferToThread

    from hyperdaemon.client.session import connect_hyperd
    from hyperdaemon.mcp import catalog

    session = await clients.open()
    await session.execute([f"CREATE TABLE t{i} (a int)" for i in range(WRITERS)])
    credentials, local = session.credentials, session.ephemeral_db
    failures: list[BaseException] = []

    def write(i: int) -> None:
        conn = connect_hyperd(credentials)
        try:
            conn.execute(f'ATTACH DATABASE "{local}" AS local')
            for k in range(WRITES):
                catalog.record_load(conn, "local", f"t{i}", "load_file", {"k": k}, None)
        except BaseException as e:
            failures.append(e)
        finally:
            conn.close()

    def write_at_once() -> None:
        threads = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    await deferToThread(write_at_once)
    assert failures == []
    assert clients.daemon_status()["restarts"] == 0
    rows = (await session.query("SELECT table_name, load_params FROM local.public."
                                "_table_catalog ORDER BY 1")).rows
    assert rows == [(f"t{i}", f'{{"k": {WRITES - 1}}}') for i in range(WRITERS)]
