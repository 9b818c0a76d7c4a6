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


def _secure_dir(path: Path) -> None:
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as e:
        raise StateDirError(
            f"Cannot create the state directory {path}: {e.strerror}; "
            f"choose another with --state-dir or HYPERDB_STATE_DIR."
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(
            f"The state directory {path} is not a directory; "
            f"choose another with --state-dir or HYPERDB_STATE_DIR."
        )
    if info.st_uid != os.geteuid():
        raise StateDirError(
            f"The state directory {path} belongs to another user (uid {info.st_uid}); "
            f"choose one of your own with --state-dir or HYPERDB_STATE_DIR."
        )
    if stat.S_IMODE(info.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)


def prepare_state_dir(path: Path) -> Path:
    """
    Make C{path}, its C{logs}, C{logs/hyperd} and C{sessions} folders exist
    as 0700 directories of this user (tightening looser modes), and prove C{path}
    writable.

    @return: the C{logs} folder.
    @raise StateDirError: if that cannot be done.
    """
    _secure_dir(path)
    logs = path / LOGS_NAME
    _secure_dir(logs)
    _secure_dir(logs / HYPERD_LOGS_NAME)
    _secure_dir(path / SESSIONS_NAME)
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


def read_record(state_dir: Path) -> DaemonRecord | None:
    """
    Read C{daemon.json}.

    @return: the record, or C{None} if there is no file.
    @raise CorruptDiscovery: if the file is not a valid record.
    """
    try:
        raw = discovery_path(state_dir).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CorruptDiscovery(f"unreadable: {e.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CorruptDiscovery("not JSON") from None
    return DaemonRecord.from_json(data)


def remove_record_if_owned(state_dir: Path, pid: int, health_port: int) -> bool:
    """
    Remove C{daemon.json} if it names the daemon C{pid} on C{health_port};
    leave any other daemon's file alone.

    @return: whether the file was removed.
    """
    try:
        record = read_record(state_dir)
    except CorruptDiscovery:
        return False
    if record is None or (record.pid, record.health_port) != (pid, health_port):
        return False
    try:
        discovery_path(state_dir).unlink()
    except FileNotFoundError:
        return False
    return True


def remove_record(state_dir: Path) -> None:
    """Remove C{daemon.json} (a client that found it stale or corrupt)."""
    try:
        discovery_path(state_dir).unlink()
    except FileNotFoundError:
        pass
