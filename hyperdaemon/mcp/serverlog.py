"""
The server's own log, as MCP log messages (the logging capability).

What the server's parts log with C{twisted.logger} under C{hyperdaemon}
(a call run again after the connection to C{hyperd} broke, C{hyperd}
replaced by the daemon, a database that could not be let go of...) goes to
the client as C{notifications/message}, at or above the level the client
sets with C{logging/setLevel}: L{DEFAULT_LEVEL} until it sets one.  An event
that names its session (C{session=}) goes only to that session's client, so
that a process serving several clients tells each only its own.  Nothing
is sent before the client's first request (there is nobody to send it to).
"""

import asyncio
import sys
import weakref
from typing import Any

#: MCP's levels, lowest first.
LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
#: The level sent until the client sets one: the server's warnings.
DEFAULT_LEVEL = "warning"
#: Twisted's levels as MCP's.
TWISTED_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "error": "error",
                  "critical": "critical"}
#: Whose events are sent: the server's own parts.
NAMESPACE = "hyperdaemon"


def mcp_level(event: dict[str, Any]) -> str | None:
    """The MCP level of a Twisted log event, if it is one of the server's own."""
    namespace = event.get("log_namespace") or ""
    if namespace != NAMESPACE and not namespace.startswith(NAMESPACE + "."):
        return None
    level = event.get("log_level")
    return TWISTED_LEVELS.get(getattr(level, "name", ""))


def at_least(level: str, threshold: str) -> bool:
    return LEVELS.index(level) >= LEVELS.index(threshold)


class Forwarder:
    """Sends one session's log events to its client, from any thread."""

    def __init__(self, session: Any) -> None:
        # Weakly where it can: the forwarder must not keep a finished
        # session alive (a host serves many, one after another).
        try:
            self._session: Any = weakref.ref(session)
        except TypeError:
            self._session = lambda: session
        self.threshold = DEFAULT_LEVEL
        self._loop: Any = None
        self._client: Any = None

    def wanted(self, event: dict[str, Any]) -> str | None:
        """The level to send C{event} at, or None to leave it out."""
        level = mcp_level(event)
        if level is None or not at_least(level, self.threshold):
            return None
        owner = event.get("session")
        if owner is not None and owner is not self._session():
            return None
        return level

    def observe(self, event: dict[str, Any]) -> None:
        level = self.wanted(event)
        if level is None or self._loop is None:
            return
        from twisted.logger import formatEvent

        text = formatEvent(event)
        self._loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(self._send(level, text)))

    async def _send(self, level: str, text: str) -> None:
        client = self._client
        if client is None:
            return
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated from 2026-07-28 on, see serve()
                await client.send_log_message(level=level, data=text, logger="hyperdb-mcp")
        except Exception as e:  # the client went, or cannot take it
            print(f"hyperdb-mcp: could not send a log message: {e}", file=sys.stderr)

    async def learn_client(self, ctx: Any, call_next: Any) -> Any:
        """Middleware: the connection to send to is the one requests come from."""
        from mcp_types.version import MODERN_PROTOCOL_VERSIONS

        # From 2026-07-28 on, log messages belong to the request that asked
        # for them: this server sends none there.
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self._loop = asyncio.get_running_loop()
            self._client = ctx.session
        return await call_next(ctx)

    async def set_level(self, ctx: Any, params: Any) -> Any:
        import mcp.types as types

        self.threshold = str(params.level)
        return types.EmptyResult()


def register(kit: Any) -> None:
    """No tools: this family sends the server's log to the client (see L{serve})."""


def serve(server: Any, kit: Any) -> None:
    """Declare the logging capability and forward the server's log to the client."""
    import warnings

    import mcp.types as types
    from twisted.logger import globalLogPublisher

    # One forwarder per session, made at its first request (the session is
    # known then): one server may serve several (the MCP host).
    forwarders: "weakref.WeakKeyDictionary[Any, Forwarder]" = weakref.WeakKeyDictionary()

    def forwarder_for(ctx: Any) -> Forwarder:
        session = kit.tools.session
        found = forwarders.get(session)
        if found is None:
            found = forwarders[session] = Forwarder(session)
        return found

    async def learn_client(ctx: Any, call_next: Any) -> Any:
        return await forwarder_for(ctx).learn_client(ctx, call_next)

    async def set_level(ctx: Any, params: Any) -> Any:
        return await forwarder_for(ctx).set_level(ctx, params)

    server.middleware.append(learn_client)
    with warnings.catch_warnings():
        # Deprecated from the 2026-07-28 protocol on, and what the clients
        # of the protocols before it use.
        warnings.simplefilter("ignore")
        server._lowlevel_server.add_request_handler(
            "logging/setLevel", types.SetLevelRequestParams, set_level)

    # The publisher must not keep a finished session's server alive.
    alive = weakref.ref(forwarders)

    def observer(event: dict[str, Any]) -> None:
        found = alive()
        if found is None:
            globalLogPublisher.removeObserver(observer)
            return
        for forwarder in list(found.values()):
            forwarder.observe(event)

    globalLogPublisher.addObserver(observer)
