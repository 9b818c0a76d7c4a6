"""
The registry of attached sessions: the MCP servers holding a long-lived
connection to the daemon, each with its ephemeral database.

The registry is domain state only; the health protocol attaches and detaches
sessions, and the daemon lists them in C{STATUS} and asks the registry
whether any is attached before it stops for idleness.  Each session's
ephemeral database lives in a private folder under C{$STATE/sessions/}
named for the client's pid; the helpers below validate, drop and sweep them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs

from hyperdaemon.daemon import pgwire
from hyperdaemon.discovery import SESSIONS_NAME  # noqa: F401  (re-exported)


@attrs.define
class Session:
    """One attached client."""

    id: str
    pid: int | None = None
    name: str | None = None
    ephemeral_db: str | None = None
    attached_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The C{STATUS} form (SPEC.md): C{id}, C{pid}, C{ephemeral_db}, and more."""
        return {
            "id": self.id,
            "pid": self.pid,
            "ephemeral_db": self.ephemeral_db,
            "name": self.name,
            "attached_at": self.attached_at,
        }


class SessionRegistry:
    """
    Attached sessions by id.  C{on_change} listeners are told after every
    attach and detach (the idle timer counts them as activity).
    """

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self.on_change: list[Callable[[], None]] = []

    def new_id(self) -> str:
        return f"s{next(self._ids)}"

    def attach(self, session: Session) -> None:
        self._sessions[session.id] = session
        self._changed()

    def detach(self, session_id: str) -> Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._changed()
        return session

    def _changed(self) -> None:
        for listener in self.on_change:
            listener()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def to_json(self) -> list[dict[str, Any]]:
        return [session.to_json() for session in self]


#: The highest pid a session folder may name: C{pid_t}'s range (a larger
#: number cannot be a process, and C{os.kill} refuses it).
PID_MAX = 2**31 - 1


def folder_owner(name: str) -> int | None:
    """
    The client pid a session folder's name starts with (C{<pid>-...}, the
    pid in ASCII decimal digits, from 1 to L{PID_MAX}), or C{None} for a
    name of any other shape.
    """
    owner, dash, _ = name.partition("-")
    if not dash or not (owner.isascii() and owner.isdigit()):
        return None
    pid = int(owner)
    return pid if 0 < pid <= PID_MAX else None


def session_folder(ephemeral_db: str, root: Path) -> Path:
    """
    The private folder of a session's ephemeral database: C{ephemeral_db}
    must be an absolute C{.hyper} path directly inside a folder of C{root}
    (clients make it with C{mkdtemp(prefix=f"{pid}-", dir=root)}), and no
    part of it below the state directory may be a symbolic link: C{root}
    and the folder are real directories, the folder is this user's, and the
    database, if it exists yet, is a regular file.

    @raise ValueError: for any other path; the daemon drops these databases
        and deletes these folders, so it must never be handed one it does
        not own, nor a path that leads elsewhere.
    """
    path = Path(ephemeral_db)
    if not path.is_absolute() or path.suffix != ".hyper" or ".." in path.parts:
        raise ValueError("ephemeral_db must be an absolute path to a .hyper file")
    folder = path.parent
    if folder.parent != root or folder_owner(folder.name) is None:
        raise ValueError(f"ephemeral_db must be inside a session folder of {root}")
    for part, kind in ((root, stat.S_ISDIR), (folder, stat.S_ISDIR), (path, stat.S_ISREG)):
        try:
            info = os.lstat(part)
        except FileNotFoundError:
            if part is path:
                break  # the client creates its database after SESSION
            raise ValueError(f"ephemeral_db's folder {part} does not exist") from None
        except OSError as e:
            raise ValueError(f"ephemeral_db cannot be checked: {part}: {e.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            raise ValueError(f"ephemeral_db must not lead through a symbolic link: {part} is one")
        if not kind(info.st_mode):
            raise ValueError(f"ephemeral_db leads through {part}, which is not a "
                             f"{'folder' if kind is stat.S_ISDIR else 'file'}")
        if part is folder and info.st_uid != os.geteuid():
            raise ValueError(f"ephemeral_db's folder {part} belongs to another user")
    return folder


def remove_session_folder(folder: Path) -> None:
    """
    Delete a session folder and what is in it, never following a symbolic
    link: not C{sessions} itself (the folder's parent), not the folder, not
    anything inside.  A folder that is a symbolic link loses the link only.
    Absent is fine.

    @raise OSError: if it cannot be removed, or C{sessions} is not a real
        directory.
    """
    try:
        root = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            info = os.lstat(folder.name, dir_fd=root)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(folder.name, dir_fd=root)
        elif shutil.rmtree.avoids_symlink_attacks:
            shutil.rmtree(folder.name, dir_fd=root)
        else:  # pragma: no cover - platforms without the fd-based functions
            shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    finally:
        os.close(root)


@attrs.frozen
class Sweep:
    """What L{sweep_orphans} did."""

    #: Folders of clients that are gone, now removed.
    removed: list[Path] = attrs.Factory(list)
    #: Entries that are not session folders, left alone.
    ignored: list[Path] = attrs.Factory(list)
    #: Orphaned folders that could not be removed, and why.
    failed: list[tuple[Path, str]] = attrs.Factory(list)


def sweep_orphans(root: Path, is_alive: Callable[[int], bool]) -> Sweep:
    """
    Remove the session folders under C{root} whose client process is gone
    (a client killed while no daemon watched it).  Entries that are not
    real directories named C{<pid>-...} (see L{folder_owner}) are left
    alone and reported; nothing here raises for a strange entry.
    """
    sweep = Sweep()
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return sweep
    for entry in entries:
        folder = Path(entry.path)
        owner = folder_owner(entry.name)
        try:
            is_folder = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_folder = False
        if owner is None or not is_folder:
            sweep.ignored.append(folder)
        elif not is_alive(owner):
            try:
                remove_session_folder(folder)
            except OSError as e:
                sweep.failed.append((folder, e.strerror or str(e)))
            else:
                sweep.removed.append(folder)
    return sweep


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DatabaseInUse(Exception):
    """hyperd refuses to drop a database that a connection still has attached."""


#: Seconds dropping a database may take, connection included.
DROP_TIMEOUT = 10.0


async def drop_database(
    reactor: Any, host: str, port: int, user: str, password: str | None, path: str,
    still_wanted: Callable[[], bool] = lambda: True,
) -> bool:
    """
    Drop (and so delete) the database file C{path} through hyperd, unless
    C{still_wanted()} says no once connected (its client came back while
    the connection was being made).

    @return: whether the drop was sent (and succeeded).
    @raise DatabaseInUse: if a connection still has it attached.
    @raise pgwire.PGError: if hyperd refuses otherwise.
    """
    quoted = '"' + path.replace('"', '""') + '"'
    connection = await pgwire.connect(reactor, host, port, user, password, DROP_TIMEOUT)
    if not still_wanted():
        connection.close()
        return False
    try:
        dropping = connection.query(f"DROP DATABASE IF EXISTS {quoted}")
        dropping.addTimeout(DROP_TIMEOUT, reactor)
        await dropping
        return True
    except pgwire.PGError as e:
        if "in use" in str(e):
            raise DatabaseInUse(str(e)) from None
        raise
    finally:
        connection.close()
