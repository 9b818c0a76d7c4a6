"""
The MCP tools' pure pieces and SQL checks: the read-only classifier, result
values, batch planning, one-shot names, export and merge options on their
own; and the rolled-back transaction behind the classifier on the real
hyperd (a private one, no daemon), with the parser bypassed so that only
that wall stands.
"""

from __future__ import annotations

import psycopg
import pytest
import pytest_twisted

from hyperdaemon.mcp import tools
from hyperdaemon.client.session import Session
from hyperdaemon.mcp.tools import (
    CELL_CAP, ReadOnlyCheck, Tools, ToolFailure, batch_role, check_read_only, copy_options,
    json_value, merge_keys, one_shot_names, parse_hyper_array, plan_batch, shape_result,
    statement_count,
)
from support import Clients, noted

#: Statements that only read, some of them full of words that write.
READ_ONLY = [
    "SELECT 1",
    "select 1;",
    "SELECT count(*) AS copy FROM orders",
    "SELECT 1 AS insert, 2 AS delete, 3 AS \"update\"",
    "SELECT \"drop\", \"create\" FROM t",
    "SELECT 'DELETE FROM t; DROP TABLE t' AS s",
    "SELECT E'\\'' AS q, 'DELETE' AS d",
    "SELECT $$ DELETE FROM t; $$ AS q",
    "SELECT $tag$ it's ; UPDATE t SET a = 1 $tag$",
    "SELECT 1 -- DELETE FROM t\n",
    "SELECT /* INSERT INTO t VALUES (1) */ 1",
    "WITH a AS (SELECT 1 AS x) SELECT * FROM a",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
    "SELECT * FROM r",
    "SELECT 1 UNION SELECT 2",
    "SELECT 1 INTERSECT SELECT 1 EXCEPT SELECT 2",
    "VALUES (1, 'a'), (2, 'b')",
    "TABLE persistent.public.keep",
    "(SELECT 1)",
    "SELECT city, rank() OVER (ORDER BY population DESC) FROM cities",
    "SELECT * FROM external('/tmp/x.parquet')",
    "EXPLAIN SELECT * FROM t",
    "EXPLAIN (FORMAT JSON) SELECT * FROM t",
    "SHOW schema_search_path",
]

#: Statements that write, each with the word its refusal must name.
WRITES = [
    # issue 11 item 4: the scan was fooled by escape strings and dollar quoting
    ("WITH x AS (SELECT E'\\'' AS q) DELETE FROM persistent.public.keep WHERE x = 1 --'",
     "DELETE"),
    ("WITH x AS (SELECT E'\\'' AS q) INSERT INTO persistent.public.keep VALUES (9) --'",
     "INSERT"),
    ("WITH x AS (SELECT E'\\'' AS q) UPDATE persistent.public.keep SET x = 0 --'", "UPDATE"),
    ("WITH x AS (SELECT $$ ' $$ AS q) DELETE FROM persistent.public.keep --'", "DELETE"),
    ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", "DELETE"),
    ("WITH x AS (SELECT 1) SELECT * FROM x UNION ALL SELECT 1 FROM (SELECT 1) y "
     "WHERE EXISTS (SELECT 1)", None),
    ("INSERT INTO t VALUES (1)", "INSERT"),
    ("INSERT INTO t SELECT * FROM u", "INSERT"),
    ("UPDATE t SET a = 1", "UPDATE"),
    ("DELETE FROM t", "DELETE"),
    ("MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE", "MERGE"),
    ("COPY (SELECT 1) TO '/tmp/out.csv' WITH (FORMAT csv)", "COPY"),
    ("COPY t FROM '/tmp/in.csv'", "COPY"),
    ("CREATE TABLE t (a int)", "CREATE"),
    ("CREATE TEMPORARY TABLE t AS SELECT 1", "CREATE"),
    ("CREATE DATABASE \"/tmp/x.hyper\"", "CREATE"),
    ("DROP TABLE t", "DROP"),
    ("ALTER TABLE t RENAME TO u", "ALTER"),
    ("TRUNCATE t", "TRUNCATE"),
    ("SET schema_search_path = 'persistent'", "SET"),
    ("BEGIN", "BEGIN"),
    ("COMMIT", "COMMIT"),
    ("ROLLBACK", "ROLLBACK"),
    ("SELECT * INTO newt FROM t", "INTO"),
    ("CALL f()", "CALL"),
    ("DO $$ BEGIN END $$", "DO"),
    ("VACUUM", "VACUUM"),
    ("PREPARE p AS DELETE FROM t", "PREPARE"),
    ("EXECUTE p", "EXECUTE"),
    ("LOCK t", "LOCK"),
    ("EXPLAIN DELETE FROM t", "DELETE"),
    ("EXPLAIN (ANALYZE) INSERT INTO t VALUES (1)", "INSERT"),
    ("EXPLAIN SHOW x", "SHOW"),
    ("UNLOAD x", "not a query"),
]


class ClassifierTests:
    def test_read_only_statements_are_accepted(self) -> None:
        for sql in READ_ONLY:
            assert check_read_only(sql) == ReadOnlyCheck(), sql

    def test_every_write_is_refused_and_named(self) -> None:
        for sql, word in [w for w in WRITES if w[1] is not None]:
            check = check_read_only(sql)
            assert check.parsed, sql
            assert check.problem is not None, sql
            assert word in check.problem, sql
            assert "use execute" in check.problem, sql

    def test_a_read_only_statement_among_the_writes_list_is_accepted(self) -> None:
        # The one entry without a word is a control: nested queries are not writes.
        for sql, word in [w for w in WRITES if w[1] is None]:
            assert check_read_only(sql).problem is None, sql

    def test_more_than_one_statement_is_refused(self) -> None:
        for sql in ["SELECT 1; SELECT 2", "SELECT 1; DELETE FROM t",
                    "SELECT E'\\\\'; DELETE FROM t", "SELECT $$;$$; DROP TABLE t",
                    "SHOW x; DELETE FROM t"]:
            problem = check_read_only(sql).problem
            assert problem is not None, sql
            assert "exactly one statement" in problem, sql

    def test_a_nested_comment_that_hyper_reads_as_a_delete_is_refused(self) -> None:
        # sqlglot nests /* */ comments; Hyper ends one at the first */ and
        # would run the DELETE (checked on hyperd: it deletes the rows).
        for sql in ["WITH x AS (SELECT 1 AS y /* /* */ ) DELETE FROM keep -- */ ) "
                    "SELECT * FROM x",
                    "SHOW x /* /* */ ; DELETE FROM keep -- */",
                    "EXPLAIN SELECT 1 /* /* */ ; DELETE FROM keep -- */"]:
            problem = check_read_only(sql).problem
            assert problem is not None, sql
            assert "comment" in problem, sql

    def test_empty_sql_is_refused(self) -> None:
        for sql in ["", "   ", "-- nothing\n", "/* nothing */", ";"]:
            problem = check_read_only(sql).problem
            assert problem is not None, repr(sql)
            assert "no statement" in problem

    def test_what_the_parser_cannot_read_is_left_to_hyper(self) -> None:
        for sql in ["SELEC 1", "SELECT FROM WHERE", "SELECT 'unterminated",
                    "ATTACH DATABASE \"/tmp/x.hyper\" AS x"]:
            check = check_read_only(sql)
            assert not check.parsed, sql
            assert "cannot read" in check.problem, sql

    def test_a_statement_too_deep_to_check_is_refused(self) -> None:
        check = check_read_only("SELECT " + "(" * 5000 + "1" + ")" * 5000)
        assert "nests too deeply" in check.problem

    def test_statement_count_splits_only_on_real_semicolons(self) -> None:
        assert statement_count("SELECT 1") == 1
        assert statement_count("SELECT 1;") == 1
        assert statement_count("SELECT ';' -- ;\n; SELECT $$;$$") == 2
        assert statement_count("SELECT E'\\';' ; DELETE FROM t") == 2
        assert statement_count("") == 0
        assert statement_count("SELECT 'unterminated") == 1


@pytest.mark.deadline(180)
class PrivateHyperdTestCase:
    """
    Tests with sessions on a private hyperd (no daemon), in their own state
    folder; the sessions, and with them their hyperd, end after the test.
    """

    @pytest.fixture(autouse=True)
    def _clients(self, clients: Clients) -> None:
        self.clients = clients
        self.tmp = clients.tmp

    async def open_session(self) -> Session:
        return await self.clients.open(no_daemon=True)


class WallTests(PrivateHyperdTestCase):
    """
    The transaction that is always rolled back, with the parser told to
    accept everything: it alone must keep a hidden DELETE from deleting.
    """

    async def tools(self) -> Tools:
        session = await self.open_session()
        await session.execute(["CREATE TABLE persistent.public.keep (x int)",
                               "INSERT INTO persistent.public.keep VALUES (1), (2)"])
        return Tools(session, read_only=True)

    def bypass_the_parser(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(tools, "check_read_only", lambda sql: ReadOnlyCheck())

    async def kept(self, session: Session) -> int:
        return (await session.query("SELECT count(*) FROM persistent.public.keep")).rows[0][0]

    @pytest_twisted.ensureDeferred
    async def test_query_rolls_back_a_delete_the_parser_missed(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        t = await self.tools()
        hidden = ("WITH x AS (SELECT 1 AS y /* /* */ ) DELETE FROM persistent.public.keep "
                  "-- */ ) SELECT * FROM x")
        with pytest.raises(ToolFailure):
            await t.query(hidden)  # the parser refuses it
        self.bypass_the_parser(monkeypatch)
        result = await t.query(hidden)
        assert result["row_count"] == 0  # hyperd ran it: a DELETE, no rows
        assert await self.kept(t.session) == 2
        result = await t.query("DELETE FROM persistent.public.keep RETURNING x")
        assert result["row_count"] == 2
        assert await self.kept(t.session) == 2

    @pytest_twisted.ensureDeferred
    async def test_query_data_rolls_back_a_delete_the_parser_missed(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        t = await self.tools()
        self.bypass_the_parser(monkeypatch)
        result = await t.query_data("a\n1\n2\n", "DELETE FROM persistent.public.keep RETURNING x")
        assert result["row_count"] == 2
        result = await t.query_data("a\n1\n2\n", "DELETE FROM data RETURNING a")
        assert result["row_count"] == 2
        assert await self.kept(t.session) == 2

    @pytest_twisted.ensureDeferred
    async def test_hyper_reports_a_syntax_error_and_runs_nothing_unchecked(self) -> None:
        t = await self.tools()
        with pytest.raises(ToolFailure) as caught:
            await t.query("SELEC 1")
        assert "syntax error" in str(caught.value)
        assert "read-only" not in str(caught.value)
        # Hyper can read it, the parser cannot: refused, and not run.
        other = self.tmp / "other.hyper"
        await t.session.execute(f'CREATE DATABASE "{other}"')
        with pytest.raises(ToolFailure) as caught:
            await t.query(f'ATTACH DATABASE "{other}" AS other')
        assert "cannot read" in str(caught.value)
        with pytest.raises(psycopg.errors.InvalidSchemaName):  # not attached
            await t.session.query("SELECT 1 FROM other.pg_catalog.pg_class LIMIT 1")

    @pytest_twisted.ensureDeferred
    async def test_read_only_sql_still_answers(self) -> None:
        t = await self.tools()
        counted = await t.query("SELECT count(*) AS copy FROM persistent.public.keep")
        assert counted["rows"] == [[2]]
        assert (await t.query("SELECT x FROM keep ORDER BY x", "persistent"))["rows"] == [[1], [2]]
        explained = await t.query("EXPLAIN SELECT * FROM persistent.public.keep")
        assert explained["row_count"] == 1
        assert len((await t.query("SHOW schema_search_path"))["rows"]) == 1
        summed = await t.query_data("a\n1\n2\n", "SELECT sum(a) AS copy FROM data;")
        assert summed["rows"] == [[3]]


class ValueTests:
    def test_values_json_lacks_become_strings_and_the_rest_stays_exact(self) -> None:
        import datetime
        import decimal
        import json

        values = [None, True, 7, 0.1 + 0.2, float("nan"), float("inf"), float("-inf"),
                  decimal.Decimal("12345678901234567890.12"), b"ab", "東京",
                  datetime.date(2024, 2, 29), datetime.datetime(2024, 1, 2, 3, 4, 5),
                  datetime.time(10, 11, 12), [1, None, float("nan")]]
        converted = [json_value(v) for v in values]
        assert converted == [
            None, True, 7, 0.30000000000000004, "NaN", "Infinity", "-Infinity",
            "12345678901234567890.12", "\\x6162", "東京", "2024-02-29", "2024-01-02T03:04:05",
            "10:11:12", [1, None, "NaN"]]
        json.dumps(converted, allow_nan=False)  # strict JSON: raises on NaN

    def test_text_over_the_cap_is_cut_and_each_cut_cell_listed(self) -> None:
        long, longer = "x" * (CELL_CAP + 1), "y" * (CELL_CAP * 2)
        result = shape_result(["a", "b"], [("short", long), (["z", longer], None)])
        assert result["rows"] == [["short", "x" * CELL_CAP], [["z", "y" * CELL_CAP], None]]
        assert result["cut_cells"] == [
            {"row": 0, "column": "b", "length": CELL_CAP + 1},
            {"row": 1, "column": "a", "length": CELL_CAP * 2}]
        assert f"substring(column FROM {CELL_CAP + 1}" in result["cut_note"]
        assert "cut_cells" not in shape_result(["a"], [("x" * CELL_CAP,)])

    def test_hypers_array_text_is_read_element_by_element(self) -> None:
        assert parse_hyper_array("[1,2,3]") == ["1", "2", "3"]
        assert parse_hyper_array("[]") == []
        assert (parse_hyper_array(r'["a",NULL,"b \"c\"","NULL","x,y","\\"]')
                == ["a", None, 'b "c"', "NULL", "x,y", "\\"])
        assert parse_hyper_array("[[1,2],[3]]") == [["1", "2"], ["3"]]
        for bad in ["", "{1,2}", "[1,2", '["a]', "[1,,2]", "[1]x"]:
            with noted(repr(bad)), pytest.raises(ValueError):
                parse_hyper_array(bad)


class BatchPlanTests:
    def test_creates_then_changes_to_rows_make_a_batch(self) -> None:
        plan = plan_batch(["CREATE TABLE a (x int)", "CREATE TEMPORARY TABLE b AS SELECT 1",
                           "CREATE TABLE IF NOT EXISTS persistent.public.c (x int)",
                           "INSERT INTO a VALUES (1)", "UPDATE a SET x = 2", "DELETE FROM a",
                           "TRUNCATE a", "COPY a FROM '/tmp/a.csv' WITH (FORMAT csv)",
                           "SELECT * FROM a"])
        assert plan.creates == ["a", "pg_temp.b", "persistent.public.c"]

    def test_what_rollback_cannot_undo_runs_only_alone(self) -> None:
        for statement, word in [("DROP TABLE a", "DROP"),
                                ("ALTER TABLE a ADD COLUMN y int", "ALTER"),
                                ("CREATE SCHEMA s", "CREATE SCHEMA"),
                                ("COPY a TO '/tmp/a.csv'", "COPY ... TO"),
                                ("SELECT * INTO b FROM a", "SELECT ... INTO"),
                                ("SET schema_search_path = 'x'", "SET"),
                                ("VACUUM", "VACUUM")]:
            assert batch_role(statement)[0] == "other", statement
            assert plan_batch([statement]).creates == []
            with pytest.raises(ToolFailure) as caught:
                plan_batch(["INSERT INTO a VALUES (1)", statement])
            assert f"sql item 2 ({word}" in str(caught.value)
            assert "own execute call" in str(caught.value)

    def test_a_create_after_a_change_to_rows_is_refused(self) -> None:
        with pytest.raises(ToolFailure) as caught:
            plan_batch(["CREATE TABLE a (x int)", "INSERT INTO a VALUES (1)",
                        "CREATE TABLE b (x int)"])
        assert "sql item 3 (CREATE TABLE) comes after item 2" in str(caught.value)

    def test_empty_and_doubled_items_are_refused(self) -> None:
        for statements, needle in [([], "the list is empty"), (["  "], "holds no statement"),
                                   (["SELECT 1; SELECT 2"], "holds 2 statements"),
                                   (["INSERT INTO a VALUES (1)", "-- nothing"],
                                    "sql item 2 holds no statement")]:
            with pytest.raises(ToolFailure) as caught:
                plan_batch(statements)
            assert needle in str(caught.value)


class OneShotNameTests:
    def test_the_names_the_sql_uses_are_made_as_hyper_looks_them_up(self) -> None:
        names = ("Orders", "data")
        assert one_shot_names("SELECT * FROM orders", names) == ["orders"]
        assert one_shot_names("SELECT * FROM ORDERS", names) == ["orders"]
        assert one_shot_names('SELECT * FROM "Orders"', names) == ["Orders"]
        assert one_shot_names("SELECT * FROM data", names) == ["data"]
        assert (one_shot_names("SELECT * FROM orders o JOIN data d USING (id)", names)
                == ["orders", "data"])
        # A name in another database is not the one-shot table: none is named,
        # so every name is made.
        assert one_shot_names("SELECT * FROM persistent.public.data", names) == ["orders", "data"]
        # EXPLAIN is not parsed into tables: every name is made.
        assert one_shot_names("EXPLAIN SELECT * FROM orders", names) == ["orders", "data"]
        assert one_shot_names("SELECT 1", ("my file",)) == ["my file"]


class OptionTests:
    def test_export_options_become_copys_and_unknown_ones_are_refused(self) -> None:
        assert copy_options("csv", None) == "FORMAT csv, HEADER true"
        assert (copy_options("csv", {"delimiter": ";", "header": False, "null": "NA",
                                     "quote": "'"})
                == "FORMAT csv, HEADER false, DELIMITER ';', QUOTE '''', NULL 'NA'")
        assert (copy_options("csv", '{"delimiter": "\\t"}')
                == "FORMAT csv, HEADER true, DELIMITER '\t'")
        assert (copy_options("parquet", {"codec": "ZSTD", "rows_per_row_group": 5})
                == "FORMAT parquet, CODEC 'zstd', ROWS_PER_ROW_GROUP 5")
        assert copy_options("hyper", {}) == ""
        for fmt, options, needle in [
            ("csv", {"codec": "zstd"}, "format 'csv' has no option 'codec'"),
            ("hyper", {"header": True}, "it takes none"),
            ("csv", {"delimiter": ""}, "one character"),
            ("csv", {"delimiter": "é"}, "one character"),
            ("csv", {"header": 1}, "true or false"),
            ("parquet", {"codec": "brotli"}, "snappy, zstd, gzip, uncompressed"),
            ("parquet", {"rows_per_row_group": 0}, "above 0"),
            ("csv", "[1]", "give an object"),
            ("csv", "{nope", "not a JSON object"),
        ]:
            with pytest.raises(ToolFailure) as caught:
                copy_options(fmt, options)
            assert str(caught.value).startswith("format_options: ")
            assert needle in str(caught.value)

    def test_merge_key_goes_with_mode_merge_only(self) -> None:
        assert merge_keys("merge", "id") == ["id"]
        assert merge_keys("merge", ["day", "city", "day"]) == ["day", "city"]
        assert merge_keys("replace", None) == []
        for mode, key, needle in [("merge", None, "needs the column(s)"),
                                  ("merge", [], "needs the column(s)"),
                                  ("merge", ["id", 3], "needs the column(s)"),
                                  ("append", "id", "only with mode='merge'")]:
            with pytest.raises(ToolFailure) as caught:
                merge_keys(mode, key)
            assert needle in str(caught.value)


class ReplaceTests(PrivateHyperdTestCase):
    """A replacing load never loses the old table, whatever fails in between."""

    @pytest_twisted.ensureDeferred
    async def test_a_failed_rename_puts_the_old_table_back(self) -> None:
        session = await self.open_session()
        await session.execute(["CREATE TABLE keep (x int)", "INSERT INTO keep VALUES (1), (2)"])
        final = tools.table_reference("keep", "local")

        def replace_from_a_staging_table_that_is_gone(conn: psycopg.Connection) -> None:
            tools._rename_over(conn, '"local".public."gone"', final, "keep")

        with pytest.raises(psycopg.errors.UndefinedTable):
            await session.call(replace_from_a_staging_table_that_is_gone)
        assert (await session.query("SELECT x FROM keep ORDER BY x")).rows == [(1,), (2,)]
        names = [r[0] for r in (await session.query(
            "SELECT c.relname FROM local.pg_catalog.pg_class c JOIN local.pg_catalog.pg_namespace"
            " n ON c.relnamespace = n.oid WHERE n.nspname = 'public'")).rows]
        assert names == ["keep"]

    @pytest_twisted.ensureDeferred
    async def test_a_replace_leaves_only_the_new_table(self) -> None:
        session = await self.open_session()
        for statement in ("CREATE TABLE keep (x int)", "INSERT INTO keep VALUES (1)",
                          "CREATE TABLE staged (x int)", "INSERT INTO staged VALUES (7)"):
            await session.execute(statement)
        await session.call(lambda conn: tools._rename_over(
            conn, tools.table_reference("staged", "local"),
            tools.table_reference("keep", "local"), "keep"))
        assert (await session.query("SELECT x FROM keep")).rows == [(7,)]
        names = [r[0] for r in (await session.query(
            "SELECT c.relname FROM local.pg_catalog.pg_class c JOIN local.pg_catalog.pg_namespace"
            " n ON c.relnamespace = n.oid WHERE n.nspname = 'public'")).rows]
        assert names == ["keep"]
