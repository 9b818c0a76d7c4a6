"""
The state directory and the discovery file, C{daemon.json}, in it.

The discovery file tells clients where the running daemon and its C{hyperd}
are and how to log in (SPEC.md).  It is written atomically (an exclusive
temporary file in the same directory, then a rename), is mode 0600 inside a
0700 directory, and is removed by a daemon only while it still names that
daemon, so that a successor's file is never lost.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import attrs

DISCOVERY_NAME = "daemon.json"
LOGS_NAME = "logs"
#: hyperd's own logs, inside the logs folder.
HYPERD_LOGS_NAME = "hyperd"
#: One private folder per session's ephemeral database.
SESSIONS_NAME = "sessions"
DIR_MODE = 0o700
FILE_MODE = 0o600


class StateDirError(Exception):
    """The state directory cannot be used; C{str()} says why and the fix."""


class CorruptDiscovery(Exception):
    """C{daemon.json} exists but is not a discovery record."""


@attrs.frozen
class DaemonRecord:
    """
    The contents of C{daemon.json}.  The first five fields are the upstream
    daemon's; C{hyperd_password} is C{None} when C{hyperd} has none
    (C{--compat}).
    """

    pid: int
    hyperd_endpoint: str
    health_port: int
    started_at: str
    version: str
    hyperd_user: str | None = None
    hyperd_password: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> "DaemonRecord":
        """
        @raise CorruptDiscovery: if C{data} lacks a field or has one of the
            wrong type.
        """
        if not isinstance(data, dict):
            raise CorruptDiscovery("not a JSON object")
        try:
            record = cls(
                pid=data["pid"],
                hyperd_endpoint=data["hyperd_endpoint"],
                health_port=data["health_port"],
                started_at=data["started_at"],
                version=data["version"],
                hyperd_user=data.get("hyperd_user"),
                hyperd_password=data.get("hyperd_password"),
            )
        except KeyError as e:
            raise CorruptDiscovery(f"missing field {e.args[0]!r}") from None
        checks = [
            type(record.pid) is int and record.pid > 0,
            type(record.health_port) is int and 0 < record.health_port < 65536,
            isinstance(record.hyperd_endpoint, str),
            isinstance(record.started_at, str),
            isinstance(record.version, str),
            record.hyperd_user is None or isinstance(record.hyperd_user, str),
            record.hyperd_password is None or isinstance(record.hyperd_password, str),
        ]
        if not all(checks):
            raise CorruptDiscovery("a field has the wrong type")
        return record


_FIX = "choose another with --state-dir or HYPERDB_STATE_DIR"


def _secure_dir(path: Path, what: str, may_be_link: bool = False) -> None:
    """
    Make C{path} an existing 0700 directory of this user.  A symbolic link
    is refused, except where C{may_be_link} (the state directory itself):
    there a link is followed only if the link too is this user's, so that
    nobody can point our state, and our chmod, at a directory they chose.

    @param what: C{path} for a person, e.g. C{"the logs folder /s/logs
        inside the state directory /s"}.
    """
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        link = path.lstat()
        info = path.stat()
    except OSError as e:
        raise StateDirError(f"Cannot create {what}: {e.strerror}; {_FIX}.") from None
    if stat.S_ISLNK(link.st_mode):
        if not may_be_link:
            raise StateDirError(
                f"{path} in the state directory is a symbolic link; remove it "
                f"(the daemon makes it again) or {_FIX}."
            )
        if link.st_uid != os.geteuid():
            raise StateDirError(
                f"The state directory {path} is a symbolic link owned by another user "
                f"(uid {link.st_uid}); remove it or {_FIX}."
            )
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"{what[0].upper()}{what[1:]} is not a directory; {_FIX}.")
    if info.st_uid != os.geteuid():
        raise StateDirError(
            f"{what[0].upper()}{what[1:]} belongs to another user (uid {info.st_uid}); "
            f"choose a state directory of your own with --state-dir or HYPERDB_STATE_DIR."
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode != DIR_MODE:
        try:
            os.chmod(path, DIR_MODE)
        except OSError as e:
            raise StateDirError(
                f"Cannot make {what} private (mode 0700 instead of {mode:04o}): "
                f"{e.strerror}; make it a writable folder of mode 0700 or {_FIX}."
            ) from None


def prepare_state_dir(path: Path) -> Path:
    """
    Make C{path}, its C{logs}, C{logs/hyperd} and C{sessions} folders exist
    as 0700 directories of this user (tightening looser modes), and prove C{path}
    writable.  C{path} may be this user's symbolic link to a directory of
    theirs; the folders inside may not be links at all.

    @return: the C{logs} folder.
    @raise StateDirError: if that cannot be done.
    """
    _secure_dir(path, f"the state directory {path}", may_be_link=True)
    logs = path / LOGS_NAME
    inside = f"inside the state directory {path}"
    _secure_dir(logs, f"the logs folder {logs} {inside}")
    _secure_dir(logs / HYPERD_LOGS_NAME,
                f"the hyperd logs folder {logs / HYPERD_LOGS_NAME} {inside}")
    _secure_dir(path / SESSIONS_NAME, f"the sessions folder {path / SESSIONS_NAME} {inside}")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise StateDirError(
            f"The state directory {path} is not writable ({e.strerror}); "
            f"fix its permissions or choose another with --state-dir or HYPERDB_STATE_DIR."
        ) from None
    return logs


def discovery_path(state_dir: Path) -> Path:
    return state_dir / DISCOVERY_NAME


def write_record(state_dir: Path, record: DaemonRecord) -> None:
    """
    Atomically replace C{daemon.json} with C{record}: readers see the old
    file or the new one, never a part.  The file is 0600 from its creation.
    """
    data = json.dumps(record.to_json(), indent=2).encode("utf-8") + b"\n"
    # mkstemp creates the file with O_EXCL and mode 0600.
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".daemon.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, discovery_path(state_dir))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


#: The largest C{daemon.json} read; anything longer is not a record.
MAX_RECORD_BYTES = 64 * 1024


def _read_record(state_dir: Path) -> tuple[DaemonRecord, os.stat_result] | None:
    """L{read_record}, with the file's C{fstat} (to tell it apart later)."""
    path = discovery_path(state_dir)
    try:
        # Never follow a link, never wait for a writer (a FIFO), and look at
        # what was opened before reading it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CorruptDiscovery(f"cannot be opened: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptDiscovery("not a regular file")
        if info.st_uid != os.geteuid():
            raise CorruptDiscovery(f"owned by another user (uid {info.st_uid})")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CorruptDiscovery("writable by other users")
        if info.st_size > MAX_RECORD_BYTES:
            raise CorruptDiscovery("too large")
        raw = os.read(fd, MAX_RECORD_BYTES + 1)
    except OSError as e:
        raise CorruptDiscovery(f"unreadable: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CorruptDiscovery("not JSON") from None
    return DaemonRecord.from_json(data), info


def read_record(state_dir: Path) -> DaemonRecord | None:
    """
    Read C{daemon.json}.  Only a regular file of this user, writable by no
    one else, is read: never through a link, and never waiting on a FIFO.

    @return: the record, or C{None} if there is no file.
    @raise CorruptDiscovery: if the file is anything else, or not a valid
        record.
    """
    found = _read_record(state_dir)
    return None if found is None else found[0]


def remove_record_if_owned(state_dir: Path, pid: int, health_port: int) -> bool:
    """
    Remove C{daemon.json} if it names the daemon C{pid} on C{health_port};
    leave any other daemon's file alone (one written since it was read
    included).

    @return: whether the file was removed.
    @raise OSError: if it names this daemon but cannot be removed (a
        read-only state directory, for instance).
    """
    try:
        found = _read_record(state_dir)
    except CorruptDiscovery:
        return False
    if found is None or (found[0].pid, found[0].health_port) != (pid, health_port):
        return False
    path = discovery_path(state_dir)
    try:
        if not os.path.samestat(found[1], path.lstat()):
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def remove_record(state_dir: Path) -> bool:
    """
    Remove C{daemon.json} (a client that found it stale or corrupt),
    whatever kind of entry it is, if it is this user's: a link goes, not
    its target; a directory goes only if it is empty.  Never raises.

    @return: whether something was removed.
    """
    path = discovery_path(state_dir)
    try:
        info = path.lstat()
        if info.st_uid != os.geteuid():
            return False
        if stat.S_ISDIR(info.st_mode):
            path.rmdir()
        else:
            path.unlink()
    except OSError:
        return False
    return True
