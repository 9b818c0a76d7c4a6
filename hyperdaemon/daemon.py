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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, globalLogPublisher

from . import __version__, peeruid
from .config import HYPERD_USER
from .discovery import HYPERD_LOGS_NAME, DaemonRecord, remove_record_if_owned, write_record
from .idle import IdleTimer
from .logs import open_daemon_log
from .protocol import Authorizer, HealthFactory
from .sessions import SessionRegistry
from .supervisor import HyperdInstance, HyperdSupervisor

_log = Logger()


class StartupError(Exception):
    """The daemon cannot start; C{str()} is one sentence with the fix."""


@attrs.frozen
class DaemonSettings:
    """Everything a daemon needs to know, already resolved and checked."""

    port: int
    state_dir: Path
    logs_dir: Path
    idle_timeout: float
    hyperd: Path
    compat: bool = False


class DaemonService(MultiService):
    """
    One daemon.  C{on_shutdown} is called once when the daemon decides to
    stop (the entry points pass C{reactor.stop}, whose shutdown trigger then
    calls L{stopService}); C{exit_code} and C{stop_reason} say why.
    """

    version = __version__

    def __init__(
        self,
        reactor: Any,
        settings: DaemonSettings,
        on_shutdown: Callable[[], None],
        install_signal_handlers: bool = False,
        authorize: Authorizer = peeruid.same_user,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.settings = settings
        self._on_shutdown = on_shutdown
        self._install_signal_handlers = install_signal_handlers
        self.sessions = SessionRegistry()
        self.health = strports.service(
            f"tcp:{settings.port}:interface=127.0.0.1",
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
        self.supervisor.setServiceParent(self)
        self.idle = IdleTimer(reactor, settings.idle_timeout, lambda: len(self.sessions), self._idled)
        self.idle.setServiceParent(self)
        self.sessions.on_change.append(self.idle.touch)
        self.exit_code = 0
        self.stop_reason: str | None = None
        self.started_at = ""
        self._started = 0.0
        self._shutting_down = False
        self._stopping: defer.Deferred[None] | None = None
        self._log_observer: Any = None
        self._logfile: Any = None

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
        if self._install_signal_handlers:
            # After the reactor's own handlers, which would exit by signal.
            self._reactor.callWhenRunning(self._handle_signals)

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
        self._on_shutdown()

    def stopService(self) -> defer.Deferred[None]:
        if self._stopping is None:
            Service.stopService(self)
            self._stopping = defer.ensureDeferred(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        await defer.maybeDeferred(self.health.stopService)
        self.idle.stopService()
        await self.supervisor.stopService()
        if remove_record_if_owned(self.settings.state_dir, os.getpid(), self.settings.port):
            _log.info("removed {path}", path=str(self.settings.state_dir / "daemon.json"))
        _log.info("stopped")
        if self._log_observer is not None:
            globalLogPublisher.removeObserver(self._log_observer)
            self._logfile.close()
            self._log_observer = None

    # -- events -------------------------------------------------------------

    def _hyperd_ready(self, instance: HyperdInstance) -> None:
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
            return
        _log.info("published hyperd {endpoint} in daemon.json", endpoint=instance.endpoint)

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
        self.supervisor.check_now()

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
        }
