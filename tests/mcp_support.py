"""
What the MCP tests share: a test case that drives real C{hyperdb-mcp}
servers over stdio with the SDK's own client, and small data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from twisted.trial.unittest import SynchronousTestCase

from support import READY_TIMEOUT, client_environment, stop_daemon_on

#: Upstream's 33 tools (hyperdb-mcp 0.7.3), which ours has by the same names.
UPSTREAM_TOOLS = {
    "query", "execute", "load_data", "load_file", "query_data", "query_file", "describe",
    "sample", "attach_database", "detach_database", "list_attached_databases", "export",
    "status", "get_readme",
    "inspect_file", "load_files", "copy_query", "load_iceberg", "set_table_metadata",
    "watch_directory", "unwatch_directory", "chart",
    "kv_set", "kv_set_many", "kv_get", "kv_list", "kv_list_stores", "kv_size", "kv_pop",
    "kv_delete", "kv_clear", "save_query", "delete_query",
}

CSV = "city,population,area\nLyon,522000,47.87\nNice,342000,71.92\nBrest,139000,49.51\n"


class McpTestCase(SynchronousTestCase):
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state, self.ports, self.env = client_environment(tmp_path)
        self.addCleanup(stop_daemon_on, self.ports)
        self.csv = tmp_path / "cities.csv"
        self.csv.write_text(CSV)

    @contextlib.asynccontextmanager
    async def server(self, *args: str) -> AsyncIterator[Any]:
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(command=sys.executable,
                                       args=["-m", "hyperdaemon", *args], env=self.env)
        with open(self.tmp / "server-stderr.log", "a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    yield session

    def drive(self, coroutine: Any) -> Any:
        return asyncio.run(asyncio.wait_for(coroutine, READY_TIMEOUT * 2))

    async def call(self, session: Any, tool: str, **arguments: Any) -> Any:
        result = await session.call_tool(tool, arguments)
        text = result.content[0].text
        if result.is_error:
            raise ToolCallError(text)
        try:
            return json.loads(text)
        except ValueError:
            return text

    def sessions_left(self) -> list[Path]:
        """
        The session folders in the state directory: not the scratch database
        the MCP host keeps ready for the next launcher (hyperdaemon.mcp.spare),
        which is the host's while it runs.
        """
        from hyperdaemon.mcp.spare import SPARE_MARK

        root = self.state / "sessions"
        return [p for p in root.iterdir() if SPARE_MARK not in p.name] if root.exists() else []


class ToolCallError(Exception):
    pass




class ReportingTestCase(McpTestCase):
    """An MCP test case that can show a figure to whoever runs the tests."""

    @pytest.fixture(autouse=True)
    def _capsys(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capture = capsys

    def report(self, line: str) -> None:
        """A figure for whoever runs the tests, shown even when output is captured."""
        with self._capture.disabled():
            print(f"\n[{self.id().rsplit('.', 1)[-1]}] {line}", flush=True)


class PlainRefusalsTestCase(McpTestCase):
    async def refused(self, session: Any, tool: str, **arguments: Any) -> str:
        """The error text of a call that must fail, without the SDK's preamble."""
        with self.assertRaises(ToolCallError) as caught:
            await self.call(session, tool, **arguments)
        message = str(caught.exception)
        preamble = f"Error executing tool {tool}: "
        return message[len(preamble):] if message.startswith(preamble) else message


async def eventually(predicate: Callable[[], Any], timeout: float, what: str,
                     interval: float = 0.005) -> Any:
    """L{support.wait_for} inside asyncio code: poll C{predicate} without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
    return value
