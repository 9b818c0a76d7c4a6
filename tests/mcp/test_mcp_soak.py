"""
A long conversation through the SDK's stdio client: 200 mixed calls in one
session (queries, one-shot queries, loads, merges, describes, samples,
exports, attach and detach, and errors in between), each result checked.
"""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

from mcp_support import CSV, ReportingTestCase, ToolCallError

#: Calls in the session.
CALLS = 200
#: A bound on the whole session; it takes some 3 s on a quiet machine.
SOAK_BOUND = 50.0


class SoakTests(ReportingTestCase):
    def test_200_mixed_calls_in_one_session_all_behave(self) -> None:
        events = self.tmp / "events.jsonl"
        events.write_text("".join(json.dumps({"kind": k, "n": n}) + "\n"
                                  for k, n in [("a", 1), ("b", 2), ("a", 3)]))
        out = self.tmp / "out"
        out.mkdir()
        done: list[str] = []
        grown: list[int] = []

        async def go() -> float:
            async with self.server() as s:
                async def ok(tool: str, **arguments: Any) -> Any:
                    done.append(tool)
                    return await self.call(s, tool, **arguments)

                async def fails(tool: str, needle: str, **arguments: Any) -> None:
                    done.append(tool)
                    with self.assertRaises(ToolCallError) as caught:
                        await self.call(s, tool, **arguments)
                    self.assertIn(needle, str(caught.exception), (tool, arguments))

                def rows(result: Any) -> Any:
                    return result["rows"]

                await ok("export", path=str(out / "cities.parquet"), format="parquet",
                         sql="SELECT * FROM (VALUES ('Lyon', 1), ('Nice', 2)) AS v(city, n)")
                start = time.perf_counter()
                kept: list[str] = []
                for r in range(CALLS):
                    table = f"t{r}"
                    steps: list[Callable[[], Awaitable[None]]] = [
                        lambda: self._check(ok("load_data", table=table, data=CSV),
                                            lambda x: x["rows_loaded"] == 3),
                        lambda: self._check(ok("query", sql=f"SELECT count(*) FROM {table}"),
                                            lambda x: rows(x) == [[3]]),
                        lambda: self._check(
                            ok("query_data", data=CSV, sql="SELECT max(population) FROM data"),
                            lambda x: rows(x) == [[522000]]),
                        lambda: self._check(
                            ok("query_file", path=str(self.csv),
                               sql="SELECT count(*) FROM cities"),
                            lambda x: rows(x) == [[3]]),
                        lambda: fails("query", "does not exist", sql="SELECT * FROM missing"),
                        lambda: self._check(
                            ok("query_file", path=str(events),
                               sql="SELECT kind, sum(n) FROM data GROUP BY kind ORDER BY kind"),
                            lambda x: rows(x) == [["a", 4], ["b", 2]]),
                        lambda: self._check(
                            ok("load_file", table="grow", path=str(self.csv), mode="append"),
                            lambda x: x["rows_loaded"] == 3 and not grown.append(3)),
                        lambda: self._check(ok("describe", table=table),
                                            lambda x: x["row_count"] == 3),
                        lambda: fails("execute", "nothing of the batch was kept",
                                      sql=[f"CREATE TABLE gone{r} (a INT)",
                                           "INSERT INTO missing VALUES (1)"]),
                        lambda: self._check(ok("sample", table=table, n=2),
                                            lambda x: len(rows(x)) == 2),
                        lambda: self._check(
                            ok("export", path=str(out / f"{table}.csv"), format="csv",
                               table=table, format_options={"delimiter": ";"}),
                            lambda x: (out / f"{table}.csv").read_text().startswith(
                                "city;population;area\n")),
                        lambda: fails("query_data", "syntax", data=CSV, sql="SELEC 1"),
                        lambda: self._check(
                            ok("load_file", table="merged", path=str(self.csv), mode="merge",
                               merge_key="city"),
                            lambda x: x["rows_inserted"] + x["rows_updated"] == 3),
                        lambda: self._check(
                            ok("query", sql="SELECT INTERVAL '1 hour' AS i, ARRAY[1, 2] AS a, "
                                            "CAST('NaN' AS DOUBLE PRECISION) AS n"),
                            lambda x: rows(x) == [["PT1H", [1, 2], "NaN"]]),
                        lambda: self._check(
                            ok("attach_database", alias=f"a{r}", kind="local_file",
                               path=str(out / f"a{r}.hyper"), on_missing="create"),
                            lambda x: x["alias"] == f"a{r}"),
                        lambda: self._check(
                            ok("execute", sql=["CREATE TABLE k (v INT)",
                                               "INSERT INTO k VALUES (1), (2)"],
                               database=f"a{r}"),
                            lambda x: x["rows_affected"] == 2),
                        lambda: self._check(ok("query", sql=f"SELECT sum(v) FROM a{r}.public.k"),
                                            lambda x: rows(x) == [[3]]),
                        lambda: self._check(ok("detach_database", alias=f"a{r}"),
                                            lambda x: x == {"detached": f"a{r}"}),
                        lambda: fails("query", "no database is attached as", sql="SELECT 1",
                                      database=f"a{r}"),
                        lambda: self._check(
                            ok("query_file", path=str(out / "cities.parquet"),
                               sql="SELECT sum(n) FROM cities"),
                            lambda x: rows(x) == [[3]]),
                        lambda: fails("detach_database", "list_attached_databases",
                                      alias="never_attached"),
                        lambda: self._check(
                            ok("list_attached_databases"),
                            lambda x: [d["alias"] for d in x["databases"]]
                            == ["local", "persistent"]),
                    ]
                    kept.append(table)
                    for step in steps:
                        if len(done) > CALLS:
                            break
                        await step()
                    if len(done) > CALLS:
                        break
                elapsed = time.perf_counter() - start
                described = await self.call(s, "describe")
                self.assertEqual(sorted(t["table"] for t in described["tables"]),
                                 sorted([*kept, "grow", "merged"]))
                grow = await self.call(s, "query", sql="SELECT count(*) FROM grow")
                self.assertEqual(rows(grow), [[sum(grown)]])
                return elapsed

        elapsed = self.drive(go())
        self.assertEqual(len(done), CALLS + 1)  # the export before the clock started
        self.report(f"{CALLS} calls in one session: {elapsed:.1f} s")
        self.assertLess(elapsed, SOAK_BOUND)

    async def _check(self, call: Awaitable[Any], holds: Callable[[Any], bool]) -> None:
        result = await call
        self.assertTrue(holds(result), result)
