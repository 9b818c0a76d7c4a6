"""
Database files that several sessions share, and how a write to one becomes
durable before the call that made it reports success.

Hyper keeps the changes to an attached database file in memory until the
last connection that has the file attached detaches it, or until C{hyperd}
stops gracefully; a SIGKILL (or a crash, or the OOM killer) loses them
(shared/HYPERD.md, "Durability").  A session therefore never keeps a shared
file attached without holding a shared C{flock} on its I{hold} lock, and
after a call that may have written to it:

  1. detaches the file and lets go of its hold;
  2. asks the other sessions to do the same (the daemon relays a
     C{RELEASE} line to them, see L{hyperdaemon.daemon.protocol});
  3. waits until it can take the hold lock exclusively.  At that moment no
     connection has the file attached, so the last detach has written the
     changes out; only then does the call return.

A session asked to release detaches the file after its current call and
attaches it again, cold, at its next call.  A writer that waits holds a
second lock, the I{turnstile}, exclusively: a session that wants to attach
the file meanwhile first lets go of every file it holds and then waits its
turn, so that readers cannot starve the writer and no cycle of waits can
form (a session that waits holds nothing another one waits for).

Everything here blocks: it runs on a session's worker thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import attrs

#: Seconds a writer waits for the other sessions to let go of a file.
FLUSH_TIMEOUT = 120.0
#: Seconds between two requests to the other sessions to let go.
NUDGE_INTERVAL = 1.0
#: Seconds between two tries of the exclusive lock while waiting.
POLL_INTERVAL = 0.005


class NotDurable(Exception):
    """The change was made but could not be confirmed on disk in time."""


class LockFile:
    """One C{flock} on one open file: shared, exclusive or none."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        return self._fd

    def lock(self, exclusive: bool, wait: bool = True) -> bool:
        """Take the lock; without C{wait}, C{False} if someone holds it."""
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._open(), flags if wait else flags | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases any lock


def lock_paths(database: Path, fallback_dir: Path) -> tuple[Path, Path, Path]:
    """
    The hold, turnstile and attach locks of C{database}: beside it, so that
    every session of every state directory meets on them; in
    C{fallback_dir} when its folder cannot be written to.  The attach lock
    is the folder's C{.hyperdb-attach.lock}, which older clients take too.
    """
    folder, name = database.parent, database.name
    if os.access(folder, os.W_OK):
        return (folder / f".{name}.hold.lock", folder / f".{name}.turnstile.lock",
                folder / ".hyperdb-attach.lock")
    fallback_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = hashlib.sha256(os.fsencode(database)).hexdigest()[:32]
    return (fallback_dir / f"{key}.hold.lock", fallback_dir / f"{key}.turnstile.lock",
            fallback_dir / f"{key}.attach.lock")


@attrs.define(eq=False)
class SharedFile:
    """A database file a session attaches under C{alias} only while it holds it."""

    alias: str
    path: Path
    hold: LockFile
    turnstile: LockFile
    #: Held, exclusively, around every CREATE and ATTACH of the file: an
    #: ATTACH while another connection runs CREATE DATABASE IF NOT EXISTS
    #: on the same file wedges hyperd (seen with 0.0.26963).
    attaching: LockFile
    #: Create the file at the first attach if it is missing.
    create: bool = False
    attached: bool = False

    @classmethod
    def at(cls, alias: str, path: Path, fallback_dir: Path, create: bool = False) -> "SharedFile":
        hold, turnstile, attaching = lock_paths(path, fallback_dir)
        return cls(alias, path, LockFile(hold), LockFile(turnstile), LockFile(attaching),
                   create)

    def close(self) -> None:
        self.hold.close()
        self.turnstile.close()
        self.attaching.close()


def take_hold(shared: SharedFile, let_go: Callable[[], None]) -> None:
    """
    Hold C{shared} (shared lock) so that it may be attached.  If a writer is
    waiting for it, first C{let_go} of everything held, then wait our turn.
    """
    if not shared.turnstile.lock(exclusive=False, wait=False):
        let_go()
        shared.turnstile.lock(exclusive=False)
    try:
        # Only a writer's instant of exclusive hold can make this wait.
        shared.hold.lock(exclusive=False)
    finally:
        shared.turnstile.unlock()


def wait_until_written(shared: SharedFile, nudge: Callable[[], None],
                       timeout: float = FLUSH_TIMEOUT,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> None:
    """
    After detaching C{shared} and letting go of its hold: wait until no
    session holds it, C{nudge}-ing the others every L{NUDGE_INTERVAL} s.
    When this returns, the file's changes are on disk.

    @raise NotDurable: if others still hold it after C{timeout} seconds.
    """
    shared.turnstile.lock(exclusive=True)
    try:
        deadline = clock() + timeout
        next_nudge = clock()
        while not shared.hold.lock(exclusive=True, wait=False):
            now = clock()
            if now >= deadline:
                raise NotDurable(
                    f"{shared.path} was changed, but another session kept it attached for "
                    f"{timeout:g} s, so the change is not yet written to disk (it will be "
                    f"once that session lets go of it)"
                )
            if now >= next_nudge:
                nudge()
                next_nudge = now + NUDGE_INTERVAL
            sleep(POLL_INTERVAL)
        shared.hold.unlock()
    finally:
        shared.turnstile.unlock()
