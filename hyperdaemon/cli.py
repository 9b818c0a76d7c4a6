"""
The C{hyperdb-mcp} command line.

C{hyperdb-mcp daemon} runs the daemon in the foreground (the same service as
C{twistd -n hyperdaemon}); C{hyperdb-mcp daemon status} and C{hyperdb-mcp
daemon stop} manage a running one, ours or any daemon that speaks the health
protocol.  Errors a user can cause end in one line on stderr that says the
fix, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from hyperdaemon import __version__

if TYPE_CHECKING:
    from hyperdaemon.client.healthclient import PortProbe

# Without a subcommand this is the launcher, whose start must import only
# the standard library (hyperdaemon.mcp.launcher): the daemon's commands
# import what they need themselves.  hyperdb-mcp and python -m hyperdaemon
# enter at hyperdaemon.mcp.launcher.main, which reads the launcher's own
# flags without this parser and hands every other command line to main here.

PROG = "hyperdb-mcp"
NO_DAEMON = "No daemon is currently running."
#: Seconds `daemon stop` waits for the daemon to be gone: longer than the
#: grace a stopping hyperd gets to write its data out (30 s) before SIGKILL.
STOP_TIMEOUT = 60.0


class _Parser(argparse.ArgumentParser):
    """
    An argument parser whose errors are one line, with where to look: the
    help of the (sub)command that was run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The subcommands' parsers, by the C{dest} of their subparsers and their name.
        self.subcommands: dict[tuple[str, str], _Parser] = {}

    def add_subcommand(self, dest: str, subparsers: Any, name: str, **kwargs: Any) -> "_Parser":
        parser = subparsers.add_parser(name, **kwargs)
        self.subcommands[dest, name] = parser
        return parser

    def innermost(self, namespace: argparse.Namespace) -> "_Parser":
        """The parser of the deepest subcommand named in C{namespace}."""
        for (dest, name), parser in self.subcommands.items():
            if getattr(namespace, dest, None) == name:
                return parser.innermost(namespace)
        return self

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        # argparse reports a subcommand's unknown arguments from the top
        # parser, which would point at the top's --help.
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.innermost(parsed).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", default=argparse.SUPPRESS,
        help="the daemon's health port (default: HYPERDB_DAEMON_PORT, else "
             "daemon.json, else a scan of 7485-7500)",
    )
    parser.add_argument(
        "--state-dir", default=argparse.SUPPRESS,
        help="state directory (default: HYPERDB_STATE_DIR, else ~/.hyperdb)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Hyper SQL for AI assistants, through one shared hyperd per user.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--no-daemon", action="store_true",
                        help="use a private hyperd owned by this process instead of the daemon")
    parser.add_argument("--persistent-db", metavar="PATH",
                        help="the shared persistent .hyper file (default: HYPERDB_PERSISTENT_DB, "
                             "else ~/.local/share/hyperdb/workspace.hyper)")
    parser.add_argument("--ephemeral-only", action="store_true",
                        help="no persistent database: only this session's scratch database")
    parser.add_argument("--read-only", action="store_true",
                        help="refuse every tool that writes")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    daemon = parser.add_subcommand(
        "command", commands, "daemon", help="run the shared daemon in the foreground, or manage it",
        description="Run the per-user daemon in the foreground (stop it with "
                    "Ctrl-C, SIGTERM or 'hyperdb-mcp daemon stop').",
    )
    _common(daemon)
    daemon.add_argument(
        "--idle-timeout", default=argparse.SUPPRESS,
        help="seconds without sessions or commands before it stops; 0 = never "
             "(default: HYPERDB_DAEMON_IDLE_TIMEOUT, else 1800)",
    )
    daemon.add_argument(
        "--compat", action="store_true", default=argparse.SUPPRESS,
        help="start hyperd without a password, for upstream Rust clients; UNSAFE on a "
             "machine shared with other users: any local user can then log in to hyperd, "
             "read and change every database, and read and write files as you "
             "(COPY ... TO/FROM)",
    )
    # For clients that spawn the daemon: a pipe told READY/EXISTS/ERROR once.
    daemon.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    actions = daemon.add_subparsers(dest="action", parser_class=_Parser)
    status = daemon.add_subcommand(
        "action", actions, "status", help="show the running daemon's facts",
        description="Show the running daemon (exit 0), or say none runs (exit 1).",
    )
    _common(status)
    status.add_argument("--json", action="store_true", help="print its STATUS object as JSON")
    stop = daemon.add_subcommand(
        "action", actions, "stop", help="stop the running daemon and wait until it is gone",
        description="Ask the running daemon to stop; return once it has exited (exit 0), "
                    "or exit 1 if none runs.",
    )
    _common(stop)
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: {message}" if not message.startswith(NO_DAEMON) else message, file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None, early_host: Any = None) -> int:
    """
    C{hyperdb-mcp}'s command line; C{early_host}: the MCP host that the
    entry point started for a daemon (L{hyperdaemon.daemon.hoststart}).
    """
    try:
        args = build_parser().parse_args(argv)
    except BaseException:
        if early_host is not None:
            early_host.discard()
        raise
    options = vars(args)
    action = options.get("action")
    if args.command == "daemon" and action is None:
        return run_daemon(options, early_host)
    if early_host is not None:  # only a daemon that runs has a host
        early_host.discard()
    if args.command != "daemon":
        from hyperdaemon.mcp.launcher import launch

        return launch(options)
    if action == "status":
        return daemon_status(options)
    return daemon_stop(options)


def _skipped(probe: PortProbe) -> None:
    print(f"{PROG}: skipped port {probe.port}: it is held by {probe.held_by()}.",
          file=sys.stderr)


def _locate(options: dict[str, Any]) -> tuple[int | None, Path | None, int]:
    """
    The port of this user's running daemon (or None), the state directory
    asked for, and an exit code for errors.  Ports held by other users are
    skipped with a note on stderr; a pinned one is an error.
    """
    from hyperdaemon import config
    from hyperdaemon.client.healthclient import PortState, locate

    try:
        choice = config.port_choice(options.get("port"), os.environ)
        state = config.state_dir(options.get("state_dir"), os.environ)
    except config.ConfigError as e:
        return None, None, _fail(str(e), 2)
    found = locate(state, choice, on_skip=_skipped)
    if found is not None and found.state is PortState.OTHER_USER:
        return None, state, _fail(
            f"port {found.port} is held by {found.held_by()}, not by your daemon: "
            f"pin a port of your own with --port or HYPERDB_DAEMON_PORT."
        )
    return (found.port if found else None), state, 0


def other_state_dir(facts: dict[str, Any], asked: Path) -> str | None:
    """
    A note for when the daemon found (by its port, for a daemon serves
    every state directory of its user in the range) keeps its state in
    another directory than C{asked}; C{None} if it is the same one, or the
    daemon does not say (the upstream one).
    """
    theirs = facts.get("state_dir")
    if not isinstance(theirs, str) or os.path.realpath(theirs) == os.path.realpath(asked):
        return None
    return (f"note: the daemon on port {facts.get('health_port', '?')} uses the state "
            f"directory {theirs}, not {asked}.")


def _age(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _uptime(facts: dict[str, Any]) -> float | None:
    if isinstance(facts.get("uptime_s"), (int, float)):
        return float(facts["uptime_s"])
    try:
        started = datetime.fromisoformat(str(facts["started_at"]))
    except (KeyError, ValueError):
        return None
    return (datetime.now(timezone.utc) - started).total_seconds()


def describe(facts: dict[str, Any]) -> str:
    """The daemon's facts for a person, from its C{STATUS} object."""
    lines = [f"hyperdb-mcp daemon {facts.get('version', '?')} is running"]

    def row(label: str, value: object) -> None:
        lines.append(f"  {label:<10} {value}")

    row("pid", facts.get("pid", "?"))
    row("port", f"127.0.0.1:{facts.get('health_port', '?')}")
    hyperd = facts.get("hyperd_endpoint") or "(not ready)"
    if facts.get("hyperd_pid"):
        hyperd += f" (pid {facts['hyperd_pid']}"
        if "restarts" in facts:
            hyperd += f", {facts['restarts']} restarts"
        hyperd += ")"
    row("hyperd", hyperd)
    if facts.get("state"):
        row("state", facts["state"])
    uptime = _uptime(facts)
    if uptime is not None:
        row("uptime", _age(uptime))
    if "idle_timeout_s" in facts:
        idle = facts["idle_timeout_s"]
        row("idle stop", "never" if not idle else f"after {idle:g} s idle")
    if "compat" in facts:
        row("password", "none (--compat)" if facts["compat"] else "required (see daemon.json)")
    if facts.get("state_dir"):
        row("state dir", facts["state_dir"])
    if facts.get("log_dir"):
        row("logs", facts["log_dir"])
    host = facts.get("mcp_host")
    if isinstance(host, dict) and (host.get("pid") or host.get("state") == "failed"):
        served = host.get("sessions") if isinstance(host.get("sessions"), list) else []
        rss = host.get("rss_kb")
        row("mcp host", f"pid {host.get('pid')} ({host.get('state')}), {len(served)} sessions"
            + (f", RSS {rss / 1024:.0f} MB" if isinstance(rss, (int, float)) else "")
            + (f", {host['restarts']} restarts" if host.get("restarts") else ""))
        for s in served:
            if isinstance(s, dict):
                name = f" {s['name']}" if s.get("name") else ""
                mode = " read-only" if s.get("read_only") else ""
                lines.append(f"    launcher pid {s.get('pid')}{name}{mode} "
                             f"ephemeral {s.get('ephemeral_db')}")
    sessions = facts.get("sessions")
    if isinstance(sessions, list):
        row("sessions", len(sessions))
        now = time.time()
        for s in sessions:
            if not isinstance(s, dict):
                continue
            age = ""
            if isinstance(s.get("attached_at"), (int, float)) and s["attached_at"]:
                age = f" age {_age(now - s['attached_at'])}"
            name = f" {s['name']}" if s.get("name") else ""
            lines.append(
                f"    {s.get('id')}: pid {s.get('pid')}{name}{age} "
                f"ephemeral {s.get('ephemeral_db')}"
            )
    return "\n".join(lines)


def daemon_status(options: dict[str, Any]) -> int:
    from hyperdaemon.client.healthclient import DaemonError, status as fetch_status

    port, state, code = _locate(options)
    if code:
        return code
    if port is None:
        return _fail(NO_DAEMON)
    try:
        facts = fetch_status(port)
    except (OSError, DaemonError) as e:
        return _fail(f"the daemon on port {port} did not report its status: {e}")
    note = other_state_dir(facts, state) if state is not None else None
    if note:
        print(f"{PROG}: {note}", file=sys.stderr)
    if options.get("json"):
        print(json.dumps(facts, indent=2))
    else:
        print(describe(facts))
    return 0


def daemon_stop(options: dict[str, Any]) -> int:
    from hyperdaemon.client.healthclient import (
        DaemonError,
        connect_own,
        status as fetch_status,
        wait_pid_gone,
        wait_port_free,
    )

    port, state, code = _locate(options)
    if code:
        return code
    if port is None:
        return _fail(NO_DAEMON)
    pid = None
    try:
        facts = fetch_status(port)
    except (OSError, DaemonError):
        pass
    else:
        pid = facts.get("pid")
        note = other_state_dir(facts, state) if state is not None else None
        if note:
            print(f"{PROG}: {note}", file=sys.stderr)
    try:
        with connect_own(port) as conn:
            reply = conn.ask("STOP")
            if reply != "STOPPING":
                return _fail(f"the daemon on port {port} refused to stop: {reply}")
            deadline = time.monotonic() + STOP_TIMEOUT
            # Our daemon closes the connection as it exits.
            conn.wait_closed(STOP_TIMEOUT)
    except (OSError, DaemonError) as e:
        return _fail(f"could not ask the daemon on port {port} to stop: {e}")
    pid = pid if isinstance(pid, int) else None
    if not wait_port_free(port, max(deadline - time.monotonic(), 0.1), pid):
        return _fail(f"the daemon on port {port} is still listening after {STOP_TIMEOUT:g} s")
    if pid is not None and not wait_pid_gone(pid, max(deadline - time.monotonic(), 0.1)):
        return _fail(f"the daemon (pid {pid}) has not exited after {STOP_TIMEOUT:g} s")
    print(f"Stopped the daemon on port {port}" + (f" (pid {pid})." if pid else "."))
    return 0


def _without_openssl() -> None:
    """
    Keep OpenSSL out of the daemon process, before anything imports it.
    Nothing there encrypts, and SCRAM (L{hyperdaemon.daemon.pgwire}) hashes with
    Python's built-in SHA-256, but Twisted's own imports (asyncio, urllib)
    load OpenSSL whenever they can: a sixth of the daemon's memory.  They
    all run without it, as on a Python built without OpenSSL.
    """
    # Python's own SHA-256: _sha256 up to 3.11, _sha2 from 3.12.
    if not any(importlib.util.find_spec(name) for name in ("_sha2", "_sha256")):
        return
    for name in ("_ssl", "_hashlib"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def run_daemon(options: dict[str, Any], early_host: Any = None) -> int:
    """
    Run the daemon in this process until it stops; its exit code.
    C{early_host}: the MCP host already started for it
    (L{hyperdaemon.daemon.hoststart}), which it adopts, or kills if it
    does not run.
    """
    _without_openssl()
    # Start-up makes tens of thousands of objects that live as long as the
    # process (modules, classes): no collection passes over them while they
    # are made, and none afterwards (gc.freeze), where a full pass would
    # stall the reactor for about 10 ms every few thousand connections.
    gc.disable()
    early = early_host
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from hyperdaemon.daemon.service import AlreadyRunning, StartupError, tell_spawner
    from hyperdaemon.daemon.tap import build_service

    ready_fd = options.get("ready_fd")
    try:
        service = build_service(options, reactor, early_host=early)
        service.privilegedStartService()
    except (AlreadyRunning, StartupError) as e:
        if early is not None:
            early.discard()
        answer = f"EXISTS {e.port}" if isinstance(e, AlreadyRunning) else f"ERROR {e}"
        tell_spawner(ready_fd, answer)
        print(f"{PROG} daemon: {e}", file=sys.stderr)
        return 1
    # A spawned daemon logs to daemon.log only; its stderr is for crashes.
    observers = [] if ready_fd is not None else [textFileLogObserver(sys.stderr)]
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    gc.freeze()
    gc.enable()
    reactor.run()
    return service.exit_code


