"""
The MCP host, as the daemon supervises it: one C{python -m
hyperdaemon.mcp.host} process per daemon, which serves the MCP sessions of
every assistant of the user (see L{hyperdaemon.mcp.host}).

The daemon starts it on demand (the C{MCP_HOST} command of the health
protocol), or, when it was spawned for an MCP client, before it even
imports Twisted (L{hyperdaemon.daemon.hoststart}), so that the host's
imports overlap the daemon's own start and C{hyperd}'s: the supervisor then
adopts that process (L{_AdoptedHost}) and tells it its port.  The host says
C{READY} on its stdout once it accepts launchers on its socket; its stdin is
a pipe (or socket) from the daemon, so that it exits when the daemon dies,
even by SIGKILL.  A host that dies is replaced at once, within a
L{RestartBudget}; past it the daemon stops asking for one, and launchers
serve in their own process.  Its other output goes to the daemon's log.
"""

from __future__ import annotations

import os
import signal
import socket as _socket
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.process import registerReapProcessHandler, unregisterReapProcessHandler
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from hyperdaemon.daemon.hoststart import HOST_ARGV, EarlyHost
from hyperdaemon.daemon.supervisor import RestartBudget

# The launcher (standard library only) owns the names both ends agree on:
# the host's socket, in the state directory (0700; the host makes it 0600),
# and the variable a spawner sets to have the host started with the daemon.
from hyperdaemon.mcp.launcher import SOCKET_NAME, START_VAR

_log = Logger()

#: Seconds the host may take from spawn to C{READY}.
READY_TIMEOUT = 60.0
#: Seconds a stopping host gets to close its sessions before SIGKILL.
STOP_GRACE = 15.0


class McpHostUnavailable(Exception):
    """No host can serve now; C{str()} says why."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def resident_kb(pid: int) -> int | None:
    """A process's resident memory in kB (C{VmRSS}), or C{None} if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class _HostProcess(ProcessProtocol):
    """One spawned host: its READY line, its log lines, its end."""

    def __init__(self, supervisor: "McpHostSupervisor") -> None:
        self._supervisor = supervisor
        self.pid: int | None = None
        self.ready = False
        self.exit_reason: str | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._out = b""
        self._err = b""

    def makeConnection(self, transport: Any) -> None:
        self.pid = transport.pid
        super().makeConnection(transport)

    def outReceived(self, data: bytes) -> None:
        self._out += data
        while b"\n" in self._out:
            line, self._out = self._out.split(b"\n", 1)
            text = line.decode("utf-8", "replace").strip()
            if text == "READY" and not self.ready:
                self.ready = True
                self._supervisor._became_ready(self)
            elif text.startswith("SESSIONS "):
                self._supervisor._sessions_reported(self, text[len("SESSIONS "):])
            elif text:
                _log.info("mcp host[{pid}]: {line}", pid=self.pid, line=text)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        while b"\n" in self._err:
            line, self._err = self._err.split(b"\n", 1)
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                _log.info("mcp host[{pid}]: {line}", pid=self.pid, line=text)
        if len(self._err) > 65536:  # a line without end: log what came
            _log.info("mcp host[{pid}]: {line}", pid=self.pid,
                      line=self._err.decode("utf-8", "replace"))
            self._err = b""

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, error.ProcessTerminated) and value.signal is not None:
            self.exit_reason = f"killed by signal {value.signal}"
        else:
            self.exit_reason = f"exited with code {getattr(value, 'exitCode', None)}"
        self.ended.callback(None)
        self._supervisor._ended(self)

    def signal(self, signum: int) -> None:
        try:
            self.transport.signalProcess(signum)
        except (error.ProcessExitedAlready, OSError):
            pass


class _Stream(Protocol):
    """One of an adopted host's streams: what it says goes to C{received}."""

    def __init__(self, received: Any, lost: Any) -> None:
        self._received = received
        self._lost = lost

    def dataReceived(self, data: bytes) -> None:
        self._received(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost()


class _AdoptedHost:
    """
    The transport of a host started before the reactor
    (L{hyperdaemon.daemon.hoststart}), as C{spawnProcess} would give one:
    its streams are adopted as Unix socket connections, and Twisted's
    C{SIGCHLD} handling reaps it (L{registerReapProcessHandler}).  Its
    protocol hears of its end once it has exited and both streams have
    closed, as with a spawned process.
    """

    def __init__(self, reactor: Any, early: EarlyHost, process: ProcessProtocol) -> None:
        self.pid: int | None = early.pid
        self._process = process
        self._status: int | None = None
        self._open = 2
        self._stdio = _Stream(process.outReceived, self._stream_lost)
        self._stderr = _Stream(process.errReceived, self._stream_lost)
        try:
            for stream, end in ((self._stdio, early.stdio), (self._stderr, early.stderr)):
                factory = Factory.forProtocol(lambda s=stream: s)
                factory.noisy = False
                reactor.adoptStreamConnection(end.fileno(), _socket.AF_UNIX, factory)
        finally:
            early.close()  # adopting made copies
        process.makeConnection(self)
        registerReapProcessHandler(early.pid, self)

    def write(self, data: bytes) -> None:
        if self._stdio.transport is not None:
            self._stdio.transport.write(data)

    def closeStdin(self) -> None:
        if self._stdio.transport is not None:
            self._stdio.transport.loseWriteConnection()

    def signalProcess(self, signum: int) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        os.kill(self.pid, signum)

    # -- its end (Twisted's reaping calls these) --------------------------------

    def reapProcess(self) -> None:
        pid = self.pid
        if pid is None:
            return
        try:
            found, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            found, status = pid, 0
        if found:
            unregisterReapProcessHandler(pid, self)
            self.processEnded(status)

    def processEnded(self, status: int) -> None:
        self.pid = None
        self._status = status
        self._maybe_ended()

    def _stream_lost(self) -> None:
        self._open -= 1
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        status = self._status
        if status is None or self._open > 0:
            return
        self._status = None
        self._open = -1  # once
        if os.WIFSIGNALED(status):
            reason: Exception = error.ProcessTerminated(signal=os.WTERMSIG(status),
                                                        status=status)
        elif os.waitstatus_to_exitcode(status) != 0:
            reason = error.ProcessTerminated(exitCode=os.waitstatus_to_exitcode(status),
                                             status=status)
        else:
            reason = error.ProcessDone(status)
        self._process.processEnded(Failure(reason))


class McpHostSupervisor(Service):
    """
    Starts the host when asked (L{ensure}), replaces it when it dies
    (within C{budget}), and stops it with the daemon.
    """

    ready_timeout = READY_TIMEOUT
    stop_grace = STOP_GRACE

    def __init__(self, reactor: Any, state_dir: Path, daemon_port: int,
                 environ: dict[str, str] | None = None,
                 budget: RestartBudget | None = None,
                 argv: list[str] | None = None, early: EarlyHost | None = None) -> None:
        self._reactor = reactor
        self.state_dir = state_dir
        self.daemon_port = daemon_port
        self._environ = dict(os.environ if environ is None else environ)
        self._environ.pop(START_VAR, None)
        self._budget = budget if budget is not None else RestartBudget(limit=5, window=60.0)
        self._argv = argv or list(HOST_ARGV)
        #: A host started with the daemon, adopted when this service starts.
        self._early = early
        self._process: _HostProcess | None = None
        self._waiters: list[defer.Deferred[dict[str, Any]]] = []
        self._timeout: Any = None
        self.restarts = 0
        #: Why the daemon gave up on a host, once it has.
        self.gave_up: str | None = None
        #: The sessions the host last reported (its C{SESSIONS} lines).
        self.sessions: list[dict[str, Any]] = []

    @property
    def socket(self) -> Path:
        return socket_path(self.state_dir)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.exit_reason is None else None

    def facts(self) -> dict[str, Any]:
        return {"pid": self.pid, "socket": str(self.socket)}

    def startService(self) -> None:
        super().startService()
        early, self._early = self._early, None
        if early is not None:
            self._adopt(early)

    def discard_early(self) -> None:
        """The daemon stops before it ran its children: kill the host started with it."""
        early, self._early = self._early, None
        if early is not None:
            early.discard()

    def _adopt(self, early: EarlyHost) -> None:
        process = _HostProcess(self)
        self._process = process
        try:
            transport = _AdoptedHost(self._reactor, early, process)
        except Exception:
            _log.failure("could not adopt the MCP host started with the daemon")
            self._process = None
            early.discard()
            return
        # Now it may listen: this daemon runs, on this port.
        transport.write(f"PORT {self.daemon_port}\n".encode())
        _log.info("the MCP host (pid {pid}) started with the daemon", pid=process.pid)
        self._timeout = self._reactor.callLater(self.ready_timeout, self._not_ready, process)

    # -- asking for it --------------------------------------------------------

    def ensure(self) -> defer.Deferred[dict[str, Any]]:
        """
        The running host's facts (C{pid}, C{socket}) once it accepts
        launchers: a host is started if none runs.  Fails with
        L{McpHostUnavailable} if the restart budget is spent, the daemon is
        stopping, or the host does not become ready in time.
        """
        if not self.running:
            return defer.fail(McpHostUnavailable("the daemon is stopping"))
        if self.gave_up is not None:
            return defer.fail(McpHostUnavailable(self.gave_up))
        process = self._process
        if process is not None and process.ready and process.exit_reason is None:
            return defer.succeed(self.facts())
        waiter: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiters.append(waiter)
        if process is None:
            self._spawn()
        return waiter

    def _spawn(self) -> None:
        argv = [*self._argv, "--state-dir", str(self.state_dir),
                "--daemon-port", str(self.daemon_port)]
        process = _HostProcess(self)
        self._process = process
        try:
            self._reactor.spawnProcess(process, argv[0], argv, env=self._environ, path="/",
                                       childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            self._process = None
            self._fail_waiters(f"the MCP host could not be started: {e.strerror or e}")
            return
        _log.info("started the MCP host (pid {pid})", pid=process.pid)
        self._timeout = self._reactor.callLater(self.ready_timeout, self._not_ready, process)

    def _not_ready(self, process: _HostProcess) -> None:
        self._timeout = None
        if process is self._process and not process.ready:
            _log.warn("the MCP host (pid {pid}) was not ready within {seconds:g} s; killing it",
                      pid=process.pid, seconds=self.ready_timeout)
            process.signal(signal.SIGKILL)

    def _fail_waiters(self, reason: str) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(McpHostUnavailable(reason))

    # -- its events -------------------------------------------------------------

    def _became_ready(self, process: _HostProcess) -> None:
        if process is not self._process:
            return
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        _log.info("the MCP host (pid {pid}) accepts launchers on {socket}", pid=process.pid,
                  socket=str(self.socket))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.facts())

    def _sessions_reported(self, process: _HostProcess, text: str) -> None:
        import json

        if process is not self._process:
            return
        try:
            sessions = json.loads(text)
        except ValueError:
            return
        if isinstance(sessions, list):
            self.sessions = [s for s in sessions if isinstance(s, dict)]

    def _ended(self, process: _HostProcess) -> None:
        if process is not self._process:
            return
        self._process = None
        self.sessions = []
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if not self.running:
            return
        _log.warn("the MCP host (pid {pid}) {reason}", pid=process.pid,
                  reason=process.exit_reason)
        if not self._budget.spend(self._reactor.seconds()):
            self.gave_up = (f"the MCP host died {self._budget.limit} times within "
                            f"{self._budget.window:g} s; launchers serve in their own process")
            _log.error("{reason}", reason=self.gave_up)
            self._fail_waiters(self.gave_up)
            return
        self.restarts += 1
        self._spawn()

    # -- lifetime ---------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop the host: its stdin closes (it closes its sessions and exits),
        SIGTERM, and SIGKILL if it is still there L{stop_grace} seconds
        later.  Fires once it has exited.
        """
        super().stopService()
        self._fail_waiters("the daemon is stopping")
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        process = self._process
        if process is None or process.exit_reason is not None:
            return defer.succeed(None)
        try:
            process.transport.closeStdin()
        except Exception:
            pass
        process.signal(signal.SIGTERM)
        killer = self._reactor.callLater(self.stop_grace, process.signal, signal.SIGKILL)
        ended = defer.Deferred()

        def gone(_: object) -> None:
            if killer.active():
                killer.cancel()
            ended.callback(None)

        process.ended.addBoth(gone)
        return ended

    def status(self) -> dict[str, Any]:
        """The C{mcp_host} object of C{STATUS}."""
        pid = self.pid
        return {
            "pid": pid,
            "socket": str(self.socket),
            "state": ("failed" if self.gave_up else "ready" if self._process is not None
                      and self._process.ready and pid else "starting" if pid else "stopped"),
            "restarts": self.restarts,
            "rss_kb": resident_kb(pid) if pid else None,
            "sessions": list(self.sessions),
        }
