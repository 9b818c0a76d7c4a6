"""
Watched folders (watch_directory, unwatch_directory): through the MCP SDK's
stdio client on the real daemon and hyperd, and L{DirectoryWatch} on the
test reactor's inotify with a stand-in for the load.
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import defer

from hyperdaemon.mcp import watch
from hyperdaemon.mcp.tools import ToolFailure, Tools
from mcp_support import ReportingTestCase, ToolCallError, eventually
from support import QUICK

#: What watch_directory promises: a file is loaded this soon after its sentinel.
PROMPT_LOAD = 2.0


def write_rows(path: Path, rows: int, start: int = 0) -> dict[str, Any]:
    """
    A CSV of C{rows} rows with dates, timestamps, NULLs (empty cells) and
    quoted text (commas, quotes, a line break); what a load of it must show.
    """
    nulls = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["id", "day", "at", "amount", "note"])
        for i in range(start, start + rows):
            day = datetime.date(2024, 1, 1) + datetime.timedelta(days=i % 366)
            amount = "" if i % 7 == 0 else f"{i * 1.5}"
            nulls += amount == ""
            note = f'say "hi", {i}' if i % 3 else f"line one\nline two {i}"
            out.writerow([i, day.isoformat(), f"{day.isoformat()} 12:{i % 60:02d}:00",
                          amount, note])
    return {"rows": rows, "nulls": nulls, "first_note": 'say "hi", 1' if start == 0 else None}


def drop(folder: Path, name: str, rows: int = 1000, start: int = 0) -> tuple[Path, Path]:
    """A producer's drop: the data file, then its sentinel."""
    data = folder / name
    write_rows(data, rows, start)
    sentinel = folder / (name + ".ready")
    sentinel.touch()
    return data, sentinel


class WatchTestCase(ReportingTestCase):
    @pytest.fixture(autouse=True)
    def _more(self, _tmp: None, tmpfs: Any) -> None:
        self.tmpfs = tmpfs
        self.inbox = self.tmp / "inbox"
        self.inbox.mkdir()


class WatchLoadTests(WatchTestCase):
    def test_a_dropped_file_is_appended_within_2_s_of_its_sentinel_and_both_files_go(
            self) -> None:
        # Into the scratch database (the default): the files are kept in loaded/.
        inbox = self.inbox

        async def go() -> tuple[Any, float, Any]:
            async with self.server() as s:
                started = await self.call(s, "watch_directory", path=str(inbox), table="events")
                data = inbox / "batch1.csv"
                write_rows(data, 1000)
                sentinel = inbox / "batch1.csv.ready"
                sentinel.touch()
                ready = time.monotonic()
                await eventually(lambda: not sentinel.exists(), QUICK, "the sentinel to go")
                elapsed = time.monotonic() - ready
                self.assertFalse(data.exists())
                drop(inbox, "batch2.csv", rows=10, start=1000)
                await eventually(lambda: not (inbox / "batch2.csv").exists(), QUICK,
                                 "the second file to go")
                counted = await self.call(
                    s, "query", sql="SELECT count(*), count(DISTINCT id), count(amount), "
                                    "min(day), max(at), max(id) FROM events")
                note = await self.call(s, "query", sql="SELECT note FROM events WHERE id IN "
                                                       "(1, 3) ORDER BY id")
                described = await self.call(s, "describe", table="events")
                return started, elapsed, (counted, note, described)

        started, elapsed, (counted, note, described) = self.drive(go())
        self.report(f"a 1,000-row CSV was appended {elapsed * 1000:.0f} ms after its .ready")
        self.assertLess(elapsed, PROMPT_LOAD)
        self.assertEqual(started["status"], "watching")
        self.assertEqual(started["database"], "local")
        self.assertEqual(started["initial_sweep"], {"files_ingested": 0, "files_failed": 0})
        non_null = sum(1 for i in range(1010) if i % 7)
        latest = max(datetime.datetime(2024, 1, 1, 12, i % 60) + datetime.timedelta(days=i % 366)
                     for i in range(1010))
        self.assertEqual(counted["rows"], [[1010, 1010, non_null, "2024-01-01",
                                            latest.isoformat(), 1009]])
        self.assertEqual(note["rows"], [['say "hi", 1'], ["line one\nline two 3"]])
        types = {c["name"]: c["type"] for c in described["columns"]}
        self.assertEqual(types["day"], "date")
        self.assertEqual(types["at"], "timestamp")
        # The scratch table goes with the session; the producer's files do not.
        self.assertEqual(started["loaded_folder"], str(inbox / "loaded"))
        self.assertEqual(os.listdir(inbox), ["loaded"])
        self.assertEqual(sorted(os.listdir(inbox / "loaded")),
                         ["batch1.csv", "batch1.csv.ready", "batch2.csv", "batch2.csv.ready"])
        with open(inbox / "loaded" / "batch2.csv", newline="", encoding="utf-8") as kept:
            self.assertEqual(len(list(csv.reader(kept))), 11)  # the header and its 10 rows

    def test_files_complete_before_the_watch_starts_are_loaded_first(self) -> None:
        inbox = self.inbox
        drop(inbox, "early1.csv", rows=5)
        drop(inbox, "early2.csv", rows=7, start=5)
        unfinished = inbox / "unfinished.csv"
        write_rows(unfinished, 3)

        async def go() -> tuple[Any, Any]:
            async with self.server() as s:
                started = await self.call(s, "watch_directory", path=str(inbox), table="early",
                                          persist=True)
                counted = await self.call(s, "query",
                                          sql="SELECT count(*) FROM persistent.public.early")
                return started, counted

        started, counted = self.drive(go())
        self.assertEqual(started["initial_sweep"], {"files_ingested": 2, "files_failed": 0})
        self.assertEqual(started["database"], "persistent")
        self.assertEqual(counted["rows"], [[12]])
        # A file without its sentinel is not complete: it stays, unread; the
        # others are on disk in the persistent database, and deleted.
        self.assertIsNone(started["loaded_folder"])
        self.assertEqual(sorted(os.listdir(inbox)), ["unfinished.csv"])

    def test_a_file_that_fails_is_moved_aside_with_its_error_and_the_watch_goes_on(
            self) -> None:
        inbox = self.inbox

        async def go() -> tuple[Any, Any]:
            async with self.server() as s:
                await self.call(s, "watch_directory", path=str(inbox), table="t")
                (inbox / "ragged.csv").write_text("a,b\n1,2\n3,4,5,6\n")
                (inbox / "ragged.csv.ready").touch()
                (inbox / "notes.txt").write_text("hello\n")
                (inbox / "notes.txt.ready").touch()
                (inbox / "ghost.csv.ready").touch()  # a sentinel without its file
                failed = inbox / "failed"
                await eventually(lambda: failed.is_dir() and len(os.listdir(failed)) == 8,
                                 QUICK, "three files to be moved aside")
                drop(inbox, "good.csv", rows=4)
                await eventually(lambda: not (inbox / "good.csv").exists(), QUICK,
                                 "the good file to load")
                counted = await self.call(s, "query", sql="SELECT count(*) FROM t")
                stopped = await self.call(s, "unwatch_directory", path=str(inbox))
                return counted, stopped

        counted, stopped = self.drive(go())
        failed = self.inbox / "failed"
        self.assertEqual(sorted(os.listdir(failed)), [
            "ghost.csv.error", "ghost.csv.ready",
            "notes.txt", "notes.txt.error", "notes.txt.ready",
            "ragged.csv", "ragged.csv.error", "ragged.csv.ready"])
        self.assertEqual((failed / "ragged.csv").read_text(), "a,b\n1,2\n3,4,5,6\n")
        self.assertIn("too many columns", (failed / "ragged.csv.error").read_text())
        self.assertIn("cannot tell the format", (failed / "notes.txt.error").read_text())
        self.assertIn("no such file", (failed / "ghost.csv.error").read_text())
        self.assertEqual(counted["rows"], [[4]])
        self.assertEqual((stopped["files_ingested"], stopped["files_failed"]), (1, 3))
        self.assertEqual(stopped["status"], "stopped")
        self.assertEqual(sorted(os.listdir(self.inbox)), ["failed", "loaded"])
        self.assertEqual(sorted(os.listdir(self.inbox / "loaded")),
                         ["good.csv", "good.csv.ready"])

    def test_unwatch_stops_loading(self) -> None:
        inbox, other = self.inbox, self.tmp / "other"
        other.mkdir()

        async def go() -> Any:
            async with self.server() as s:
                await self.call(s, "watch_directory", path=str(inbox), table="t")
                await self.call(s, "watch_directory", path=str(other), table="u")
                stopped = await self.call(s, "unwatch_directory", path=str(inbox))
                self.assertEqual(stopped["files_ingested"], 0)
                drop(inbox, "late.csv", rows=3)
                # A drop into the folder still watched, after it: had the
                # first watch been alive, its load would have been queued
                # before this one, and done before this one is.
                drop(other, "marker.csv", rows=2)
                await eventually(lambda: not (other / "marker.csv").exists(), QUICK,
                                 "the other folder's file to load")
                with self.assertRaises(ToolCallError):
                    await self.call(s, "query", sql="SELECT count(*) FROM t")
                return await self.call(s, "query", sql="SELECT count(*) FROM u")

        self.assertEqual(self.drive(go())["rows"], [[2]])
        self.assertEqual(sorted(os.listdir(self.inbox)), ["late.csv", "late.csv.ready"])

    def test_the_sessions_end_stops_its_watchers_and_blames_no_file(self) -> None:
        inbox, other = self.inbox, self.tmp / "other"
        other.mkdir()

        async def go() -> float:
            async with self.server() as s:
                await self.call(s, "watch_directory", path=str(inbox), table="t")
                # A load that the end of the session may catch under way.
                drop(inbox, "big.csv", rows=200_000)
                closing = time.monotonic()
            closed = time.monotonic() - closing
            # The first session is over (its server gone, or its host's
            # session closed).  Another one watches another folder; a drop
            # into the first folder, then one into the other: had the first
            # watch outlived its session, it would have seen its drop first
            # (and, its session closed, set the file aside at once).
            async with self.server() as s:
                await self.call(s, "watch_directory", path=str(other), table="u")
                drop(inbox, "after.csv", rows=1)
                drop(other, "marker.csv", rows=1)
                await eventually(lambda: not (other / "marker.csv").exists(), QUICK,
                                 "the other folder's file to load")
            return closed

        closed = self.drive(go())
        self.report(f"the session with a watch (and a load under way) closed in {closed:.2f} s")
        self.assertEqual(self.sessions_left(), [])
        left = sorted(os.listdir(inbox))
        # Loaded, or left for the next watch; never moved aside as failed.
        self.assertNotIn("failed", left)
        self.assertIn(left, (["after.csv", "after.csv.ready"],
                             ["after.csv", "after.csv.ready", "big.csv", "big.csv.ready"]))
        self.assertEqual(self.daemon_sessions(), [])

    def daemon_sessions(self) -> list[Any]:
        import json
        import sys

        done = subprocess.run([sys.executable, "-m", "hyperdaemon", "daemon", "status", "--json",
                               "--port", str(self.ports[0])], env=self.env,
                              capture_output=True, text=True, timeout=QUICK)
        if done.returncode != 0:
            return []  # no daemon: no session either
        return json.loads(done.stdout)["sessions"]


class WatchDatabaseTests(WatchTestCase):
    def test_a_watch_writes_into_its_database_and_detach_database_waits_for_unwatch(
            self) -> None:
        inbox, db = self.inbox, self.tmp / "shared.hyper"

        async def go() -> tuple[str, Any, Any]:
            async with self.server() as s:
                await self.call(s, "attach_database", alias="shared", kind="file", path=str(db),
                                on_missing="create")
                await self.call(s, "watch_directory", path=str(inbox), table="t",
                                database="shared")
                drop(inbox, "one.csv", rows=6)
                await eventually(lambda: not (inbox / "one.csv").exists(), QUICK,
                                 "the file to load")
                with self.assertRaises(ToolCallError) as refused:
                    await self.call(s, "detach_database", alias="shared")
                counted = await self.call(s, "query", sql="SELECT count(*) FROM shared.public.t")
                await self.call(s, "unwatch_directory", path=str(inbox))
                detached = await self.call(s, "detach_database", alias="shared")
                return str(refused.exception), counted, detached

        refused, counted, detached = self.drive(go())
        self.assertIn("alias:", refused)
        self.assertIn("unwatch_directory", refused)
        self.assertEqual(counted["rows"], [[6]])
        self.assertEqual(detached, {"detached": "shared"})

        async def again() -> Any:
            async with self.server() as s:
                await self.call(s, "attach_database", alias="shared", kind="file", path=str(db))
                return await self.call(s, "query", sql="SELECT count(*) FROM shared.public.t")

        self.assertEqual(self.drive(again())["rows"], [[6]])


class WatchRefusalTests(WatchTestCase):
    def test_bad_input_is_a_clear_tool_error_and_the_session_goes_on(self) -> None:
        inbox = self.inbox
        locked = self.tmp / "locked"
        if os.geteuid() == 0:
            self.tmpfs(locked, "size=1m,mode=0755")
            subprocess.run(["mount", "-o", "remount,ro", str(locked)], check=True)
        else:
            locked.mkdir()
            locked.chmod(0o500)
            self.addCleanup(locked.chmod, 0o700)

        async def go() -> dict[str, str]:
            errors = {}
            async with self.server() as s:
                for label, tool, arguments in [
                    ("missing", "watch_directory", {"path": str(self.tmp / "nope"), "table": "t"}),
                    ("a file", "watch_directory", {"path": str(self.csv), "table": "t"}),
                    ("unwritable", "watch_directory", {"path": str(locked), "table": "t"}),
                    ("no table", "watch_directory", {"path": str(inbox), "table": " "}),
                    ("concurrency", "watch_directory", {"path": str(inbox), "table": "t",
                                                        "max_concurrent": 0}),
                    ("database", "watch_directory", {"path": str(inbox), "table": "t",
                                                     "database": "nowhere"}),
                    ("not watched", "unwatch_directory", {"path": str(inbox)}),
                ]:
                    with self.assertRaises(ToolCallError, msg=label) as caught:
                        await self.call(s, tool, **arguments)
                    errors[label] = str(caught.exception)
                await self.call(s, "watch_directory", path=str(inbox), table="t")
                with self.assertRaises(ToolCallError) as caught:
                    await self.call(s, "watch_directory", path=str(inbox), table="other")
                errors["twice"] = str(caught.exception)
                self.assertEqual((await self.call(s, "query", sql="SELECT 1 AS one"))["rows"],
                                 [[1]])
            return errors

        errors = self.drive(go())
        self.assertIn("path: the folder", errors["missing"])
        self.assertIn("does not exist", errors["missing"])
        self.assertIn("is a file, not a folder", errors["a file"])
        self.assertIn("cannot list and write", errors["unwritable"])
        self.assertIn("table:", errors["no table"])
        self.assertIn("max_concurrent: 0", errors["concurrency"])
        self.assertIn("from 1 to 32", errors["concurrency"])
        self.assertIn("database:", errors["database"])
        self.assertIn("is not watched", errors["not watched"])
        self.assertIn("watched already", errors["twice"])
        self.assertIn("unwatch_directory", errors["twice"])
        for label, error in errors.items():
            self.assertNotIn("Traceback", error, label)
            self.assertNotIn("Errno", error, label)

    def test_read_only_refuses_watch_directory(self) -> None:
        async def go() -> str:
            async with self.server("--read-only") as s:
                with self.assertRaises(ToolCallError) as caught:
                    await self.call(s, "watch_directory", path=str(self.inbox), table="t")
                return str(caught.exception)

        self.assertIn("--read-only", self.drive(go()))
        drop(self.inbox, "kept.csv", rows=1)
        self.assertEqual(sorted(os.listdir(self.inbox)), ["kept.csv", "kept.csv.ready"])


# -- DirectoryWatch on the test reactor ------------------------------------------

class FakeLoads:
    """A stand-in for load_file: each call waits until the test fires it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, defer.Deferred[dict[str, Any]]]] = []
        self.called = defer.DeferredQueue()

    def __call__(self, path: Path) -> defer.Deferred[dict[str, Any]]:
        from twisted.internet import reactor

        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.calls.append((path, d))
        # Told once the watch holds the Deferred, not from inside this call.
        reactor.callLater(0, self.called.put, path)
        return d


@pytest.fixture
def watches() -> Any:
    """Makes DirectoryWatches on the reactor; each is stopped at the end."""
    from twisted.internet import reactor

    made: list[watch.DirectoryWatch] = []

    def make(folder: Path, load: Callable[[Path], Any],
             keep: bool = False) -> watch.DirectoryWatch:
        w = watch.DirectoryWatch(reactor, folder, "t", "local", 4, load, keep=keep)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


async def test_a_sentinel_made_while_watching_loads_its_file_and_both_go(
        tmp_path: Path, watches: Any) -> None:
    loads = FakeLoads()
    w = watches(tmp_path, loads)
    assert await w.start() == {"files_ingested": 0, "files_failed": 0}
    data, sentinel = drop(tmp_path, "a.csv", rows=2)
    assert await loads.called.get() == data
    assert data.exists() and sentinel.exists()  # not until the load succeeds
    loads.calls[0][1].callback({"rows_loaded": 2})
    assert not data.exists() and not sentinel.exists()
    assert w.files_ingested == 1


async def test_a_watch_that_keeps_moves_each_loaded_file_into_loaded_under_a_free_name(
        tmp_path: Path, watches: Any) -> None:
    loads = FakeLoads()
    w = watches(tmp_path, loads, keep=True)
    await w.start()
    for rows in (2, 3):  # the same name twice: the second is kept under a number
        data, sentinel = drop(tmp_path, "a.csv", rows=rows)
        await loads.called.get()
        loads.calls[-1][1].callback({"rows_loaded": rows})
        assert not data.exists() and not sentinel.exists()
    kept = tmp_path / "loaded"
    assert sorted(os.listdir(kept)) == ["1-a.csv", "1-a.csv.ready", "a.csv", "a.csv.ready"]
    assert len((kept / "a.csv").read_text().splitlines()) < len(
        (kept / "1-a.csv").read_text().splitlines())
    assert w.files_ingested == 2


async def test_a_stopped_watch_starts_no_load_and_waits_for_the_one_under_way(
        tmp_path: Path, watches: Any) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    loads, marker_loads = FakeLoads(), FakeLoads()
    w = watches(first, loads)
    await w.start()
    await watches(second, marker_loads).start()
    drop(first, "a.csv", rows=1)
    await loads.called.get()
    stopping = w.stop()
    assert not stopping.called  # the load under way is waited for
    drop(first, "b.csv", rows=1)
    drop(second, "marker.csv", rows=1)  # seen after b.csv would have been
    await marker_loads.called.get()
    loads.calls[0][1].callback({"rows_loaded": 1})
    await stopping
    assert [p.name for p, _ in loads.calls] == ["a.csv"]
    assert sorted(os.listdir(first)) == ["b.csv", "b.csv.ready"]


async def test_a_load_failing_after_a_stop_leaves_its_files_in_place(
        tmp_path: Path, watches: Any) -> None:
    loads = FakeLoads()
    w = watches(tmp_path, loads)
    await w.start()
    drop(tmp_path, "a.csv", rows=1)
    await loads.called.get()
    stopping = w.stop()
    loads.calls[0][1].errback(ToolFailure("the load was stopped: the server is shutting down"))
    await stopping
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "a.csv.ready"]
    assert w.files_failed == 0


async def test_a_failed_file_is_set_aside_once_under_a_free_name(
        tmp_path: Path, watches: Any) -> None:
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "a.csv").write_text("an earlier failure\n")
    drop(tmp_path, "a.csv", rows=1)

    def refuse(path: Path) -> Any:
        raise ToolFailure("path: not loadable; fix it")

    w = watches(tmp_path, refuse)
    assert await w.start() == {"files_ingested": 0, "files_failed": 1}
    assert sorted(os.listdir(tmp_path / "failed")) == [
        "1-a.csv", "1-a.csv.error", "1-a.csv.ready", "a.csv"]
    assert (tmp_path / "failed" / "1-a.csv.error").read_text().startswith(
        "path: not loadable; fix it\n")
    assert w.last_error == "a.csv: path: not loadable; fix it"


def test_tools_stop_ends_every_watch(tmp_path: Path) -> None:
    tools = Tools(session=object())
    stopped: list[str] = []

    class Watch:
        def __init__(self, name: str) -> None:
            self.name = name

        def stop(self) -> defer.Deferred[None]:
            stopped.append(self.name)
            return defer.succeed(None)

    tools.watches.update({"/a": Watch("a"), "/b": Watch("b")})
    tools.stop()
    assert sorted(stopped) == ["a", "b"]
    assert tools.watches == {}


def test_a_sentinel_names_its_data_file() -> None:
    assert watch.data_file_of("orders.csv.ready") == "orders.csv"
    assert watch.data_file_of("orders.ready") == "orders"
    assert watch.data_file_of(".ready") is None
    assert watch.data_file_of(".hidden.csv.ready") is None
    assert watch.data_file_of("orders.csv") is None


def test_max_concurrent_is_a_whole_number_from_1_to_32() -> None:
    assert watch.concurrency(None) == 4
    assert watch.concurrency(1) == 1
    assert watch.concurrency(32) == 32
    for bad in (0, -1, 33, True, 2.5, "4"):
        with pytest.raises(ToolFailure, match="max_concurrent"):
            watch.concurrency(bad)


async def test_a_sentinel_moved_into_the_folder_counts_as_made(
        tmp_path: Path, watches: Any) -> None:
    folder, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    loads = FakeLoads()
    await watches(folder, loads).start()
    write_rows(folder / "a.csv", 1)
    (elsewhere / "a.csv.ready").touch()
    os.rename(elsewhere / "a.csv.ready", folder / "a.csv.ready")
    assert await loads.called.get() == folder / "a.csv"


async def test_at_most_max_concurrent_files_load_at_once(tmp_path: Path) -> None:
    from twisted.internet import reactor

    loads = FakeLoads()
    w = watch.DirectoryWatch(reactor, tmp_path, "t", "local", 2, loads)
    for name in ("a.csv", "b.csv", "c.csv"):
        drop(tmp_path, name, rows=1)
    sweep = w.start()
    try:
        for _ in range(2):
            await loads.called.get()
        assert [p.name for p, _ in loads.calls] == ["a.csv", "b.csv"]
        loads.calls[0][1].callback({"rows_loaded": 1})
        assert (await loads.called.get()).name == "c.csv"
        for _, d in loads.calls[1:]:
            d.callback({"rows_loaded": 1})
        assert await sweep == {"files_ingested": 3, "files_failed": 0}
    finally:
        await w.stop()


def test_without_inotify_the_folder_is_listed_every_poll_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet import inotify
    from twisted.internet.task import Clock

    def unavailable(*args: Any) -> Any:
        raise inotify.INotifyError("no inotify here")

    monkeypatch.setattr(inotify, "INotify", unavailable)
    clock = Clock()
    loaded: list[str] = []
    w = watch.DirectoryWatch(clock, tmp_path, "t", "local", 4,
                             lambda path: loaded.append(path.name) or {"rows_loaded": 1})
    w.start()
    drop(tmp_path, "a.csv", rows=1)
    clock.advance(w.poll_interval - 0.1)
    assert loaded == []
    clock.advance(0.1)
    assert loaded == ["a.csv"]
    assert os.listdir(tmp_path) == []
    w.stop()
    drop(tmp_path, "b.csv", rows=1)
    clock.advance(w.poll_interval * 3)
    assert loaded == ["a.csv"]
    assert clock.getDelayedCalls() == []
