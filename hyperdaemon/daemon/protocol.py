"""
The health protocol: TCP on 127.0.0.1, one UTF-8 command per line, one reply
line per command, many commands per connection (SPEC.md).

This module parses and dispatches; what a command does belongs to the
L{HealthTarget} it is given (the daemon).  A connection is dropped when it is
silent or trickles for L{HealthProtocol.timeOut} seconds, or sends a line
longer than L{HealthProtocol.MAX_LENGTH}; either way the daemon and every
other connection are unharmed.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Protocol

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from hyperdaemon import PRODUCT


class HealthTarget(Protocol):
    """What the health protocol needs of the daemon."""

    version: str

    def touch(self) -> None:
        """Any command was received: it counts as activity."""

    def status(self) -> dict[str, Any]:
        """The C{STATUS} object."""

    def stop(self) -> None:
        """Begin the graceful shutdown."""

    def report_hyperd_error(self) -> None:
        """A client saw C{hyperd} fail: check it now."""

    def attach_session(self, fields: dict[str, Any]) -> tuple[str, Deferred[dict[str, Any]]]:
        """
        Register a session (C{SESSION}): its id, and a Deferred that fires
        with the id and C{hyperd}'s credentials once C{hyperd} is ready.

        @raise ValueError: if C{fields} are unusable (the message says why).
        """

    def end_session(self, session_id: str, clean: bool) -> None:
        """
        The session is over: C{clean} after C{BYE} (the client removes its
        own database), not when its connection dropped (the daemon must).
        """

    def when_ready(self) -> Deferred[dict[str, Any]]:
        """C{hyperd}'s credentials, once it is ready (C{READY})."""

    def rename_session(self, session_id: str, name: str | None) -> None:
        """The session's client gave it a new label (C{NAME})."""

    def start_mcp_host(self) -> Deferred[dict[str, Any]]:
        """The MCP host's facts (C{pid}, C{socket}) once it is ready (C{MCP_HOST})."""


#: The longest label a session may carry (C{SESSION}'s and C{NAME}'s C{name}).
MAX_SESSION_NAME = 200


def session_name(value: object) -> str | None:
    """
    A session's label as sent in C{NAME}: a string of at most
    L{MAX_SESSION_NAME} characters, or C{None} for none.

    @raise ValueError: for anything else (the message says what is allowed).
    """
    if value is None or (isinstance(value, str) and len(value) <= MAX_SESSION_NAME):
        return value
    raise ValueError(f'"name" must be a string of at most {MAX_SESSION_NAME} characters')


#: Decides whether the peer of a transport may use more than C{PING}.
Authorizer = Callable[[ITransport], bool]


@implementer(IPushProducer)
class _ReadThrottle:
    """
    Stops reading from a client that does not read our replies, so that a
    flood of commands cannot grow our write buffer without bound.
    """

    def __init__(self, transport: ITransport) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class HealthProtocol(LineReceiver, TimeoutMixin):
    """
    One health connection.  Replies are byte-exact with the upstream daemon;
    commands are matched after trimming white space (C{\\r\\n} is accepted).
    A client may half-close (C{printf 'STATUS\\n' | nc -N}): it still gets
    its replies, then the connection closes.
    """

    delimiter = b"\n"
    MAX_LENGTH = 4096
    #: Seconds a connection may go without sending a whole line.
    timeOut: float | None = 30.0
    #: Seconds a closing connection may take to read its last replies
    #: before it is cut off.
    closeGrace: float = 5.0

    _log = Logger()

    def __init__(self, target: HealthTarget, authorize: Authorizer) -> None:
        self._target = target
        self._authorize = authorize
        self._allowed: bool | None = None
        #: Set once the connection is closing; the timer then cuts it off.
        self._closing = False
        #: The session this connection carries, once C{SESSION} succeeded.
        self.session_id: str | None = None

    def connectionMade(self) -> None:
        self.setTimeout(self.timeOut)
        self.transport.registerProducer(_ReadThrottle(self.transport), True)

    def connectionLost(self, reason: object = None) -> None:
        self.setTimeout(None)
        self._end_session()

    def _end_session(self, clean: bool = False) -> None:
        self._releasers().discard(self)
        session_id, self.session_id = self.session_id, None
        if session_id is not None:
            self._target.end_session(session_id, clean)

    def readConnectionLost(self) -> None:
        self._close()

    def writeConnectionLost(self) -> None:
        self._close()

    def timeoutConnection(self) -> None:
        if self._closing:
            self.transport.abortConnection()
        else:
            self._close("ERR timeout")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._close("ERR line too long")

    def _close(self, message: str | None = None) -> None:
        """
        Say C{message}, flush, close; a client that does not read what is
        left is cut off after L{closeGrace} seconds.
        """
        if self._closing:
            return
        self._closing = True
        if message is not None:
            self.sendLine(message.encode("ascii"))
        # A transport closes only once no streaming producer is left.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        # The one timer of the connection now bounds the close.
        self.setTimeout(self.closeGrace)

    def _idle_again(self) -> None:
        """Time the connection out again when it goes silent (no session)."""
        if self.session_id is None:
            # setTimeout(None) replaced the instance's timeOut; the class
            # holds the configured one.
            self.setTimeout(type(self).timeOut)

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.sendLine(b"ERR invalid utf-8")
            return
        command, _, argument = text.strip().partition(" ")
        if command == "PING":
            # Anyone may identify the daemon, and a PING alone does not look
            # the peer up (the hot path of every scan); it counts as activity
            # once the peer is known to be this daemon's user.
            if self._allowed:
                self._target.touch()
        elif not self._is_allowed():
            self.sendLine(b"ERR forbidden")
            return
        else:
            self._target.touch()
        handler = self._commands.get(command)
        if handler is None:
            self.sendLine(b"ERR unknown command")
            return
        reply = handler(self, argument.strip())
        if isinstance(reply, Deferred):
            self._reply_later(reply)
        else:
            self.sendLine(reply.encode("utf-8"))

    def _reply_later(self, reply: Deferred[str]) -> None:
        """
        Hold later lines until C{reply} fires, so that replies keep the
        order of their commands.
        """
        self.paused = True
        self.setTimeout(None)

        def send(line: object) -> None:
            if isinstance(line, Failure):
                line = f"ERR {line.getErrorMessage()}"
            if self.transport is None or self._closing:
                return
            self.sendLine(str(line).encode("utf-8"))
            self.paused = False
            self._idle_again()
            self.dataReceived(b"")

        reply.addBoth(send)

    def _is_allowed(self) -> bool:
        if self._allowed is None:
            self._allowed = self._authorize(self.transport)
            if not self._allowed:
                self._log.info(
                    "a connection from another user ({peer}) may only PING",
                    peer=str(self.transport.getPeer()),
                )
        return self._allowed

    def cmd_PING(self, argument: str) -> str:
        return f"PONG {PRODUCT} {self._target.version}"

    def cmd_HEARTBEAT(self, argument: str) -> str:
        return "OK"

    def cmd_STATUS(self, argument: str) -> str:
        return json.dumps(self._target.status(), separators=(",", ":"))

    def cmd_STOP(self, argument: str) -> str:
        self._target.stop()
        return "STOPPING"

    def cmd_REPORT_HYPERD_ERROR(self, argument: str) -> str:
        self._target.report_hyperd_error()
        return "OK"

    def cmd_SESSION(self, argument: str) -> str | Deferred[str]:
        if self.session_id is not None:
            return "ERR this connection already carries a session"
        try:
            fields = json.loads(argument)
            if not isinstance(fields, dict):
                raise ValueError("SESSION takes a JSON object")
            self.session_id, ready = self._target.attach_session(fields)
        except ValueError as e:
            return f"ERR {e}"
        # A session's connection is silent by design: no idle timeout.
        self.setTimeout(None)
        if fields.get("release") is True:
            # It understands RELEASE lines: relay other sessions' requests.
            self._releasers().add(self)

        def failed(reason: Failure) -> str:
            self._end_session()
            return f"ERR {reason.getErrorMessage()}"

        return ready.addCallbacks(
            lambda facts: "OK " + json.dumps(facts, separators=(",", ":")), failed
        )

    def cmd_READY(self, argument: str) -> Deferred[str]:
        return self._target.when_ready().addCallback(
            lambda facts: "OK " + json.dumps(facts, separators=(",", ":"))
        )

    def cmd_BYE(self, argument: str) -> str:
        self._end_session(clean=True)
        self._idle_again()  # an ordinary connection again
        return "OK"

    def cmd_RELEASE(self, argument: str) -> str:
        """
        Relay a request to let go of a database file (C{{"path": ...}}) to
        every other session that asked for such requests: a session that
        wrote to the file waits until nobody has it attached, which is when
        Hyper writes the changes out (L{hyperdaemon.client.sharedfiles}).
        """
        try:
            fields = json.loads(argument)
            path = fields["path"] if isinstance(fields, dict) else None
        except ValueError:
            path = None
        if not isinstance(path, str) or not path:
            return 'ERR RELEASE takes a JSON object with "path"'
        line = b"RELEASE " + json.dumps({"path": path}, separators=(",", ":")).encode("utf-8")
        for other in list(self._releasers()):
            if other is not self and other.transport is not None and not other._closing:
                other.sendLine(line)
        return "OK"

    def cmd_NAME(self, argument: str) -> str:
        """
        Relabel this connection's session (C{{"name": ...}}): a client that
        registered before it knew what to call itself (an MCP server learns
        its client's name only after it has opened its session).
        """
        if self.session_id is None:
            return "ERR NAME needs a session on this connection: send SESSION first"
        try:
            fields = json.loads(argument)
        except ValueError:
            fields = None
        if not isinstance(fields, dict) or "name" not in fields:
            return 'ERR NAME takes a JSON object with "name"'
        try:
            name = session_name(fields["name"])
        except ValueError as e:
            return f"ERR {e}"
        self._target.rename_session(self.session_id, name)
        return "OK"

    def cmd_MCP_HOST(self, argument: str) -> Deferred[str]:
        """
        Start the MCP host if it does not run; answer C{OK {"pid", "socket"}}
        once it accepts launchers, or C{ERR} and why not.
        """
        return self._target.start_mcp_host().addCallback(
            lambda facts: "OK " + json.dumps(facts, separators=(",", ":"))
        )

    def _releasers(self) -> set["HealthProtocol"]:
        factory = getattr(self, "factory", None)
        return factory.releasers if factory is not None else set()

    #: Command name -> handler, shared by every connection.
    _commands: dict[str, Callable[[HealthProtocol, str], str | Deferred[str]]] = {
        "PING": cmd_PING,
        "HEARTBEAT": cmd_HEARTBEAT,
        "STATUS": cmd_STATUS,
        "STOP": cmd_STOP,
        "REPORT_HYPERD_ERROR": cmd_REPORT_HYPERD_ERROR,
        "SESSION": cmd_SESSION,
        "READY": cmd_READY,
        "BYE": cmd_BYE,
        "RELEASE": cmd_RELEASE,
        "NAME": cmd_NAME,
        "MCP_HOST": cmd_MCP_HOST,
    }


class HealthFactory(ServerFactory):
    """Makes a L{HealthProtocol} for each connection to the health port."""

    noisy = False

    def __init__(self, target: HealthTarget, authorize: Authorizer,
                 clock: IReactorTime | None = None) -> None:
        self.target = target
        self.authorize = authorize
        self.clock = clock
        #: Connections whose sessions take C{RELEASE} requests.
        self.releasers: set[HealthProtocol] = set()

    def buildProtocol(self, addr: object) -> HealthProtocol:
        protocol = HealthProtocol(self.target, self.authorize)
        protocol.factory = self
        if self.clock is not None:
            protocol.callLater = self.clock.callLater  # TimeoutMixin's clock
        return protocol


#: Every command of the health protocol, from its dispatch table (the tests
#: send each one as another user, so that a new command cannot be missed).
COMMANDS: tuple[str, ...] = tuple(HealthProtocol._commands)
