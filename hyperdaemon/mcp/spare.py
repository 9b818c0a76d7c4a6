"""
A scratch database and a connection to C{hyperd}, made ahead for the next
launcher that an MCP host serves.

Opening a session means connecting to C{hyperd} (a SCRAM login) and
creating its scratch database: about half of what a launcher waits for once
the host has its settings.  The host keeps one of each ready (L{SpareKeeper}):
an empty database in a folder of its own (C{<host pid>-spare-...} in the
sessions folder, so that a sweep of a dead host's folders takes it), and a
connection with nothing attached.  When a launcher comes, the database file
moves into a new folder named for the launcher's pid (L{hand_over}) and the
session opens on it as on a scratch database of its own (C{reattach}),
registered with the daemon as any other, on the connection made ahead if it
is still sound (L{hyperdaemon.client.session.SpareConnection}).  Then
another is made.  C{hyperd} does not hold a database it created but never
attached, so moving the file is safe.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet import threads
from twisted.logger import Logger

from hyperdaemon.client.session import EPHEMERAL_NAME, SpareConnection

_log = Logger()

#: What a spare's folder is called after its host's pid.
SPARE_MARK = "-spare-"


@attrs.define(eq=False)
class Spare:
    """An empty scratch database, in its own folder, and a connection made ahead."""

    folder: Path
    connection: SpareConnection

    def discard(self) -> None:
        self.connection.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def make(sessions_root: Path, credentials: Any) -> Spare:
    """
    A spare for the C{hyperd} of C{credentials}: it blocks (a thread's work).

    @raise Exception: whatever connecting or creating the database raised.
    """
    from hyperdaemon.client.session import _quote, connect_hyperd

    clear_stale(sessions_root)
    connection = connect_hyperd(credentials)
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}{SPARE_MARK}", dir=sessions_root))
        connection.execute(f"CREATE DATABASE {_quote(str(folder / EPHEMERAL_NAME))}")
    except BaseException:
        connection.close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return Spare(folder, SpareConnection(connection, credentials))


def hand_over(spare: Spare, pid: int) -> Path:
    """
    Move the spare's database into a new session folder of C{pid} (made
    exclusively, as a session makes its own); its path there.

    @raise OSError: if that cannot be done (the spare is then discarded).
    """
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{pid}-", dir=spare.folder.parent))
        os.rename(spare.folder / EPHEMERAL_NAME, folder / EPHEMERAL_NAME)
    except OSError:
        spare.discard()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(spare.folder, ignore_errors=True)
    return folder / EPHEMERAL_NAME


def clear_stale(sessions_root: Path, is_alive: Callable[[int], bool] | None = None) -> None:
    """Remove the spares of hosts that are gone (a host killed keeps its own)."""
    from hyperdaemon.daemon.sessions import folder_owner, pid_alive

    alive = is_alive or pid_alive
    try:
        entries = list(os.scandir(sessions_root))
    except OSError:
        return
    for entry in entries:
        owner = folder_owner(entry.name)
        if (SPARE_MARK in entry.name and owner is not None and not alive(owner)
                and entry.is_dir(follow_symlinks=False)):
            shutil.rmtree(entry.path, ignore_errors=True)


class SpareKeeper:
    """
    Keeps one L{Spare} ready: made in a thread (C{build}, which returns one),
    again L{pause} seconds after each is taken (not while the session that
    took it opens and serves its first requests); discarded when the host
    stops.
    """

    #: Seconds after a spare is taken before the next is made.
    pause = 0.05

    def __init__(self, reactor: Any, build: Callable[[], Spare]) -> None:
        self._reactor = reactor
        self._build = build
        self._spare: Spare | None = None
        self._making = False
        self._stopped = False
        #: The replenish that a take scheduled, if it has not run.
        self._next: Any = None

    @property
    def ready(self) -> bool:
        return self._spare is not None

    def replenish(self) -> None:
        """Make a spare unless one is ready or being made."""
        if self._stopped or self._making or self._spare is not None:
            return
        self._making = True
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._build)

        def made(spare: Spare) -> None:
            self._making = False
            if self._stopped:
                spare.discard()
            else:
                self._spare = spare

        def failed(failure: Any) -> None:
            self._making = False  # the next launcher opens as ever, and asks again (take)
            _log.info("no spare scratch database for now: {error}",
                      error=failure.getErrorMessage())

        d.addCallbacks(made, failed)

    def take(self, pid: int) -> tuple[Path, SpareConnection] | None:
        """
        The spare's database, moved into a session folder of C{pid}, and its
        connection; None if no spare is ready.  Another is made.
        """
        if self._stopped:
            return None
        spare, self._spare = self._spare, None
        # The next one, once this launcher's session is under way; or again,
        # if the last could not be made.
        if self._next is None or not self._next.active():
            self._next = self._reactor.callLater(self.pause, self.replenish)
        if spare is None:
            return None
        try:
            return hand_over(spare, pid), spare.connection
        except OSError as e:
            _log.warn("could not hand a spare scratch database over: {error}", error=e)
            return None

    def stop(self) -> None:
        self._stopped = True
        if self._next is not None and self._next.active():
            self._next.cancel()
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()
