"""
The registry of attached sessions: the MCP servers holding a long-lived
connection to the daemon, each with its ephemeral database.

This module is domain state only; the health protocol attaches and detaches
sessions, and the daemon lists them in C{STATUS} and asks the registry
whether any is attached before it stops for idleness.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import attrs


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

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def _changed(self) -> None:
        for listener in self.on_change:
            listener()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def to_json(self) -> list[dict[str, Any]]:
        return [session.to_json() for session in self]
