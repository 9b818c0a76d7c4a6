"""
Where the daemon's settings come from.

Flags beat environment variables, variables beat defaults (SPEC.md).  Every
function here is pure apart from reading the environment mapping it is given
and, for C{hyperd}, looking at the file system; each raises L{ConfigError}
with one sentence that names the problem and its fix.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Mapping

import attrs

#: The ports a daemon may use when none is pinned (SPEC.md: 7485..7500).
DEFAULT_PORT_RANGE = (7485, 7500)
#: Idle seconds before the daemon stops; 0 means never.
DEFAULT_IDLE_TIMEOUT = 1800.0
#: The role C{hyperd} is initialised with; clients log in as this user.
HYPERD_USER = "tableau_internal_user"

STATE_DIR_VAR = "HYPERDB_STATE_DIR"
PORT_VAR = "HYPERDB_DAEMON_PORT"
#: Not in the upstream contract: moves the scanned range (tests use it to
#: stay clear of 7485..7500; so can several isolated setups on one machine).
PORT_RANGE_VAR = "HYPERDB_DAEMON_PORT_RANGE"
IDLE_TIMEOUT_VAR = "HYPERDB_DAEMON_IDLE_TIMEOUT"
HYPERD_PATH_VAR = "HYPERD_PATH"


class ConfigError(Exception):
    """
    A setting cannot be used.  C{str()} is one sentence with the fix, fit to
    show a user as it is.
    """


@attrs.frozen
class PortChoice:
    """
    Which health port to use: exactly C{pinned}, or the first usable port of
    C{first}..C{last} (inclusive).
    """

    pinned: int | None
    first: int
    last: int

    def candidates(self) -> range:
        if self.pinned is not None:
            return range(self.pinned, self.pinned + 1)
        return range(self.first, self.last + 1)


def _port_number(text: str, source: str) -> int:
    try:
        port = int(text.strip())
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(
            f"{source} is {text!r}, which is not a port number: "
            f"give a whole number from 1 to 65535."
        )
    return port


def port_choice(flag: str | int | None, environ: Mapping[str, str]) -> PortChoice:
    """
    Resolve the health port: C{--port}, else C{HYPERDB_DAEMON_PORT}, else a
    scan of C{HYPERDB_DAEMON_PORT_RANGE} (default 7485-7500).
    """
    first, last = DEFAULT_PORT_RANGE
    spec = environ.get(PORT_RANGE_VAR, "").strip()
    if spec:
        low, sep, high = spec.partition("-")
        if not sep:
            raise ConfigError(
                f"{PORT_RANGE_VAR} is {spec!r}: write it as FIRST-LAST, e.g. 7485-7500."
            )
        first = _port_number(low, PORT_RANGE_VAR)
        last = _port_number(high, PORT_RANGE_VAR)
        if last < first:
            raise ConfigError(
                f"{PORT_RANGE_VAR} is {spec!r}: the first port must not exceed the last."
            )
    if flag is not None:
        return PortChoice(_port_number(str(flag), "--port"), first, last)
    if environ.get(PORT_VAR, "").strip():
        return PortChoice(_port_number(environ[PORT_VAR], PORT_VAR), first, last)
    return PortChoice(None, first, last)


def idle_timeout(flag: str | float | None, environ: Mapping[str, str]) -> float:
    """
    Resolve the idle timeout in seconds: C{--idle-timeout}, else
    C{HYPERDB_DAEMON_IDLE_TIMEOUT}, else 1800.  C{0} means never.
    """
    if flag is not None:
        text, source = str(flag), "--idle-timeout"
    elif environ.get(IDLE_TIMEOUT_VAR, "").strip():
        text, source = environ[IDLE_TIMEOUT_VAR], IDLE_TIMEOUT_VAR
    else:
        return DEFAULT_IDLE_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (seconds >= 0 and seconds != float("inf")):
        raise ConfigError(
            f"{source} is {text!r}: give the idle timeout in seconds "
            f"(a number >= 0; 0 means never stop)."
        )
    return seconds


def state_dir(flag: str | None, environ: Mapping[str, str]) -> Path:
    """
    Resolve the state directory: C{--state-dir}, else C{HYPERDB_STATE_DIR},
    else C{~/.hyperdb}.  The path is made absolute; it is not created here.
    """
    home = environ.get("HOME") or os.path.expanduser("~")
    if flag:
        raw = flag
    elif environ.get(STATE_DIR_VAR, "").strip():
        raw = environ[STATE_DIR_VAR]
    else:
        raw = os.path.join("~", ".hyperdb")
    if raw == "~" or raw.startswith("~/"):
        if not home or home == "~":
            raise ConfigError(
                f"Cannot find your home directory: set {STATE_DIR_VAR} to a "
                f"directory for the daemon's state."
            )
        raw = home + raw[1:]
    return Path(os.path.abspath(raw))


def bundled_hyperd() -> Path | None:
    """
    The C{hyperd} shipped in the installed C{tableauhyperapi} wheel, found
    without importing it (importing it loads a large native library).
    """
    spec = importlib.util.find_spec("tableauhyperapi")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(list(spec.submodule_search_locations)[0])
    return package / "bin" / "hyper" / "hyperd"


def hyperd_executable(environ: Mapping[str, str]) -> Path:
    """
    Resolve the C{hyperd} to run: C{HYPERD_PATH} (the executable, or the
    folder holding it), else the one in C{tableauhyperapi}.

    @raise ConfigError: if it is missing or not executable.
    """
    override = environ.get(HYPERD_PATH_VAR, "").strip()
    if override:
        path = Path(os.path.abspath(os.path.expanduser(override)))
        if path.is_dir():
            path = path / "hyperd"
        source = f"{HYPERD_PATH_VAR} ({override})"
        fix = f"point {HYPERD_PATH_VAR} at the hyperd executable or the folder holding it"
    else:
        found = bundled_hyperd()
        if found is None:
            raise ConfigError(
                "Cannot find hyperd: the tableauhyperapi package is not installed; "
                f"run 'pip install tableauhyperapi' or set {HYPERD_PATH_VAR}."
            )
        path = found
        source = "tableauhyperapi"
        fix = f"reinstall tableauhyperapi or set {HYPERD_PATH_VAR}"
    if not path.is_file():
        raise ConfigError(f"hyperd is missing at {path} (from {source}): {fix}.")
    if not os.access(path, os.X_OK):
        raise ConfigError(f"hyperd at {path} (from {source}) is not executable: {fix}.")
    return path


def check_persistent_db(path: Path) -> None:
    """
    Make the persistent database's folder exist and check that the file is,
    or can be made, there: before a session starts anything, so that a bad
    path fails the open at once and leaves nothing running.

    @raise ConfigError: one sentence naming the path, what it is for, and
        the fix.
    """
    fix = ("choose another file with --persistent-db or HYPERDB_PERSISTENT_DB, "
           "or do without one (--ephemeral-only)")
    if os.path.isdir(path):
        raise ConfigError(f"The persistent database {path} is a folder, not a .hyper file; "
                          f"{fix}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot create the folder {path.parent} for the persistent database "
                          f"{path}: {e.strerror}; {fix}.") from None
    if not os.path.lexists(path) and not os.access(path.parent, os.W_OK):
        raise ConfigError(f"Cannot create the persistent database {path}: its folder is not "
                          f"writable; {fix}.")
