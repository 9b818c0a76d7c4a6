"""
Processes, C{/proc}, ports and temporary sandboxes, and the L{Reaper} that
makes sure every process the benchmark started is gone at the end.

Every child gets a marker variable in its environment (the daemons a client
spawns, their C{hyperd}s and the MCP servers inherit it), so that the final
sweep finds them by reading C{/proc/PID/environ}, whoever their parent is.
Waiting is always for a condition, with a bound.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

MARKER = "HYPERDAEMON_BENCHMARK"
#: The daemons' real port range: never used here.
RESERVED_PORTS = range(7485, 7501)
#: Variables of the daemons and clients that must never leak in from the
#: caller's environment (they could point at the user's real state).
SCRUBBED = (
    "HYPERDB_DAEMON_PORT", "HYPERDB_DAEMON_PORT_RANGE", "HYPERDB_STATE_DIR",
    "HYPERDB_PERSISTENT_DB", "HYPERDB_DAEMON_IDLE_TIMEOUT", "HYPERD_PATH", "XDG_DATA_HOME",
    "TMPDIR",
    # Our processes run as installed, with their bytecode cached (cli.py
    # compiles it first), not recompiled at every start.
    "PYTHONDONTWRITEBYTECODE",
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A measure could not be taken; C{str()} says why."""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.002) -> Any:
    """Poll C{predicate} until it returns something true; L{BenchError} after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# -- /proc ---------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie does not count)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cpu_seconds(pid: int) -> float:
    """
    CPU time of C{pid}, all its threads, not its children: from each
    thread's C{schedstat} (nanoseconds) where the kernel has it, else
    C{utime + stime} from C{/proc/PID/stat} (clock ticks, 10 ms apart).
    """
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    fields = _stat_fields(pid)
    if fields is None:
        raise BenchError(f"process {pid} is gone")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """C{VmRSS} of C{pid} (or another field of its status: C{VmHWM}, the peak); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def pss_bytes(pid: int) -> int:
    """C{Pss} of C{pid} (shared pages divided among their users); 0 if gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def private_bytes(pid: int) -> int:
    """C{Private_Clean} + C{Private_Dirty} of C{pid} (pages no other process maps); 0 if gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def is_mcp_host(pid: int) -> bool:
    """Whether C{pid} is our MCP host (L{hyperdaemon.mcp.host})."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"hyperdaemon.mcp.host" in f.read().split(b"\0")
    except OSError:
        return False


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] not in ("Z", "X"):
                parents[int(entry)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """The live descendants of C{pid} (children, their children, ...)."""
    parents = _parents()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found.append(child)
                frontier.append(child)
    return found


def children_running(pid: int, program: str) -> list[int]:
    """
    The live children of C{pid} whose executable is named C{program} (by
    C{/proc/PID/exe}: hyperd renames its main thread, so C{comm} will not do).
    """
    found = []
    for child, parent in _parents().items():
        if parent != pid:
            continue
        try:
            if os.path.basename(os.readlink(f"/proc/{child}/exe")) == program:
                found.append(child)
        except OSError:
            pass
    return found


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has C{name=value}."""
    needle = f"{name}={value}".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        if pid_alive(int(entry)):
            found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait, without polling, until C{pid} has exited; C{False} on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return not pid_alive(pid)
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                return True
    finally:
        os.close(fd)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- ports ---------------------------------------------------------------------

def free_port() -> int:
    """A port nothing listens on now, never one of the daemon's real range."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def free_range(count: int) -> tuple[int, int]:
    """C{count} consecutive free ports, in 20000-30000 (below the ephemeral range)."""
    while True:
        first = random.randrange(20000, 30000 - count)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return first, first + count - 1


# -- the reaper and the sandboxes -----------------------------------------------

class Reaper:
    """Starts processes with the marker; at the end, stops whatever still runs."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        self.popens: list[subprocess.Popen[Any]] = []
        self.root = Path(tempfile.mkdtemp(prefix="hyperdaemon-bench-"))

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env[MARKER] = self.marker
        return env

    def popen(self, argv: Sequence[str], env: Mapping[str, str], *,
              stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.DEVNULL,
              stderr: Any = subprocess.DEVNULL, **kwargs: Any) -> subprocess.Popen[Any]:
        if env.get(MARKER) != self.marker:
            raise ValueError("every child must carry the benchmark's marker")
        proc = subprocess.Popen(list(argv), env=dict(env), stdin=stdin, stdout=stdout,
                                stderr=stderr, **kwargs)
        self.popens.append(proc)
        return proc

    def sandbox(self, name: str, ports: int = 3) -> "Sandbox":
        return Sandbox(self, Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root)), ports)

    def marked(self) -> list[int]:
        return pids_with_env(MARKER, self.marker)

    def cleanup(self, timeout: float = 15.0) -> dict[int, str]:
        """
        Kill every process still running that the benchmark started, and
        wait until they are gone; the ones that would not go (pid: command).
        """
        for proc in self.popens:
            if proc.poll() is None:
                kill(proc.pid)
        for pid in self.marked():
            for child in descendants(pid):
                kill(child)
            kill(pid)
        for proc in self.popens:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        deadline = time.monotonic() + timeout
        left = self.marked()
        while left and time.monotonic() < deadline:
            for pid in left:
                kill(pid)
            time.sleep(0.05)
            left = self.marked()
        return {pid: cmdline(pid) for pid in left}


class Sandbox:
    """
    A fresh state directory, persistent database, XDG data folder, log
    folder and port range for one daemon or group of clients.
    """

    def __init__(self, reaper: Reaper, path: Path, ports: int) -> None:
        self.reaper = reaper
        self.path = path
        self.state = path / "state"
        self.persistent = path / "persistent.hyper"
        self.logs = path / "bench-logs"
        self.logs.mkdir()
        #: TMPDIR of every process here: what they leave in /tmp is removed with the sandbox.
        self.tmp = path / "tmp"
        self.tmp.mkdir()
        first, last = free_range(ports)
        self.ports = range(first, last + 1)

    @property
    def record_path(self) -> Path:
        return self.state / "daemon.json"

    def env(self, **extra: str) -> dict[str, str]:
        env = self.reaper.base_env()
        env.update(
            HYPERDB_STATE_DIR=str(self.state),
            HYPERDB_PERSISTENT_DB=str(self.persistent),
            XDG_DATA_HOME=str(self.path / "xdg-data"),
            HYPERDB_DAEMON_PORT_RANGE=f"{self.ports[0]}-{self.ports[-1]}",
            TMPDIR=str(self.tmp),
        )
        env.update(extra)
        return env

    def log(self, name: str) -> IO[bytes]:
        return open(self.logs / name, "ab")
