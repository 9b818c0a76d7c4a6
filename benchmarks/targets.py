"""
The two daemons under test, behind one interface: how to start each one
(as a daemon, as an MCP server), where to find its C{hyperd} and its
credentials, and how to stop it.

Ours: C{python -m hyperdaemon} with this interpreter; C{STATUS} has
C{hyperd_pid} and the password.  Theirs (upstream): C{hyperdb-mcp} from the
peer package with its own C{hyperd}; its C{hyperd} runs without a password
and its C{STATUS} has no C{hyperd_pid}, so that is found in C{/proc}.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .pinger import ping_once
from .procs import (
    BenchError,
    Sandbox,
    children_running,
    descendants,
    kill,
    pid_alive,
    wait_for,
    wait_pid_gone,
)

#: Bound for a daemon and its hyperd to become ready.
READY_TIMEOUT = 60.0
#: Bound for a daemon to stop after STOP (upstream takes about 5 s).
STOP_TIMEOUT = 30.0
HYPERD_USER = "tableau_internal_user"


def ask(port: int, command: str, timeout: float = 5.0) -> str:
    """One command on a fresh connection; its reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(command.encode() + b"\n")
        data = b""
        while b"\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"port {port} closed the connection")
            data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")


def answers_ping(port: int) -> bool:
    try:
        ping_once(port, timeout=1.0)
        return True
    except OSError:
        return False


def query_works(endpoint: str | None, password: str | None, timeout: int = 2) -> bool:
    """Whether C{SELECT 1} runs over libpq on C{endpoint}."""
    import psycopg

    if not endpoint:
        return False
    host, _, port = endpoint.rpartition(":")
    kwargs: dict[str, Any] = dict(host=host, port=int(port), user=HYPERD_USER,
                                  autocommit=True, connect_timeout=timeout)
    if password:
        kwargs["password"] = password
    try:
        with psycopg.connect(**kwargs) as conn:
            return conn.execute("SELECT 1").fetchone()[0] == 1
    except (psycopg.Error, OSError):
        return False


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Target:
    """One implementation of the daemon."""

    name: str
    #: Whether the health protocol has our SESSION command.
    sessions: bool

    def version(self) -> str:
        raise NotImplementedError

    def daemon_argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def env(self, sandbox: Sandbox, port: int | None = None) -> dict[str, str]:
        """The environment of a daemon, client or MCP server in C{sandbox}
        (C{port} pins the daemon's health port)."""
        raise NotImplementedError

    def mcp_command(self, no_daemon: bool = False) -> tuple[str, list[str]]:
        raise NotImplementedError

    def hyperd_pid(self, daemon: "Daemon") -> int | None:
        raise NotImplementedError

    def endpoint(self, daemon: "Daemon") -> tuple[str | None, str | None]:
        """The hyperd endpoint and password the daemon publishes now."""
        raise NotImplementedError


class Ours(Target):
    name = "ours"
    sessions = True

    def version(self) -> str:
        import hyperdaemon

        return hyperdaemon.__version__

    def daemon_argv(self, port: int) -> list[str]:
        return [sys.executable, "-m", "hyperdaemon", "daemon", "--port", str(port),
                "--idle-timeout", "0"]

    def env(self, sandbox: Sandbox, port: int | None = None) -> dict[str, str]:
        extra = {"HYPERDB_DAEMON_PORT": str(port)} if port is not None else {}
        return sandbox.env(**extra)

    def mcp_command(self, no_daemon: bool = False) -> tuple[str, list[str]]:
        return sys.executable, ["-m", "hyperdaemon", *(["--no-daemon"] if no_daemon else [])]

    def hyperd_pid(self, daemon: "Daemon") -> int | None:
        pid = daemon.status().get("hyperd_pid")
        return pid if isinstance(pid, int) else None

    def endpoint(self, daemon: "Daemon") -> tuple[str | None, str | None]:
        # As our clients do: STATUS has the endpoint and the password.
        try:
            facts = daemon.status()
        except (OSError, ValueError):
            return None, None
        if facts.get("state") != "ready":
            return None, None
        return facts.get("hyperd_endpoint"), facts.get("hyperd_password")


class Theirs(Target):
    name = "theirs"
    sessions = False

    def __init__(self, package: Path) -> None:
        self.package = package
        self.executable = package / "hyperdb-mcp"

    def version(self) -> str:
        out = subprocess.run([str(self.executable), "--version"], capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL)
        return out.stdout.strip() or out.stderr.strip()

    def daemon_argv(self, port: int) -> list[str]:
        # A long idle timeout rather than 0, whose meaning upstream does not document.
        return [str(self.executable), "daemon", "--port", str(port), "--idle-timeout", "86400"]

    def env(self, sandbox: Sandbox, port: int | None = None) -> dict[str, str]:
        # Upstream has no port range: HYPERDB_DAEMON_PORT is its base port.
        return sandbox.env(HYPERD_PATH=str(self.package / "hyperd"),
                           HYPERDB_DAEMON_PORT=str(port if port is not None
                                                   else sandbox.ports[0]))

    def mcp_command(self, no_daemon: bool = False) -> tuple[str, list[str]]:
        return str(self.executable), (["--no-daemon"] if no_daemon else [])

    def hyperd_pid(self, daemon: "Daemon") -> int | None:
        found = children_running(daemon.pid, "hyperd")
        return found[0] if found else None

    def endpoint(self, daemon: "Daemon") -> tuple[str | None, str | None]:
        # Upstream's clients read daemon.json; its hyperd has no password.
        record = read_record(daemon.sandbox.record_path)
        if record is None:
            return None, None
        return record.get("hyperd_endpoint"), record.get("hyperd_password")


class Daemon:
    """
    A daemon of either target: one we start (C{start}), or one a client
    spawned (L{adopt}, from its C{daemon.json}).
    """

    def __init__(self, target: Target, sandbox: Sandbox, port: int | None = None) -> None:
        self.target = target
        self.sandbox = sandbox
        self.port = port if port is not None else sandbox.ports[0]
        self.proc: subprocess.Popen[Any] | None = None
        self._pid: int | None = None
        self.started_at: float | None = None

    @classmethod
    def adopt(cls, target: Target, sandbox: Sandbox) -> "Daemon | None":
        """The daemon that C{sandbox}'s C{daemon.json} names, if any."""
        record = read_record(sandbox.record_path)
        if record is None or not isinstance(record.get("pid"), int):
            return None
        daemon = cls(target, sandbox, int(record["health_port"]))
        daemon._pid = record["pid"]
        return daemon

    @property
    def pid(self) -> int:
        if self.proc is not None:
            return self.proc.pid
        assert self._pid is not None
        return self._pid

    def start(self) -> "Daemon":
        env = self.target.env(self.sandbox, self.port)
        with self.sandbox.log(f"daemon-{self.port}.log") as log:
            self.started_at = time.perf_counter()
            self.proc = self.sandbox.reaper.popen(
                self.target.daemon_argv(self.port), env, stdout=log, stderr=log,
            )
        return self

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the {self.target.name} daemon exited with "
                             f"{self.proc.returncode}; see {self.sandbox.logs}")

    def status(self) -> dict[str, Any]:
        return json.loads(ask(self.port, "STATUS"))

    def query_works(self) -> bool:
        return query_works(*self.target.endpoint(self))

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until it answers PING and a query works on its hyperd."""
        def ready() -> bool:
            self.check_running()
            return answers_ping(self.port) and self.query_works()

        wait_for(ready, timeout, f"the {self.target.name} daemon to be ready", interval=0.01)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """STOP it and wait until it has exited; kill it (and its hyperd) if it will not."""
        hyperds = descendants(self.pid) if pid_alive(self.pid) else []
        try:
            ask(self.port, "STOP")
        except OSError:
            pass
        if not wait_pid_gone(self.pid, timeout):
            kill(self.pid)
            wait_pid_gone(self.pid, 5.0)
        if self.proc is not None:
            self.proc.wait(5.0)
        for pid in hyperds:
            if not wait_pid_gone(pid, 10.0):
                kill(pid)
