"""
Measure 9, the file tools: C{inspect_file} of one big CSV file, then
C{load_files} of the same rows split in four files, through one MCP server
(with its daemon, found or spawned as users have it), driven over stdio with
the SDK's own client.  Both servers take the same arguments: C{path}; and
C{files} as a list of C{table} and C{path}.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from .mcpdrive import SERVER_TIMEOUT, TAG, _params, _query
from .procs import BenchError

#: Bound for one inspect_file or load_files call.
CALL_TIMEOUT = 300.0
#: Files that load_files loads.
PARTS = 4


def write_csv(path: Path, first: int, rows: int) -> None:
    """C{rows} rows (ids from C{first}) of id, name, score and day, with a header."""
    with open(path, "w") as f:
        f.write("id,name,score,day\n")
        for start in range(first, first + rows, 10_000):
            f.write("".join(f"{i},name {i},{i * 0.5},2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}\n"
                            for i in range(start, min(start + 10_000, first + rows))))


def data_files(folder: Path, rows: int) -> tuple[Path, list[Path]]:
    """One CSV file of C{rows} rows, and the same rows in L{PARTS} files."""
    folder.mkdir(parents=True, exist_ok=True)
    big = folder / "big.csv"
    write_csv(big, 0, rows)
    parts = []
    for index in range(PARTS):
        start, end = rows * index // PARTS, rows * (index + 1) // PARTS
        part = folder / f"part{index}.csv"
        write_csv(part, start, end - start)
        parts.append(part)
    return big, parts


def _text(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content or [])


def time_file_tools(command: str, args: list[str], env: dict[str, str], errlog: Path,
                    big: Path, parts: Sequence[Path], rows: int) -> dict[str, float]:
    """
    Seconds that C{inspect_file} of C{big} and C{load_files} of C{parts}
    take in one server (started and warmed by a query first); the tables
    loaded are counted afterwards.
    """
    from mcp.client.session import ClientSession
    from mcp.client.stdio import stdio_client

    async def go() -> dict[str, float]:
        with open(errlog, "a") as log:
            params = _params(command, args, dict(env, **{TAG: uuid.uuid4().hex}))
            async with stdio_client(params, errlog=log) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    await _query(session)
                    start = time.perf_counter()
                    inspected = await session.call_tool("inspect_file", {"path": str(big)})
                    inspect_s = time.perf_counter() - start
                    if inspected.is_error or str(rows) not in _text(inspected).replace(",", ""):
                        raise BenchError(f"inspect_file failed: {_text(inspected)[:300]}")
                    files = [{"table": f"part{i}", "path": str(p)} for i, p in enumerate(parts)]
                    start = time.perf_counter()
                    loaded = await session.call_tool("load_files", {"files": files})
                    load_s = time.perf_counter() - start
                    if loaded.is_error:
                        raise BenchError(f"load_files failed: {_text(loaded)[:300]}")
                    union = " UNION ALL ".join(f"SELECT count(*) AS n FROM part{i}"
                                               for i in range(len(parts)))
                    counted = await session.call_tool(
                        "query", {"sql": f"SELECT sum(n) AS total FROM ({union}) AS c"})
                    if counted.is_error or str(rows) not in _text(counted):
                        raise BenchError(f"load_files did not load every row: "
                                         f"{_text(counted)[:300]}")
                    return {"inspect_file_s": inspect_s, "load_files_s": load_s}

    return asyncio.run(asyncio.wait_for(go(), SERVER_TIMEOUT + 2 * CALL_TIMEOUT))


def file_tools(reaper: Any, targets: Sequence[Any], rec: Any, sizes: dict[str, Any]) -> None:
    """Measure 9's file tools, for every target, in alternating order."""
    from .measures import Daemon, _stop_quietly, order

    rows = sizes["file_rows"]
    big, parts = data_files(reaper.root / "file-tools-data", rows)
    for rep in range(rec.repeats):
        for target in order(targets, rep):
            with rec.guard([target], 9, rep, "file tools"):
                sandbox = reaper.sandbox(f"files-{target.name}", ports=16)
                command, args = target.mcp_command()
                try:
                    seconds = time_file_tools(command, args, target.env(sandbox),
                                              sandbox.logs / "mcp-servers.log", big, parts,
                                              rows)
                    for key, value in seconds.items():
                        rec.add(target, key, rep, value)
                finally:
                    _stop_quietly(Daemon.adopt(target, sandbox))
