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

import functools
import importlib
import json
import os
import select
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Collection, Protocol, Sequence, Union

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

from hyperdaemon import __version__, peeruid
from hyperdaemon.config import HYPERD_USER, ConfigError, check_persistent_db
from hyperdaemon.discovery import SESSIONS_NAME, CorruptDiscovery, read_record
from hyperdaemon.client.finder import DaemonAddress, Finder
from hyperdaemon.client.sharedfiles import NotDurable, SharedFile, take_hold, wait_until_written

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
#: The session protocol that relays RELEASE requests between sessions.
RELEASE_PROTOCOL = 2
#: The session protocol that lets a session change its name (NAME).
NAME_PROTOCOL = 3
#: SQL aliases of the session's databases.
EPHEMERAL_ALIAS = "local"
PERSISTENT_ALIAS = "persistent"
#: Where a shared file's locks go when its own folder is read-only.
LOCKS_NAME = "locks"
#: Command tags of statements that cannot have written anything (Hyper has
#: no data-modifying CTEs, and SELECT INTO is refused).
READ_TAGS = frozenset({"SELECT", "SHOW"})

#: What a call may have written: C{True} (every shared file), C{False}, the
#: aliases it wrote to, or a function that says so once the call is done.
Writes = Union[bool, Collection[str], Callable[[], Union[bool, Collection[str]]]]


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

    def close(self, clean: bool = True) -> defer.Deferred[None]:
        """
        End: say goodbye (C{clean}: our ephemeral database is dropped), stop
        what was started.
        """

    def cleans_up_after_us(self) -> bool:
        """Whether the other end drops our database and folder if we cannot."""

    def can_relay_releases(self) -> bool:
        """
        Whether other sessions can be asked to let go of a shared file (so
        that this session may keep files attached between calls).
        """

    def request_release(self, path: str) -> None:
        """Ask the other sessions to let go of C{path} (L{hyperdaemon.client.sharedfiles})."""

    def rename(self, name: str) -> defer.Deferred[None]:
        """Label the session C{name} where it is listed (C{daemon status})."""

    #: Called (on the reactor) with a path another session asks us to let go of.
    on_release: Callable[[str], None] | None


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
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text.startswith("RELEASE "):
            # Not a reply: another session asks us to let go of a file.
            self._link._release_requested(text[len("RELEASE "):])
        elif self._waiting:
            self._waiting.pop(0).callback(text)

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
                 heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 pid: int | None = None) -> None:
        self._reactor = reactor
        self._finder = finder
        self._name = name
        #: The process whose death ends the session (see L{Session.open}).
        self._pid = os.getpid() if pid is None else pid
        self.sessions_root = finder.state_dir / SESSIONS_NAME
        self._ephemeral: Path | None = None
        self._protocol: _SessionProtocol | None = None
        self._credentials = _Awaited()
        self._legacy = False
        self._closing = False
        self.address: DaemonAddress | None = None
        self.on_release: Callable[[str], None] | None = None
        #: The daemon accepted our ephemeral database: it drops it if we die.
        self._daemon_knows_ephemeral = False
        self._heartbeats = HeartbeatDebouncer(reactor, heartbeat_interval, self._heartbeat)
        factory = Factory.forProtocol(lambda: _SessionProtocol(self))
        factory.noisy = False
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

    def can_relay_releases(self) -> bool:
        address = self.address
        return address is not None and (address.session_protocol or 0) >= RELEASE_PROTOCOL

    def request_release(self, path: str) -> None:
        protocol = self._protocol
        if protocol is not None and self.can_relay_releases():
            protocol.ask("RELEASE " + json.dumps({"path": path})).addErrback(lambda _: None)

    def _release_requested(self, argument: str) -> None:
        try:
            path = json.loads(argument)["path"]
        except (ValueError, KeyError, TypeError):
            _log.warn("unusable RELEASE from the daemon")
            return
        if self.on_release is not None and isinstance(path, str):
            self.on_release(path)

    def cleans_up_after_us(self) -> bool:
        return self._daemon_knows_ephemeral and not self._legacy

    def rename(self, name: str) -> defer.Deferred[None]:
        """
        Send C{NAME} on the session's connection, if the daemon speaks it;
        a later C{SESSION} (after a reconnection) carries the name anyway.
        A refusal is logged: the name is only a label.
        """
        self._name = name
        protocol, address = self._protocol, self.address
        if (protocol is None or self._legacy or address is None
                or (address.session_protocol or 0) < NAME_PROTOCOL):
            return defer.succeed(None)

        def answered(line: str) -> None:
            if line != "OK":
                _log.warn("the daemon did not take our new name: {line}", line=line)

        d = protocol.ask("NAME " + json.dumps({"name": name}))
        return d.addCallbacks(answered, lambda _: None)

    def close(self, clean: bool = True) -> defer.Deferred[None]:
        self._closing = True
        self._heartbeats.cancel()
        self._credentials.fail(SessionError("the session is closed"))
        protocol = self._protocol
        # BYE tells the daemon we dropped our database: without it, the
        # daemon drops it once our connection closes.
        bye = (protocol.ask("BYE") if protocol is not None and not self._legacy and clean
               else defer.succeed(""))
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
        # The port may have changed hands since the daemon was found: nothing
        # but PING goes out before the kernel says this user accepted us.
        protocol.ask("PING").addCallbacks(lambda _: self._answered(protocol), lambda _: None)

    def _answered(self, protocol: _SessionProtocol) -> None:
        if self._closing:
            protocol.transport.loseConnection()
            return
        if not peeruid.own_server(protocol.transport):
            _log.warn("port {port} is no longer this user's daemon: not used",
                      port=protocol.transport.getPeer().port)
            protocol.transport.abortConnection()
            return
        self._protocol = protocol
        if self._legacy:
            self._read_discovery()
            return
        self._register(protocol, self._ephemeral)

    def _register(self, protocol: _SessionProtocol, ephemeral: Path | None) -> None:
        if ephemeral is not None:
            # A daemon that stopped (a takeover) removed our folder: a new,
            # empty one, for the new daemon to accept and clean up.
            try:
                ephemeral.parent.mkdir(mode=0o700, exist_ok=True)
            except OSError as e:
                _log.warn("cannot make {folder}: {error}", folder=str(ephemeral.parent),
                          error=e.strerror)
        fields = {"pid": self._pid, "name": self._name,
                  "ephemeral_db": str(ephemeral) if ephemeral else None,
                  "release": True}
        if self._pid != os.getpid():
            # Opened for another process (an MCP host's launcher), which
            # comes back through a new host if this one dies: the daemon
            # keeps the database for as long as that process lives.
            fields["keep_while_owner_lives"] = True

        def reply(line: str) -> None:
            if line.startswith("ERR") and ephemeral is not None and "ephemeral_db" in line:
                # This daemon keeps its state elsewhere: we clean up ourselves.
                _log.info("the daemon refused our ephemeral database ({line})", line=line)
                self._register(protocol, None)
                return
            if line.startswith("ERR") and self._credentials.value is None:
                self._credentials.fail(SessionError(f"the daemon refused the session: {line[4:]}"))
                return
            if line.startswith("OK ") and ephemeral is not None:
                self._daemon_knows_ephemeral = True
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
        from hyperdaemon.config import hyperd_executable
        from hyperdaemon.daemon.supervisor import HyperdSupervisor

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
        """
        Check our hyperd: the credentials come back once it is known to be
        usable (busy counts), or once its replacement is ready.
        """
        self._credentials.clear()
        self._supervisor.check_now()
        self._supervisor.when_usable().addCallbacks(self._ready, lambda _: None)

    def activity(self) -> None:
        pass

    #: Other processes' private hyperds cannot be reached: files are
    #: let go of after every call.
    on_release: Callable[[str], None] | None = None

    def can_relay_releases(self) -> bool:
        return False

    def request_release(self, path: str) -> None:
        pass

    def cleans_up_after_us(self) -> bool:
        return False

    def rename(self, name: str) -> defer.Deferred[None]:
        return defer.succeed(None)  # listed nowhere

    def close(self, clean: bool = True) -> defer.Deferred[None]:
        d = defer.maybeDeferred(self._supervisor.stopService) if self._supervisor.running \
            else defer.succeed(None)
        return d.addBoth(lambda _: shutil.rmtree(self._logs, ignore_errors=True))


def _own_folder(ephemeral: str | os.PathLike[str] | None, root: Path,
                pid: int) -> Path | None:
    """
    The folder of C{ephemeral} if it is a session folder of C{pid} under
    C{root} (a real directory of this user, named C{<pid>-...}); else None.
    """
    if ephemeral is None:
        return None
    path = Path(ephemeral)
    folder = path.parent
    if (path.name != EPHEMERAL_NAME or folder.parent != root
            or not folder.name.startswith(f"{pid}-")):
        return None
    try:
        info = os.lstat(folder)
    except OSError:
        return None
    import stat

    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return None
    return folder


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


class _WorkerPool(ThreadPool):
    """A session's worker: its thread never keeps a finished program alive."""

    threadFactory = functools.partial(threading.Thread, daemon=True)


@attrs.define(eq=False)
class SpareConnection:
    """A connection to C{hyperd} made ahead of a session, with the credentials it used."""

    connection: Any
    credentials: Credentials

    def take(self, credentials: Credentials) -> Any:
        """The connection if it is sound and for C{credentials}; else None (it is closed)."""
        connection = self.connection
        if credentials == self.credentials and not _broken(connection):
            return connection
        self.close()
        return None

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            pass


def connect_hyperd(credentials: Credentials) -> Any:
    """
    A psycopg connection (autocommit) to the C{hyperd} of C{credentials},
    once we know that this user's process accepted it: a port can change
    hands when a C{hyperd} dies, and our statements and rows must never
    reach another user's process.  The password is only ever proven with
    SCRAM, never sent.

    @raise SessionError: if another user's process answered.
    @raise psycopg.OperationalError: if it cannot connect (try again).
    """
    import psycopg

    from hyperdaemon import peeruid

    extra = {"require_auth": "scram-sha-256"} if credentials.password is not None else {}
    # No prepared statements: databases are attached and detached around
    # calls, and a plan prepared over a table that has since gone fails
    # ("no longer valid").
    connection = psycopg.connect(
        host=credentials.host, port=credentials.port, user=credentials.user,
        password=credentials.password, autocommit=True, connect_timeout=10,
        prepare_threshold=None, **extra,
    )
    try:
        with socket.socket(fileno=os.dup(connection.pgconn.socket)) as sock:
            owner = peeruid.server_uid(sock)
    except (peeruid.UnknownPeer, OSError):
        connection.close()
        raise psycopg.OperationalError(
            f"hyperd at {credentials.host}:{credentials.port} closed the connection") from None
    if owner is not None and owner != os.getuid():
        connection.close()
        raise SessionError(
            f"the hyperd endpoint {credentials.host}:{credentials.port} is held by "
            f"{peeruid.describe_uid(owner)}, not by you: nothing was sent to it; stop that "
            f"process or ask the daemon for a new hyperd (hyperdb-mcp daemon stop)")
    return connection


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
        #: A connection made ahead (L{open}'s C{connection}), until used.
        self._spare: SpareConnection | None = None
        self._pool = _WorkerPool(1, 1, name="hyperdaemon-session")
        self._closed = False
        #: Shared files (the persistent database, files attached by name),
        #: attached only while held (L{hyperdaemon.client.sharedfiles}).
        self._files: dict[str, SharedFile] = {}
        self._locks_fallback = source.sessions_root.parent / LOCKS_NAME
        if persistent_db is not None:
            self._files[PERSISTENT_ALIAS] = SharedFile.at(
                PERSISTENT_ALIAS, persistent_db, self._locks_fallback, create=True)
        source.on_release = self._release_requested

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
        pid: int | None = None,
        reattach: str | os.PathLike[str] | None = None,
        connection: "SpareConnection | None" = None,
    ) -> defer.Deferred["Session"]:
        """
        Open a session: find or start the daemon (or, with C{no_daemon}, a
        private C{hyperd}), register, create the ephemeral database and
        attach the persistent one (creating it if missing).

        Settings come from C{environ} (default C{os.environ}) as for the
        daemon: C{HYPERDB_STATE_DIR}, C{HYPERDB_DAEMON_PORT},
        C{HYPERDB_PERSISTENT_DB}...; C{finder} replaces the default one.
        C{pid} is the process the session belongs to (default this one): its
        folder is named after it, and the daemon drops the session's
        database if that process dies (an MCP host opens sessions for its
        launchers).  C{reattach} is the ephemeral database of an earlier
        session of that process (its folder under the state directory,
        named after C{pid}): it is attached again, with what it holds; any
        other path is ignored and a new database made.  C{connection}: a
        connection to C{hyperd} made ahead, used instead of connecting if it
        is still sound and its credentials are still the ones (an MCP host
        keeps one ready); the session owns it from then on.

        @return: a Deferred firing with the ready L{Session}, or failing
            with L{SessionError} / L{hyperdaemon.client.finder.DaemonUnavailable}.
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        try:
            return cls._start(reactor, name, persistent_db, ephemeral_only, no_daemon,
                              state_dir, port, environ, finder, pid, reattach, connection)
        except Exception:
            if connection is not None:
                connection.close()
            return defer.fail()

    @classmethod
    def _start(cls, reactor: Any, name: str | None,
               persistent_db: str | os.PathLike[str] | None, ephemeral_only: bool,
               no_daemon: bool, state_dir: str | None, port: str | int | None,
               environ: dict[str, str] | None, finder: Finder | None,
               pid: int | None = None,
               reattach: str | os.PathLike[str] | None = None,
               connection: "SpareConnection | None" = None) -> defer.Deferred["Session"]:
        environ = dict(os.environ if environ is None else environ)
        if finder is None:
            finder = Finder.from_environment(state_dir, port, environ)
        source: HyperdSource
        if no_daemon:
            source = PrivateHyperd(reactor, finder.state_dir, environ)
        else:
            source = DaemonLink(reactor, finder, name, pid=pid)
        persistent: Path | None = None
        if not ephemeral_only:
            persistent = (Path(os.path.abspath(os.path.expanduser(persistent_db)))
                          if persistent_db else default_persistent_db(environ))
        return defer.ensureDeferred(cls._open(reactor, source, persistent,
                                              os.getpid() if pid is None else pid, reattach,
                                              connection))

    @classmethod
    async def _open(cls, reactor: Any, source: HyperdSource,
                    persistent: Path | None, pid: int,
                    reattach: str | os.PathLike[str] | None = None,
                    connection: "SpareConnection | None" = None) -> "Session":
        from hyperdaemon.discovery import StateDirError, prepare_state_dir

        root = source.sessions_root
        try:
            prepare_state_dir(root.parent)
            if persistent is not None:
                check_persistent_db(persistent)
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        # A private folder, made exclusively, named for its owner's pid so
        # that a daemon can tell when its owner is gone.
        try:
            folder = (_own_folder(reattach, root, pid)
                      or Path(tempfile.mkdtemp(prefix=f"{pid}-", dir=root)))
        except OSError as e:
            raise StateDirError(
                f"Cannot create this session's folder in {root}: {e.strerror}; free or fix "
                f"the state directory, or choose another with HYPERDB_STATE_DIR."
            ) from None
        session = cls(reactor, source, folder / EPHEMERAL_NAME, persistent)
        session._spare = connection
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
                self._connect()
                # Attached once now, so that an unusable persistent
                # database fails the open, and a new one is created.
                self._attach_shared()
                self._after_call(False)
                return
            except psycopg.OperationalError:
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                blockingCallFromThread(self._reactor, self._report_error)

    def _connect(self) -> None:
        """(Re)connect to the current hyperd and attach our databases."""
        import psycopg

        self._drop_connection()
        for attempt in range(CONNECT_ATTEMPTS):
            credentials = blockingCallFromThread(self._reactor, self._fresh_credentials)
            self.credentials = credentials
            spare, self._spare = self._spare, None
            if spare is not None:
                connection = spare.take(credentials)
                if connection is not None:
                    break
            try:
                connection = connect_hyperd(credentials)
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
            connection.execute(f"SET schema_search_path = '{EPHEMERAL_ALIAS}'")
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _drop_connection(self) -> None:
        """Close the connection to hyperd: every database is detached with it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass
        for shared in self._files.values():
            shared.attached = False
            shared.hold.unlock()

    def _run(self, work: Callable[[Any], Any], retry: bool, writes: Writes) -> Any:
        """
        Run C{work(connection)} with every database attached; first
        reconnect if hyperd went away while we were idle.  If the connection
        dies during C{work} and C{retry} is set, reconnect and run it once
        more.  Then make what it C{writes} durable (L{_after_call}).
        """
        import psycopg

        if _broken(self._connection):
            self._report_and_reconnect()
        started = False
        try:
            try:
                self._attach_shared()
                started = True
                result = work(self._connection)
            except psycopg.OperationalError:
                if not _broken(self._connection):
                    raise
                self._report_and_reconnect()
                if started and not retry:
                    raise SessionError(
                        "hyperd went away during the statement, which may not have completed; "
                        "the session has reconnected: check, then run it again if needed"
                    ) from None
                _log.warn("a call was cut off by the broken connection: running it again",
                          session=self)
                self._attach_shared()
                result = work(self._connection)
        except BaseException:
            # A failed call may still have changed something (Hyper does
            # not undo DDL): write out what it may have touched all the same.
            try:
                self._after_call(writes)
            except Exception as e:
                _log.warn("after a failed call: {error}", error=e)
            raise
        self._after_call(writes)
        return result

    def _attach_shared(self) -> None:
        """Hold and attach every shared file not attached now."""
        while pending := [f for f in self._files.values() if not f.attached]:
            shared = pending[0]
            take_hold(shared, self._let_go_all)
            try:
                self._attach_file(shared)
            except BaseException:
                shared.hold.unlock()
                raise
            shared.attached = True

    def _attach_file(self, shared: SharedFile) -> None:
        import psycopg

        quoted = _quote(str(shared.path))
        if shared.create:
            shared.path.parent.mkdir(parents=True, exist_ok=True)
        # Sessions take turns: an ATTACH while another connection runs
        # CREATE DATABASE IF NOT EXISTS on the same file wedges hyperd.
        shared.attaching.lock(exclusive=True)
        try:
            if shared.create and not shared.path.exists():
                try:
                    self._connection.execute(f"CREATE DATABASE IF NOT EXISTS {quoted}")
                except psycopg.errors.ObjectInUse:
                    pass  # a client of an older version is creating it right now
            self._connection.execute(f"ATTACH DATABASE {quoted} AS {_quote(shared.alias)}")
        finally:
            shared.attaching.unlock()

    def _let_go(self, shared: SharedFile) -> None:
        """Detach a shared file and let go of its hold."""
        if shared.attached:
            try:
                self._connection.execute(f"DETACH DATABASE {_quote(shared.alias)}")
            except Exception:
                # Never let go of a hold on a file that may still be
                # attached: closing the connection detaches everything.
                self._drop_connection()
                return
            shared.attached = False
        shared.hold.unlock()

    def _let_go_all(self) -> None:
        for shared in self._files.values():
            self._let_go(shared)

    def _after_call(self, writes: Writes) -> None:
        """
        Make the call's writes to shared files durable: detach them and wait
        until no session has them attached (L{hyperdaemon.client.sharedfiles}).
        Without a way to ask other sessions to let go, let go of every file
        after each call, so that nobody waits on an idle session.
        """
        if callable(writes):
            writes = writes()
        if writes is True:
            written = [f for f in self._files.values() if f.attached]
        elif writes:
            written = [f for a, f in self._files.items() if a in writes and f.attached]
        else:
            written = []
        if written and self._connection is not None:
            for shared in written:
                self._let_go(shared)
            for shared in written:
                try:
                    wait_until_written(
                        shared, functools.partial(self._nudge, str(shared.path)))
                except NotDurable as e:
                    raise SessionError(str(e)) from None
            if self._source.can_relay_releases() and not self._closed:
                # A cold attach costs some 10 ms per table: pay it now, while
                # the caller reads the result, not in the next call.
                self._pool.callInThread(self._attach_quietly)
        if not self._source.can_relay_releases():
            self._let_go_all()

    def _attach_quietly(self) -> None:
        """Attach the shared files between calls; a failure waits for the next call."""
        if self._closed or _broken(self._connection):
            return
        try:
            self._attach_shared()
        except Exception as e:
            _log.info("attaching the shared databases again failed: {error}", error=e)

    def _nudge(self, path: str) -> None:
        blockingCallFromThread(self._reactor, self._request_release, path)

    def _request_release(self, path: str) -> None:
        self._source.request_release(path)

    def _release_requested(self, path: str) -> None:
        """Another session waits for C{path}: let go of it after the current call."""
        if self._closed or not any(str(f.path) == path and f.attached
                                   for f in self._files.values()):
            return

        def let_go() -> None:
            for shared in self._files.values():
                if str(shared.path) == path:
                    self._let_go(shared)

        self._in_worker(let_go).addErrback(
            lambda f: _log.warn("could not let go of {path}: {error}", path=path,
                                error=f.getErrorMessage()))

    def _report_and_reconnect(self) -> None:
        before = self.credentials
        blockingCallFromThread(self._reactor, self._report_error)
        self._connect()
        after = self.credentials
        endpoint = f"{after.host}:{after.port}" if after is not None else "?"
        # session=: whose warning it is, for a process serving several.
        if (before is not None and after is not None
                and (before.host, before.port) != (after.host, after.port)):
            _log.warn("hyperd was replaced: the session reconnected to the new one at "
                      "{endpoint}", endpoint=endpoint, session=self)
        else:
            _log.warn("the connection to hyperd broke: the session reconnected to {endpoint}",
                      endpoint=endpoint, session=self)

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
        """
        Run one statement that returns rows; fires with a L{Result}.  A
        statement that wrote (C{INSERT ... RETURNING}, say) is made durable
        as L{execute} does.
        """
        tags: list[str] = []

        def work(connection: Any) -> Result:
            cursor = connection.execute(sql, params)
            tags.append((cursor.statusmessage or "").split(" ", 1)[0])
            columns = [c.name for c in cursor.description or []]
            return Result(columns, cursor.fetchall() if cursor.description else [])

        def wrote() -> bool:
            return not tags or tags[-1] not in READ_TAGS

        return self.call(work, retry=True, writes=wrote)

    def execute(self, statements: str | Sequence[str]) -> defer.Deferred[int]:
        """
        Run one statement, or several atomically (in one transaction);
        fires with the number of rows affected (summed), once the changes
        to shared databases are written to disk.
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

    def call(self, work: Callable[[Any], Any], retry: bool = False,
             writes: Writes = True) -> defer.Deferred[Any]:
        """
        Run C{work(connection)} on the session's worker thread with its
        psycopg connection (autocommit; databases attached, search path on
        C{local}); fires with what it returns.  C{retry}: run it once more
        if hyperd went away during it (only for work that is safe to
        repeat).  C{writes}: what C{work} may change among the shared
        databases (C{True}: any; C{False}: none; or their aliases); those
        are written to disk before the Deferred fires, so that the change
        survives even a SIGKILL of hyperd.  The session's own C{local}
        database is scratch and is not written out after each call.
        """
        self._check_open()
        self._source.activity()
        return self._in_worker(self._run, work, retry, writes)

    def attach(self, alias: str, path: str | os.PathLike[str],
               create: bool = False) -> defer.Deferred[None]:
        """
        Attach a database file under C{alias} (creating it with C{create}),
        as a shared file: other sessions may use it at the same time, and
        writes to it are made durable like those to C{persistent}.
        """
        self._check_open()
        if alias in self._files or alias == EPHEMERAL_ALIAS:
            return defer.fail(SessionError(f"{alias!r} is already attached"))
        shared = SharedFile.at(alias, Path(os.path.abspath(path)), self._locks_fallback,
                               create=create)

        def attach(connection: Any) -> None:
            self._files[alias] = shared
            try:
                self._attach_shared()
            except BaseException:
                del self._files[alias]
                shared.close()
                raise

        return self.call(attach, writes=False)

    def detach(self, alias: str) -> defer.Deferred[None]:
        """Detach a file attached with L{attach}."""
        self._check_open()
        if alias not in self._files or alias == PERSISTENT_ALIAS:
            return defer.fail(SessionError(f"{alias!r} was not attached with attach()"))

        def detach(connection: Any) -> None:
            shared = self._files.pop(alias, None)
            if shared is not None:
                self._let_go(shared)
                shared.close()

        return self.call(detach, writes=False)

    def rename(self, name: str) -> defer.Deferred[None]:
        """
        Change the name the daemon lists this session under (C{daemon
        status}), e.g. once the program knows who it serves.  Does nothing
        with C{no_daemon} or a daemon too old to rename sessions.  Fires
        once the daemon has answered; never fails.

        @raise ValueError: if C{name} is not a string of at most 200
            characters.
        """
        from hyperdaemon.daemon.protocol import MAX_SESSION_NAME

        if not isinstance(name, str) or len(name) > MAX_SESSION_NAME:
            raise ValueError(f"a session's name is a string of at most {MAX_SESSION_NAME} "
                             f"characters")
        return self._source.rename(name)

    @property
    def attached_files(self) -> dict[str, Path]:
        """The shared files by alias (C{persistent} and those of L{attach})."""
        return {alias: shared.path for alias, shared in self._files.items()}

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError("the session is closed")

    def close(self, keep_ephemeral: bool = False) -> defer.Deferred[None]:
        """
        End the session: cancel the statement under way, detach and delete
        the ephemeral database, tell the daemon, stop what was started.
        Persistent data stays.  If the ephemeral database could not be
        dropped, the daemon is left to drop it (no C{BYE}).

        With C{keep_ephemeral}, the ephemeral database is only detached:
        it belongs to a process that lives on (an MCP host's launcher, whose
        next host attaches it again), and the daemon drops it once that
        process is gone.
        """
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        return defer.ensureDeferred(self._close(keep_ephemeral))

    async def _close(self, keep_ephemeral: bool = False) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:  # never used: the session did not get that far
            spare.close()
        dropped = False
        if self._pool.started:
            connection = self._connection
            if connection is not None:
                # A long statement would hold the drop (and the exit) up.
                await self._cancel_until_idle(connection)
            try:
                dropped = await self._in_worker(self._drop_ephemeral, not keep_ephemeral)
            except Exception as e:
                _log.warn("could not drop {path}: {error}", path=str(self.ephemeral_db), error=e)
        await self._source.close(clean=dropped)
        if self._pool.started:
            await deferToThread(self._pool.stop)
        if keep_ephemeral:
            return
        if dropped or not self._source.cleans_up_after_us():
            await deferToThread(shutil.rmtree, self.ephemeral_db.parent, True)

    async def _cancel_until_idle(self, connection: Any) -> None:
        """
        Cancel the statements that run or wait on C{connection} until the
        worker is free.  A cancel that reaches C{hyperd} before the statement
        it is meant for does nothing: it is sent again until one lands.
        """
        from twisted.internet.task import deferLater

        deadline = self._reactor.seconds() + CANCEL_PATIENCE
        while ((self._pool.working or self._pool.q.qsize())
               and self._reactor.seconds() < deadline):
            await deferToThread(_cancel, connection)
            await deferLater(self._reactor, CANCEL_AGAIN_AFTER, lambda: None)

    def _drop_ephemeral(self, drop: bool = True) -> bool:
        """
        Let go of every database, then drop ours (unless not C{drop}: the
        connection only closes); whether it is gone.
        """
        try:
            self._let_go_all()
        except Exception as e:
            _log.warn("could not detach the shared databases: {error}", error=e)
        for shared in self._files.values():
            shared.close()
        connection, self._connection = self._connection, None
        if connection is None or connection.closed:
            return False
        if not drop:
            connection.close()
            return False
        try:
            connection.execute(f"DETACH DATABASE {EPHEMERAL_ALIAS}")
            connection.execute(f"DROP DATABASE IF EXISTS {_quote(str(self.ephemeral_db))}")
            return True
        finally:
            connection.close()


#: How long a closing session keeps cancelling what runs on its connection,
#: and how often it sends a cancel again while something still runs.
CANCEL_PATIENCE = 10.0
CANCEL_AGAIN_AFTER = 0.1


def _cancel(connection: Any) -> None:
    try:
        connection.cancel_safe(timeout=5.0)
    except Exception:
        pass
