"""
What durable writes cost per call: sessions through a real daemon and hyperd
on a persistent database of 1 and of 30 tables, against the same statements
on a connection that keeps the file attached and never writes it out (what
a session did before writes were made durable).

    python -m benchmarks.durability [--calls N] [--json PATH]

Every figure is a median over N calls, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

TABLE_COUNTS = (1, 30)
#: Seconds between a write and the next call, as an assistant reading a result.
PAUSE = 1.0
#: Ports of the benchmark's own daemon, away from the real 7485-7500.
PORT_RANGE = "39980-39989"


async def _median_ms(n: int, call: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


async def _measure(reactor: Any, tables: int, calls: int, work: Path) -> dict[str, float]:
    import psycopg

    from hyperdaemon.client.session import Session

    env = dict(os.environ, HYPERDB_STATE_DIR=str(work / "state"),
               HYPERDB_DAEMON_PORT_RANGE=PORT_RANGE,
               HYPERDB_PERSISTENT_DB=str(work / f"workspace-{tables}.hyper"))
    one = await Session.open(reactor, name="bench-one", environ=env)
    two = await Session.open(reactor, name="bench-two", environ=env)
    figures: dict[str, float] = {}
    try:
        await one.execute([f"CREATE TABLE persistent.public.t{i} (x int)" for i in range(tables)])
        await two.query("SELECT count(*) FROM persistent.public.t0")
        figures["read, file held"] = await _median_ms(
            calls, lambda: one.query("SELECT count(*) FROM persistent.public.t0"))
        await two.close()  # alone on the file
        figures["write, alone"] = await _median_ms(
            calls, lambda: one.execute("INSERT INTO persistent.public.t0 VALUES (1)"))

        async def read_after_a_write(pause: float, times: list[float]) -> None:
            from twisted.internet.task import deferLater

            await one.execute("INSERT INTO persistent.public.t0 VALUES (1)")
            if pause:
                await deferLater(reactor, pause, lambda: None)  # the assistant reads the result
            began = time.perf_counter()
            await one.query("SELECT count(*) FROM persistent.public.t0")
            times.append((time.perf_counter() - began) * 1000)

        for label, pause, n in (("read right after a write", 0.0, calls),
                                (f"read {PAUSE:g} s after a write", PAUSE, min(calls, 10))):
            times: list[float] = []
            await _median_ms(n, lambda: read_after_a_write(pause, times))
            figures[label] = statistics.median(times)
        two = await Session.open(reactor, name="bench-two", environ=env)
        await two.query("SELECT 1")

        async def write_while_held() -> None:
            await two.query("SELECT count(*) FROM persistent.public.t0")  # holds it again
            began = time.perf_counter()
            await one.execute("INSERT INTO persistent.public.t0 VALUES (1)")
            held.append((time.perf_counter() - began) * 1000)

        held: list[float] = []
        await _median_ms(calls, write_while_held)
        figures["write, another session holding the file"] = statistics.median(held)

        # Before: the file stays attached, nothing is written out.
        credentials = one.credentials
        path = str(work / f"workspace-{tables}.hyper")
        await one.close()
        await two.close()
        with psycopg.connect(host=credentials.host, port=credentials.port,
                             user=credentials.user, password=credentials.password,
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'ATTACH DATABASE "{path}" AS persistent')

            async def raw(sql: str) -> None:
                conn.execute(sql)

            figures["before: read"] = await _median_ms(
                calls, lambda: raw("SELECT count(*) FROM persistent.public.t0"))
            figures["before: write"] = await _median_ms(
                calls, lambda: raw("INSERT INTO persistent.public.t0 VALUES (1)"))
            conn.execute("DETACH DATABASE persistent")
    finally:
        await one.close()
        await two.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.durability",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from twisted.internet import defer, task

    results: dict[str, dict[str, float]] = {}

    async def run(reactor: Any) -> None:
        import subprocess

        with tempfile.TemporaryDirectory(prefix="hyperdb-bench-") as work:
            try:
                for tables in TABLE_COUNTS:
                    results[f"{tables} tables"] = await _measure(reactor, tables, args.calls,
                                                                 Path(work))
            finally:
                subprocess.run([sys.executable, "-m", "hyperdaemon", "daemon", "stop",
                                "--state-dir", str(Path(work) / "state")],
                               env=dict(os.environ, HYPERDB_DAEMON_PORT_RANGE=PORT_RANGE),
                               capture_output=True)
        print(report(results))
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2))

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    return 0


def report(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'figure (median ms)':44}" + "".join(f"{k:>14}" for k in results)]
    keys = list(next(iter(results.values())))
    for key in keys:
        lines.append(f"{key:44}" + "".join(f"{r[key]:14.2f}" for r in results.values()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
