"""
The MCP host started with the daemon process itself, before the daemon
imports Twisted: standard library only.

A launcher that finds no daemon spawns one and waits for its host, whose
imports (the MCP SDK, pydantic, psycopg: most of a cold start) are the
longest step.  Started here, they overlap the daemon's own imports and
C{hyperd}'s start instead of following them.  The host is told nothing yet:
its stdin and stdout are one end of a socket pair whose other end the
daemon's supervisor adopts (L{hyperdaemon.daemon.mcphost}), and it listens
for launchers only once that end says C{PORT <n>}, that is once this daemon
has won its port and is sure to run.  A daemon that gives up before then
kills it (L{EarlyHost.discard}); one that dies closes its end, and the host
exits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Mapping, Sequence

from hyperdaemon.mcp.launcher import START_VAR

#: How the daemon starts its host (C{-P}: the working directory is not on
#: the module path, whatever it is).
HOST_ARGV = (sys.executable, "-P", "-m", "hyperdaemon.mcp.host")


class EarlyHost:
    """A host started before the reactor: its pid and the daemon's ends of its streams."""

    def __init__(self, pid: int, stdio: socket.socket, stderr: socket.socket) -> None:
        self.pid = pid
        #: The host's stdin and stdout.
        self.stdio = stdio
        #: Its stderr (its log lines).
        self.stderr = stderr

    def close(self) -> None:
        """Close the daemon's ends (once they are adopted, or to let the host go)."""
        self.stdio.close()
        self.stderr.close()

    def discard(self) -> None:
        """
        Kill the host and reap it: the daemon is not going to run.  It has
        done nothing but import (it waits for C{PORT} before it listens).
        """
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.close()


def start_for_daemon(argv: Sequence[str], environ: Mapping[str, str]) -> EarlyHost | None:
    """
    The host, started now if C{argv} (C{hyperdb-mcp}'s arguments) starts a
    daemon that a launcher spawned for it (L{START_VAR}, and the absolute
    C{--state-dir} that launchers give); C{None} otherwise, and the
    daemon's supervisor starts it once the daemon runs.  This comes before
    the command line's parser, and Twisted, are imported.
    """
    if (environ.get(START_VAR) != "1" or argv[:1] != ["daemon"] or "--state-dir" not in argv
            or "status" in argv or "stop" in argv):
        return None
    index = list(argv).index("--state-dir") + 1
    state_dir = argv[index] if index < len(argv) else ""
    if not os.path.isabs(state_dir):
        return None
    return start_early(os.path.normpath(state_dir),
                       {k: v for k, v in environ.items() if k != START_VAR})


def inherited_fds() -> list[int]:
    """This process's descriptors above stderr that a child would inherit."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    found = []
    for name in names:
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:  # the listing's own descriptor, closed since
            pass
    return found


def start_early(state_dir: str, environ: Mapping[str, str],
                argv: Sequence[str] = HOST_ARGV) -> EarlyHost | None:
    """
    Start the host (C{argv}) for C{state_dir} now, waiting for its port;
    C{None} if it cannot be started (the supervisor then starts one the
    usual way, and says why if that fails too).
    """
    stdio, host_stdio = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stderr, host_stderr = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [*argv, "--state-dir", state_dir]
    actions = [(os.POSIX_SPAWN_DUP2, host_stdio.fileno(), 0),
               (os.POSIX_SPAWN_DUP2, host_stdio.fileno(), 1),
               (os.POSIX_SPAWN_DUP2, host_stderr.fileno(), 2)]
    # Nothing else of ours: the spawner's --ready-fd pipe, above all, whose
    # end the spawner waits for.
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in inherited_fds()]
    try:
        pid = os.posix_spawn(argv[0], argv, dict(environ), file_actions=actions)
    except OSError:
        for end in (stdio, host_stdio, stderr, host_stderr):
            end.close()
        return None
    host_stdio.close()
    host_stderr.close()
    return EarlyHost(pid, stdio, stderr)
