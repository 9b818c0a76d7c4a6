"""
The daemon as one Twisted service: the health port, the C{hyperd}
supervisor, the idle timer and the session registry, and the one graceful
shutdown path that C{STOP}, SIGTERM, SIGINT, idleness and a failed C{hyperd}
all take.

Start-up order is the single-instance lock of SPEC.md: the health port is
bound in C{privilegedStartService} (a busy port fails there, loudly), then
C{hyperd} starts; C{daemon.json} is written each time a C{hyperd} answers
queries.  Shutdown order: stop listening (the port is free at once), stop
C{hyperd}, remove C{daemon.json} if it still names this daemon.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.application import strports
from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher

from hyperdaemon import __version__, peeruid
from hyperdaemon.config import HYPERD_USER
from hyperdaemon.discovery import (
    DISCOVERY_NAME,
    HYPERD_LOGS_NAME,
    CorruptDiscovery,
    DaemonRecord,
    read_record,
    remove_record,
    remove_record_if_owned,
    write_record,
)
from hyperdaemon.daemon.idle import IdleTimer
from hyperdaemon.logs import open_daemon_log
from hyperdaemon.daemon.protocol import Authorizer, HealthFactory
from hyperdaemon.daemon.sessions import (
    SESSIONS_NAME,
    DatabaseInUse,
    Session,
    SessionRegistry,
    drop_database,
    pid_alive,
    remove_session_folder,
    session_folder,
    sweep_orphans,
)
from hyperdaemon.daemon.hoststart import EarlyHost
from hyperdaemon.daemon.mcphost import McpHostSupervisor
from hyperdaemon.daemon.supervisor import HyperdInstance, HyperdSupervisor

# The name its lines have always had in daemon.log.
_log = Logger(namespace="hyperdaemon.daemon")

#: Version of the session commands this daemon speaks (1: SESSION, READY,
#: BYE; 2: RELEASE too; 3: NAME too; 4: MCP_HOST, and SESSION's
#: keep_while_owner_lives); clients look for it in STATUS before they rely
#: on them.
SESSION_PROTOCOL = 4


def _own_daemon_among(ports: tuple[int, ...]) -> int | None:
    """
    The first of C{ports} where a daemon of this user answers (blocking).
    A daemon-shaped answer from a port another user holds does not count
    (L{probe_port} checks the owner); such a port is logged and skipped.
    """
    from hyperdaemon.client.healthclient import PortState, log_skipped, probe_port

    for port in ports:
        # Generous: a daemon that has bound its port may not answer until its
        # reactor runs, which takes a while on a loaded machine.
        found = probe_port(port, timeout=5.0)
        if found.state is PortState.DAEMON:
            return port
        if found.state is PortState.OTHER_USER:
            log_skipped(found)
    return None


def _serves_state_dir(record: DaemonRecord, state_dir: Path) -> bool:
    """
    Whether the daemon that C{record} (read from C{state_dir}'s
    C{daemon.json}) names is alive: a daemon of this user answers on its
    health port with that pid and that state directory (blocking).
    """
    from hyperdaemon.client.healthclient import DaemonError, PortState, probe_port, status

    if probe_port(record.health_port, timeout=5.0).state is not PortState.DAEMON:
        return False
    try:
        facts = status(record.health_port)
    except (OSError, DaemonError):
        return False
    # An upstream daemon does not say where its state is.
    return facts.get("pid") == record.pid and facts.get("state_dir", str(state_dir)) == str(state_dir)


#: The backoff step whose delay (1.6 s) paces the checks that the owner of
#: a held session's database still lives.
OWNER_CHECK_ATTEMPT = 4


class StartupError(Exception):
    """The daemon cannot start; C{str()} is one sentence with the fix."""


#: Connections the kernel queues before the daemon accepts them.  Twisted's
#: default (50) overflows when many clients start at once, and each client
#: whose SYN is dropped waits a second for its retry.
LISTEN_BACKLOG = 1024


@attrs.frozen
class DaemonSettings:
    """Everything a daemon needs to know, already resolved and checked."""

    port: int
    state_dir: Path
    logs_dir: Path
    idle_timeout: float
    hyperd: Path
    compat: bool = False
    #: Ports of the range below C{port} that were busy when it was chosen:
    #: a daemon of this user that was still starting may answer there, and
    #: then this one yields (the lowest port wins a race).
    lower_ports: tuple[int, ...] = ()
    #: A pipe to the process that spawned this daemon: it is told
    #: C{READY <port>}, C{EXISTS <port>} or C{ERROR <reason>}, once.
    ready_fd: int | None = None
    #: Start the MCP host at once, with C{hyperd} (the daemon was spawned
    #: for an MCP client); otherwise it starts on the first C{MCP_HOST}.
    mcp_host: bool = False

    @property
    def sessions_dir(self) -> Path:
        return self.state_dir / SESSIONS_NAME


class AlreadyRunning(StartupError):
    """A daemon of this user already answers on C{port}."""

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.port = port


def tell_spawner(fd: int | None, line: str) -> None:
    """Write C{line} to the spawner's pipe and close it; a gone spawner is fine."""
    if fd is None:
        return
    try:
        os.write(fd, line.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


class DaemonService(MultiService):
    """
    One daemon.  C{on_shutdown} is called once when the daemon decides to
    stop (the entry points pass C{reactor.stop}, whose shutdown trigger then
    calls L{stopService}); C{exit_code} and C{stop_reason} say why.
    """

    version = __version__

    #: A dead session's database that C{hyperd} still reports in use is
    #: dropped again after C{drop_retry_first} seconds, then after twice as
    #: long each time up to C{drop_retry_max}, for as long as the daemon
    #: runs; and at once whenever a session attaches or ends.
    drop_retry_first = 0.1
    drop_retry_max = 5.0
    #: Seconds of "in use" after which the daemon says so in its log (once).
    drop_patience = 10.0

    def __init__(
        self,
        reactor: Any,
        settings: DaemonSettings,
        on_shutdown: Callable[[], None],
        install_signal_handlers: bool = False,
        authorize: Authorizer = peeruid.same_user,
        early_host: EarlyHost | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.settings = settings
        self._on_shutdown = on_shutdown
        self._install_signal_handlers = install_signal_handlers
        self.sessions = SessionRegistry()
        self.health = strports.service(
            f"tcp:{settings.port}:interface=127.0.0.1:backlog={LISTEN_BACKLOG}",
            HealthFactory(self, authorize, reactor),
            reactor=reactor,
        )
        self.health.setServiceParent(self)
        self.supervisor = HyperdSupervisor(
            reactor,
            settings.hyperd,
            settings.logs_dir / HYPERD_LOGS_NAME,
            settings.compat,
            on_ready=self._hyperd_ready,
            on_give_up=self._hyperd_gave_up,
        )
        self.mcp_host = McpHostSupervisor(reactor, settings.state_dir, settings.port,
                                          early=early_host)
        self.idle = IdleTimer(reactor, settings.idle_timeout, lambda: len(self.sessions), self._idled)
        self.idle.setServiceParent(self)
        self.sessions.on_change.append(self.idle.touch)
        # hyperd is probed only while sessions use it: an idle daemon sleeps.
        # Unwatched, a hung hyperd is found when a client reports it.
        self.supervisor.watch(False)
        self.sessions.on_change.append(lambda: self.supervisor.watch(len(self.sessions) > 0))
        self.exit_code = 0
        self.stop_reason: str | None = None
        self.started_at = ""
        self._started = 0.0
        self._shutting_down = False
        self._stopping: defer.Deferred[None] | None = None
        self._log_observer: Any = None
        self._logfile: Any = None
        self._ready_fd = settings.ready_fd
        self._ready_waiters: list[defer.Deferred[dict[str, Any]]] = []
        self._cleanups: set[defer.Deferred[None]] = set()
        #: Sessions that ended without BYE whose database and folder are
        #: not yet gone, by id.
        self._pending_drops: dict[str, Session] = {}
        #: The waits between drop attempts; cancelling one retries at once.
        self._drop_waits: set[defer.Deferred[None]] = set()
        #: Sessions opened for another process (an MCP host's launcher):
        #: their database is kept while that process lives, for it to
        #: attach again through a new host.
        self._owner_held: set[str] = set()
        self.sessions.on_change.append(self._retry_drops_now)

    # -- lifetime -----------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Bind the health port: the single-instance lock.

        @raise StartupError: if the port is taken.
        """
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise StartupError(
                f"Cannot listen on 127.0.0.1:{self.settings.port} ({e.socketError}); "
                f"another daemon may have just started there: see "
                f"'hyperdb-mcp daemon status --port {self.settings.port}'."
            ) from None

    def startService(self) -> None:
        self._log_observer, self._logfile = open_daemon_log(self.settings.logs_dir)
        globalLogPublisher.addObserver(self._log_observer)
        self.started_at = datetime.now(timezone.utc).isoformat()
        self._started = self._reactor.seconds()
        super().startService()
        _log.info(
            "hyperdaemon {version} (pid {pid}) answering on 127.0.0.1:{port}; "
            "state in {state_dir}",
            version=self.version, pid=os.getpid(), port=self.settings.port,
            state_dir=str(self.settings.state_dir),
        )
        if self.settings.compat:
            _log.warn(
                "--compat: hyperd accepts any local user without a password: anyone on "
                "this machine can read and change every database it has open, and read "
                "and write files as this user through COPY; use --compat only where no "
                "one else has an account",
            )
        if self._install_signal_handlers:
            # After the reactor's own handlers, which would exit by signal.
            self._reactor.callWhenRunning(self._handle_signals)
        self._sweep()
        record = self._read_own_record()
        if record is None or record.health_port == self.settings.port:
            self._check_lower_ports()
            return
        # daemon.json names another daemon: if it still runs there, this
        # state directory is taken (its file is not ours to overwrite).
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                              _serves_state_dir, record, self.settings.state_dir)
        d.addErrback(lambda f: _log.failure("checking {path} failed", f,
                                            path=str(self.settings.state_dir / DISCOVERY_NAME))
                     or False)
        d.addCallback(lambda alive: self._refuse_state_dir(record.health_port) if alive
                      else self._check_lower_ports())

    def _read_own_record(self) -> DaemonRecord | None:
        """
        C{daemon.json} as this daemon starts.  Anything there that is not a
        record (a directory, a FIFO, a link, garbage) is removed if it is
        this user's to remove, or reported.
        """
        path = str(self.settings.state_dir / DISCOVERY_NAME)
        try:
            return read_record(self.settings.state_dir)
        except CorruptDiscovery as e:
            if remove_record(self.settings.state_dir):
                _log.warn("removed {path}, which was not a discovery record ({problem})",
                          path=path, problem=e)
            else:
                _log.error("{path} is not a discovery record ({problem}) and cannot be "
                           "removed: remove it, or clients will not find this daemon "
                           "through it", path=path, problem=e)
            return None

    def _sweep(self) -> None:
        """Remove the session folders of clients that are gone; say what else is there."""
        sweep = sweep_orphans(self.settings.sessions_dir, pid_alive)
        for folder in sweep.removed:
            _log.info("removed {folder}, left by a client that is gone", folder=str(folder))
        for folder in sweep.ignored:
            _log.warn("ignored {folder}: not a session folder (<pid>-...)", folder=str(folder))
        for folder, error in sweep.failed:
            _log.warn("could not remove {folder}, left by a client that is gone: {error}",
                      folder=str(folder), error=error)

    def _refuse_state_dir(self, port: int) -> None:
        if self._shutting_down:
            return
        tell_spawner(self._ready_fd, f"EXISTS {port}")
        self._ready_fd = None
        self.shutdown(
            f"another hyperdb-mcp daemon already uses the state directory "
            f"{self.settings.state_dir}, on port {port}: use it, stop it with "
            f"'hyperdb-mcp daemon stop --port {port}', or give this one its own --state-dir",
            exit_code=1,
        )

    def _check_lower_ports(self) -> None:
        if self._shutting_down:
            return
        if self.settings.lower_ports:
            d = deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), _own_daemon_among,
                self.settings.lower_ports,
            )
            d.addCallback(self._yield_or_start)
            d.addErrback(lambda f: _log.failure("checking lower ports failed", f)
                         or self._yield_or_start(None))
        else:
            self._start_children()

    def _start_children(self) -> None:
        """Start hyperd, and the MCP host with it when a launcher spawned us."""
        self.supervisor.startService()
        self.mcp_host.startService()
        if self.settings.mcp_host:
            self.mcp_host.ensure().addErrback(
                lambda f: _log.warn("no MCP host: {reason}", reason=f.getErrorMessage()))

    def _yield_or_start(self, port: int | None) -> None:
        if self._shutting_down:
            return
        if port is None:
            self._start_children()
            return
        tell_spawner(self._ready_fd, f"EXISTS {port}")
        self._ready_fd = None
        self.shutdown(f"a daemon of this user already runs on port {port}", exit_code=1)

    def _handle_signals(self) -> None:
        def handler(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            self._reactor.callFromThread(self.shutdown, f"received {name}")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def shutdown(self, reason: str, exit_code: int = 0) -> None:
        """Begin the graceful shutdown, once, for C{reason}."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self.stop_reason = reason
        self.exit_code = exit_code
        _log.info("stopping: {reason}", reason=reason)
        self._retry_drops_now()  # the waiting drops give up their turn
        tell_spawner(self._ready_fd, f"ERROR {reason}")
        self._ready_fd = None
        for waiter in self._ready_waiters:
            waiter.errback(Exception(f"the daemon is stopping: {reason}"))
        self._ready_waiters = []
        self._on_shutdown()

    def stopService(self) -> defer.Deferred[None]:
        if self._stopping is None:
            Service.stopService(self)
            self._stopping = defer.ensureDeferred(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        await defer.maybeDeferred(self.health.stopService)
        self.mcp_host.discard_early()  # started with the daemon, which never ran it
        self.idle.stopService()
        if self.mcp_host.running:
            # Before hyperd: the host's sessions drop their databases.
            await self.mcp_host.stopService()
        if self.supervisor.running:
            await self.supervisor.stopService()
        # With hyperd gone, nothing has the sessions' databases open.
        if self._cleanups:
            await defer.DeferredList(list(self._cleanups))
        # Each step below is logged and passed if it fails (a read-only or
        # full state directory): the shutdown always runs to its end.
        for session in [*self.sessions, *self._pending_drops.values()]:
            if session.ephemeral_db:
                folder = Path(session.ephemeral_db).parent
                try:
                    remove_session_folder(folder)
                except OSError as e:
                    _log.warn("could not remove {folder}: {error}", folder=str(folder),
                              error=e.strerror or str(e))
        path = str(self.settings.state_dir / DISCOVERY_NAME)
        try:
            if remove_record_if_owned(self.settings.state_dir, os.getpid(), self.settings.port):
                _log.info("removed {path}", path=path)
        except OSError as e:
            _log.error("could not remove {path}: {error}; clients will find it stale and "
                       "remove it", path=path, error=e.strerror or str(e))
        _log.info("stopped")
        if self._log_observer is not None:
            globalLogPublisher.removeObserver(self._log_observer)
            self._logfile.close()
            self._log_observer = None

    # -- events -------------------------------------------------------------

    def _hyperd_ready(self, instance: HyperdInstance) -> None:
        tell_spawner(self._ready_fd, f"READY {self.settings.port}")
        self._ready_fd = None
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(self._credentials(instance))
        record = DaemonRecord(
            pid=os.getpid(),
            hyperd_endpoint=instance.endpoint,
            health_port=self.settings.port,
            started_at=self.started_at,
            version=self.version,
            hyperd_user=instance.user,
            hyperd_password=instance.password,
        )
        try:
            write_record(self.settings.state_dir, record)
        except OSError as e:
            _log.error(
                "cannot write the discovery file in {state_dir}: {error}",
                state_dir=str(self.settings.state_dir), error=e.strerror,
            )
            self._withdraw_record()
            return
        _log.info("published hyperd {endpoint} in daemon.json", endpoint=instance.endpoint)

    def _withdraw_record(self) -> None:
        """
        Remove this daemon's C{daemon.json}, which names a C{hyperd} that is
        gone (its new one could not be published): no client may trust the
        old endpoint and password.
        """
        path = str(self.settings.state_dir / DISCOVERY_NAME)
        try:
            removed = remove_record_if_owned(self.settings.state_dir, os.getpid(),
                                             self.settings.port)
        except OSError as e:
            _log.error("could not remove the stale {path} either: {error}; clients will find "
                       "its hyperd gone and remove it", path=path, error=e.strerror or str(e))
            return
        if removed:
            _log.warn("removed the stale {path}: clients find this daemon by its port "
                      "until the file can be written again", path=path)

    def _hyperd_gave_up(self, reason: str) -> None:
        self.shutdown(reason, exit_code=1)

    def _idled(self) -> None:
        self.shutdown(f"idle for {self.settings.idle_timeout:g} s")

    # -- HealthTarget -------------------------------------------------------

    def touch(self) -> None:
        self.idle.touch()

    def stop(self) -> None:
        self._reactor.callLater(0, self.shutdown, "STOP command")

    def report_hyperd_error(self) -> None:
        # A check, not a kill: hyperd is replaced only if it is hung or gone.
        self.supervisor.check_now()

    def _credentials(self, instance: HyperdInstance) -> dict[str, Any]:
        return {
            "hyperd_endpoint": instance.endpoint,
            "hyperd_user": instance.user,
            "hyperd_password": instance.password,
        }

    def when_ready(self) -> defer.Deferred[dict[str, Any]]:
        """
        hyperd's credentials once it is usable: a hyperd that has not shown
        a sign of life lately (the daemon does not probe while no session is
        attached) is checked first, and a hung one replaced
        (L{HyperdSupervisor.when_usable}); a new hyperd's as soon as it is
        ready.
        """
        if self._shutting_down:
            return defer.fail(Exception(f"the daemon is stopping: {self.stop_reason}"))
        waiter: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._ready_waiters.append(waiter)

        def usable(instance: HyperdInstance) -> None:
            if waiter in self._ready_waiters:
                self._ready_waiters.remove(waiter)
                waiter.callback(self._credentials(instance))

        # If the supervisor gives up or stops, shutdown() answers the waiter.
        self.supervisor.when_usable().addCallbacks(usable, lambda _: None)
        return waiter

    def attach_session(self, fields: dict[str, Any]) -> tuple[str, defer.Deferred[dict[str, Any]]]:
        pid, name, ephemeral = fields.get("pid"), fields.get("name"), fields.get("ephemeral_db")
        if type(pid) is not int or pid <= 0:
            raise ValueError("SESSION needs \"pid\", the client's process id")
        if name is not None and not (isinstance(name, str) and len(name) <= 200):
            raise ValueError("\"name\" must be a string of at most 200 characters")
        if ephemeral is not None:
            if not isinstance(ephemeral, str):
                raise ValueError("\"ephemeral_db\" must be a path")
            session_folder(ephemeral, self.settings.sessions_dir)
            for pending in list(self._pending_drops.values()):
                if pending.ephemeral_db == ephemeral:
                    # Its client is back (it reconnected): the database is
                    # its again, not to be dropped.
                    del self._pending_drops[pending.id]
                    _log.info("session {id}'s database is in use again; not dropping it",
                              id=pending.id)
        session = Session(self.sessions.new_id(), pid, name, ephemeral, time.time())
        if fields.get("keep_while_owner_lives") is True and ephemeral is not None:
            self._owner_held.add(session.id)
        self.sessions.attach(session)
        _log.info("session {id} attached: pid {pid} {name}", id=session.id, pid=pid,
                  name=name or "")
        ready = self.when_ready()
        ready.addCallback(lambda facts: {"id": session.id, **facts})
        return session.id, ready

    def start_mcp_host(self) -> defer.Deferred[dict[str, Any]]:
        if self._shutting_down or not self.mcp_host.running:
            return defer.fail(Exception("the daemon is stopping"))
        return self.mcp_host.ensure()

    def rename_session(self, session_id: str, name: str | None) -> None:
        for session in self.sessions:
            if session.id == session_id:
                _log.info("session {id} is now called {name}", id=session_id, name=name or "")
                session.name = name
                return

    def end_session(self, session_id: str, clean: bool) -> None:
        session = self.sessions.detach(session_id)
        if session is None:
            return
        _log.info("session {id} ended{how} (pid {pid})", id=session.id, pid=session.pid,
                  how="" if clean else " without goodbye")
        if not session.ephemeral_db or clean:
            self._owner_held.discard(session.id)
            return
        self._pending_drops[session.id] = session
        if self._shutting_down:
            # hyperd is going down: its folder goes once hyperd has stopped.
            return
        cleanup = defer.ensureDeferred(self._drop_ephemeral(session))
        self._cleanups.add(cleanup)
        cleanup.addBoth(lambda _: self._cleanups.discard(cleanup))

    def _retry_drops_now(self) -> None:
        """End the waits of the pending drops: each tries again (or gives up) now."""
        for wait in list(self._drop_waits):
            wait.cancel()

    async def _wait_to_retry_drop(self, attempt: int) -> None:
        delay = backoffPolicy(self.drop_retry_first, self.drop_retry_max, 2.0,
                              jitter=lambda: 0.0)(attempt)
        wait = deferLater(self._reactor, delay, lambda: None)
        self._drop_waits.add(wait)
        try:
            await wait
        except defer.CancelledError:
            pass  # a session came or went, or the daemon is stopping
        finally:
            self._drop_waits.discard(wait)

    def _still_to_drop(self, session: Session) -> bool:
        """
        Whether the daemon should still drop C{session}'s database through
        hyperd: it is pending, the daemon is not stopping, and its path
        still leads through no symbolic link (else hyperd would follow it).
        """
        if self._shutting_down or session.id not in self._pending_drops:
            return False
        assert session.ephemeral_db is not None
        try:
            session_folder(session.ephemeral_db, self.settings.sessions_dir)
        except ValueError as e:
            _log.warn("not dropping {path}: {error}", path=session.ephemeral_db, error=e)
            return False
        return True

    async def _drop_ephemeral(self, session: Session) -> None:
        """
        Drop a finished session's database through hyperd, then remove its
        folder.  While hyperd reports the database in use, try again with
        backoff for as long as the daemon runs; if the daemon stops first,
        L{_stop} removes the folder once hyperd is gone.  A path that has
        come to lead through a symbolic link is not dropped, and its folder
        is removed without following it.
        """
        assert session.ephemeral_db is not None
        path = session.ephemeral_db
        folder = Path(path).parent
        if session.id in self._owner_held:
            # Its owner may come back (its host died): wait while it lives,
            # unless it attaches the database again first.
            while (session.pid is not None and pid_alive(session.pid)
                   and self._still_to_drop(session)):
                await self._wait_to_retry_drop(OWNER_CHECK_ATTEMPT)
            self._owner_held.discard(session.id)
        started = self._reactor.seconds()
        warned = False
        attempt = 0
        while (instance := self.supervisor.instance) is not None:
            if not self._still_to_drop(session):
                break
            try:
                # Checked again once connected: that took a while.
                await drop_database(
                    self._reactor, instance.host, instance.port, instance.user,
                    instance.password, path, lambda: self._still_to_drop(session),
                )
                break
            except DatabaseInUse:
                # The client's own hyperd connection has not closed yet, or a
                # process of the user still has the database attached.
                if not warned and self._reactor.seconds() - started >= self.drop_patience:
                    warned = True
                    _log.warn("{path} is still in use after {seconds:g} s; trying again "
                              "every {interval:g} s until it is free", path=path,
                              seconds=self.drop_patience, interval=self.drop_retry_max)
                await self._wait_to_retry_drop(attempt)
                attempt += 1
            except Exception as e:
                _log.warn("could not drop {path}: {error}", path=path, error=e)
                break
        if self._shutting_down or session.id not in self._pending_drops:
            return
        try:
            await deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                    remove_session_folder, folder)
        except OSError as e:
            # Still pending: the shutdown tries again.
            _log.warn("could not remove {folder}: {error}", folder=str(folder),
                      error=e.strerror or str(e))
            return
        self._pending_drops.pop(session.id, None)
        _log.info("removed the ephemeral database of session {id}", id=session.id)

    def status(self) -> dict[str, Any]:
        instance = self.supervisor.instance
        state = "stopping" if self._shutting_down else self.supervisor.state
        return {
            "pid": os.getpid(),
            "hyperd_endpoint": instance.endpoint if instance else None,
            "health_port": self.settings.port,
            "started_at": self.started_at,
            "version": self.version,
            "hyperd_user": HYPERD_USER,
            "hyperd_password": instance.password if instance else None,
            "hyperd_pid": self.supervisor.pid,
            "state": state,
            "restarts": self.supervisor.restarts,
            "uptime_s": round(self._reactor.seconds() - self._started, 3),
            "idle_timeout_s": self.settings.idle_timeout,
            "compat": self.settings.compat,
            "state_dir": str(self.settings.state_dir),
            "log_dir": str(self.settings.logs_dir),
            "sessions": self.sessions.to_json(),
            "session_protocol": SESSION_PROTOCOL,
            "mcp_host": self.mcp_host.status(),
        }
