"""
The server's own warnings as MCP log messages (L{hyperdaemon.mcp.serverlog}):
through the SDK's stdio client, a call after hyperd was replaced brings the
session's warning, at the level the client set; and the filtering on its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any, AsyncIterator

from mcp_support import McpTestCase
from support import READY_TIMEOUT, status, wait_for
from twisted.logger import LogLevel

from hyperdaemon.mcp.serverlog import Forwarder, mcp_level


class ServerLogTests(McpTestCase):
    @contextlib.asynccontextmanager
    async def logged(self) -> AsyncIterator[tuple[Any, list[Any], Any]]:
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        messages: list[Any] = []

        async def keep(params: Any) -> None:
            messages.append(params)

        params = StdioServerParameters(command=sys.executable, args=["-m", "hyperdaemon"],
                                       env=self.env)
        with open(self.tmp / "server-stderr.log", "a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write, logging_callback=keep) as session:
                    init = await session.initialize()
                    yield session, messages, init

    def replace_hyperd(self) -> None:
        before = status(self.ports[0])
        os.kill(before["hyperd_pid"], signal.SIGKILL)
        wait_for(lambda: status(self.ports[0])["hyperd_pid"] not in (None, before["hyperd_pid"]),
                 READY_TIMEOUT, "a new hyperd")

    def test_a_replaced_hyperd_is_told_to_the_client_as_a_warning(self) -> None:
        async def go() -> tuple[Any, list[Any], Any]:
            async with self.logged() as (session, messages, init):
                await self.call(session, "query", sql="SELECT 1")
                self.replace_hyperd()
                answer = await self.call(session, "query", sql="SELECT 2 AS two")
                # The message is sent before the call's result.
                return init, list(messages), answer

        init, messages, answer = self.drive(go())
        self.assertIsNotNone(init.capabilities.logging)
        self.assertEqual(answer["rows"], [[2]])
        self.assertEqual([m.level for m in messages], ["warning"])
        self.assertIn("hyperd was replaced", messages[0].data)
        self.assertIn("reconnected", messages[0].data)

    def test_a_level_above_warning_leaves_the_warnings_out(self) -> None:
        async def go() -> list[Any]:
            async with self.logged() as (session, messages, _):
                await session.set_logging_level("error")
                await self.call(session, "query", sql="SELECT 1")
                self.replace_hyperd()
                await self.call(session, "query", sql="SELECT 2")
                return list(messages)

        self.assertEqual(self.drive(go()), [])


class LevelTests:
    def event(self, level: LogLevel, namespace: str = "hyperdaemon.client.session",
              **more: Any) -> dict[str, Any]:
        return {"log_level": level, "log_namespace": namespace, "log_format": "x", **more}

    def test_only_the_servers_own_events_have_a_level(self) -> None:
        assert mcp_level(self.event(LogLevel.warn)) == "warning"
        assert mcp_level(self.event(LogLevel.info, "hyperdaemon")) == "info"
        assert mcp_level(self.event(LogLevel.warn, "twisted.internet")) is None
        assert mcp_level(self.event(LogLevel.warn, "hyperdaemonic")) is None

    def test_the_threshold_and_the_session_decide(self) -> None:
        mine, other = object(), object()
        forwarder = Forwarder(mine)
        assert forwarder.wanted(self.event(LogLevel.warn)) == "warning"
        assert forwarder.wanted(self.event(LogLevel.info)) is None
        assert forwarder.wanted(self.event(LogLevel.warn, session=mine)) == "warning"
        assert forwarder.wanted(self.event(LogLevel.warn, session=other)) is None
        forwarder.threshold = "debug"
        assert forwarder.wanted(self.event(LogLevel.debug)) == "debug"
        forwarder.threshold = "critical"
        assert forwarder.wanted(self.event(LogLevel.error)) is None
