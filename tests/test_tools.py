"""
The MCP tools' SQL checks: the read-only classifier on its own, and the
rolled-back transaction behind it on the real hyperd (a private one, no
daemon), with the parser bypassed so that only that wall stands.
"""

from __future__ import annotations

from pathlib import Path
import psycopg
import pytest
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hyperdaemon import tools
from hyperdaemon.session import Session
from hyperdaemon.tools import ReadOnlyCheck, Tools, ToolFailure, check_read_only, statement_count
from support import client_environment

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


class ClassifierTests(SynchronousTestCase):
    def test_read_only_statements_are_accepted(self) -> None:
        for sql in READ_ONLY:
            self.assertEqual(check_read_only(sql), ReadOnlyCheck(), sql)

    def test_every_write_is_refused_and_named(self) -> None:
        for sql, word in [w for w in WRITES if w[1] is not None]:
            check = check_read_only(sql)
            self.assertTrue(check.parsed, sql)
            self.assertIsNotNone(check.problem, sql)
            self.assertIn(word, check.problem, sql)
            self.assertIn("use execute", check.problem, sql)

    def test_a_read_only_statement_among_the_writes_list_is_accepted(self) -> None:
        # The one entry without a word is a control: nested queries are not writes.
        for sql, word in [w for w in WRITES if w[1] is None]:
            self.assertIsNone(check_read_only(sql).problem, sql)

    def test_more_than_one_statement_is_refused(self) -> None:
        for sql in ["SELECT 1; SELECT 2", "SELECT 1; DELETE FROM t",
                    "SELECT E'\\\\'; DELETE FROM t", "SELECT $$;$$; DROP TABLE t",
                    "SHOW x; DELETE FROM t"]:
            problem = check_read_only(sql).problem
            self.assertIsNotNone(problem, sql)
            self.assertIn("exactly one statement", problem, sql)

    def test_a_nested_comment_that_hyper_reads_as_a_delete_is_refused(self) -> None:
        # sqlglot nests /* */ comments; Hyper ends one at the first */ and
        # would run the DELETE (checked on hyperd: it deletes the rows).
        for sql in ["WITH x AS (SELECT 1 AS y /* /* */ ) DELETE FROM keep -- */ ) "
                    "SELECT * FROM x",
                    "SHOW x /* /* */ ; DELETE FROM keep -- */",
                    "EXPLAIN SELECT 1 /* /* */ ; DELETE FROM keep -- */"]:
            problem = check_read_only(sql).problem
            self.assertIsNotNone(problem, sql)
            self.assertIn("comment", problem, sql)

    def test_empty_sql_is_refused(self) -> None:
        for sql in ["", "   ", "-- nothing\n", "/* nothing */", ";"]:
            problem = check_read_only(sql).problem
            self.assertIsNotNone(problem, repr(sql))
            self.assertIn("no statement", problem)

    def test_what_the_parser_cannot_read_is_left_to_hyper(self) -> None:
        for sql in ["SELEC 1", "SELECT FROM WHERE", "SELECT 'unterminated",
                    "ATTACH DATABASE \"/tmp/x.hyper\" AS x"]:
            check = check_read_only(sql)
            self.assertFalse(check.parsed, sql)
            self.assertIn("cannot read", check.problem, sql)

    def test_a_statement_too_deep_to_check_is_refused(self) -> None:
        check = check_read_only("SELECT " + "(" * 5000 + "1" + ")" * 5000)
        self.assertIn("nests too deeply", check.problem)

    def test_statement_count_splits_only_on_real_semicolons(self) -> None:
        self.assertEqual(statement_count("SELECT 1"), 1)
        self.assertEqual(statement_count("SELECT 1;"), 1)
        self.assertEqual(statement_count("SELECT ';' -- ;\n; SELECT $$;$$"), 2)
        self.assertEqual(statement_count("SELECT E'\\';' ; DELETE FROM t"), 2)
        self.assertEqual(statement_count(""), 0)
        self.assertEqual(statement_count("SELECT 'unterminated"), 1)


class WallTests(TestCase):
    """
    The transaction that is always rolled back, with the parser told to
    accept everything: it alone must keep a hidden DELETE from deleting.
    """

    timeout = 180

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state, self.ports, self.env = client_environment(tmp_path)

    async def tools(self) -> Tools:
        session = await Session.open(reactor, environ=self.env, no_daemon=True)
        self.addCleanup(session.close)
        await session.execute(["CREATE TABLE persistent.public.keep (x int)",
                               "INSERT INTO persistent.public.keep VALUES (1), (2)"])
        return Tools(session, read_only=True)

    def bypass_the_parser(self) -> None:
        self.patch(tools, "check_read_only", lambda sql: ReadOnlyCheck())

    async def kept(self, session: Session) -> int:
        return (await session.query("SELECT count(*) FROM persistent.public.keep")).rows[0][0]

    async def test_query_rolls_back_a_delete_the_parser_missed(self) -> None:
        t = await self.tools()
        hidden = ("WITH x AS (SELECT 1 AS y /* /* */ ) DELETE FROM persistent.public.keep "
                  "-- */ ) SELECT * FROM x")
        with self.assertRaises(ToolFailure):
            await t.query(hidden)  # the parser refuses it
        self.bypass_the_parser()
        result = await t.query(hidden)
        self.assertEqual(result["row_count"], 0)  # hyperd ran it: a DELETE, no rows
        self.assertEqual(await self.kept(t.session), 2)
        result = await t.query("DELETE FROM persistent.public.keep RETURNING x")
        self.assertEqual(result["row_count"], 2)
        self.assertEqual(await self.kept(t.session), 2)

    async def test_query_data_rolls_back_a_delete_the_parser_missed(self) -> None:
        t = await self.tools()
        self.bypass_the_parser()
        result = await t.query_data("a\n1\n2\n", "DELETE FROM persistent.public.keep RETURNING x")
        self.assertEqual(result["row_count"], 2)
        result = await t.query_data("a\n1\n2\n", "DELETE FROM data RETURNING a")
        self.assertEqual(result["row_count"], 2)
        self.assertEqual(await self.kept(t.session), 2)

    async def test_hyper_reports_a_syntax_error_and_runs_nothing_unchecked(self) -> None:
        t = await self.tools()
        with self.assertRaises(ToolFailure) as caught:
            await t.query("SELEC 1")
        self.assertIn("syntax error", str(caught.exception))
        self.assertNotIn("read-only", str(caught.exception))
        # Hyper can read it, the parser cannot: refused, and not run.
        other = self.tmp / "other.hyper"
        await t.session.execute(f'CREATE DATABASE "{other}"')
        with self.assertRaises(ToolFailure) as caught:
            await t.query(f'ATTACH DATABASE "{other}" AS other')
        self.assertIn("cannot read", str(caught.exception))
        with self.assertRaises(psycopg.errors.InvalidSchemaName):  # not attached
            await t.session.query("SELECT 1 FROM other.pg_catalog.pg_class LIMIT 1")

    async def test_read_only_sql_still_answers(self) -> None:
        t = await self.tools()
        self.assertEqual((await t.query("SELECT count(*) AS copy FROM persistent.public.keep"))
                         ["rows"], [[2]])
        self.assertEqual((await t.query("SELECT x FROM keep ORDER BY x", "persistent"))["rows"],
                         [[1], [2]])
        explained = await t.query("EXPLAIN SELECT * FROM persistent.public.keep")
        self.assertEqual(explained["row_count"], 1)
        self.assertEqual(len((await t.query("SHOW schema_search_path"))["rows"]), 1)
        self.assertEqual((await t.query_data("a\n1\n2\n", "SELECT sum(a) AS copy FROM data;"))
                         ["rows"], [[3]])
