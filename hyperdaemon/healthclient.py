"""
Blocking helpers that speak the health protocol to a daemon on 127.0.0.1.

Used by the command line (C{hyperdb-mcp daemon status|stop}) and by the
start-up checks that run before the reactor does; never call them from the
reactor thread.  Every call is bounded by a timeout.
"""

from __future__ import annotations

import enum
import json
import os
import select
import socket
import time
from pathlib import Path
from typing import Any

import attrs

from . import PRODUCT
from .config import PortChoice
from .discovery import CorruptDiscovery, read_record, remove_record

#: Seconds to wait for a reply from a port that may not be a daemon.
IDENTIFY_TIMEOUT = 0.5
#: Seconds to wait for a daemon's reply.
REQUEST_TIMEOUT = 5.0
#: The longest reply line accepted (STATUS grows with the sessions).
MAX_REPLY = 16 * 1024 * 1024


class PortState(enum.Enum):
    #: Nothing listens there.
    FREE = "free"
    #: A daemon that serves this user (or one that cannot tell users apart).
    DAEMON = "daemon"
    #: A daemon that refuses this user: another user's.
    OTHER_USER = "other-user"
    #: Anything else.
    FOREIGN = "foreign"


@attrs.frozen
class PortProbe:
    port: int
    state: PortState
    version: str | None = None


class DaemonError(Exception):
    """A daemon did not answer as the protocol says; C{str()} says how."""


def parse_pong(line: str) -> str | None:
    """
    The version in an identified C{PING} reply (C{PONG hyperdb-mcp <version>},
    exact tokens), or C{None} for anything else.
    """
    tokens = line.split(" ")
    if len(tokens) == 3 and tokens[0] == "PONG" and tokens[1] == PRODUCT and tokens[2]:
        return tokens[2]
    return None


class HealthConnection:
    """One connection to a health port; several commands may be sent."""

    def __init__(self, port: int, timeout: float = REQUEST_TIMEOUT) -> None:
        self.port = port
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "HealthConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ask(self, command: str) -> str:
        """
        Send C{command} and return the reply line without its newline.

        @raise DaemonError: if the connection closes first.
        @raise OSError: on a socket error or timeout.
        """
        self._sock.sendall(command.encode("utf-8") + b"\n")
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise DaemonError(f"port {self.port} closed the connection without a reply")
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY:
                raise DaemonError(f"port {self.port} sent an over-long reply")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def wait_closed(self, timeout: float) -> bool:
        """Wait until the daemon closes the connection; C{False} on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._sock.settimeout(remaining)
            try:
                if not self._sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True


def probe_port(port: int, timeout: float = IDENTIFY_TIMEOUT) -> PortProbe:
    """
    Tell whether C{port} is free, foreign, another user's daemon, or a
    daemon of ours (and its version).  A daemon is asked for C{STATUS} too:
    another user's answers C{ERR forbidden}.
    """
    try:
        with HealthConnection(port, timeout) as conn:
            version = parse_pong(conn.ask("PING"))
            if version is None:
                return PortProbe(port, PortState.FOREIGN)
            if conn.ask("STATUS") == "ERR forbidden":
                return PortProbe(port, PortState.OTHER_USER, version)
    except ConnectionRefusedError:
        return PortProbe(port, PortState.FREE)
    except (OSError, DaemonError):
        return PortProbe(port, PortState.FOREIGN)
    return PortProbe(port, PortState.DAEMON, version)


def status(port: int, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """
    The daemon's C{STATUS} object.

    @raise DaemonError: if it refuses (another user's daemon) or answers
        something that is not a JSON object.
    """
    with HealthConnection(port, timeout) as conn:
        line = conn.ask("STATUS")
    if line.startswith("ERR"):
        raise DaemonError(f"the daemon on port {port} answered {line!r}")
    try:
        data = json.loads(line)
    except ValueError:
        raise DaemonError(f"the daemon on port {port} sent a STATUS that is not JSON") from None
    if not isinstance(data, dict):
        raise DaemonError(f"the daemon on port {port} sent a STATUS that is not an object")
    return data


def locate(state_dir: Path, choice: PortChoice) -> PortProbe | None:
    """
    Find the running daemon: the pinned port only, if one is pinned (which
    may be another user's daemon: the caller says so); else the port named
    by C{daemon.json} (removing the file if it is corrupt or names no daemon
    of ours), then a scan of the port range, skipping other users' daemons.
    """
    if choice.pinned is not None:
        found = probe_port(choice.pinned)
        return found if found.state in (PortState.DAEMON, PortState.OTHER_USER) else None
    try:
        record = read_record(state_dir)
    except CorruptDiscovery:
        remove_record(state_dir)
        record = None
    if record is not None:
        found = probe_port(record.health_port)
        if found.state is PortState.DAEMON:
            return found
        remove_record(state_dir)
    for port in choice.candidates():
        found = probe_port(port)
        if found.state is PortState.DAEMON:
            return found
    return None


def wait_port_free(port: int, timeout: float, pid: int | None = None) -> bool:
    """
    Wait until nothing listens on C{port}, or, if C{pid} is given, until the
    daemon there is no longer that one (a client may respawn one at once);
    C{False} on timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        else:
            if pid is not None:
                try:
                    if status(port, timeout=1.0).get("pid") not in (pid, None):
                        return True
                except (OSError, DaemonError):
                    pass
        time.sleep(0.01)
    return False


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """
    Wait until process C{pid} has exited; C{False} on timeout.  On Linux
    the kernel tells us (a pidfd becomes readable); elsewhere we poll.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
            time.sleep(0.01)
        return False
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)
