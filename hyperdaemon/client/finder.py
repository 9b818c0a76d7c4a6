"""
How a client gets a daemon: find the running one, take over an older one of
ours, or spawn one, surviving races with other clients doing the same.  Only
a daemon of this user is ever used: ports held by other users are skipped
(L{hyperdaemon.client.healthclient.locate}), and every connection that sends more
than C{PING} is checked again on its own (L{connect_own}).

Everything here blocks (sockets with timeouts, a pipe): run it in a worker
thread, never on the reactor thread.  The decisions are small pure functions
(L{parse_version}, L{should_take_over}) tested on their own.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import attrs

from hyperdaemon import __version__
from hyperdaemon.config import PortChoice, port_choice, state_dir as resolve_state_dir
from hyperdaemon.discovery import LOGS_NAME, prepare_state_dir
from hyperdaemon.client.healthclient import (
    DaemonError,
    PortState,
    connect_own,
    locate,
    status,
    wait_pid_gone,
    wait_port_free,
)

#: Seconds a spawned daemon may take until its hyperd answers queries.
SPAWN_TIMEOUT = 90.0
#: Seconds to wait for an older daemon to stop during a takeover.
TAKEOVER_TIMEOUT = 30.0
#: Times a client tries again after losing a race to start a daemon.
ATTEMPTS = 5
#: The spawned daemon's stdout and stderr (crashes before logging starts).
SPAWN_LOG_NAME = "daemon-stderr.log"
SPAWN_LOG_LIMIT = 1_000_000


class DaemonUnavailable(Exception):
    """No daemon could be found or started; C{str()} says why and where to look."""


@attrs.frozen
class DaemonAddress:
    """A running daemon, as a client sees it."""

    port: int
    version: str
    #: The version of our session commands it speaks; C{None} for a daemon
    #: that has none (the upstream Rust one).
    session_protocol: int | None
    facts: dict[str, Any] = attrs.field(eq=False, repr=False)


def parse_version(text: str) -> tuple[int, ...]:
    """
    The leading numeric parts of a version (C{"0.7.3.r28c"} -> C{(0, 7, 3)});
    C{()} when there are none.
    """
    parts = []
    for piece in text.split("."):
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


def should_take_over(client_version: str, daemon_version: str,
                     session_protocol: int | None) -> bool:
    """
    Whether a client should stop the running daemon and start its own: only
    a daemon of ours (one that speaks the session commands) that is older
    than the client.  Equal or newer daemons are reused, and so is the
    upstream daemon, whatever its version.
    """
    if session_protocol is None:
        return False
    daemon, client = parse_version(daemon_version), parse_version(client_version)
    return bool(daemon) and bool(client) and daemon < client


def _address(port: int) -> DaemonAddress:
    facts = status(port)
    protocol = facts.get("session_protocol")
    return DaemonAddress(
        port=port,
        version=str(facts.get("version", "")),
        session_protocol=protocol if isinstance(protocol, int) else None,
        facts=facts,
    )


@attrs.define
class Finder:
    """
    Finds or starts this user's daemon.  C{state_dir} and C{choice} come
    from the same settings as the daemon's (L{from_environment}).
    """

    state_dir: Path
    choice: PortChoice
    client_version: str = __version__
    spawn_timeout: float = SPAWN_TIMEOUT
    #: Never in the repr: Twisted logs endpoints (and so this) when it
    #: retries, and an environment holds the user's tokens.
    environ: Mapping[str, str] = attrs.field(factory=lambda: dict(os.environ), repr=False)

    @classmethod
    def from_environment(cls, state_dir: str | None = None, port: str | int | None = None,
                         environ: Mapping[str, str] | None = None) -> "Finder":
        environ = dict(os.environ if environ is None else environ)
        return cls(resolve_state_dir(state_dir, environ), port_choice(port, environ),
                   environ=environ)

    def ensure(self) -> DaemonAddress:
        """
        A usable daemon: the running one (after a takeover if it is an
        older one of ours), or a new one.

        @raise DaemonUnavailable: if none can be had.
        """
        last_error = "no attempt was made"
        for _ in range(ATTEMPTS):
            found = locate(self.state_dir, self.choice)
            if found is not None and found.state is PortState.OTHER_USER:
                raise DaemonUnavailable(
                    f"Port {found.port} is held by {found.held_by()}, not by your daemon: "
                    f"pin a port of your own with HYPERDB_DAEMON_PORT."
                )
            if found is not None:
                try:
                    address = _address(found.port)
                except (OSError, DaemonError) as e:
                    last_error = f"the daemon on port {found.port} did not answer STATUS: {e}"
                    continue
                if not should_take_over(self.client_version, address.version,
                                        address.session_protocol):
                    return address
                if not self._stop(address):
                    return address
                outcome = self.spawn(pinned=address.port)
            else:
                outcome = self.spawn()
            kind, _, detail = outcome.partition(" ")
            if kind in ("READY", "EXISTS"):
                try:
                    return _address(int(detail))
                except (OSError, DaemonError, ValueError) as e:
                    last_error = f"the daemon on port {detail} did not answer: {e}"
                    continue
            last_error = detail or outcome
        raise DaemonUnavailable(
            f"Could not start the hyperdb-mcp daemon: {last_error} "
            f"(see {self.state_dir / LOGS_NAME})."
        )

    def _stop(self, address: DaemonAddress) -> bool:
        """Stop an older daemon for a takeover; C{False} if it would not go."""
        pid = address.facts.get("pid")
        try:
            with connect_own(address.port) as conn:
                if conn.ask("STOP") != "STOPPING":
                    return False
                conn.wait_closed(TAKEOVER_TIMEOUT)
        except (OSError, DaemonError):
            return False
        if isinstance(pid, int):
            wait_pid_gone(pid, TAKEOVER_TIMEOUT)
        return wait_port_free(address.port, TAKEOVER_TIMEOUT,
                              pid if isinstance(pid, int) else None)

    def spawn(self, pinned: int | None = None) -> str:
        """
        Start a daemon, fully detached (its own session, stdio to a log),
        and wait, without polling, for its word on a pipe: C{READY <port>},
        C{EXISTS <port>} (another one won), or C{ERROR <reason>}.
        """
        logs = prepare_state_dir(self.state_dir)
        log_path = logs / SPAWN_LOG_NAME
        if log_path.exists() and log_path.stat().st_size > SPAWN_LOG_LIMIT:
            log_path.unlink()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        read_end, write_end = os.pipe()
        argv = [sys.executable, "-m", "hyperdaemon", "daemon",
                "--state-dir", str(self.state_dir), "--ready-fd", str(write_end)]
        if pinned is not None:
            argv += ["--port", str(pinned)]
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                pass_fds=(write_end,), start_new_session=True, env=dict(self.environ),
                cwd="/",
            )
        finally:
            os.close(write_end)
            os.close(log_fd)
        # Reap it if it exits while we live; if we exit first, init does.
        threading.Thread(target=proc.wait, name="hyperdaemon-reaper", daemon=True).start()
        try:
            return self._read_word(read_end, proc.pid, log_path)
        finally:
            os.close(read_end)

    def _read_word(self, fd: int, pid: int, log_path: Path) -> str:
        deadline = time.monotonic() + self.spawn_timeout
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"ERROR the daemon (pid {pid}) was not ready within {self.spawn_timeout:g} s"
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return f"ERROR the daemon (pid {pid}) exited before it was ready; see {log_path}"
            data += chunk
        return data.split(b"\n", 1)[0].decode("utf-8", "replace")
