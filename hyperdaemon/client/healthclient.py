"""
Blocking helpers that speak the health protocol to a daemon on 127.0.0.1.

Used by the command line (C{hyperdb-mcp daemon status|stop}), by the
finder and by the start-up checks that run before the reactor does; never
call them from the reactor thread.  Every call is bounded by a timeout.

A daemon-shaped answer proves nothing: another local user can run a program
that answers C{PONG hyperdb-mcp ...} on a port of the range.  So nothing but
C{PING} goes to a port before the kernel has said that this user owns the
socket at the other end (L{hyperdaemon.peeruid}): first who listens there
(cheap, and another user's port is then not even connected to), then, once
the port has answered C{PING}, who accepted that very connection (which no
change of hands can fool).  Where the kernel cannot tell (not Linux), a
daemon that answers C{PING} is trusted.
"""

from __future__ import annotations

import enum
import json
import os
import select
import socket
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from hyperdaemon import PRODUCT, peeruid
from hyperdaemon.config import PortChoice
from hyperdaemon.discovery import CorruptDiscovery, read_record, remove_record

#: Seconds to wait for a reply from a port that may not be a daemon.
IDENTIFY_TIMEOUT = 0.5
#: Seconds to wait for a daemon's reply.
REQUEST_TIMEOUT = 5.0
#: The longest reply line accepted (STATUS grows with the sessions).
MAX_REPLY = 16 * 1024 * 1024


class PortState(enum.Enum):
    #: Nothing listens there.
    FREE = "free"
    #: A daemon run by this user (where the owner cannot be learned: any
    #: program that answers an identified PING).
    DAEMON = "daemon"
    #: Held by another user, daemon-shaped or not: never sent more than PING.
    OTHER_USER = "other-user"
    #: Anything else, including a port whose owner could not be learned.
    FOREIGN = "foreign"


@attrs.frozen
class PortProbe:
    port: int
    state: PortState
    #: The daemon's version, if the port answered an identified PING.
    version: str | None = None
    #: The uid owning the port, where it was learned.
    owner: int | None = None

    def held_by(self) -> str:
        """
        Who holds the port, for a message: C{"another user, nobody (uid
        65534)"}, or C{"a hyperdb-mcp daemon of another user, ..."} once it
        has answered C{PING}.
        """
        who = "another user" if self.owner is None else (
            f"another user, {peeruid.describe_uid(self.owner)}"
        )
        return who if self.version is None else f"a hyperdb-mcp daemon of {who}"


class DaemonError(Exception):
    """A daemon did not answer as the protocol says; C{str()} says how."""


class OtherUsersPort(DaemonError):
    """The port is held by another user: nothing but C{PING} was sent."""

    def __init__(self, probe: PortProbe) -> None:
        super().__init__(f"port {probe.port} is held by {probe.held_by()}, not by your daemon")
        self.probe = probe


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

    def identify(self) -> str | None:
        """Send C{PING}: the daemon's version, or C{None} if the answer is not a daemon's."""
        return parse_pong(self.ask("PING"))

    def server_owner(self) -> int | None:
        """
        The uid owning the server end of this connection (L{peeruid.server_uid});
        ask after a reply.

        @raise peeruid.UnknownPeer: if that cannot be learned.
        """
        return peeruid.server_uid(self._sock)

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


def _other_user(owner: int | None) -> bool:
    return owner is not None and owner != os.geteuid()


def probe_port(port: int, timeout: float = IDENTIFY_TIMEOUT) -> PortProbe:
    """
    Tell whether C{port} is free, another user's, a daemon of ours (and its
    version), or anything else.  Another user's port is told by its
    listener's owner before it is connected to; else it gets one C{PING},
    and a daemon-shaped answer counts only if this user accepted the
    connection.
    """
    owner = peeruid.listener_uid(port)
    if _other_user(owner):
        return PortProbe(port, PortState.OTHER_USER, owner=owner)
    try:
        with HealthConnection(port, timeout) as conn:
            version = conn.identify()
            if version is None:
                return PortProbe(port, PortState.FOREIGN, owner=owner)
            owner = conn.server_owner()
    except ConnectionRefusedError:
        return PortProbe(port, PortState.FREE)
    except (OSError, DaemonError, peeruid.UnknownPeer):
        return PortProbe(port, PortState.FOREIGN)
    if _other_user(owner):
        return PortProbe(port, PortState.OTHER_USER, version, owner)
    return PortProbe(port, PortState.DAEMON, version, owner)


def connect_own(port: int, timeout: float = REQUEST_TIMEOUT) -> HealthConnection:
    """
    A connection to the daemon of this user on C{port}, checked before
    anything but C{PING} is sent on it (L{probe_port}), so that a port that
    changed hands since it was probed gets nothing.

    @raise OtherUsersPort: if another user holds the port.
    @raise DaemonError: if it is not a daemon, or its owner cannot be learned.
    @raise OSError: on a socket error or timeout.
    """
    conn = HealthConnection(port, timeout)
    try:
        version = conn.identify()
        if version is None:
            raise DaemonError(f"port {port} does not answer as a hyperdb-mcp daemon")
        try:
            owner = conn.server_owner()
        except peeruid.UnknownPeer:
            raise DaemonError(f"the owner of port {port} cannot be learned") from None
        if _other_user(owner):
            raise OtherUsersPort(PortProbe(port, PortState.OTHER_USER, version, owner))
    except BaseException:
        conn.close()
        raise
    return conn


def status(port: int, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """
    The C{STATUS} object of this user's daemon on C{port} (L{connect_own}).

    @raise DaemonError: if the port is not this user's daemon (L{OtherUsersPort}
        if it is another user's), or the daemon refuses or answers something
        that is not a JSON object.
    """
    with connect_own(port, timeout) as conn:
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


def log_skipped(probe: PortProbe) -> None:
    """The default report of a port skipped because another user holds it."""
    # Twisted only now: the command line imports this module before the
    # daemon keeps OpenSSL out of its process, and Twisted's imports load it.
    from twisted.logger import Logger

    Logger(namespace=__name__).warn("port {port} is held by {holder}: skipped", port=probe.port,
              holder=probe.held_by())


def locate(state_dir: Path, choice: PortChoice,
           on_skip: Callable[[PortProbe], None] = log_skipped) -> PortProbe | None:
    """
    Find the running daemon of this user: the pinned port only, if one is
    pinned (which may be held by another user: the caller says so); else
    the port named by C{daemon.json}, then a scan of the port range.  Ports
    held by another user are skipped, each reported to C{on_skip};
    C{daemon.json} is read only if it is this user's (L{read_record}), and
    the port it names is checked like any other.  Pinned or not, a
    C{daemon.json} that is corrupt or names no daemon of ours is removed.
    """
    try:
        record = read_record(state_dir)
    except CorruptDiscovery:
        remove_record(state_dir)
        record = None
    if choice.pinned is not None:
        found = probe_port(choice.pinned)
        if record is not None:
            named = found if record.health_port == found.port else probe_port(record.health_port)
            if named.state is not PortState.DAEMON:
                remove_record(state_dir)
        return found if found.state in (PortState.DAEMON, PortState.OTHER_USER) else None
    reported: set[int] = set()

    def skip(found: PortProbe) -> None:
        if found.state is PortState.OTHER_USER and found.port not in reported:
            reported.add(found.port)
            on_skip(found)

    if record is not None:
        found = probe_port(record.health_port)
        if found.state is PortState.DAEMON:
            return found
        skip(found)
        remove_record(state_dir)
    for port in choice.candidates():
        found = probe_port(port)
        if found.state is PortState.DAEMON:
            return found
        skip(found)
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
                except OtherUsersPort:
                    return True  # another user took the port: ours is gone
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
