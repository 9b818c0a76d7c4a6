"""
The client's session: a shared C{hyperd} through the daemon (or a private
one), a private ephemeral database, the shared persistent one, and their
cleanup.

L{Session} is the public API (C{query}, C{execute}, C{close}; Deferreds,
which asyncio code awaits with C{Deferred.asFuture}).  Under it:

  - L{DaemonLink} holds the long-lived connection to the daemon in a
    C{ClientService}: it registers the session (C{SESSION}), learns
    C{hyperd}'s credentials, sends debounced heartbeats, and when the daemon
    goes away finds or spawns one again (L{DaemonEndpoint}) and registers
    anew.  With a daemon that has no session commands (the upstream one) it
    reads the credentials from C{daemon.json} and the client cleans up.
  - L{PrivateHyperd} is the same interface over a C{hyperd} owned by this
    process (C{--no-daemon}).
  - Database work runs on one worker thread per session, so the libpq
    connection is only ever used by one thread and never blocks the reactor.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.threads import blockingCallFromThread, deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from . import __version__
from .config import HYPERD_USER
from .discovery import SESSIONS_NAME, CorruptDiscovery, read_record
from .finder import DaemonAddress, Finder

_log = Logger()

#: Seconds between heartbeats at most, however busy the session is.
HEARTBEAT_INTERVAL = 10.0
#: The file name of a session's ephemeral database in its private folder.
EPHEMERAL_NAME = "scratch.hyper"
#: Seconds a session waits for a usable hyperd (the daemon restarting it,
#: or a new daemon starting) before an operation fails.
CREDENTIALS_TIMEOUT = 120.0
#: Connection attempts while hyperd is being replaced.
CONNECT_ATTEMPTS = 3
#: SQL aliases of the session's databases.
EPHEMERAL_ALIAS = "local"
PERSISTENT_ALIAS = "persistent"


class SessionError(Exception):
    """A session could not do what was asked; C{str()} says why."""


@attrs.frozen
class Credentials:
    """How to log in to a C{hyperd}."""

    host: str
    port: int
    user: str
    password: str | None = attrs.field(repr=False)

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> "Credentials":
        host, _, port = str(facts["hyperd_endpoint"]).rpartition(":")
        return cls(host, int(port), facts.get("hyperd_user") or HYPERD_USER,
                   facts.get("hyperd_password"))


def heartbeat_delay(now: float, last_sent: float | None, interval: float) -> float:
    """
    How long to wait before the heartbeat that activity at C{now} asks for:
    none if the last one is at least C{interval} old, else until it is.
    """
    if last_sent is None:
        return 0.0
    return max(0.0, last_sent + interval - now)


class HeartbeatDebouncer:
    """
    Turns activity into heartbeats, at most one per C{interval}: activity
    schedules a single C{send}; more activity before it goes adds nothing.
    """

    def __init__(self, clock: IReactorTime, interval: float, send: Callable[[], None]) -> None:
        self._clock = clock
        self.interval = interval
        self._send = send
        self._last_sent: float | None = None
        self._pending: Any = None

    def activity(self) -> None:
        if self._pending is not None:
            return
        delay = heartbeat_delay(self._clock.seconds(), self._last_sent, self.interval)
        self._pending = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._last_sent = self._clock.seconds()
        self._send()

    def cancel(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


class _Awaited:
    """
    The current credentials, which may be unknown for a while (hyperd being
    replaced): callers wait for the next ones, or for the final failure.
    """

    def __init__(self) -> None:
        self.value: Credentials | None = None
        self._waiters: list[defer.Deferred[Credentials]] = []
        self._failure: Exception | None = None

    def get(self) -> defer.Deferred[Credentials]:
        if self._failure is not None:
            return defer.fail(self._failure)
        if self.value is not None:
            return defer.succeed(self.value)
        d: defer.Deferred[Credentials] = defer.Deferred()
        self._waiters.append(d)
        return d

    def set(self, value: Credentials) -> None:
        self.value = value
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # a caller may have timed out
                waiter.callback(value)

    def clear(self) -> None:
        self.value = None

    def fail(self, failure: Exception) -> None:
        """No credentials will ever come: fail every waiter, now and later."""
        self._failure = failure
        self.value = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(failure)


class HyperdSource(Protocol):
    """Where a session's C{hyperd} comes from: the daemon, or a private one."""

    #: The folder under which the session makes its private folder.
    sessions_root: Path

    def start(self, ephemeral_db: Path | None) -> defer.Deferred[Credentials]:
        """Begin; fires with the first credentials."""

    def credentials(self) -> defer.Deferred[Credentials]:
        """Fresh credentials once C{hyperd} is ready (after a replacement too)."""

    def report_error(self) -> None:
        """The session's connection to C{hyperd} failed."""

    def activity(self) -> None:
        """The session did something (for heartbeats)."""

    def close(self) -> defer.Deferred[None]:
        """End: say goodbye, stop what was started."""


class _SessionProtocol(LineReceiver):
    """The client end of a session connection to the daemon."""

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self, link: "DaemonLink") -> None:
        self._link = link
        self._waiting: list[defer.Deferred[str]] = []

    def connectionMade(self) -> None:
        self._link._connected(self)

    def connectionLost(self, reason: Failure = None) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(SessionError("the daemon closed the connection"))
        self._link._disconnected(self)

    def lineReceived(self, line: bytes) -> None:
        if self._waiting:
            self._waiting.pop(0).callback(line.decode("utf-8", "replace").rstrip("\r"))

    def ask(self, command: str) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        self._waiting.append(d)
        self.sendLine(command.encode("utf-8"))
        return d


@implementer(IStreamClientEndpoint)
@attrs.define
class DaemonEndpoint:
    """
    Connects to this user's daemon, finding or spawning it first (in a
    worker thread): what C{ClientService} reconnects through when the daemon
    goes away.
    """

    reactor: Any
    finder: Finder
    found: Callable[[DaemonAddress], None]
    #: A daemon found a moment ago: the next connection goes to it without
    #: looking again.
    known: DaemonAddress | None = None

    def connect(self, factory: Factory) -> defer.Deferred[Any]:
        known, self.known = self.known, None
        if known is not None:
            d = defer.succeed(known)
        else:
            d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.finder.ensure)

        def found(address: DaemonAddress) -> defer.Deferred[Any]:
            self.found(address)
            return TCP4ClientEndpoint(self.reactor, "127.0.0.1", address.port,
                                      timeout=10).connect(factory)

        return d.addCallback(found)


class DaemonLink:
    """
    The session's long-lived connection to the daemon (see the module
    docstring).  Implements L{HyperdSource}.
    """

    def __init__(self, reactor: Any, finder: Finder, name: str | None,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL) -> None:
        self._reactor = reactor
        self._finder = finder
        self._name = name
        self.sessions_root = finder.state_dir / SESSIONS_NAME
        self._ephemeral: Path | None = None
        self._protocol: _SessionProtocol | None = None
        self._credentials = _Awaited()
        self._legacy = False
        self._closing = False
        self.address: DaemonAddress | None = None
        self._heartbeats = HeartbeatDebouncer(reactor, heartbeat_interval, self._heartbeat)
        factory = Factory.forProtocol(lambda: _SessionProtocol(self))
        self._endpoint = DaemonEndpoint(reactor, finder, self._found)
        self._service = ClientService(
            self._endpoint, factory,
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=5.0), clock=reactor,
        )

    # -- HyperdSource -------------------------------------------------------

    def start(self, ephemeral_db: Path | None) -> defer.Deferred[Credentials]:
        """
        Find or start the daemon (failing with its clear error if that is
        impossible), then keep a session connection to it.
        """
        self._ephemeral = ephemeral_db
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._finder.ensure)

        def found(address: DaemonAddress) -> defer.Deferred[Credentials]:
            self._found(address)
            self._endpoint.known = address
            self._service.startService()
            return self.credentials()

        return d.addCallback(found)

    def credentials(self) -> defer.Deferred[Credentials]:
        return self._credentials.get()

    def report_error(self) -> None:
        """Forget the credentials; ask the daemon to check hyperd and for new ones."""
        self._credentials.clear()
        protocol = self._protocol
        if protocol is None:
            return
        protocol.ask("REPORT_HYPERD_ERROR").addErrback(lambda _: None)
        if self._legacy:
            self._reactor.callLater(0.2, self._read_discovery)
            return
        protocol.ask("READY").addCallbacks(self._ready_reply, lambda _: None)

    def activity(self) -> None:
        self._heartbeats.activity()

    def close(self) -> defer.Deferred[None]:
        self._closing = True
        self._heartbeats.cancel()
        self._credentials.fail(SessionError("the session is closed"))
        protocol = self._protocol
        bye = protocol.ask("BYE") if protocol is not None and not self._legacy else defer.succeed("")
        bye.addErrback(lambda _: None)
        bye.addCallback(lambda _: self._service.stopService())
        return bye.addCallback(lambda _: None)

    # -- connection events --------------------------------------------------

    def _found(self, address: DaemonAddress) -> None:
        self.address = address
        self._legacy = address.session_protocol is None

    def _connected(self, protocol: _SessionProtocol) -> None:
        if self._closing:
            protocol.transport.loseConnection()
            return
        self._protocol = protocol
        if self._legacy:
            self._read_discovery()
            return
        self._register(protocol, self._ephemeral)

    def _register(self, protocol: _SessionProtocol, ephemeral: Path | None) -> None:
        fields = {"pid": os.getpid(), "name": self._name,
                  "ephemeral_db": str(ephemeral) if ephemeral else None}

        def reply(line: str) -> None:
            if line.startswith("ERR") and ephemeral is not None and "ephemeral_db" in line:
                # This daemon keeps its state elsewhere: we clean up ourselves.
                _log.info("the daemon refused our ephemeral database ({line})", line=line)
                self._register(protocol, None)
                return
            if line.startswith("ERR") and self._credentials.value is None:
                self._credentials.fail(SessionError(f"the daemon refused the session: {line[4:]}"))
                return
            self._ready_reply(line)

        protocol.ask("SESSION " + json.dumps(fields)).addCallbacks(reply, lambda _: None)

    def _ready_reply(self, line: str) -> None:
        if not line.startswith("OK "):
            _log.warn("the daemon answered {line!r}", line=line)
            return
        try:
            self._set_credentials(Credentials.from_facts(json.loads(line[3:])))
        except (ValueError, KeyError) as e:
            _log.warn("unusable answer from the daemon: {error}", error=e)

    def _read_discovery(self) -> None:
        """A daemon without session commands: its credentials are in daemon.json."""
        try:
            record = read_record(self._finder.state_dir)
        except CorruptDiscovery:
            record = None
        if record is None or self.address is None or record.health_port != self.address.port:
            self._reactor.callLater(0.2, self._read_discovery) if not self._closing else None
            return
        self._set_credentials(Credentials.from_facts(record.to_json()))

    def _set_credentials(self, credentials: Credentials) -> None:
        self._credentials.set(credentials)

    def _disconnected(self, protocol: _SessionProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
            # The daemon is gone (or going): its hyperd with it.
            self._credentials.clear()

    def _heartbeat(self) -> None:
        if self._protocol is not None:
            self._protocol.ask("HEARTBEAT").addErrback(lambda _: None)


class PrivateHyperd:
    """
    A C{hyperd} owned by this process (C{--no-daemon}), behind the same
    interface as L{DaemonLink}.
    """

    def __init__(self, reactor: Any, state_dir: Path, environ: dict[str, str]) -> None:
        from .config import hyperd_executable
        from .supervisor import HyperdSupervisor

        self._reactor = reactor
        self.sessions_root = state_dir / SESSIONS_NAME
        self._logs = Path(tempfile.mkdtemp(prefix="hyperdb-private-logs-"))
        self._credentials = _Awaited()
        self._supervisor = HyperdSupervisor(
            reactor, hyperd_executable(environ), self._logs, compat=False,
            on_ready=self._ready, on_give_up=self._gave_up,
        )

    def start(self, ephemeral_db: Path | None) -> defer.Deferred[Credentials]:
        self._supervisor.startService()
        return self.credentials()

    def _ready(self, instance: Any) -> None:
        self._credentials.set(
            Credentials(instance.host, instance.port, instance.user, instance.password)
        )

    def _gave_up(self, reason: str) -> None:
        self._credentials.fail(SessionError(reason))

    def credentials(self) -> defer.Deferred[Credentials]:
        return self._credentials.get()

    def report_error(self) -> None:
        """Probe our hyperd; a replacement brings new credentials."""
        self._credentials.clear()
        self._supervisor.check_now().addCallback(self._still_current)

    def _still_current(self, _: object) -> None:
        if self._credentials.value is None and self._supervisor.instance is not None:
            self._ready(self._supervisor.instance)

    def activity(self) -> None:
        pass

    def close(self) -> defer.Deferred[None]:
        d = defer.maybeDeferred(self._supervisor.stopService) if self._supervisor.running \
            else defer.succeed(None)
        return d.addBoth(lambda _: shutil.rmtree(self._logs, ignore_errors=True))


def default_persistent_db(environ: dict[str, str] | None = None) -> Path:
    """
    The persistent database: C{HYPERDB_PERSISTENT_DB}, else
    C{$XDG_DATA_HOME/hyperdb/workspace.hyper} (C{~/.local/share/...}).
    """
    environ = dict(os.environ if environ is None else environ)
    if environ.get("HYPERDB_PERSISTENT_DB", "").strip():
        return Path(os.path.abspath(os.path.expanduser(environ["HYPERDB_PERSISTENT_DB"])))
    data = environ.get("XDG_DATA_HOME", "").strip()
    if not data or not os.path.isabs(data):  # the XDG spec ignores relative paths
        data = os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "hyperdb" / "workspace.hyper"


class _turn:
    """An exclusive lock on a file (flock), held for a block; blocks: worker threads only."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> None:
        import fcntl

        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _broken(connection: Any) -> bool:
    """
    Whether an idle libpq connection is already dead: its socket is readable
    only if the server closed it (or sent something unasked).
    """
    if connection is None or connection.closed:
        return True
    try:
        readable, _, _ = select.select([connection.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


@attrs.frozen
class Result:
    """Rows of a query, with their column names."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


class Session:
    """
    One client's session: SQL over the shared C{hyperd}, with a private
    ephemeral database (alias C{local}, the default for unqualified names)
    and, unless C{ephemeral_only}, the shared persistent one (alias
    C{persistent}).  Open it with L{Session.open}.
    """

    def __init__(self, reactor: Any, source: HyperdSource, ephemeral_db: Path,
                 persistent_db: Path | None) -> None:
        self._reactor = reactor
        self._source = source
        self.ephemeral_db = ephemeral_db
        self.persistent_db = persistent_db
        self.credentials: Credentials | None = None
        self._connection: Any = None
        self._pool = ThreadPool(1, 1, name="hyperdaemon-session")
        self._closed = False

    @classmethod
    def open(
        cls,
        reactor: Any = None,
        *,
        name: str | None = None,
        persistent_db: str | os.PathLike[str] | None = None,
        ephemeral_only: bool = False,
        no_daemon: bool = False,
        state_dir: str | None = None,
        port: str | int | None = None,
        environ: dict[str, str] | None = None,
        finder: Finder | None = None,
    ) -> defer.Deferred["Session"]:
        """
        Open a session: find or start the daemon (or, with C{no_daemon}, a
        private C{hyperd}), register, create the ephemeral database and
        attach the persistent one (creating it if missing).

        Settings come from C{environ} (default C{os.environ}) as for the
        daemon: C{HYPERDB_STATE_DIR}, C{HYPERDB_DAEMON_PORT},
        C{HYPERDB_PERSISTENT_DB}...; C{finder} replaces the default one.

        @return: a Deferred firing with the ready L{Session}, or failing
            with L{SessionError} / L{hyperdaemon.finder.DaemonUnavailable}.
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        try:
            return cls._start(reactor, name, persistent_db, ephemeral_only, no_daemon,
                              state_dir, port, environ, finder)
        except Exception:
            return defer.fail()

    @classmethod
    def _start(cls, reactor: Any, name: str | None,
               persistent_db: str | os.PathLike[str] | None, ephemeral_only: bool,
               no_daemon: bool, state_dir: str | None, port: str | int | None,
               environ: dict[str, str] | None, finder: Finder | None) -> defer.Deferred["Session"]:
        environ = dict(os.environ if environ is None else environ)
        if finder is None:
            finder = Finder.from_environment(state_dir, port, environ)
        source: HyperdSource
        if no_daemon:
            source = PrivateHyperd(reactor, finder.state_dir, environ)
        else:
            source = DaemonLink(reactor, finder, name)
        persistent: Path | None = None
        if not ephemeral_only:
            persistent = (Path(os.path.abspath(os.path.expanduser(persistent_db)))
                          if persistent_db else default_persistent_db(environ))
        return defer.ensureDeferred(cls._open(reactor, source, persistent))

    @classmethod
    async def _open(cls, reactor: Any, source: HyperdSource,
                    persistent: Path | None) -> "Session":
        from .discovery import prepare_state_dir

        root = source.sessions_root
        prepare_state_dir(root.parent)
        # A private folder, made exclusively, named for our pid so that a
        # daemon can tell when its owner is gone.
        folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        session = cls(reactor, source, folder / EPHEMERAL_NAME, persistent)
        session._pool.start()
        # psycopg takes some 50 ms to import: the worker does it
        # while the daemon is found, or started.
        session._pool.callInThread(importlib.import_module, "psycopg")
        try:
            session.credentials = await source.start(session.ephemeral_db)
            await session._in_worker(session._first_connect)
        except BaseException:
            await session.close()
            raise
        return session

    # -- the worker thread ---------------------------------------------------

    def _in_worker(self, work: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, work, *args)

    def _first_connect(self) -> None:
        """L{_connect}, again if hyperd is replaced while we attach."""
        import psycopg

        for attempt in range(CONNECT_ATTEMPTS):
            try:
                return self._connect()
            except psycopg.OperationalError:
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                blockingCallFromThread(self._reactor, self._report_error)

    def _connect(self) -> None:
        """(Re)connect to the current hyperd and attach our databases."""
        import psycopg

        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:
                pass
            self._connection = None
        for attempt in range(CONNECT_ATTEMPTS):
            credentials = blockingCallFromThread(self._reactor, self._fresh_credentials)
            self.credentials = credentials
            try:
                connection = psycopg.connect(
                    host=credentials.host, port=credentials.port, user=credentials.user,
                    password=credentials.password, autocommit=True, connect_timeout=10,
                )
                break
            except psycopg.OperationalError:
                # A hyperd that died a moment ago may still be the one on record.
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                blockingCallFromThread(self._reactor, self._report_error)
        try:
            self.ephemeral_db.parent.mkdir(mode=0o700, exist_ok=True)
            ephemeral = _quote(str(self.ephemeral_db))
            connection.execute(f"CREATE DATABASE IF NOT EXISTS {ephemeral}")
            connection.execute(f"ATTACH DATABASE {ephemeral} AS {EPHEMERAL_ALIAS}")
            if self.persistent_db is not None:
                self.persistent_db.parent.mkdir(parents=True, exist_ok=True)
                persistent = _quote(str(self.persistent_db))
                # Sessions creating and attaching a new persistent database at
                # the same moment can wedge hyperd: take turns.
                with _turn(self.persistent_db.parent / ".hyperdb-attach.lock"):
                    try:
                        connection.execute(f"CREATE DATABASE IF NOT EXISTS {persistent}")
                    except psycopg.errors.ObjectInUse:
                        pass  # another session is creating it right now
                    connection.execute(f"ATTACH DATABASE {persistent} AS {PERSISTENT_ALIAS}")
            connection.execute(f"SET schema_search_path = '{EPHEMERAL_ALIAS}'")
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _run(self, work: Callable[[Any], Any], retry: bool) -> Any:
        """
        Run C{work(connection)}; first reconnect if hyperd went away while
        we were idle.  If the connection dies during C{work} and C{retry} is
        set, reconnect and run it once more.
        """
        import psycopg

        if _broken(self._connection):
            self._report_and_reconnect()
        try:
            return work(self._connection)
        except psycopg.OperationalError:
            if not _broken(self._connection):
                raise
            self._report_and_reconnect()
            if not retry:
                raise SessionError(
                    "hyperd went away during the statement, which may not have completed; "
                    "the session has reconnected: check, then run it again if needed"
                ) from None
            return work(self._connection)

    def _report_and_reconnect(self) -> None:
        blockingCallFromThread(self._reactor, self._report_error)
        self._connect()

    def _fresh_credentials(self) -> defer.Deferred[Credentials]:
        d = self._source.credentials()
        d.addTimeout(CREDENTIALS_TIMEOUT, self._reactor)

        def timed_out(reason: Failure) -> Failure:
            if reason.check(defer.TimeoutError):
                raise SessionError(
                    f"no hyperd became available within {CREDENTIALS_TIMEOUT:g} s; "
                    f"see the daemon's log"
                )
            return reason

        return d.addErrback(timed_out)

    def _report_error(self) -> defer.Deferred[None]:
        self._source.report_error()
        return defer.succeed(None)

    # -- public API ----------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> defer.Deferred[Result]:
        """Run one statement that returns rows; fires with a L{Result}."""
        def work(connection: Any) -> Result:
            cursor = connection.execute(sql, params)
            columns = [c.name for c in cursor.description or []]
            return Result(columns, cursor.fetchall() if cursor.description else [])

        return self.call(work, retry=True)

    def execute(self, statements: str | Sequence[str]) -> defer.Deferred[int]:
        """
        Run one statement, or several atomically (in one transaction);
        fires with the number of rows affected (summed).
        """
        batch = [statements] if isinstance(statements, str) else list(statements)

        def work(connection: Any) -> int:
            total = 0
            if len(batch) == 1:
                cursor = connection.execute(batch[0])
                return max(cursor.rowcount, 0)
            with connection.transaction():
                for statement in batch:
                    total += max(connection.execute(statement).rowcount, 0)
            return total

        return self.call(work)

    def call(self, work: Callable[[Any], Any], retry: bool = False) -> defer.Deferred[Any]:
        """
        Run C{work(connection)} on the session's worker thread with its
        psycopg connection (autocommit; databases attached, search path on
        C{local}); fires with what it returns.  C{retry}: run it once more
        if hyperd went away during it (only for work that is safe to
        repeat).
        """
        self._check_open()
        self._source.activity()
        return self._in_worker(self._run, work, retry)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError("the session is closed")

    def close(self) -> defer.Deferred[None]:
        """
        End the session: detach and delete the ephemeral database, tell the
        daemon, stop what was started.  Persistent data stays.
        """
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        return defer.ensureDeferred(self._close())

    async def _close(self) -> None:
        if self._pool.started:
            try:
                await self._in_worker(self._drop_ephemeral)
            except Exception as e:
                _log.warn("could not drop {path}: {error}", path=str(self.ephemeral_db), error=e)
        await self._source.close()
        if self._pool.started:
            await deferToThread(self._pool.stop)
        await deferToThread(shutil.rmtree, self.ephemeral_db.parent, True)

    def _drop_ephemeral(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None or connection.closed:
            return
        try:
            connection.execute(f"DETACH DATABASE {EPHEMERAL_ALIAS}")
            connection.execute(f"DROP DATABASE IF EXISTS {_quote(str(self.ephemeral_db))}")
        finally:
            connection.close()
