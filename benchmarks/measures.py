"""
The nine measures.  Each phase runs its repetitions with the daemons in
alternating order (ours first on even repetitions, theirs first on odd
ones) and hands every figure to a L{Recorder}.  A measure that fails for
one daemon in one repetition is recorded as an error and the run goes on.

Waiting is always for a condition with a bound; the only sleeps are the
idle window of measure 6 (whose CPU time is what is measured, not the
sleep) and the pacing of heartbeats and PINGs in measure 8.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import load as load_driver
from .mcpdrive import hold_servers, time_first_query, time_loads
from .pinger import ping_many
from .procs import (
    BenchError,
    Reaper,
    cpu_seconds,
    descendants,
    is_mcp_host,
    kill,
    pid_alive,
    private_bytes,
    pss_bytes,
    rss_bytes,
    wait_for,
    wait_pid_gone,
)
from .report import percentile
from .targets import Daemon, Target, answers_ping, ask, query_works, read_record

CLIENT_PROGRAM = Path(__file__).resolve().parents[1] / "tests" / "client_program.py"
#: Bound for a client to open its session and print its line.
CLIENT_TIMEOUT = 120.0
#: Bound for hyperd to be replaced after it was killed.
RECOVERY_TIMEOUT = 60.0
MB = 1e6


class Recorder:
    """Figures per daemon, per repetition; and the errors met."""

    def __init__(self, repeats: int, verbose: bool = True) -> None:
        self.repeats = repeats
        self.values: dict[str, dict[str, list[float | None]]] = {}
        self.extras: dict[str, dict[str, list[Any]]] = {}
        self.errors: list[dict[str, Any]] = []
        self.verbose = verbose

    def add(self, target: Target, key: str, rep: int, value: float) -> None:
        series = self.values.setdefault(target.name, {}).setdefault(key, [None] * self.repeats)
        series[rep] = float(value)
        if self.verbose:
            print(f"  [{target.name} rep {rep + 1}] {key} = {value:.4g}", file=sys.stderr,
                  flush=True)

    def extra(self, target: Target, key: str, value: Any) -> None:
        self.extras.setdefault(target.name, {}).setdefault(key, []).append(value)

    @contextlib.contextmanager
    def guard(self, targets: Sequence[Target], measure: int, rep: int, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # recorded; the run goes on
            for target in targets:
                self.errors.append({"target": target.name, "measure": measure, "rep": rep,
                                    "what": what, "error": _describe(e),
                                    "traceback": traceback.format_exc()})
            names = ",".join(t.name for t in targets)
            print(f"  [{names} rep {rep + 1}] measure {measure} ({what}) failed: "
                  f"{_describe(e)}", file=sys.stderr, flush=True)


def _describe(error: BaseException) -> str:
    """C{Type: message}; for an exception group (anyio's), its leaves'."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(leaf) for leaf in error.exceptions)
    return f"{type(error).__name__}: {error}"


def order(targets: Sequence[Target], rep: int) -> list[Target]:
    return list(targets) if rep % 2 == 0 else list(reversed(targets))


def _stop_quietly(daemon: Daemon | None) -> None:
    if daemon is None:
        return
    try:
        daemon.stop()
    except Exception as e:  # the final sweep kills whatever is left
        print(f"  could not stop the {daemon.target.name} daemon {daemon.pid}: {e}",
              file=sys.stderr)


# -- measure 1: each daemon alone on the machine -------------------------------

def pings(reaper: Reaper, targets: Sequence[Target], rec: Recorder, count: int) -> None:
    """
    Measure 1, for each target in turn, with no other daemon running: the
    other one's periodic wake-ups would otherwise land in this one's tail.
    """
    for rep in range(rec.repeats):
        for target in order(targets, rep):
            daemon = None
            with rec.guard([target], 1, rep, "ping"):
                daemon = Daemon(target, reaper.sandbox(f"ping-{target.name}")).start()
                daemon.wait_ready()
                ping(daemon, rec, rep, count)
            _stop_quietly(daemon)


# -- measures 6 and 8: one long-running daemon each -----------------------------

def steady(reaper: Reaper, targets: Sequence[Target], rec: Recorder, sizes: dict[str, Any],
           which: set[int]) -> None:
    daemons: dict[str, Daemon] = {}
    try:
        for target in targets:
            daemons[target.name] = Daemon(target, reaper.sandbox(f"steady-{target.name}")).start()
        for target in list(targets):
            with rec.guard([target], min(which & {6, 8}), 0, "start"):
                daemons[target.name].wait_ready()
                continue
            targets = [t for t in targets if t is not target]  # it never became ready
        for rep in range(rec.repeats):
            if 6 in which:
                with rec.guard(targets, 6, rep, "idle"):
                    idle([daemons[t.name] for t in targets], rec, rep, sizes["idle_s"])
        if 8 in which:
            env = reaper.base_env()
            for rep in range(rec.repeats):
                for target in order(targets, rep):
                    with rec.guard([target], 8, rep, "load"):
                        load(daemons[target.name], rec, rep, sizes, env)
    finally:
        for daemon in daemons.values():
            _stop_quietly(daemon)


#: Unrecorded round trips before each PING sample set: the first connections
#: of a process pay for cold caches and lazy set-up, in the measuring client too.
PING_WARMUP = 20


def ping(daemon: Daemon, rec: Recorder, rep: int, count: int) -> None:
    """Measure 1: C{count} fresh connections, one after the other, after a warm-up."""
    ping_many(daemon.port, PING_WARMUP)
    samples, errors = ping_many(daemon.port, count)
    if not samples:
        raise BenchError(f"no PING was answered ({errors} failed)")
    rec.add(daemon.target, "ping_p50_ms", rep, percentile(samples, 50) * 1000)
    rec.add(daemon.target, "ping_p99_ms", rep, percentile(samples, 99) * 1000)
    rec.extra(daemon.target, "ping_errors", errors)


def idle(daemons: list[Daemon], rec: Recorder, rep: int, window: float) -> None:
    """Measure 6: CPU time of each idle daemon over the same window; its RSS."""
    before = {d.target.name: cpu_seconds(d.pid) for d in daemons}
    start = time.perf_counter()
    time.sleep(window)  # the window: what is measured is the CPU time within it
    elapsed = time.perf_counter() - start
    for daemon in daemons:
        daemon.check_running()
        used = cpu_seconds(daemon.pid) - before[daemon.target.name]
        rec.add(daemon.target, "idle_cpu_s", rep, used * window / elapsed)
        rec.add(daemon.target, "idle_rss_mb", rep, rss_bytes(daemon.pid) / MB)


def load(daemon: Daemon, rec: Recorder, rep: int, sizes: dict[str, Any],
         env: dict[str, str]) -> None:
    """Measure 8: many heartbeating sessions, PING p99 and CPU meanwhile."""
    result = load_driver.run_load(daemon.port, daemon.pid, sizes["load"],
                                  daemon.target.sessions, sizes["load_pings"], env)
    daemon.check_running()
    target = daemon.target
    if not result["ping_samples"]:
        raise BenchError("no PING was answered under load")
    rec.add(target, "load_attach_s", rep, result["attach_s"])
    rec.add(target, "load_ping_p50_ms", rep, percentile(result["ping_samples"], 50) * 1000)
    rec.add(target, "load_ping_p99_ms", rep, percentile(result["ping_samples"], 99) * 1000)
    if result["heartbeat_samples"]:
        rec.add(target, "load_heartbeat_p99_ms", rep,
                percentile(result["heartbeat_samples"], 99) * 1000)
    rec.add(target, "load_cpu_pct", rep, result["cpu_pct"])
    rec.add(target, "load_rss_mb", rep, result["rss"] / MB)
    rec.add(target, "load_failures", rep, result["failures"])
    rec.extra(target, "load_detail", {k: v for k, v in result.items() if not k.endswith("samples")}
              | {"heartbeats": len(result["heartbeat_samples"])})


# -- measures 2, 4 and 5: a fresh daemon per repetition -------------------------

def lifecycle(reaper: Reaper, targets: Sequence[Target], rec: Recorder,
              which: set[int]) -> None:
    for rep in range(rec.repeats):
        for target in order(targets, rep):
            daemon = Daemon(target, reaper.sandbox(f"life-{target.name}"))
            try:
                with rec.guard([target], 2, rep, "cold start"):
                    cold_start(daemon, rec, rep, record=2 in which)
                if daemon.proc is None or not daemon.query_works():
                    continue
                if 4 in which:
                    with rec.guard([target], 4, rep, "hyperd killed"):
                        recovery(daemon, rec, rep)
                if 5 in which:
                    with rec.guard([target], 5, rep, "STOP"):
                        stop(daemon, rec, rep)
            finally:
                if daemon.proc is not None and daemon.proc.poll() is None:
                    _stop_quietly(daemon)


def cold_start(daemon: Daemon, rec: Recorder, rep: int, record: bool) -> None:
    """Measure 2: from C{exec} until PING answers, and until a query works."""
    daemon.start()
    assert daemon.started_at is not None

    def pinged() -> bool:
        daemon.check_running()
        return answers_ping(daemon.port)

    wait_for(pinged, 60.0, f"the {daemon.target.name} daemon to answer PING", interval=0.001)
    at_ping = time.perf_counter() - daemon.started_at

    def queried() -> bool:
        # As a libpq client would: the credentials in daemon.json.
        daemon.check_running()
        record = read_record(daemon.sandbox.record_path)
        return record is not None and query_works(record.get("hyperd_endpoint"),
                                                  record.get("hyperd_password"))

    wait_for(queried, 60.0, f"a query through the {daemon.target.name} daemon", interval=0.002)
    at_query = time.perf_counter() - daemon.started_at
    if record:
        rec.add(daemon.target, "cold_ping_s", rep, at_ping)
        rec.add(daemon.target, "cold_query_s", rep, at_query)


def recovery(daemon: Daemon, rec: Recorder, rep: int) -> None:
    """Measure 4: SIGKILL hyperd; until a query works on the endpoint the daemon publishes."""
    target = daemon.target
    old = target.hyperd_pid(daemon)
    if old is None:
        raise BenchError(f"the {target.name} daemon's hyperd was not found")
    start = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    if not wait_pid_gone(old, 10.0):
        raise BenchError(f"hyperd {old} did not die of SIGKILL")

    def works() -> bool:
        daemon.check_running()
        return query_works(*target.endpoint(daemon))

    wait_for(works, RECOVERY_TIMEOUT, f"a new hyperd of the {target.name} daemon",
             interval=0.002)
    rec.add(target, "recovery_s", rep, time.perf_counter() - start)


def stop(daemon: Daemon, rec: Recorder, rep: int) -> None:
    """Measure 5: STOP; until the process has exited and daemon.json is gone."""
    assert daemon.proc is not None
    hyperds = descendants(daemon.pid)
    start = time.perf_counter()
    reply = ask(daemon.port, "STOP")
    if reply != "STOPPING":
        raise BenchError(f"STOP was answered {reply!r}")
    if not wait_pid_gone(daemon.pid, 60.0):
        raise BenchError("the daemon did not exit within 60 s of STOP")
    record = daemon.sandbox.record_path
    wait_for(lambda: not record.exists(), 30.0, "daemon.json to be removed", interval=0.001)
    rec.add(daemon.target, "stop_s", rep, time.perf_counter() - start)
    daemon.proc.wait(5.0)
    for pid in hyperds:
        if not wait_pid_gone(pid, 10.0):
            kill(pid)


# -- measure 3: clients that find or spawn the daemon ----------------------------

def clients(reaper: Reaper, targets: Sequence[Target], rec: Recorder) -> None:
    for rep in range(rec.repeats):
        for target in order(targets, rep):
            if target.sessions:
                with rec.guard([target], 3, rep, "client library"):
                    client_library(reaper, target, rec, rep)
            with rec.guard([target], 3, rep, "MCP server"):
                mcp_server(reaper, target, rec, rep)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"client {proc.pid} printed nothing within {timeout:g} s")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise BenchError(f"client {proc.pid} exited with {proc.wait(10)} "
                                 f"before its line")
            data += chunk
    return data.split(b"\n", 1)[0]


def _client(reaper: Reaper, env: dict[str, str], log: Path, *flags: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return reaper.popen([sys.executable, str(CLIENT_PROGRAM), *flags, "SELECT 1"], env,
                            stdin=subprocess.PIPE if "--hold" in flags else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=err)


def _check_client_line(line: bytes) -> dict[str, Any]:
    facts = json.loads(line)
    if facts.get("results") != [[[1]]]:
        raise BenchError(f"the client's query returned {facts.get('results')!r}")
    return facts


def _one_shot_client(reaper: Reaper, env: dict[str, str], log: Path) -> float:
    """Seconds from starting a client process until its JSON line (after its query)."""
    start = time.perf_counter()
    proc = _client(reaper, env, log)
    line = _read_line(proc, CLIENT_TIMEOUT)
    elapsed = time.perf_counter() - start
    _check_client_line(line)
    code = proc.wait(60)
    if code != 0:
        raise BenchError(f"the client exited with {code}; see {log}")
    assert proc.stdout is not None
    proc.stdout.close()
    return elapsed


def client_library(reaper: Reaper, target: Target, rec: Recorder, rep: int) -> None:
    """Measure 3, ours: a one-shot client process, cold (it spawns the daemon), then warm."""
    if not CLIENT_PROGRAM.exists():
        raise BenchError(f"{CLIENT_PROGRAM} is missing")
    sandbox = reaper.sandbox(f"client-{target.name}", ports=16)
    env = target.env(sandbox)
    env.pop("HYPERDB_DAEMON_PORT", None)  # found or spawned through the range, as users do
    log = sandbox.logs / "clients.log"
    try:
        rec.add(target, "client_cold_s", rep, _one_shot_client(reaper, env, log))
        rec.add(target, "client_warm_s", rep, _one_shot_client(reaper, env, log))
    finally:
        _stop_quietly(Daemon.adopt(target, sandbox))


def mcp_server(reaper: Reaper, target: Target, rec: Recorder, rep: int) -> None:
    """Measure 3, both: an MCP server over stdio, cold (it spawns the daemon), then warm."""
    sandbox = reaper.sandbox(f"mcp-{target.name}", ports=16)
    env = target.env(sandbox)
    command, args = target.mcp_command()
    log = sandbox.logs / "mcp-servers.log"
    try:
        rec.add(target, "mcp_cold_s", rep, time_first_query(command, args, env, log))
        if read_record(sandbox.record_path) is None:
            raise BenchError("no daemon was left running after the cold start")
        rec.add(target, "mcp_warm_s", rep, time_first_query(command, args, env, log))
    finally:
        _stop_quietly(Daemon.adopt(target, sandbox))


# -- measure 7: memory of N sessions, shared daemon vs private hyperds -----------

def _rss_parts(clients: Sequence[int], daemon: int | None) -> tuple[int, dict[str, Any]]:
    """
    The RSS sum of the clients, their descendants (private hyperds), the
    daemon and its descendants (its hyperd); that sum by role, in MB; and
    the same by PSS (shared pages counted once), in MB.
    """
    roles = {"clients": list(clients),
             "clients' hyperds": [c for pid in clients for c in descendants(pid)]}
    if daemon is not None:
        if not pid_alive(daemon):
            raise BenchError("the daemon died")
        roles["daemon"] = [daemon]
        below = descendants(daemon)
        # Ours serves MCP sessions from one host process, a child of the daemon.
        roles["mcp host"] = [pid for pid in below if is_mcp_host(pid)]
        roles["daemon's hyperd"] = [pid for pid in below if pid not in roles["mcp host"]]
    rss = {role: sum(rss_bytes(pid) for pid in pids) for role, pids in roles.items()}
    pss = {role: sum(pss_bytes(pid) for pid in pids) for role, pids in roles.items()}
    private = {role: sum(private_bytes(pid) for pid in pids) for role, pids in roles.items()}
    parts: dict[str, Any] = {k: round(v / MB, 1) for k, v in rss.items()}
    parts["pss"] = {k: round(v / MB, 1) for k, v in pss.items()}
    parts["private"] = {k: round(v / MB, 1) for k, v in private.items()}
    parts["pss_total"] = sum(pss.values()) / MB
    # What each assistant costs with the host's base shared among them all.
    count = max(len(clients), 1)
    parts["sessions"] = len(clients)
    parts["amortized_private"] = (private["clients"] + private.get("mcp host", 0)) / count / MB
    parts["amortized_pss"] = (pss["clients"] + pss.get("mcp host", 0)) / count / MB
    return sum(rss.values()), parts


def per_assistant(alone: dict[str, Any], many: dict[str, Any]) -> dict[str, float]:
    """
    What one more assistant costs, from the parts measured with one server
    (C{alone}) and with N (C{many}): its own process (the mean of the N),
    and what the host grows by per session (ours; upstream has no host);
    and the whole machine's PSS as a line, C{fixed + N * per_session}.
    """
    n = many["sessions"]
    if n < 2:
        raise BenchError("the memory measure needs at least 2 sessions")
    own_private = many["private"]["clients"] / n
    own_pss = many["pss"]["clients"] / n
    host_private = (many["private"].get("mcp host", 0) - alone["private"].get("mcp host", 0))
    host_pss = (many["pss"].get("mcp host", 0) - alone["pss"].get("mcp host", 0))
    per_session = (many["pss_total"] - alone["pss_total"]) / (n - 1)
    return {"private": own_private + host_private / (n - 1),
            "pss": own_pss + host_pss / (n - 1),
            "host_private_per_session": host_private / (n - 1),
            "pss_per_session": per_session,
            "pss_fixed": alone["pss_total"] - per_session}


def crossover(ours: dict[str, float], theirs: dict[str, float]) -> float:
    """
    The number of assistants from which ours needs less memory (PSS, whole
    machine) than theirs, by the two lines of L{per_assistant}; infinite if
    ours never does, 1 if it always does.
    """
    saved = theirs["pss_per_session"] - ours["pss_per_session"]
    extra = ours["pss_fixed"] - theirs["pss_fixed"]
    if extra <= 0:
        return 1.0
    if saved <= 0:
        return math.inf
    return float(math.floor(extra / saved) + 1)


def memory(reaper: Reaper, targets: Sequence[Target], rec: Recorder, sessions: int) -> None:
    for rep in range(rec.repeats):
        lines: dict[str, dict[str, float]] = {}
        for target in order(targets, rep):
            if target.sessions:
                with rec.guard([target], 7, rep, "client library"):
                    shared, parts = _clients_memory(reaper, target, sessions, shared=True)
                    rec.extra(target, "mem_shared_parts_mb", parts)
                    private, parts = _clients_memory(reaper, target, sessions, shared=False)
                    rec.extra(target, "mem_private_parts_mb", parts)
                    rec.add(target, "mem_shared_mb", rep, shared / MB)
                    rec.add(target, "mem_private_mb", rep, private / MB)
                    rec.add(target, "mem_ratio", rep, private / shared)
                    _ratios(rec, target, rep, "mem")
            with rec.guard([target], 7, rep, "MCP servers"):
                (shared, one_daemon), alone = _servers_memory(reaper, target, sessions,
                                                              shared=True)
                rec.extra(target, "mcp_mem_shared_parts_mb", one_daemon)
                rec.extra(target, "mcp_mem_alone_parts_mb", alone)
                private, parts = _servers_memory(reaper, target, sessions, shared=False)
                rec.extra(target, "mcp_mem_private_parts_mb", parts)
                each = per_assistant(alone, one_daemon)
                lines[target.name] = each
                rec.extra(target, "mcp_per_assistant_mb", each)
                rec.add(target, "mcp_mem_shared_mb", rep, shared / MB)
                rec.add(target, "mcp_mem_shared_pss_mb", rep, one_daemon["pss_total"])
                rec.add(target, "mcp_assistant_private_mb", rep, each["private"])
                rec.add(target, "mcp_assistant_pss_mb", rep, each["pss"])
                rec.add(target, "mcp_assistant_amortized_private_mb", rep,
                        one_daemon["amortized_private"])
                rec.add(target, "mcp_mem_private_mb", rep, private / MB)
                rec.add(target, "mcp_mem_ratio", rep, private / shared)
                _ratios(rec, target, rep, "mcp_mem")
        if "ours" in lines and "theirs" in lines:
            ours = next(t for t in targets if t.name == "ours")
            rec.add(ours, "mcp_crossover_n", rep, crossover(lines["ours"], lines["theirs"]))


def _ratios(rec: Recorder, target: Target, rep: int, prefix: str) -> None:
    """
    Two more readings of private / shared: by PSS (shared pages, such as
    hyperd's own code, counted once), and of the server side alone (the
    private hyperds against the daemon and its hyperd, without the clients).
    """
    extras = rec.extras[target.name]
    shared, private = extras[f"{prefix}_shared_parts_mb"][-1], extras[f"{prefix}_private_parts_mb"][-1]
    rec.add(target, f"{prefix}_ratio_pss", rep, private["pss_total"] / shared["pss_total"])
    rec.add(target, f"{prefix}_ratio_server", rep,
            private["clients' hyperds"] / (shared["daemon"] + shared["daemon's hyperd"]))


def _batches(count: int) -> list[range]:
    """
    The first session alone, then all the others at once.  The first one
    creates the persistent database: several sessions creating it at the
    same moment can hang hyperd (seen with ours and with upstream's), which
    is not what this measure is about.
    """
    return [range(0, 1), range(1, count)] if count > 1 else [range(count)]


def _own_persistent(env: dict[str, str], sandbox: Any, index: int,
                    shared: bool) -> dict[str, str]:
    """
    Shared sessions share one persistent database; private hyperds each
    need their own, since a .hyper file is locked by the hyperd that has it.
    """
    if shared:
        return env
    return dict(env, HYPERDB_PERSISTENT_DB=str(sandbox.path / f"persistent-{index}.hyper"))


def _clients_memory(reaper: Reaper, target: Target, count: int,
                    shared: bool) -> tuple[int, dict[str, Any]]:
    """RSS sum of C{count} holding clients and the daemon and hyperd(s) serving them."""
    kind = "shared" if shared else "private"
    sandbox = reaper.sandbox(f"mem-{kind}-{target.name}")
    daemon = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if shared:
            daemon = Daemon(target, sandbox).start()
            daemon.wait_ready()
        env = target.env(sandbox, daemon.port if daemon else None)
        log = sandbox.logs / "clients.log"
        flags = ["--hold"] + ([] if shared else ["--no-daemon"])
        deadline = time.monotonic() + CLIENT_TIMEOUT
        for batch in _batches(count):
            started = [_client(reaper, _own_persistent(env, sandbox, i, shared), log, *flags,
                               "--name", f"bench-{i}") for i in batch]
            procs.extend(started)
            for proc in started:
                _check_client_line(_read_line(proc, max(deadline - time.monotonic(), 0.1)))
        return _rss_parts([p.pid for p in procs], daemon.pid if daemon else None)
    finally:
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                for pid in descendants(proc.pid):
                    kill(pid)
                proc.kill()
                proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()
        _stop_quietly(daemon)


def _servers_memory(reaper: Reaper, target: Target, count: int,
                    shared: bool) -> tuple[int, dict[str, Any]]:
    """RSS sum of C{count} MCP servers and the daemon and hyperd(s) serving them."""
    kind = "shared" if shared else "private"
    sandbox = reaper.sandbox(f"mcpmem-{kind}-{target.name}", ports=16)
    daemon = None
    try:
        if shared:
            daemon = Daemon(target, sandbox).start()
            daemon.wait_ready()
        env = target.env(sandbox, daemon.port if daemon else None)
        command, args = target.mcp_command(no_daemon=not shared)

        def measure(pids: list[int]) -> tuple[int, dict[str, Any]]:
            return _rss_parts(pids, daemon.pid if daemon else None)

        def measure_first(pids: list[int]) -> dict[str, Any]:
            return measure(pids)[1]

        envs = [_own_persistent(env, sandbox, i, shared) for i in range(count)]
        # Shared: the parts with the first server alone too (per_assistant).
        return hold_servers(command, args, envs, sandbox.logs / "mcp-servers.log", measure,
                            first_alone=True, measure_first=measure_first if shared else None)
    finally:
        _stop_quietly(daemon)


# -- measure 9: inline loads through the MCP server ------------------------------

def inline_data(rows: int, fmt: str) -> str:
    """C{rows} rows of id, name, score and day, as CSV with a header or a JSON array."""
    records = ((i, f"name {i}", i * 0.5, f"2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}")
               for i in range(rows))
    if fmt == "csv":
        return "id,name,score,day\n" + "".join(f"{i},{n},{s},{d}\n" for i, n, s, d in records)
    return json.dumps([{"id": i, "name": n, "score": s, "day": d} for i, n, s, d in records])


def inline_loads(reaper: Reaper, targets: Sequence[Target], rec: Recorder,
                 sizes: dict[str, Any]) -> None:
    loads = [(fmt, inline_data(sizes[key], fmt), sizes[key])
             for fmt, key in (("csv", "load_csv_rows"), ("json", "load_json_rows"))]
    for rep in range(rec.repeats):
        for target in order(targets, rep):
            with rec.guard([target], 9, rep, "inline loads"):
                inline_load(reaper, target, rec, rep, loads)


def inline_load(reaper: Reaper, target: Target, rec: Recorder, rep: int,
                loads: list[tuple[str, str, int]]) -> None:
    """
    Measure 9: one MCP server (with its daemon, found or spawned as users
    have it), C{load_data} of inline CSV and then JSON; the server's peak RSS.
    """
    sandbox = reaper.sandbox(f"loads-{target.name}", ports=16)
    env = target.env(sandbox)
    command, args = target.mcp_command()
    try:
        seconds, peak = time_loads(command, args, env, sandbox.logs / "mcp-servers.log", loads)
        rec.add(target, "load_csv_s", rep, seconds["csv"])
        rec.add(target, "load_json_s", rep, seconds["json"])
        rec.add(target, "load_peak_rss_mb", rep, peak / MB)
    finally:
        _stop_quietly(Daemon.adopt(target, sandbox))
