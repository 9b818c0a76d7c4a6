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
seconds, and at once on L{HyperdSupervisor.check_now} and when a client asks
for it after a quiet period (L{HyperdSupervisor.when_usable}).

A probe that fails is judged with what the kernel says about the process
(L{liveness}): a busy or briefly stopped C{hyperd} is left alone, since it
holds its databases' changes in memory; one that shows no sign of life for
L{HyperdSupervisor.hung_after} seconds is replaced, and one whose process
has exited is replaced at once (its exit is noticed through
C{processExited}).  A C{hyperd} is always stopped the same way, on
replacement and on shutdown: SIGCONT, the callback connection closed,
SIGTERM, and SIGKILL only after L{HyperdSupervisor.stop_grace} seconds; a
replacement starts once the old one is gone, so that the two never have the
same database file open.  At most L{RestartBudget.limit} replacements happen
within L{RestartBudget.window} seconds; past that the supervisor gives up.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hyperdaemon import peeruid

from hyperdaemon.daemon import pgwire
from hyperdaemon.config import HYPERD_USER
from hyperdaemon.daemon.liveness import Liveness, ProcessSample, Verdict, read_process_sample

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


@implementer(IReadDescriptor)
class _CallbackListener:
    """
    Listens on 127.0.0.1 for C{hyperd}'s callback connection and hands each
    one to C{factory}.  Not C{listenTCP}: its port logs C{... starting on
    PORT} and C{(TCP Port PORT Closed)} at every C{hyperd} start, whatever the
    factory's C{noisy}, which tells a person reading the log nothing.
    """

    def __init__(self, reactor: Any, factory: Factory) -> None:
        self._reactor = reactor
        self._factory = factory
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._socket.bind(("127.0.0.1", 0))
            self._socket.listen(1)
            self._socket.setblocking(False)
        except BaseException:
            self._socket.close()
            raise
        self.port: int = self._socket.getsockname()[1]
        reactor.addReader(self)

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return "hyperd-callback"

    def doRead(self) -> None:
        try:
            connection, _ = self._socket.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        with connection:
            connection.setblocking(False)
            # The reactor takes a duplicate of the descriptor.
            self._reactor.adoptStreamConnection(connection.fileno(), socket.AF_INET,
                                                self._factory)

    def connectionLost(self, reason: Failure) -> None:
        self.stopListening()

    def stopListening(self) -> None:
        if self._socket.fileno() != -1:
            self._reactor.removeReader(self)
            self._socket.close()


class _HyperdProcess(ProcessProtocol):
    """One spawned hyperd: reports its end, and stops gracefully on request."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.exit_reason: str | None = None
        self.callback: _CallbackProtocol | None = None
        #: Kept after exit, when the transport forgets it.
        self.pid: int | None = None
        self._end_waiters: list[defer.Deferred[None]] = []
        self._stopping = False

    @property
    def exited(self) -> bool:
        return self.exit_reason is not None

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
        # The supervisor hears of it (and logs it) before those waiting for it.
        self.ended.callback(None)
        waiters, self._end_waiters = self._end_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_ended(self) -> defer.Deferred[None]:
        """Fires once the process has exited (at once if it has)."""
        if self.exited:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._end_waiters.append(waiter)
        return waiter

    def signal(self, signum: int) -> None:
        try:
            self.transport.signalProcess(signum)
        except error.ProcessExitedAlready:
            pass
        except OSError:
            pass  # reaped between the check and the signal

    def stop(self, clock: Any, grace: float) -> defer.Deferred[None]:
        """
        Stop it gracefully, so that it writes out the databases it has open:
        SIGCONT (it may be stopped), its callback connection closed (that
        alone makes hyperd shut down), SIGTERM (for a hyperd that has not
        called back yet); SIGKILL only if it has not exited C{grace} seconds
        later.  Calling it again changes nothing.  Fires once it has exited.
        """
        if not self._stopping and not self.exited:
            self._stopping = True
            self.signal(signal.SIGCONT)
            if self.callback is not None:
                self.callback.close()
            self.signal(signal.SIGTERM)
            killer = clock.callLater(grace, self._kill, grace)
            self.when_ended().addCallback(lambda _: killer.cancel() if killer.active() else None)
        return self.when_ended()

    def _kill(self, grace: float) -> None:
        _log.warn("hyperd[{pid}] did not exit within {grace:g} s of SIGTERM; killing it",
                  pid=self.pid, grace=grace)
        self.signal(signal.SIGKILL)


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


class HyperdUnavailable(Exception):
    """The supervisor stopped or gave up before a C{hyperd} was usable."""


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
    #: Seconds between health probes of a ready, watched hyperd; a client
    #: that asks for hyperd (L{when_usable}) when it has shown no sign of
    #: life for this long waits for a probe first.
    probe_interval = 5.0
    #: Seconds a probe may take; one that takes longer has failed, and the
    #: process is looked at (L{Liveness}) before anything is decided.
    probe_timeout = 5.0
    #: Seconds without a sign of life (an answer, CPU time advancing, a
    #: thread running or in disk wait) after which a hyperd that does not
    #: answer is hung, and replaced.
    hung_after = 30.0
    #: Seconds between SIGTERM and SIGKILL when stopping hyperd, on
    #: replacement and on shutdown: long enough to write out its databases.
    #: A hyperd that exits sooner is not waited for.
    stop_grace = 30.0

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
        sample_process: Callable[[int], ProcessSample | None] = read_process_sample,
    ) -> None:
        self._reactor = reactor
        self._executable = executable
        self._log_dir = log_dir
        self._compat = compat
        self._on_ready = on_ready
        self._on_give_up = on_give_up
        self._budget = budget if budget is not None else RestartBudget()
        self._probe_factory = probe_factory
        self._sample_process = sample_process
        self.state = "stopped"
        self.instance: HyperdInstance | None = None
        self.restarts = 0
        self._generation = 0
        self._current: _HyperdProcess | None = None
        self._live: set[_HyperdProcess] = set()
        self._probe: QueryProbe | None = None
        self._liveness: Liveness | None = None
        self._verdict = Verdict.ANSWERS
        self._checking: defer.Deferred[Verdict] | None = None
        self._check_waiters: list[defer.Deferred[Verdict]] = []
        self._usable_waiters: list[defer.Deferred[HyperdInstance]] = []
        self._launching: defer.Deferred[None] | None = None
        self._prober = LoopingCall(self._scheduled_probe)
        self._prober.clock = reactor
        self._watched = True
        self._ever_ready = False
        self._stopped = False

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
        C{watched} (the default), and otherwise only while a client waits in
        L{when_usable}.  An unwatched C{hyperd} is still replaced at once if
        it exits, and checked on L{check_now}; nothing wakes the process up
        for it.
        """
        self._watched = watched
        self._schedule_probes()

    def _schedule_probes(self) -> None:
        wanted = self.state == "ready" and (self._watched or bool(self._usable_waiters))
        if wanted and not self._prober.running:
            self._prober.start(self.probe_interval, now=False)
        elif not wanted and self._prober.running:
            self._prober.stop()

    # -- lifetime -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._launch()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopped = True
        self.state = "stopping"
        self._generation += 1
        self._schedule_probes()
        if self._launching is not None:
            self._launching.cancel()
        self._fail_usable_waiters("hyperd is stopping")
        return defer.ensureDeferred(self._stop_all())

    async def _stop_all(self) -> None:
        await defer.DeferredList([p.stop(self._reactor, self.stop_grace) for p in self._live])
        self._drop_probe()
        self._current = None
        self.instance = None
        self.state = "stopped"

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
            if generation == self._generation:
                self._became_ready(instance)

        def failed(reason: Failure) -> None:
            self._launching = None
            if reason.check(defer.CancelledError) or generation != self._generation:
                return
            self._lost(generation, f"hyperd failed to start: {reason.getErrorMessage()}")

        d.addCallbacks(started, failed)

    def _became_ready(self, instance: HyperdInstance) -> None:
        """The current process (with its probe) has answered: it serves now."""
        self.instance = instance
        self.state = "ready"
        self._ever_ready = True
        self._liveness = Liveness(self._reactor.seconds(), hung_after=self.hung_after)
        self._verdict = Verdict.ANSWERS
        _log.info(
            "hyperd[{pid}] ready on {endpoint}", pid=instance.pid, endpoint=instance.endpoint
        )
        self._on_ready(instance)
        self._fire_usable_waiters()
        self._schedule_probes()

    async def _start(self, generation: int) -> HyperdInstance:
        password = None if self._compat else secrets.token_urlsafe(24)
        callback = _CallbackFactory()
        listener = _CallbackListener(self._reactor, callback)
        process = _HyperdProcess()
        try:
            args = [
                str(self._executable),
                "run",
                f"--callback-connection=tab.tcp://127.0.0.1:{listener.port}",
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
        if process is self._current and self.state == "ready":
            self._lost(generation, f"hyperd[{process.pid}] {process.exit_reason}")
        elif process is not self._current or self.state == "stopping":
            # Stopped by us (while starting, the launch reports an early exit).
            _log.info("hyperd[{pid}] stopped: {reason}", pid=process.pid,
                      reason=process.exit_reason)

    def when_usable(self) -> defer.Deferred[HyperdInstance]:
        """
        The ready C{hyperd}, once it is known to be usable: at once if it
        has shown a sign of life within the last L{probe_interval} seconds
        and its last check found it usable; otherwise after a check, which
        it passes by answering or by being busy (it answers when it can).
        One that is stopped or silent is checked again every
        L{probe_interval} seconds meanwhile, watched or not, and replaced
        once hung (L{hung_after}); the replacement is given then, as it is
        while one starts.

        @raise HyperdUnavailable: (through the Deferred) if the supervisor
            stops or gives up first.
        """
        liveness = self._liveness
        if (self.state == "ready" and self.instance is not None and liveness is not None
                and self._checking is None and self._verdict.usable
                and liveness.fresh(self._reactor.seconds(), self.probe_interval)):
            return defer.succeed(self.instance)
        if self.state == "failed" or self._stopped:
            return defer.fail(HyperdUnavailable(f"hyperd is {self.state}"))
        waiter: defer.Deferred[HyperdInstance] = defer.Deferred()
        self._usable_waiters.append(waiter)
        if self.state == "ready":
            self.check_now()
            self._schedule_probes()
        return waiter

    def _fire_usable_waiters(self) -> None:
        instance = self.instance
        if instance is None:
            return
        waiters, self._usable_waiters = self._usable_waiters, []
        for waiter in waiters:
            waiter.callback(instance)
        self._schedule_probes()

    def _fail_usable_waiters(self, why: str) -> None:
        waiters, self._usable_waiters = self._usable_waiters, []
        for waiter in waiters:
            waiter.errback(HyperdUnavailable(why))

    def check_now(self) -> defer.Deferred[Verdict]:
        """
        Check hyperd now (a client reported an error): probe it, and judge a
        probe that fails by what its process does (L{Liveness}).  It is
        replaced only if it is hung or gone; a busy or briefly stopped one is
        left alone.  Fires with the verdict when the check is over
        (L{Verdict.ANSWERS} if there is no ready hyperd to check).
        """
        if self.state != "ready":
            return defer.succeed(Verdict.ANSWERS)
        waiter: defer.Deferred[Verdict] = defer.Deferred()
        self._check_waiters.append(waiter)
        if self._checking is None:
            self._checking = defer.ensureDeferred(self._check(self._generation))
            self._checking.addBoth(self._checked)
        return waiter

    def _checked(self, result: Verdict | Failure) -> None:
        self._checking = None
        waiters, self._check_waiters = self._check_waiters, []
        if isinstance(result, Failure):
            _log.failure("hyperd check failed unexpectedly", result)
            result = Verdict.ANSWERS
        for waiter in waiters:
            waiter.callback(result)

    def _scheduled_probe(self) -> None:
        try:
            self.check_now()
        except Exception:
            _log.failure("hyperd probe failed unexpectedly")

    async def _check(self, generation: int) -> Verdict:
        process, probe, liveness = self._current, self._probe, self._liveness
        if process is None or process.pid is None or probe is None or liveness is None:
            return Verdict.ANSWERS
        sample = self._sample_process(process.pid)
        why = ""
        if sample is not None and (sample.stopped or sample.gone):
            # It cannot answer: no probe to wait for.
            verdict = liveness.unanswered(self._reactor.seconds(), sample)
        else:
            if liveness.observed(self._reactor.seconds(), sample):
                self._fire_usable_waiters()  # seen working: it answers when it can
            attempt = probe.check()
            attempt.addTimeout(self.probe_timeout, self._reactor)
            try:
                await attempt
                verdict = liveness.answered(self._reactor.seconds())
            except defer.TimeoutError:
                why = f"no answer to a query within {self.probe_timeout:g} s"
            except Exception as e:
                why = f"a query failed: {str(e).strip() or type(e).__name__}"
            if why:
                verdict = liveness.unanswered(self._reactor.seconds(),
                                              self._sample_process(process.pid))
        if generation == self._generation and self.running:
            self._judged(generation, process, liveness, verdict, why)
        return verdict

    def _judged(self, generation: int, process: _HyperdProcess, liveness: Liveness,
                verdict: Verdict, why: str) -> None:
        """Act on a check's verdict, and log each change of it."""
        previous, self._verdict = self._verdict, verdict
        pid = process.pid
        if verdict is Verdict.GONE:
            self._lost(generation, f"hyperd[{pid}] has exited")
            return
        if verdict is Verdict.HUNG:
            silent = liveness.silent_for(self._reactor.seconds())
            self._lost(generation, f"hyperd[{pid}] showed no sign of life for {silent:.0f} s "
                                   f"({why or 'stopped'})")
            return
        if verdict.usable:
            self._fire_usable_waiters()
        if verdict is previous:
            return
        if verdict is Verdict.ANSWERS:
            _log.info("hyperd[{pid}] answers again", pid=pid)
        elif verdict is Verdict.BUSY:
            _log.info("hyperd[{pid}] is busy ({why}, but it is working); it is left to work",
                      pid=pid, why=why or "no probe")
        elif verdict is Verdict.STOPPED:
            _log.warn("hyperd[{pid}] is stopped (by a signal) and cannot answer; it is "
                      "replaced if it shows no sign of life for {limit:g} s",
                      pid=pid, limit=self.hung_after)
        else:
            _log.warn("hyperd[{pid}] does not answer ({why}) and is idle; it is replaced "
                      "if it shows no sign of life for {limit:g} s",
                      pid=pid, why=why, limit=self.hung_after)

    def _lost(self, generation: int, reason: str) -> None:
        """
        The hyperd of C{generation} is gone or hung: stop it gracefully, then
        replace it, or give up.
        """
        if generation != self._generation or not self.running:
            return
        self._generation += 1
        generation = self._generation
        self.state = "starting"
        self._schedule_probes()
        broken, self._current = self._current, None
        self.instance = None
        self._liveness = None
        self._drop_probe()
        stopped = (broken.stop(self._reactor, self.stop_grace) if broken is not None
                   else defer.succeed(None))
        if not self._ever_ready:
            self.state = "failed"
            _log.critical("{reason}", reason=reason)
            self._fail_usable_waiters(reason)
            self._on_give_up(reason)
            return
        if not self._budget.spend(self._reactor.seconds()):
            self.state = "failed"
            why = (
                f"{reason}; giving up after {self._budget.limit} replacements "
                f"within {self._budget.window:g} s"
            )
            _log.critical("{reason}", reason=why)
            self._fail_usable_waiters(why)
            self._on_give_up(why)
            return
        self.restarts += 1
        if broken is not None and not broken.exited:
            _log.warn("{reason}; stopping it, then starting a new hyperd", reason=reason)
        else:
            _log.warn("{reason}; starting a new hyperd", reason=reason)

        def replace(_: object) -> None:
            # Not while the old one may still write its databases out.
            if generation == self._generation and self.running:
                self._launch()

        stopped.addCallback(replace)
