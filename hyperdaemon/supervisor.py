"""
The C{hyperd} supervisor: starts the shared C{hyperd}, knows when it is ready,
notices when it dies or hangs, replaces it within a budget, and stops it.

C{hyperd} is spawned with a callback connection (HYPERD.md): it connects to a
port of ours and sends its endpoint; we keep that connection open for its
whole life, so that when the daemon dies, even by SIGKILL, the kernel closes
it and C{hyperd} exits too.  It gets a fresh random password on stdin unless
C{compat} is set.  It is ready once a query succeeds; after that, while it is
watched (L{HyperdSupervisor.watch}: the daemon watches while sessions are
attached), a probe query runs every L{HyperdSupervisor.probe_interval}
seconds, and at once on L{HyperdSupervisor.check_now}, so that a C{hyperd}
that is alive but does not answer is killed and replaced.  Its exit is
noticed at once through C{processEnded}.  At most L{RestartBudget.limit} replacements happen within
L{RestartBudget.window} seconds; past that the supervisor gives up.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import peeruid, pgwire
from .config import HYPERD_USER

_log = Logger()


@attrs.define
class RestartBudget:
    """
    Allows at most C{limit} replacements within any C{window} seconds.
    Pure bookkeeping: the caller passes the time.
    """

    limit: int = 3
    window: float = 60.0
    _spent: list[float] = attrs.field(factory=list)

    def spend(self, now: float) -> bool:
        """
        Record a replacement at C{now} if the budget allows it.

        @return: C{True} if it may happen, C{False} if the budget is spent.
        """
        self._spent = [t for t in self._spent if now - t < self.window]
        if len(self._spent) >= self.limit:
            return False
        self._spent.append(now)
        return True


@attrs.frozen
class HyperdInstance:
    """A running, ready C{hyperd}: what clients need to log in to it."""

    pid: int
    host: str
    port: int
    user: str
    password: str | None = attrs.field(repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


#: hyperd's own stdout and stderr, in its log folder; emptied past the cap.
HYPERD_OUTPUT_NAME = "hyperd-output.log"
HYPERD_OUTPUT_CAP = 1_000_000


def _open_output(path: Path) -> int:
    """A descriptor appending to C{path} (0600), emptied first if over the cap."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    try:
        if path.stat().st_size > HYPERD_OUTPUT_CAP:
            flags |= os.O_TRUNC
    except FileNotFoundError:
        pass
    return os.open(path, flags, 0o600)


class HyperdStartError(Exception):
    """A C{hyperd} did not become ready; C{str()} says why."""


def parse_callback_frame(buffer: bytes) -> tuple[str, int] | None:
    """
    Parse hyperd's callback frame: a length byte, then
    C{tab.tcp://HOST:PORT} and a NUL, the length counting the NUL.

    @return: C{(host, port)}, or C{None} if C{buffer} is not yet complete.
    @raise ValueError: if the frame is malformed.
    """
    if not buffer:
        return None
    length = buffer[0]
    if len(buffer) < 1 + length:
        return None
    text = buffer[1 : 1 + length].rstrip(b"\x00").decode("ascii")
    scheme = "tab.tcp://"
    if not text.startswith(scheme):
        raise ValueError(f"unexpected callback frame {text!r}")
    host, _, port = text[len(scheme) :].rpartition(":")
    return host, int(port)


class _CallbackProtocol(Protocol):
    """Receives hyperd's endpoint, then holds the connection open."""

    def __init__(self, received: defer.Deferred[tuple[str, int]]) -> None:
        self._received = received
        self._buffer = b""

    def connectionMade(self) -> None:
        # Only a process of ours may tell us where hyperd is.
        if not peeruid.same_user(self.transport):
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._received.called:
            return
        self._buffer += data
        try:
            parsed = parse_callback_frame(self._buffer)
        except (ValueError, UnicodeDecodeError) as e:
            self._received.errback(HyperdStartError(f"bad callback from hyperd: {e}"))
            return
        if parsed is not None:
            self._received.callback(parsed)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class _CallbackFactory(Factory):
    noisy = False

    def __init__(self) -> None:
        self.received: defer.Deferred[tuple[str, int]] = defer.Deferred()
        self.protocol_instance: _CallbackProtocol | None = None

    def buildProtocol(self, addr: Any) -> _CallbackProtocol | None:
        if self.received.called:
            return None
        self.protocol_instance = _CallbackProtocol(self.received)
        return self.protocol_instance


class _HyperdProcess(ProcessProtocol):
    """One spawned hyperd: reports its end."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.exit_reason: str | None = None
        self.callback: _CallbackProtocol | None = None
        #: Kept after exit, when the transport forgets it.
        self.pid: int | None = None

    def makeConnection(self, transport: Any) -> None:
        self.pid = transport.pid
        super().makeConnection(transport)

    def processExited(self, reason: Failure) -> None:
        # Not processEnded: that also waits for the output pipes to close.
        value = reason.value
        if isinstance(value, error.ProcessTerminated) and value.signal is not None:
            self.exit_reason = f"killed by signal {value.signal}"
        else:
            self.exit_reason = f"exited with code {getattr(value, 'exitCode', None)}"
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


class QueryProbe:
    """
    A connection to one C{hyperd} for readiness and health checks, opened on
    first use and again after a failure.
    """

    connect_timeout = 5.0

    def __init__(self, reactor: Any, instance: HyperdInstance) -> None:
        self._reactor = reactor
        self._instance = instance
        self._connection: pgwire.PGClientProtocol | None = None

    def check(self) -> defer.Deferred[None]:
        """
        Run C{SELECT 1}.  Fails with L{pgwire.PGError} or a connection error
        if C{hyperd} does not answer it; cancelling it drops the connection.
        """
        return defer.ensureDeferred(self._check())

    async def _check(self) -> None:
        try:
            if self._connection is None or self._connection.closed:
                i = self._instance
                self._connection = await pgwire.connect(
                    self._reactor, i.host, i.port, i.user, i.password, self.connect_timeout,
                )
            await self._connection.query("SELECT 1")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class HyperdSupervisor(Service):
    """
    Owns the shared C{hyperd}.  C{on_ready} is called with each new ready
    L{HyperdInstance} (the first and every replacement); C{on_give_up} with a
    reason when the first start fails or the restart budget is spent.
    """

    #: Seconds from spawn until hyperd must answer a query.
    ready_timeout = 60.0
    #: Pause between readiness attempts after the callback.
    ready_retry_delay = 0.05
    #: Seconds between health probes of a ready hyperd.
    probe_interval = 5.0
    #: Seconds a probe may take before hyperd is declared hung.
    probe_timeout = 5.0
    #: Seconds between SIGTERM and SIGKILL when stopping hyperd.
    stop_grace = 5.0

    def __init__(
        self,
        reactor: Any,
        executable: Path,
        log_dir: Path,
        compat: bool,
        on_ready: Callable[[HyperdInstance], None],
        on_give_up: Callable[[str], None],
        budget: RestartBudget | None = None,
        probe_factory: Callable[[Any, HyperdInstance], QueryProbe] = QueryProbe,
    ) -> None:
        self._reactor = reactor
        self._executable = executable
        self._log_dir = log_dir
        self._compat = compat
        self._on_ready = on_ready
        self._on_give_up = on_give_up
        self._budget = budget if budget is not None else RestartBudget()
        self._probe_factory = probe_factory
        self.state = "stopped"
        self.instance: HyperdInstance | None = None
        self.restarts = 0
        self._generation = 0
        self._current: _HyperdProcess | None = None
        self._live: set[_HyperdProcess] = set()
        self._probe: QueryProbe | None = None
        self._checking: defer.Deferred[None] | None = None
        self._launching: defer.Deferred[None] | None = None
        self._prober = LoopingCall(self._scheduled_probe)
        self._prober.clock = reactor
        self._watched = True
        self._ever_ready = False

    @property
    def pid(self) -> int | None:
        return self._current.pid if self._current is not None else None

    @property
    def watched(self) -> bool:
        """Whether the ready C{hyperd} is probed periodically (L{watch})."""
        return self._watched

    def watch(self, watched: bool) -> None:
        """
        Probe the ready C{hyperd} every L{probe_interval} seconds while
        C{watched} (the default), and not at all otherwise.  An unwatched
        C{hyperd} is still replaced at once if it exits, and checked on
        L{check_now}; nothing wakes the process up for it.
        """
        self._watched = watched
        if watched and self.state == "ready" and not self._prober.running:
            self._prober.start(self.probe_interval, now=False)
        elif not watched and self._prober.running:
            self._prober.stop()

    # -- lifetime -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._launch()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.state = "stopping"
        self._generation += 1
        if self._prober.running:
            self._prober.stop()
        if self._launching is not None:
            self._launching.cancel()
        return defer.ensureDeferred(self._stop_all())

    async def _stop_all(self) -> None:
        for process in list(self._live):
            self._terminate(process, "TERM")
        if self._live:
            ended = defer.DeferredList([p.ended for p in self._live])
            killer = self._reactor.callLater(self.stop_grace, self._kill_remaining)
            await ended
            if killer.active():
                killer.cancel()
        self._drop_probe()
        self._current = None
        self.instance = None
        self.state = "stopped"

    def _kill_remaining(self) -> None:
        for process in list(self._live):
            _log.warn("hyperd[{pid}] ignored SIGTERM; killing it", pid=process.pid)
            process.signal("KILL")

    def _terminate(self, process: _HyperdProcess, signame: str) -> None:
        # Closing the callback connection alone makes hyperd shut down; the
        # signal covers a hyperd that has not called back yet or is hung.
        if process.callback is not None:
            process.callback.close()
        process.signal(signame)

    def _drop_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()

    # -- starting -----------------------------------------------------------

    def _launch(self) -> None:
        self._generation += 1
        generation = self._generation
        self.state = "starting"
        self.instance = None
        d = defer.ensureDeferred(self._start(generation))
        self._launching = d

        def started(instance: HyperdInstance) -> None:
            self._launching = None
            if generation != self._generation:
                return
            self.instance = instance
            self.state = "ready"
            self._ever_ready = True
            _log.info(
                "hyperd[{pid}] ready on {endpoint}", pid=instance.pid, endpoint=instance.endpoint
            )
            self._on_ready(instance)
            self.watch(self._watched)

        def failed(reason: Failure) -> None:
            self._launching = None
            if reason.check(defer.CancelledError) or generation != self._generation:
                return
            self._lost(generation, f"hyperd failed to start: {reason.getErrorMessage()}")

        d.addCallbacks(started, failed)

    async def _start(self, generation: int) -> HyperdInstance:
        password = None if self._compat else secrets.token_urlsafe(24)
        callback = _CallbackFactory()
        listener = self._reactor.listenTCP(0, callback, interface="127.0.0.1")
        process = _HyperdProcess()
        try:
            args = [
                str(self._executable),
                "run",
                f"--callback-connection=tab.tcp://127.0.0.1:{listener.getHost().port}",
                "--listen-connection=tab.tcp://127.0.0.1:0",
                f"--init-user={HYPERD_USER}",
                "--skip-license",
                f"--log-dir={self._log_dir}",
                "--log-file-max-count=2",
                "--log-file-size-limit=10M",
            ]
            if password is None:
                args.append("--no-password")
            # hyperd's stdout and stderr go to a file, never to a pipe of ours:
            # if the daemon dies, a write to a dead pipe would kill hyperd by
            # SIGPIPE in the middle of its graceful shutdown, losing the last
            # writes to the databases it has open.
            output = _open_output(self._log_dir / HYPERD_OUTPUT_NAME)
            try:
                self._reactor.spawnProcess(
                    process, args[0], args, env=dict(os.environ),
                    childFDs={0: "w", 1: output, 2: output},
                )
            except OSError as e:
                raise HyperdStartError(f"cannot run {self._executable}: {e.strerror}") from None
            finally:
                os.close(output)
            self._live.add(process)
            process.ended.addBoth(lambda _: self._ended(process, generation))
            if password is not None:
                # hyperd asks for the new password twice (HYPERD.md).
                process.transport.write(f"{password}\n{password}\n".encode("ascii"))
            process.transport.closeStdin()
            self._current = process

            deadline = self._reactor.seconds() + self.ready_timeout
            ready: defer.Deferred[tuple[str, int]] = defer.Deferred()

            def called_back(result: object) -> None:
                if not ready.called:
                    if isinstance(result, Failure):
                        ready.errback(result)
                    else:
                        ready.callback(result)

            callback.received.addBoth(called_back)

            def ended_early(_: object) -> None:
                if not ready.called:
                    ready.errback(HyperdStartError(
                        f"hyperd {process.exit_reason} before it was ready; "
                        f"see {self._log_dir / HYPERD_OUTPUT_NAME}"
                    ))

            process.ended.addCallback(ended_early)
            ready.addTimeout(self.ready_timeout, self._reactor)
            try:
                host, port = await ready
            except defer.TimeoutError:
                raise HyperdStartError(
                    f"hyperd did not call back within {self.ready_timeout:g} s"
                ) from None
            process.callback = callback.protocol_instance
        finally:
            listener.stopListening()

        instance = HyperdInstance(process.pid, host, port, HYPERD_USER, password)
        probe = self._probe_factory(self._reactor, instance)
        while True:
            attempt = probe.check()
            remaining = max(deadline - self._reactor.seconds(), 0.001)
            attempt.addTimeout(remaining, self._reactor)
            try:
                await attempt
                break
            except defer.TimeoutError:
                raise HyperdStartError(
                    f"hyperd did not answer a query within {self.ready_timeout:g} s"
                ) from None
            except Exception as e:
                if process.ended.called:
                    raise HyperdStartError(f"hyperd {process.exit_reason} before it was ready")
                if self._reactor.seconds() >= deadline:
                    raise HyperdStartError(f"hyperd does not answer queries: {e}") from None
                await deferLater(self._reactor, self.ready_retry_delay, lambda: None)
        if generation == self._generation:
            self._drop_probe()
            self._probe = probe
        else:
            probe.close()
        return instance

    # -- watching -----------------------------------------------------------

    def _ended(self, process: _HyperdProcess, generation: int) -> None:
        self._live.discard(process)
        # While starting, the launch itself reports an early exit.
        if process is self._current and self.state == "ready":
            self._lost(generation, f"hyperd[{process.pid}] {process.exit_reason}")

    def check_now(self) -> defer.Deferred[None]:
        """
        Probe hyperd now (a client reported an error); replace it only if
        the probe fails.  Fires when the check is over.
        """
        if self.state != "ready":
            return defer.succeed(None)
        if self._checking is None:
            self._checking = self._check(self._generation)
        return self._checking

    def _scheduled_probe(self) -> None:
        try:
            self.check_now().addErrback(
                lambda f: _log.failure("hyperd probe failed unexpectedly", f)
            )
        except Exception:
            _log.failure("hyperd probe failed unexpectedly")

    def _check(self, generation: int) -> defer.Deferred[None]:
        probe = self._probe
        if probe is None:
            return defer.succeed(None)
        d = probe.check()
        d.addTimeout(self.probe_timeout, self._reactor)

        def failed(reason: Failure) -> None:
            if reason.check(defer.TimeoutError):
                why = f"hyperd did not answer a query within {self.probe_timeout:g} s"
            else:
                why = f"hyperd query failed: {reason.getErrorMessage().strip()}"
            self._lost(generation, why)

        def done(_: object) -> None:
            self._checking = None

        d.addErrback(failed)
        d.addBoth(done)
        return d

    def _lost(self, generation: int, reason: str) -> None:
        """The hyperd of C{generation} is dead or useless: replace it or give up."""
        if generation != self._generation or not self.running:
            return
        self._generation += 1
        if self._prober.running:
            self._prober.stop()
        self._checking = None
        broken, self._current = self._current, None
        self.instance = None
        if broken is not None and not broken.ended.called:
            self._terminate(broken, "KILL")
        self._drop_probe()
        if not self._ever_ready:
            self.state = "failed"
            _log.critical("{reason}", reason=reason)
            self._on_give_up(reason)
            return
        if not self._budget.spend(self._reactor.seconds()):
            self.state = "failed"
            why = (
                f"{reason}; giving up after {self._budget.limit} replacements "
                f"within {self._budget.window:g} s"
            )
            _log.critical("{reason}", reason=why)
            self._on_give_up(why)
            return
        self.restarts += 1
        _log.warn("{reason}; starting a new hyperd", reason=reason)
        self._launch()

