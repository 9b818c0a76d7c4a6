"""
MCP servers (ours: C{python -m hyperdaemon}; theirs: C{hyperdb-mcp}) driven
over stdio with the SDK's own client, as an assistant would: start the
server, C{initialize}, call the C{query} tool with C{SELECT 1}; or load
inline data with C{load_data} (both servers take C{table}, C{data} and
C{format}).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .procs import BenchError, parent_of, pids_with_env, rss_bytes

#: Bound for one server to start and answer.
SERVER_TIMEOUT = 120.0
#: Bound for servers to close once released.
CLOSE_TIMEOUT = 30.0
#: Bound for one load_data call (upstream loads JSON at about 0.75 ms a row).
LOAD_TIMEOUT = 300.0
TAG = "HYPERDAEMON_BENCHMARK_SERVER"


async def _query(session: Any) -> None:
    result = await session.call_tool("query", {"sql": "SELECT 1"})
    if result.is_error:
        text = result.content[0].text if result.content else ""
        raise BenchError(f"the query tool failed: {text}")


def _params(command: str, args: list[str], env: dict[str, str]) -> Any:
    from mcp.client.stdio import StdioServerParameters

    return StdioServerParameters(command=command, args=args, env=env)


def time_first_query(command: str, args: list[str], env: dict[str, str], errlog: Path) -> float:
    """Seconds from starting the server to the result of its first C{query}."""
    from mcp.client.session import ClientSession
    from mcp.client.stdio import stdio_client

    async def go() -> float:
        with open(errlog, "a") as log:
            start = time.perf_counter()
            async with stdio_client(_params(command, args, env), errlog=log) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    await _query(session)
                    return time.perf_counter() - start

    return asyncio.run(asyncio.wait_for(go(), SERVER_TIMEOUT))


def time_loads(command: str, args: list[str], env: dict[str, str], errlog: Path,
               loads: list[tuple[str, str, int]]) -> tuple[dict[str, float], int]:
    """
    Seconds that each C{load_data} call takes in one server (started and
    warmed by a query first): C{loads} are (format, data, rows), each loaded
    into its own table and counted afterwards; and the server's peak RSS
    (bytes) once they are done.
    """
    from mcp.client.session import ClientSession
    from mcp.client.stdio import stdio_client

    tag = uuid.uuid4().hex

    async def go() -> tuple[dict[str, float], int]:
        with open(errlog, "a") as log:
            params = _params(command, args, dict(env, **{TAG: tag}))
            async with stdio_client(params, errlog=log) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    await _query(session)
                    seconds = {}
                    for fmt, data, rows in loads:
                        table = f"bench_{fmt}"
                        start = time.perf_counter()
                        result = await session.call_tool(
                            "load_data", {"table": table, "data": data, "format": fmt})
                        seconds[fmt] = time.perf_counter() - start
                        _check(result, f"load_data ({fmt})", None)
                        counted = await session.call_tool(
                            "query", {"sql": f"SELECT count(*) AS n FROM {table}"})
                        _check(counted, f"the count after load_data ({fmt})", str(rows))
                    found = pids_with_env(TAG, tag)
                    found = [p for p in found if parent_of(p) not in found]
                    if len(found) != 1:
                        raise BenchError(f"found {len(found)} processes for one MCP server")
                    return seconds, rss_bytes(found[0], "VmHWM")

    return asyncio.run(asyncio.wait_for(go(), SERVER_TIMEOUT + LOAD_TIMEOUT * len(loads)))


def _server_pids(tags: list[str]) -> list[int]:
    """The pids of the servers started with C{tags}."""
    pids = []
    for tag in tags:
        # The server's children (a private hyperd) inherit the tag.
        found = pids_with_env(TAG, tag)
        found = [p for p in found if parent_of(p) not in found]
        if len(found) != 1:
            raise BenchError(f"found {len(found)} processes for one MCP server")
        pids.extend(found)
    return pids


def _check(result: Any, what: str, needle: str | None) -> None:
    # Upstream answers a query with the SQL in a first block, the rows in the next.
    text = "\n".join(getattr(block, "text", "") for block in result.content or [])
    if result.is_error or (needle is not None and needle not in text):
        raise BenchError(f"{what} failed: {text[:300]}")


def hold_servers(command: str, args: list[str], envs: list[dict[str, str]], errlog: Path,
                 measure: Callable[[list[int]], Any], first_alone: bool = False,
                 measure_first: Callable[[list[int]], Any] | None = None) -> Any:
    """
    Start one server per environment at once (with C{first_alone}, the
    first one, then once it has answered, all the others); once each has
    answered a C{query}, call C{measure} with the servers' pids, then close
    them all (cancelling any that will not close).  With C{measure_first}
    (and C{first_alone}), call it too with the first server's pid while it
    runs alone, and return both results, first's last.
    """
    from mcp.client.session import ClientSession
    from mcp.client.stdio import stdio_client

    tags = [uuid.uuid4().hex for _ in envs]

    async def one(env: dict[str, str], ready: asyncio.Event, release: asyncio.Event) -> None:
        with open(errlog, "a") as log:
            async with stdio_client(_params(command, args, env), errlog=log) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    await _query(session)
                    ready.set()
                    await release.wait()

    async def started(servers: list[asyncio.Task[None]], readies: list[asyncio.Event]) -> None:
        all_ready = asyncio.ensure_future(asyncio.gather(*(r.wait() for r in readies)))
        try:
            done, _ = await asyncio.wait([all_ready, *servers], timeout=SERVER_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
            if all_ready not in done:
                for task in done:
                    task.result()  # a server that ended early: its error
                raise BenchError(f"{len(servers)} MCP server(s) did not answer a query "
                                 f"within {SERVER_TIMEOUT:g} s")
        finally:
            all_ready.cancel()
            await asyncio.gather(all_ready, return_exceptions=True)

    async def go() -> Any:
        release = asyncio.Event()
        readies = [asyncio.Event() for _ in envs]
        servers: list[asyncio.Task[None]] = []
        batches = [range(0, 1), range(1, len(envs))] if first_alone else [range(len(envs))]
        try:
            alone = None
            for batch in batches:
                new = [asyncio.create_task(one(dict(envs[i], **{TAG: tags[i]}), readies[i],
                                               release)) for i in batch]
                servers.extend(new)
                await started(new, [readies[i] for i in batch])
                if measure_first is not None and alone is None:
                    alone = measure_first(_server_pids(tags[:1]))
            result = measure(_server_pids(tags))
            return result if measure_first is None else (result, alone)
        finally:
            release.set()
            if servers:
                _, stuck = await asyncio.wait(servers, timeout=CLOSE_TIMEOUT)
                for task in stuck:  # cancelling the client ends its server process
                    task.cancel()
                await asyncio.gather(*servers, return_exceptions=True)

    return asyncio.run(go())
