"""
Measure 8: many sessions heartbeating at once, driven by one asyncio loop
in the benchmark process, while a separate process (L{pinger}) times fresh
C{PING}s and the daemon's CPU time is read from C{/proc}.

Against our daemon each connection registers a session first
(C{SESSION {"pid", "name", "ephemeral_db": null}}, answered C{OK {...}});
the upstream daemon has no such command, so its connections only send
C{HEARTBEAT}.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

from .procs import MARKER, cpu_seconds, rss_bytes

#: Seconds between two heartbeats of one session.
HEARTBEAT_INTERVAL = 1.0
#: Connections opened at once (the listen backlog is small).
CONNECT_CONCURRENCY = 64
#: Seconds between two fresh PINGs of the prober.
PING_SPACING = 0.02
#: Bound for one reply.
REPLY_TIMEOUT = 30.0

PINGER = Path(__file__).with_name("pinger.py")


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE towards the hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed + 1024)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer


async def _open(port: int, register: bool, gate: asyncio.Semaphore) -> _Conn:
    async with gate:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), REPLY_TIMEOUT)
        conn = _Conn(reader, writer)
        if register:
            fields = {"pid": os.getpid(), "name": "bench", "ephemeral_db": None}
            writer.write(b"SESSION " + json.dumps(fields).encode() + b"\n")
            line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
            if not line.startswith(b"OK "):
                writer.close()
                raise ConnectionError(f"SESSION was answered {line!r}")
        return conn


async def _heartbeats(conn: _Conn, stop: asyncio.Event, latencies: list[float],
                      failures: list[int]) -> None:
    try:
        await asyncio.wait_for(stop.wait(), random.uniform(0, HEARTBEAT_INTERVAL))
        return
    except asyncio.TimeoutError:
        pass
    while not stop.is_set():
        start = time.perf_counter()
        try:
            conn.writer.write(b"HEARTBEAT\n")
            line = await asyncio.wait_for(conn.reader.readline(), REPLY_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            failures.append(1)
            return
        if line.strip() != b"OK":
            failures.append(1)
            return
        latencies.append(time.perf_counter() - start)
        try:
            await asyncio.wait_for(stop.wait(), HEARTBEAT_INTERVAL)
        except asyncio.TimeoutError:
            pass


async def _close(conn: _Conn, register: bool) -> None:
    try:
        if register:
            conn.writer.write(b"BYE\n")
            await asyncio.wait_for(conn.reader.readline(), REPLY_TIMEOUT)
        conn.writer.close()
        await asyncio.wait_for(conn.writer.wait_closed(), REPLY_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        pass


async def _drive(port: int, daemon_pid: int, sessions: int, register: bool,
                 pings: int, env: dict[str, str]) -> dict[str, Any]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    start = time.perf_counter()
    opened = await asyncio.gather(*(_open(port, register, gate) for _ in range(sessions)),
                                  return_exceptions=True)
    attach_s = time.perf_counter() - start
    conns = [c for c in opened if isinstance(c, _Conn)]
    failures = [1] * (sessions - len(conns))
    stop = asyncio.Event()
    latencies: list[float] = []
    beats = [asyncio.create_task(_heartbeats(c, stop, latencies, failures)) for c in conns]
    prober = None
    try:
        # One whole interval first, so that every session is beating.
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        cpu0, wall0 = cpu_seconds(daemon_pid), time.perf_counter()
        prober = await asyncio.create_subprocess_exec(
            sys.executable, str(PINGER), str(port), str(pings), str(PING_SPACING),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=env,
        )
        out, _ = await asyncio.wait_for(prober.communicate(),
                                        60 + pings * (PING_SPACING + 5))
        cpu1, wall1 = cpu_seconds(daemon_pid), time.perf_counter()
        rss = rss_bytes(daemon_pid)
    finally:
        if prober is not None and prober.returncode is None:
            prober.kill()
            await prober.wait()
        stop.set()
        await asyncio.gather(*beats, return_exceptions=True)
        await asyncio.gather(*(_close(c, register) for c in conns), return_exceptions=True)
    probe = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "attach_s": attach_s,
        "ping_samples": probe["samples"],
        "ping_errors": probe["errors"],
        "heartbeat_samples": latencies,
        "failures": len(failures) + probe["errors"],
        "cpu_pct": 100.0 * (cpu1 - cpu0) / (wall1 - wall0),
        "rss": rss,
        "connected": len(conns),
    }


def run_load(port: int, daemon_pid: int, sessions: int, register: bool, pings: int,
             env: dict[str, str]) -> dict[str, Any]:
    """Open C{sessions} connections, heartbeat on them, and measure meanwhile."""
    assert MARKER in env
    raise_fd_limit(sessions + 256)
    return asyncio.run(asyncio.wait_for(
        _drive(port, daemon_pid, sessions, register, pings, env),
        300 + sessions * 0.1))
