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
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs

from . import pgwire
from .discovery import SESSIONS_NAME  # noqa: F401  (re-exported)


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


#: Seconds the daemon keeps trying to drop a dead session's database while
#: hyperd still has it open (the client's libpq connection is closing).
DROP_RETRY_SECONDS = 10.0


def session_folder(ephemeral_db: str, root: Path) -> Path:
    """
    The private folder of a session's ephemeral database: C{ephemeral_db}
    must be an absolute C{.hyper} path directly inside a folder of C{root}
    (clients make it with C{mkdtemp(prefix=f"{pid}-", dir=root)}).

    @raise ValueError: for any other path; the daemon deletes these folders,
        so it must never be handed one it does not own.
    """
    path = Path(ephemeral_db)
    if not path.is_absolute() or path.suffix != ".hyper" or ".." in path.parts:
        raise ValueError("ephemeral_db must be an absolute path to a .hyper file")
    folder = path.parent
    if folder.parent != root or not folder.name.split("-", 1)[0].isdigit():
        raise ValueError(f"ephemeral_db must be inside a session folder of {root}")
    return folder


def remove_session_folder(folder: Path) -> None:
    """Delete a session folder and what is in it; absent is fine."""
    shutil.rmtree(folder, ignore_errors=True)


def sweep_orphans(root: Path, is_alive: Callable[[int], bool]) -> list[Path]:
    """
    Remove the session folders under C{root} whose client process is gone
    (a client killed while no daemon watched it).

    @return: the folders removed.
    """
    removed = []
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return removed
    for folder in entries:
        owner = folder.name.split("-", 1)[0]
        if folder.is_dir() and owner.isdigit() and not is_alive(int(owner)):
            remove_session_folder(folder)
            removed.append(folder)
    return removed


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
) -> None:
    """
    Drop (and so delete) the database file C{path} through hyperd.

    @raise DatabaseInUse: if a connection still has it attached.
    @raise pgwire.PGError: if hyperd refuses otherwise.
    """
    quoted = '"' + path.replace('"', '""') + '"'
    connection = await pgwire.connect(reactor, host, port, user, password, DROP_TIMEOUT)
    try:
        dropping = connection.query(f"DROP DATABASE IF EXISTS {quoted}")
        dropping.addTimeout(DROP_TIMEOUT, reactor)
        await dropping
    except pgwire.PGError as e:
        if "in use" in str(e):
            raise DatabaseInUse(str(e)) from None
        raise
    finally:
        connection.close()
