"""
Watched folders: the tools C{watch_directory} and C{unwatch_directory}.

A producer writes a data file (C{name.csv}, or any format load_file reads)
into a watched folder, then a sentinel named after the whole file
(C{name.csv.ready}).  The sentinel says the data file is complete: the file
is then appended to the watch's table, exactly as C{load_file} with
C{mode="append"} would (through the session, so that a write to a shared
database is on disk before the files go), and both files are deleted; or,
when the table is in the session's scratch database (which goes with the
session), moved into the folder's C{loaded/} subfolder, so that the data
outlives the session somewhere.

A file that fails to load is moved, with its sentinel, into the folder's
C{failed/} subfolder, and its error is written beside it as
C{name.csv.error}: never deleted, never tried again.  Files that are
complete (sentinel there) when the watch starts are loaded at once.

On Linux the folder is watched with inotify (L{twisted.internet.inotify}):
a sentinel is seen as soon as it is made, with no polling.  Elsewhere the
folder is listed every L{DirectoryWatch.poll_interval} seconds.

Watches belong to the session's L{hyperdaemon.mcp.tools.Tools} (its
C{watches}, by folder): C{detach_database} refuses to detach a database
that a watch writes to, and C{Tools.stop} (the server's close) ends them.
A load that a stop interrupts leaves the files where they are, for the
next watch to load.
"""

import contextvars
import datetime
import os
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from hyperdaemon.mcp.tools import ToolFailure

#: The suffix of a sentinel: C{name.csv.ready} says C{name.csv} is complete.
READY_SUFFIX = ".ready"
#: The suffix of the file that holds a failed file's error.
ERROR_SUFFIX = ".error"
#: The subfolder that failed files are moved into.
FAILED_FOLDER = "failed"
#: Where a watch into the scratch database keeps the files it loaded.
LOADED_FOLDER = "loaded"
#: Files loaded at once by one watch, unless told; and at most.
DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 32

log = Logger()


def data_file_of(sentinel: str) -> str | None:
    """The data file that the file named C{sentinel} marks complete, or None. Pure."""
    if sentinel.endswith(READY_SUFFIX) and len(sentinel) > len(READY_SUFFIX):
        name = sentinel[:-len(READY_SUFFIX)]
        if not name.startswith("."):
            return name
    return None


def concurrency(max_concurrent: Any) -> int:
    """
    How many files a watch loads at once, from C{max_concurrent} (default
    L{DEFAULT_CONCURRENCY}, at most L{MAX_CONCURRENCY}).  Pure.

    @raise ToolFailure: for anything but a whole number from 1.
    """
    if max_concurrent is None:
        return DEFAULT_CONCURRENCY
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or (
            max_concurrent < 1 or max_concurrent > MAX_CONCURRENCY):
        raise ToolFailure(f"max_concurrent: {max_concurrent!r} is not a number of files to load "
                          f"at once; give a whole number from 1 to {MAX_CONCURRENCY} (default "
                          f"{DEFAULT_CONCURRENCY})")
    return max_concurrent


def watchable_folder(path: Any) -> Path:
    """
    The absolute, resolved folder that C{path} names, if a watch can use it:
    a folder this user can list and write in (loaded files are deleted or
    moved into loaded/, failed ones moved into failed/).

    @raise ToolFailure: naming C{path} and what to do.
    """
    if not isinstance(path, str) or not path.strip():
        raise ToolFailure("path: give the folder to watch, by absolute path")
    folder = Path(os.path.realpath(os.path.expanduser(path)))
    if not folder.exists():
        raise ToolFailure(f"path: the folder {folder} does not exist; create it first, or check "
                          f"the path")
    if not folder.is_dir():
        raise ToolFailure(f"path: {folder} is a file, not a folder; give the folder that the "
                          f"files are dropped into")
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        raise ToolFailure(f"path: this user cannot list and write in {folder} (loaded files "
                          f"are moved or deleted from it); fix its permissions, or watch "
                          f"another folder")
    return folder


def set_aside_names(failed: Path, name: str, taken: Callable[[Path], bool]) -> tuple[Path, ...]:
    """
    Where a failed file C{name} goes in the folder C{failed}: the data
    file, its sentinel and its error, under a name that C{taken} says is
    free (the same name that failed before gets a number).  Pure but for
    C{taken}.
    """
    for attempt in range(10_000):
        stored = name if attempt == 0 else f"{attempt}-{name}"
        paths = (failed / stored, failed / (stored + READY_SUFFIX),
                 failed / (stored + ERROR_SUFFIX))
        if not any(taken(p) for p in paths):
            return paths
    raise OSError(f"no free name for {name} in {failed}")


class DirectoryWatch:
    """
    One watched folder: loads each complete file (see the module's
    docstring) with C{load(path)}, which returns a Deferred (or raises)
    like L{hyperdaemon.mcp.tools.Tools.load_file}.
    """

    #: Seconds between listings where inotify is not available.
    poll_interval = 2.0

    def __init__(self, reactor: Any, folder: Path, table: str, database: str,
                 concurrency: int, load: Callable[[Path], Any], keep: bool = False) -> None:
        self.reactor = reactor
        self.folder = folder
        self.table = table
        self.database = database
        #: Loaded files are moved into L{LOADED_FOLDER}, not deleted.
        self.keep = keep
        self.concurrency = concurrency
        self.files_ingested = 0
        self.files_failed = 0
        #: The last failure's sentence, or None.
        self.last_error: str | None = None
        self._load = load
        self._semaphore = defer.DeferredSemaphore(concurrency)
        #: Data files being loaded, by name.
        self._busy: set[str] = set()
        #: Data files that failed and could not be moved aside: never tried again.
        self._given_up: set[str] = set()
        self._running: set[defer.Deferred[None]] = set()
        self._notifier: Any = None
        self._poll: Any = None
        self.stopped = False

    # -- lifetime ------------------------------------------------------------

    def start(self) -> defer.Deferred[dict[str, int]]:
        """
        Watch the folder, then load what is complete in it already; fires
        with how many of those were loaded and how many failed.
        """
        self._notify()
        return self._sweep()

    def stop(self) -> defer.Deferred[None]:
        """
        Stop watching: no new load starts; fires once the loads under way
        have ended (a stop of the server ends them early).
        """
        self.stopped = True
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        running = list(self._running)
        return defer.DeferredList(running, consumeErrors=True).addCallback(lambda _: None)

    def _notify(self) -> None:
        """Be told of each file made in the folder: inotify, or a slow poll."""
        notifier = None
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notifier = inotify.INotify(self.reactor)
            notifier.startReading()
            notifier.watch(FilePath(os.fsencode(self.folder)),
                           mask=inotify.IN_CREATE | inotify.IN_MOVED_TO,
                           callbacks=[self._notified])
        except Exception as e:  # not Linux, no inotify, or no watch left: poll
            if notifier is not None:
                notifier.loseConnection()
            log.info("watching {folder} by polling ({why})", folder=str(self.folder), why=e)
            from twisted.internet.task import LoopingCall

            self._poll = LoopingCall(self._poll_once)
            self._poll.clock = self.reactor
            self._poll.start(self.poll_interval, now=False)
            return
        self._notifier = notifier

    def _poll_once(self) -> defer.Deferred[Any]:
        """One listing of the polled folder; its errors are logged, never raised."""
        d = defer.maybeDeferred(self._sweep)
        d.addErrback(lambda failure: log.failure("watch of {folder}: a listing failed",
                                                 failure=failure, folder=str(self.folder)))
        return d

    def _notified(self, ignored: Any, path: Any, mask: int) -> None:
        from twisted.internet import inotify

        if mask & inotify.IN_Q_OVERFLOW:
            self._sweep()  # events were lost: look at everything
            return
        name = data_file_of(os.fsdecode(path.basename()))
        if name is not None:
            self._start_load(name)

    # -- loading -------------------------------------------------------------

    def _sweep(self) -> defer.Deferred[dict[str, int]]:
        """Load every complete file not being loaded; fires with the counts."""
        try:
            names = sorted(os.listdir(self.folder))
        except OSError as e:
            self.last_error = f"the folder {self.folder} cannot be listed: {e.strerror}"
            log.warn("watch of {folder}: {error}", folder=str(self.folder),
                     error=self.last_error)
            return defer.succeed({"files_ingested": 0, "files_failed": 0})
        loads = [self._start_load(data) for data in map(data_file_of, names)
                 if data is not None]
        outcomes = defer.gatherResults([d for d in loads if d is not None])
        return outcomes.addCallback(lambda done: {
            "files_ingested": sum(1 for o in done if o == "loaded"),
            "files_failed": sum(1 for o in done if o == "failed")})

    def _start_load(self, name: str) -> defer.Deferred[str] | None:
        """Load C{name} unless it is being loaded already; fires with its outcome."""
        if self.stopped or name in self._busy or name in self._given_up:
            return None
        self._busy.add(name)
        d: defer.Deferred[str] = self._semaphore.run(self._load_one, name)
        tracked = d.addBoth(self._done, name)
        self._running.add(tracked)
        tracked.addBoth(self._untrack, tracked)
        return tracked

    def _done(self, outcome: Any, name: str) -> str:
        self._busy.discard(name)
        if isinstance(outcome, str):
            return outcome
        # A fault of ours, not of the file: say so, and leave the files.
        self.last_error = f"{name}: {outcome.getErrorMessage()}"
        log.failure("watch of {folder}: {name} could not be handled", failure=outcome,
                    folder=str(self.folder), name=name)
        return "left"

    def _untrack(self, outcome: Any, tracked: defer.Deferred[str]) -> Any:
        self._running.discard(tracked)
        return outcome

    @defer.inlineCallbacks
    def _load_one(self, name: str) -> Any:
        """Load one file; C{"loaded"}, C{"failed"}, or C{"left"} (not tried, or stopped)."""
        data = self.folder / name
        sentinel = self.folder / (name + READY_SUFFIX)
        if self.stopped or not os.path.lexists(sentinel):
            return "left"  # loaded meanwhile (a sweep and an event both saw it)
        try:
            if not data.is_file():
                raise ToolFailure(f"path: {name + READY_SUFFIX} says {name} is complete, and "
                                  f"there is no such file in {self.folder}; write the data "
                                  f"file before its sentinel")
            loaded = yield defer.maybeDeferred(self._load, data)
        except ToolFailure as e:
            if self.stopped:
                return "left"  # the stop interrupted it: the file is not at fault
            self._set_aside(name, str(e))
            return "failed"
        if self.keep:
            self._keep(name)
        else:
            for done in (data, sentinel):
                try:
                    done.unlink()
                except FileNotFoundError:
                    pass
        self.files_ingested += 1
        log.info("watch of {folder}: {name} appended to {table} ({rows} rows)",
                 folder=str(self.folder), name=name, table=self.table,
                 rows=loaded.get("rows_loaded"))
        return "loaded"

    def _keep(self, name: str) -> None:
        """Move a loaded file and its sentinel into C{loaded/} (a name taken gets a number)."""
        kept = self.folder / LOADED_FOLDER
        try:
            kept.mkdir(exist_ok=True)
            data, sentinel, _ = set_aside_names(kept, name, os.path.lexists)
            os.rename(self.folder / name, data)
            os.rename(self.folder / (name + READY_SUFFIX), sentinel)
        except OSError as e:
            # Loaded, but it cannot be moved: never loaded twice.
            self._given_up.add(name)
            log.warn("watch of {folder}: {name} was loaded, but could not be moved into "
                     "{kept}: {error}; it is left in place and not loaded again",
                     folder=str(self.folder), name=name, kept=str(kept), error=str(e))

    def _set_aside(self, name: str, error: str) -> None:
        """Move a failed file and its sentinel into C{failed/}, its error beside them."""
        self.files_failed += 1
        self.last_error = f"{name}: {error}"
        log.warn("watch of {folder}: {name} failed to load: {error}", folder=str(self.folder),
                 name=name, error=error)
        failed = self.folder / FAILED_FOLDER
        try:
            failed.mkdir(exist_ok=True)
            data, sentinel, note = set_aside_names(failed, name, os.path.lexists)
            when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            note.write_text(f"{error}\n(table {self.table!r} in database {self.database!r}, "
                            f"{when})\n", encoding="utf-8")
            if os.path.lexists(self.folder / name):
                os.rename(self.folder / name, data)
            os.rename(self.folder / (name + READY_SUFFIX), sentinel)
        except OSError as e:
            # Left where it is, and not tried again by this watch.
            self._given_up.add(name)
            log.warn("watch of {folder}: {name} could not be moved aside: {error}",
                     folder=str(self.folder), name=name, error=e)

    def facts(self) -> dict[str, Any]:
        return {"directory": str(self.folder), "table": self.table, "database": self.database,
                "max_concurrent": self.concurrency, "files_ingested": self.files_ingested,
                "files_failed": self.files_failed, "last_error": self.last_error}


# -- the tools ---------------------------------------------------------------------

def start_watch(tools: Any, reactor: Any, path: str, table: str,
                    max_concurrent: int | None = None, database: str | None = None,
                    persist: bool | None = None) -> defer.Deferred[dict[str, Any]]:
    """Start a L{DirectoryWatch} of C{path} into C{table}; fires once the first sweep is done."""
    tools._refuse_writes("watch_directory")
    if not isinstance(table, str) or not table.strip():
        raise ToolFailure("table: give the name of the table that the files are appended to, "
                          "e.g. 'events'")
    count = concurrency(max_concurrent)
    db = tools._database(database, persist)
    folder = watchable_folder(path)
    key = str(folder)
    if key in tools.watches:
        current = tools.watches[key]
        raise ToolFailure(f"path: {folder} is watched already (into table {current.table!r}); "
                          f"call unwatch_directory first to watch it with other settings")

    # The session's own method: C{tools} may stand for whichever session a
    # request serves (the MCP host's L{hyperdaemon.mcp.server.SessionTools}),
    # and the loads happen outside any request.
    load_file = tools.load_file

    def load(data: Path) -> Any:
        return load_file(table=table, path=str(data), mode="append", database=db)

    from hyperdaemon.client.session import EPHEMERAL_ALIAS

    # A scratch table goes with the session: its files are kept, not deleted.
    keep = db == EPHEMERAL_ALIAS
    watch = DirectoryWatch(reactor, folder, table, db, count, load, keep=keep)
    tools.watches[key] = watch
    try:
        # Started in a context of its own: what the folder's events run
        # (they inherit it) must not belong to this request (its progress,
        # its session) but to the watch.
        started = contextvars.Context().run(watch.start)
    except Exception:
        del tools.watches[key]
        raise
    return started.addCallback(lambda sweep: {
        "directory": key, "table": table, "database": db, "status": "watching",
        "max_concurrent": count, "initial_sweep": sweep,
        "failed_folder": str(folder / FAILED_FOLDER),
        "loaded_folder": str(folder / LOADED_FOLDER) if keep else None})


def stop_watch(tools: Any, path: str) -> defer.Deferred[dict[str, Any]]:
    """Stop the watch of C{path}; fires once its loads under way have ended."""
    if not isinstance(path, str) or not path.strip():
        raise ToolFailure("path: give the watched folder, as given to watch_directory")
    key = os.path.realpath(os.path.expanduser(path))
    watch = tools.watches.pop(key, None)
    if watch is None:
        if not tools.watches:
            raise ToolFailure(f"path: {key} is not watched, and no folder is; watch_directory "
                              f"starts a watch")
        raise ToolFailure(f"path: {key} is not watched; the watched folders are "
                          f"{', '.join(sorted(tools.watches))}: give one of those")
    return watch.stop().addCallback(lambda _: {**watch.facts(), "status": "stopped"})


def register(kit: Any) -> None:
    tools, Arg = kit.tools, kit.arg
    from typing import Annotated

    from mcp.types import CallToolResult
    from pydantic import Field

    from hyperdaemon.mcp import server

    class Sweep(kit.Result):
        files_ingested: int = Field(description="Files loaded (deleted, or kept in the "
                                                "loaded folder).")
        files_failed: int = Field(description="Files moved into the failed folder.")

    class Watching(kit.Result):
        """The watch started, and what it found in the folder already."""

        directory: str = Field(description="The folder watched, as an absolute path.")
        table: str
        database: str
        status: str = Field(description="`watching`.")
        max_concurrent: int
        initial_sweep: Sweep = Field(description="The files that were complete already.")
        failed_folder: str = Field(description="Where files that fail to load are moved, "
                                               "each with its error in name.error.")
        loaded_folder: str | None = Field(
            None, description="Where loaded files are kept, when the table is in the "
                              "session's scratch database (which goes with the session); "
                              "null when they are deleted once on disk.")

    class Unwatched(kit.Result):
        """The watch stopped, and what it did."""

        directory: str
        table: str
        database: str
        status: str = Field(description="`stopped`.")
        max_concurrent: int
        files_ingested: int = Field(description="Files this watch loaded.")
        files_failed: int = Field(description="Files it moved into the failed folder.")
        last_error: str | None = Field(None, description="The latest failure, if any.")

    @kit.tool("Watch a folder", kit.hints(read_only=False, destructive=True,
                                          idempotent=False))
    async def watch_directory(
        path: Arg(str, "The folder to watch, by absolute path; it must exist and be "
                       "writable (loaded files are deleted from it, or moved into its "
                       "loaded/ subfolder)."),
        table: Arg(str, "The table that every file dropped into the folder is appended "
                        "to, made by the first file if it does not exist."),
        max_concurrent: Arg(int | None, f"How many files are loaded at once, from 1 to "
                                        f"{MAX_CONCURRENCY}. Default "
                                        f"{DEFAULT_CONCURRENCY}.") = None,
        database: Arg(str | None, server.TARGET_DATABASE) = None,
        persist: Arg(bool | None, server.PERSIST) = None,
    ) -> Annotated[CallToolResult, Watching]:
        """
        Load files into a table as they arrive in a folder: a producer writes
        a file (CSV, JSON, JSON lines or Parquet, as load_file reads), then an
        empty sentinel named after it with .ready added (orders.csv.ready); the
        file is appended to the table and both are deleted, or, for a table in
        the scratch database (local, the default), moved into loaded/, since
        that database goes with the session. A file that fails is moved into
        failed/ with its error in name.error beside it. Files already complete
        are loaded first. The watch ends with the session or
        with unwatch_directory; refused with --read-only.
        """
        from twisted.internet import reactor

        return await kit.call(start_watch, tools=tools, reactor=reactor, path=path, table=table,
                              max_concurrent=max_concurrent, database=database,
                              persist=persist)

    @kit.tool("Stop watching a folder", kit.hints(read_only=False, destructive=False,
                                                  idempotent=True))
    async def unwatch_directory(
        path: Arg(str, "The watched folder, as given to watch_directory."),
    ) -> Annotated[CallToolResult, Unwatched]:
        """
        Stop loading the files dropped into a watched folder; returns once
        the loads under way have ended. Files dropped later stay where they are.
        """
        return await kit.call(stop_watch, tools=tools, path=path)

