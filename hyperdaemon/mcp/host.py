"""
The MCP host: one process per user that serves the MCP session of every
assistant, so that the SDK, pydantic, psycopg and Twisted are loaded once,
not once per assistant.

The daemon starts it (L{hyperdaemon.daemon.mcphost}) as C{python -m
hyperdaemon.mcp.host --state-dir S --daemon-port P}.  It listens on
C{S/mcp-host.sock} (mode 0600, in the 0700 state directory), prints
C{READY} on stdout once it accepts launchers, and from then on a
C{SESSIONS <json>} line whenever its sessions change.  It exits when its
stdin (a pipe from the daemon) closes, or on SIGTERM/SIGINT, closing every
session first.

Each connection is one launcher (L{hyperdaemon.mcp.launcher}): a peer of
another uid is told no and closed; otherwise its first line is its settings
(L{LauncherSettings}), the host opens a client L{Session} for it (its folder
and registration named after the launcher's pid), answers one line
(C{{"ok": true, ...}} or C{{"error": sentence, "fallback": bool}}), and then
serves MCP on the rest of the stream, one JSON-RPC message per line, as a
server on stdio would.  Sessions are independent: each has its own psycopg
connection and worker thread, so one's slow query holds up no other.  When
the connection closes, the session closes (its scratch database is dropped).

What does not depend on a session is made once, before a launcher
arrives: one MCP server, its tools and their pydantic models, serves every
session; its tools reach the session being served through L{SessionTools}
(L{CURRENT_SESSION}, set in the task that serves the connection).
"""

from __future__ import annotations

import argparse
import contextvars
import gc
import json
import os
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from hyperdaemon.client.finder import DaemonAddress, Finder
from hyperdaemon.mcp.launcher import PASSED_VARIABLES, Lines

#: The most a settings line may hold.
SETTINGS_LIMIT = 256 * 1024
#: The longest MCP message line a launcher may send (a load_data's data).
MESSAGE_LIMIT = 256 * 1024 * 1024


class HostStartError(Exception):
    """The host cannot serve; C{str()} is one sentence with the fix."""


@attrs.define
class HostFinder(Finder):
    """
    The host's daemon, as its sessions find it: found once (L{Finder.ensure}),
    then known, so that a launcher's session does not wait for the daemon's
    C{STATUS} first.  The host lives no longer than that daemon (its stdin
    is the daemon's pipe), and each session's connection to it is checked
    as ever (the daemon must be this user's).
    """

    known: DaemonAddress | None = None

    def ensure(self) -> DaemonAddress:
        known = self.known
        if known is None:
            known = self.known = Finder.ensure(self)
        return known


@attrs.frozen
class LauncherSettings:
    """What a launcher says about itself in its first line."""

    pid: int
    cwd: str
    read_only: bool = False
    ephemeral_only: bool = False
    #: The persistent database, absolute (the launcher resolves it); None
    #: with C{ephemeral_only}.
    persistent_db: str | None = None
    environ: dict[str, str] = attrs.Factory(dict)
    #: The scratch database of the launcher's session in a host that died:
    #: attached again, with what it holds.
    ephemeral_db: str | None = None

    @classmethod
    def parse(cls, line: bytes) -> "LauncherSettings":
        """
        The settings in a launcher's first line (a JSON object).

        @raise ValueError: with one sentence saying what is wrong.
        """
        try:
            fields = json.loads(line)
        except ValueError:
            raise ValueError("the settings line is not JSON") from None
        if not isinstance(fields, dict):
            raise ValueError("the settings line must be a JSON object")
        pid, cwd = fields.get("pid"), fields.get("cwd")
        if type(pid) is not int or pid <= 0:
            raise ValueError("the settings need \"pid\", the launcher's process id")
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise ValueError("the settings need \"cwd\", an absolute path")
        persistent = fields.get("persistent_db")
        if persistent is not None and not (isinstance(persistent, str)
                                           and os.path.isabs(persistent)):
            raise ValueError("\"persistent_db\" must be an absolute path")
        ephemeral = fields.get("ephemeral_db")
        if ephemeral is not None and not (isinstance(ephemeral, str)
                                          and os.path.isabs(ephemeral)):
            raise ValueError("\"ephemeral_db\" must be an absolute path")
        environ = fields.get("environ") or {}
        if not (isinstance(environ, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in environ.items())):
            raise ValueError("\"environ\" must map names to strings")
        flags = {name: fields.get(name, False) for name in ("read_only", "ephemeral_only")}
        if not all(isinstance(value, bool) for value in flags.values()):
            raise ValueError("\"read_only\" and \"ephemeral_only\" must be true or false")
        return cls(pid=pid, cwd=cwd, persistent_db=persistent, ephemeral_db=ephemeral,
                   environ={k: v for k, v in environ.items() if k in PASSED_VARIABLES},
                   **flags)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (C{SO_PEERCRED})."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def clear_stale_socket(path: Path) -> None:
    """
    Make way for a new socket at C{path}: a socket nobody answers on is
    removed.

    @raise HostStartError: if a host answers there, or the path is not a socket.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise HostStartError(f"{path} exists and is not a socket: remove it, and the "
                             f"daemon will start the MCP host again.")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as e:
        raise HostStartError(f"cannot check {path}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise HostStartError(f"an MCP host already answers on {path}; stop its daemon "
                         f"('hyperdb-mcp daemon stop') before starting another.")


#: The session being served: set in the task that serves a launcher's
#: connection, and so seen by every request handler of that connection.
CURRENT_SESSION: contextvars.ContextVar["Served"] = contextvars.ContextVar("hyperdb_mcp_session")


class SessionTools:
    """
    The L{hyperdaemon.mcp.tools.Tools} of the session being served
    (L{CURRENT_SESSION}): what the host gives L{build_server} as its tools,
    so that one server, its tools and their models made once, serves every
    session.  Families must keep per-session state on C{kit.tools}, never
    in their closures, and touch C{kit.tools} only while a request is
    handled; the host makes a server per session for a family that does not.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(_current_tools(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(_current_tools(), name, value)


def _current_tools() -> Any:
    try:
        return CURRENT_SESSION.get().tools
    except LookupError:
        raise RuntimeError("no MCP session is being served here: use kit.tools only "
                           "while a request is handled") from None


def _as_future(d: Any) -> Any:
    import asyncio

    return d.asFuture(asyncio.get_running_loop())


@attrs.define
class Served:
    """A session being served: the value of L{CURRENT_SESSION}."""

    session: Any
    tools: Any
    #: Called with the client's name once it is known.
    renamed: Callable[[str], None]


class McpHost:
    """The host's connections, its spare server, and its lifetime."""

    def __init__(self, reactor: Any, state_dir: Path, daemon_port: int | None,
                 report: Callable[[str], None] = lambda line: None) -> None:
        self._reactor = reactor
        self.state_dir = state_dir
        self.daemon_port = daemon_port
        self._report = report
        self.connections: set[LauncherConnection] = set()
        self._listening: Any = None
        self.server: Any = None
        self._finder: HostFinder | None = None
        #: The scratch database and connection made ahead (L{start_spares}).
        self.spares: Any = None
        #: The host is stopping: its sessions end, their launchers do not.
        self.stopping = False

    @property
    def socket_path(self) -> Path:
        from hyperdaemon.daemon.mcphost import socket_path

        return socket_path(self.state_dir)

    def listen(self) -> None:
        """
        Listen on the socket, removing a stale one first.

        @raise HostStartError: if that cannot be done.
        """
        from twisted.internet.error import CannotListenError
        from twisted.internet.protocol import Factory

        path = self.socket_path
        if len(os.fsencode(path)) >= 108:
            raise HostStartError(f"the socket path {path} is too long for a Unix socket; "
                                 f"choose a shorter state directory (HYPERDB_STATE_DIR).")
        clear_stale_socket(path)
        factory = Factory.forProtocol(lambda: LauncherConnection(self))
        factory.noisy = False
        try:
            self._listening = self._reactor.listenUNIX(str(path), factory, backlog=1024,
                                                       mode=0o600, wantPID=False)
        except CannotListenError as e:
            raise HostStartError(f"cannot listen on {path}: {e.socketError}") from None

    def prepare(self) -> None:
        """
        Import what sessions need and make the one server; and load what a
        first statement's checks need (L{hyperdaemon.mcp.tools.warm_up}):
        done now, it does not compete with the first launchers' sessions
        (a first query would otherwise pay about 0.1 s).
        """
        import psycopg  # noqa: F401  (each session's worker would import it)

        from hyperdaemon.mcp.server import build_server
        from hyperdaemon.mcp.tools import warm_up

        def name_session(label: str) -> None:
            CURRENT_SESSION.get().renamed(label)

        try:
            self.server = build_server(SessionTools(), name_session=name_session)
        except RuntimeError as e:
            # A family wants its session while the server is made: then
            # each session gets a server of its own (slower, and larger).
            print(f"hyperdb-mcp host: one server per session, since a tool family cannot "
                  f"share one ({e})", file=sys.stderr)
            self.server = None
        warm_up()

    def find_daemon(self) -> None:
        """
        In a thread, once the host is ready: find the daemon, so that the
        first launcher's session does not wait for its C{STATUS}.
        """
        try:
            self.finder().ensure()
        except Exception:
            pass  # the first session finds it, or says why it cannot

    def start_spares(self) -> None:
        """Keep a scratch database and a connection ready for the next launcher."""
        from hyperdaemon.client.healthclient import status
        from hyperdaemon.client.session import Credentials
        from hyperdaemon.discovery import SESSIONS_NAME
        from hyperdaemon.mcp import spare

        def build() -> Any:
            facts = status(self.finder().ensure().port)
            if facts.get("state") != "ready" or not facts.get("hyperd_endpoint"):
                raise RuntimeError("the daemon's hyperd is not ready")
            return spare.make(self.state_dir / SESSIONS_NAME, Credentials.from_facts(facts))

        self.spares = spare.SpareKeeper(self._reactor, build)
        self.spares.replenish()

    # -- sessions ----------------------------------------------------------------

    def finder(self) -> HostFinder:
        """How this host's sessions find its daemon (found once, then known)."""
        from hyperdaemon.config import PortChoice

        if self._finder is None:
            port = self.daemon_port
            self._finder = HostFinder(self.state_dir, PortChoice(port, port, port),
                                      environ=dict(os.environ))
        return self._finder

    def open_session(self, settings: LauncherSettings) -> Any:
        """A Deferred of the launcher's client L{Session}, on this host's daemon."""
        from hyperdaemon.client.session import Session

        reattach, connection = settings.ephemeral_db, None
        if reattach is None and self.spares is not None:
            taken = self.spares.take(settings.pid)
            if taken is not None:
                reattach, connection = taken
        return Session.open(self._reactor, name="hyperdb-mcp",
                            persistent_db=settings.persistent_db,
                            ephemeral_only=settings.ephemeral_only,
                            finder=self.finder(), pid=settings.pid,
                            reattach=reattach, connection=connection)

    def refusal(self, settings: LauncherSettings) -> str | None:
        """Why this host is not the one the launcher's settings choose, or None."""
        from hyperdaemon.config import ConfigError, port_choice

        try:
            choice = port_choice(None, settings.environ)
        except ConfigError as e:
            return str(e)
        if self.daemon_port not in choice.candidates():
            return (f"this host's daemon is on port {self.daemon_port}, which the "
                    f"launcher's port settings do not allow")
        return None

    def changed(self) -> None:
        sessions = [c.summary() for c in self.connections if c.summary() is not None]
        self._report("SESSIONS " + json.dumps(sessions, separators=(",", ":")))

    # -- lifetime ----------------------------------------------------------------

    def stop(self) -> Any:
        """Stop listening and close every session; a Deferred that fires when done."""
        from twisted.internet import defer

        self.stopping = True
        if self.spares is not None:
            self.spares.stop()
        waits = [c.end() for c in list(self.connections)]
        listening, self._listening = self._listening, None
        if listening is not None:
            waits.append(defer.maybeDeferred(listening.stopListening))
        return defer.DeferredList(waits)


@implementer(IHalfCloseableProtocol)
class LauncherConnection(Protocol):
    """
    One launcher's connection: its settings line, then MCP.  The launcher
    shuts its sending side down when its stdin ends: the session closes,
    and then the connection.
    """

    def __init__(self, host: McpHost) -> None:
        self._host = host
        self.transport: Any = None
        self._buffer = b""
        self.settings: LauncherSettings | None = None
        self._incoming: Any = None
        self._task: Any = None
        self._lost = False
        #: The launcher's input ended before the session opened.
        self._eof = False
        self._name: str | None = None
        self._ephemeral: str | None = None
        self._ended: Any = None
        self._lines = Lines()

    def connectionMade(self) -> None:
        try:
            uid = peer_uid(self.transport.socket)
        except OSError:
            uid = -1
        if uid != os.getuid():
            self._answer({"error": "this MCP host serves only its own user", "fallback": True})
            self.transport.loseConnection()
            self._lost = True
            return
        self._host.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._lost:
            return
        if self._incoming is not None:
            self._feed(data)
            return
        self._buffer += data
        if self.settings is not None:
            return  # the session is opening: the lines wait in the buffer
        line, newline, rest = self._buffer.partition(b"\n")
        if not newline:
            if len(self._buffer) > SETTINGS_LIMIT:
                self._refuse("the settings line is too long", fallback=False)
            return
        try:
            settings = LauncherSettings.parse(line)
        except ValueError as e:
            self._refuse(str(e), fallback=False)
            return
        refusal = self._host.refusal(settings)
        if refusal is not None:
            self._refuse(refusal, fallback=True)
            return
        self.settings, self._buffer = settings, rest
        import asyncio

        self._task = asyncio.get_event_loop().create_task(self._serve(settings))

    def readConnectionLost(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.close()  # the server sees the end of its input
        elif self._task is None:
            self.transport.loseConnection()
        else:
            self._eof = True

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.close()  # the server sees the end of its input
        if self._task is None:
            self._host.connections.discard(self)

    def summary(self) -> dict[str, Any] | None:
        if self.settings is None or self._ephemeral is None:
            return None
        return {"pid": self.settings.pid, "name": self._name,
                "ephemeral_db": self._ephemeral, "read_only": self.settings.read_only}

    def end(self) -> Any:
        """Close the connection; a Deferred that fires once its session is closed."""
        from twisted.internet import defer

        if self.transport is not None:
            self.transport.loseConnection()
        if self._task is None:
            return defer.succeed(None)
        return defer.Deferred.fromFuture(self._task).addErrback(lambda _: None)

    # -- what goes out ---------------------------------------------------------

    def _answer(self, fields: dict[str, Any]) -> None:
        self.transport.write(json.dumps(fields, separators=(",", ":")).encode() + b"\n")

    def _refuse(self, reason: str, fallback: bool) -> None:
        self._answer({"error": reason, "fallback": fallback})
        self._lost = True
        self.transport.loseConnection()
        self._host.connections.discard(self)

    # -- serving ---------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        from mcp.shared.message import SessionMessage
        from mcp.types import jsonrpc_message_adapter

        for line in self._lines.feed(data):
            if not line.strip():
                continue
            try:
                message: Any = SessionMessage(
                    jsonrpc_message_adapter.validate_json(line, by_name=False))
            except Exception as e:  # the SDK answers a bad line as stdio's reader does
                message = e
            try:
                self._incoming.send_nowait(message)
            except Exception:  # the server has stopped reading: the session ends
                break
        if self._lines.pending > MESSAGE_LIMIT:
            self.transport.loseConnection()

    async def _serve(self, settings: LauncherSettings) -> None:
        import math

        import anyio

        host = self._host
        try:
            session = await _as_future(host.open_session(settings))
        except Exception as e:
            from hyperdaemon.config import ConfigError

            if not self._lost:
                # A setting the user must fix (a bad persistent database) is
                # theirs to hear; anything else, the launcher's own server
                # tries again.
                self._refuse(str(e) or type(e).__name__,
                             fallback=not isinstance(e, ConfigError))
            host.connections.discard(self)
            return
        from hyperdaemon.mcp.tools import Tools

        tools = None
        try:
            if self._lost:
                return
            address = getattr(session._source, "address", None)
            facts = {
                "daemon_port": address.port if address else host.daemon_port,
                "daemon_version": address.version if address else None,
                "served_by": "mcp host",
                "host_pid": os.getpid(),
            }
            tools = Tools(session, read_only=settings.read_only, status_facts=lambda: facts)

            def renamed(label: str) -> None:
                session.rename(label)
                self._name = label
                host.changed()

            # Every request handler of this connection runs in a copy of
            # this task's context, and so sees this session.
            CURRENT_SESSION.set(Served(session, tools, renamed))
            self._ephemeral = str(session.ephemeral_db)
            host.changed()
            self._answer({"ok": True, "host_pid": os.getpid(),
                          "ephemeral_db": self._ephemeral})
            incoming, received = anyio.create_memory_object_stream(math.inf)
            outgoing, to_send = anyio.create_memory_object_stream(0)
            self._incoming = incoming
            self._lines = Lines()
            self._feed(self._buffer)
            self._buffer = b""
            if self._eof:
                incoming.close()
                self._incoming = None

            async def write_out() -> None:
                async with to_send:
                    async for message in to_send:
                        text = message.message.model_dump_json(by_alias=True,
                                                               exclude_unset=True)
                        if self.transport is not None and not self._lost:
                            self.transport.write(text.encode("utf-8") + b"\n")

            server = host.server
            if server is None:
                from hyperdaemon.mcp.server import build_server

                server = build_server(tools, name_session=renamed)
            lowlevel = server._lowlevel_server  # what run_stdio_async serves with
            async with anyio.create_task_group() as group:
                group.start_soon(write_out)
                async with outgoing:
                    await lowlevel.run(received, outgoing,
                                       lowlevel.create_initialization_options())
        finally:
            if tools is not None:
                tools.stop()
            try:
                # The launcher ended its session: its scratch database goes.
                # The host is stopping (its daemon stops or died): the
                # launcher lives on, and its next host attaches it again.
                await _as_future(session.close(keep_ephemeral=host.stopping))
            finally:
                host.connections.discard(self)
                if not self._lost and self.transport is not None:
                    self.transport.loseConnection()
                host.changed()


def quiet_ports(observer: Any) -> Any:
    """
    C{observer} without Twisted's lines about the socket's port ("... starting
    on ...", "(UNIX Port ... Closed)"): the daemon says when its host listens
    and stops, and these would only repeat it in its log.
    """
    from twisted.logger import FilteringLogObserver, PredicateResult

    def about_the_port(event: dict[str, Any]) -> Any:
        text = event.get("log_text") or ""
        if (isinstance(text, str) and event.get("log_namespace") == "log_legacy"
                and (text.startswith("(UNIX Port ") or " starting on " in text)):
            return PredicateResult.no
        return PredicateResult.maybe

    return FilteringLogObserver(observer, [about_the_port])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperdaemon.mcp.host",
                                     description="The MCP host (started by the daemon).")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--daemon-port", type=int,
                        help="the daemon's port; without it, the host waits for a line "
                             "'PORT <n>' on stdin before it listens")
    args = parser.parse_args(argv)
    # Start-up makes objects that live as long as the process (the SDK's
    # models): frozen once made, not collected over and over.
    gc.disable()
    os.umask(0o077)
    import asyncio

    from twisted.internet import asyncioreactor

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([quiet_ports(textFileLogObserver(sys.stderr))],
                                     redirectStandardIO=False)
    outcome = {"code": 0}
    state = {"prepared": False, "stopping": False}

    def stop() -> None:
        """Stop, once: the daemon closes its pipe and sends SIGTERM."""
        if not state["stopping"] and reactor.running:
            state["stopping"] = True
            reactor.stop()

    def fail(message: str) -> None:
        print(f"hyperdb-mcp host: {message}", file=sys.stderr)
        outcome["code"] = 1
        stop()

    class DaemonPipe(Protocol):
        """stdin/stdout: the daemon's pipe.  Its end is the daemon's."""

        _buffer = b""

        def dataReceived(self, data: bytes) -> None:
            # A host started with the daemon learns its port here (hoststart).
            if host.daemon_port is not None:
                return
            self._buffer += data
            line, found, rest = self._buffer.partition(b"\n")
            if not found:
                if len(line) > 64:
                    fail(f"the daemon's first line is not 'PORT <n>': {line[:80]!r}")
                return
            self._buffer = rest
            word, _, port = line.decode("ascii", "replace").partition(" ")
            if word != "PORT" or not port.strip().isdigit():
                fail(f"the daemon's first line is not 'PORT <n>': {line[:80]!r}")
                return
            host.daemon_port = int(port)
            go_live()

        def connectionLost(self, reason: Any = None) -> None:
            stop()

    pipe = DaemonPipe()
    stdio.StandardIO(pipe, reactor=reactor)
    host = McpHost(reactor, args.state_dir.absolute(), args.daemon_port,
                   report=lambda line: pipe.transport.write(line.encode() + b"\n"))

    def go_live() -> None:
        """Once prepared and told the port: listen, and say so."""
        if not state["prepared"] or host.daemon_port is None or outcome["code"]:
            return
        if args.daemon_port is None:
            try:
                host.listen()
            except HostStartError as e:
                fail(str(e))
                return
        pipe.transport.write(b"READY\n")
        reactor.callInThread(host.find_daemon)
        host.start_spares()

    if args.daemon_port is not None:
        try:
            host.listen()
        except HostStartError as e:
            print(f"hyperdb-mcp host: {e}", file=sys.stderr)
            return 1

    def start() -> None:
        import signal

        for signum in (signal.SIGTERM, signal.SIGINT):  # in place of the reactor's own
            signal.signal(signum, lambda signum, frame: reactor.callFromThread(stop))
        try:
            host.prepare()
        except Exception as e:
            fail(f"cannot serve: {e}")
            return
        gc.freeze()
        gc.enable()
        state["prepared"] = True
        go_live()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", host.stop)
    # Stopping listening (host.stop) removed the socket: removing the path
    # again now could take the next host's.
    reactor.run()
    sys.stdout.flush()
    sys.stderr.flush()
    # Sessions' worker threads are done; nothing else may hold the exit up.
    os._exit(outcome["code"])


if __name__ == "__main__":
    sys.exit(main())
