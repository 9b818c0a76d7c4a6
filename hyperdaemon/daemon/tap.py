"""
The twistd plugin's options and service maker (C{twistd hyperdaemon}).

L{Options} checks the values given and L{makeService} resolves and checks
every setting before twistd forks, so that a bad value, an unusable state
directory, a missing C{hyperd} or a daemon already running ends the command
at once with one clear line on stderr and exit 1, leaving nothing behind.
(An unknown flag is twistd's and twist's own to report, with their usage.)  It starts nothing: the health port is
bound in C{privilegedStartService} and C{hyperd} in C{startService}.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

from twisted.python import usage

from hyperdaemon import config
from hyperdaemon.daemon.hoststart import EarlyHost
from hyperdaemon.daemon.mcphost import START_VAR as MCP_HOST_VAR
from hyperdaemon.daemon.service import AlreadyRunning, DaemonService, DaemonSettings, StartupError
from hyperdaemon.discovery import StateDirError, prepare_state_dir
from hyperdaemon.client.healthclient import PortState, log_skipped, probe_port


class Options(usage.Options):
    synopsis = "[--port N] [--idle-timeout S] [--state-dir DIR] [--compat]"
    longdesc = (
        "Run the per-user hyperdb-mcp daemon: one shared hyperd for every "
        "MCP server of this user.  Flags beat environment variables "
        "(HYPERDB_DAEMON_PORT, HYPERDB_DAEMON_IDLE_TIMEOUT, HYPERDB_STATE_DIR, "
        "HYPERD_PATH), which beat the defaults."
    )
    optParameters = [
        ["port", "p", None,
         "Health port on 127.0.0.1 (default: HYPERDB_DAEMON_PORT, else the "
         "first free port of 7485-7500)."],
        ["idle-timeout", None, None,
         "Seconds without sessions or commands before the daemon stops; 0 = "
         "never (default: HYPERDB_DAEMON_IDLE_TIMEOUT, else 1800)."],
        ["state-dir", None, None,
         "Directory for daemon.json and logs (default: HYPERDB_STATE_DIR, else ~/.hyperdb)."],
    ]
    optFlags = [
        ["compat", None,
         "Start hyperd without a password, so that upstream Rust clients can use it.  "
         "UNSAFE on a machine shared with other users: any local user can then log in "
         "to hyperd, read and change every database, and read and write files as you "
         "(COPY ... TO/FROM)."],
    ]

    def postOptions(self) -> None:
        try:
            config.port_choice(self["port"], os.environ)
            config.idle_timeout(self["idle-timeout"], os.environ)
        except config.ConfigError as e:
            # Not a UsageError: twistd and twist print their whole usage for
            # one, which helps with an unknown flag, not with a bad value.
            raise SystemExit(f"{_program()}: {e}") from None


def _program() -> str:
    """How the command was run, for its one-line errors: C{twistd hyperdaemon} or C{twist hyperdaemon}."""
    runner = os.path.basename(sys.argv[0]) if sys.argv else ""
    return f"{runner if runner in ('twistd', 'twist') else 'twistd'} hyperdaemon"


def choose_port(choice: config.PortChoice) -> tuple[int, tuple[int, ...]]:
    """
    The health port to bind: the pinned one, or the first free one of the
    range, skipping ports held by other programs and by other users (whose
    daemon-shaped answers are not trusted, and which are logged).  The
    whole range is checked first: one daemon per user, wherever it runs.

    @return: the port, and the busy ports before it that did not answer as
        a daemon in time and are not another user's (one may be a daemon of
        this user still starting; see L{DaemonSettings.lower_ports}).
    @raise AlreadyRunning: if a daemon of this user already answers in the
        range (or on the pinned port).
    @raise StartupError: if the pinned port is taken, or the range is full.
    """
    probes = [probe_port(port) for port in choice.candidates()]
    for found in probes:
        if found.state is PortState.DAEMON:
            port = found.port
            raise AlreadyRunning(
                f"A hyperdb-mcp daemon (version {found.version}) is already running on "
                f"port {port}: use it, see 'hyperdb-mcp daemon status --port {port}', "
                f"or stop it with 'hyperdb-mcp daemon stop --port {port}'.",
                port,
            )
    for found in probes:
        if found.state is PortState.OTHER_USER:
            if choice.pinned is not None:
                raise StartupError(
                    f"Port {choice.pinned} is held by {found.held_by()}: pin a port of "
                    f"your own with --port or HYPERDB_DAEMON_PORT."
                )
            log_skipped(found)
    for index, found in enumerate(probes):
        if found.state is PortState.FREE:
            lower = tuple(p.port for p in probes[:index] if p.state is PortState.FOREIGN)
            return found.port, lower
    if choice.pinned is not None:
        raise StartupError(
            f"Port {choice.pinned} is in use by another program: choose another "
            f"with --port or HYPERDB_DAEMON_PORT."
        )
    raise StartupError(
        f"Every port from {choice.first} to {choice.last} is in use by other programs "
        f"or other users: pin a free one with --port or HYPERDB_DAEMON_PORT."
    )


def resolve_settings(options: Mapping[str, Any], environ: Mapping[str, str]) -> DaemonSettings:
    """
    Resolve and check every setting (C{options} keys: C{port},
    C{idle_timeout}, C{state_dir}, C{compat}, C{ready_fd}); prepare the
    state directory.

    @raise StartupError: with one sentence naming the problem and the fix.
    """
    try:
        choice = config.port_choice(options.get("port"), environ)
        idle = config.idle_timeout(options.get("idle_timeout"), environ)
        state = config.state_dir(options.get("state_dir"), environ)
        hyperd = config.hyperd_executable(environ)
        logs = prepare_state_dir(state)
    except (config.ConfigError, StateDirError) as e:
        raise StartupError(str(e)) from None
    port, lower = choose_port(choice)
    return DaemonSettings(
        port=port,
        state_dir=state,
        logs_dir=logs,
        idle_timeout=idle,
        hyperd=hyperd,
        compat=bool(options.get("compat")),
        lower_ports=lower,
        ready_fd=options.get("ready_fd"),
        # Set by a launcher that spawns the daemon: its host is wanted now.
        mcp_host=environ.get(MCP_HOST_VAR) == "1",
    )


def build_service(options: Mapping[str, Any], reactor: Any,
                  early_host: EarlyHost | None = None) -> DaemonService:
    """
    The daemon service for these options, stopping C{reactor} when done;
    with C{early_host}, the MCP host started with this process, which it
    adopts.
    """
    settings = resolve_settings(options, os.environ)

    def stop_reactor() -> None:
        # hyperd can fail before the reactor runs (twistd starts services first).
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    return DaemonService(reactor, settings, on_shutdown=stop_reactor, install_signal_handlers=True,
                         early_host=early_host)


def makeService(options: Options) -> DaemonService:
    from twisted.internet import reactor

    try:
        return build_service({k.replace("-", "_"): v for k, v in options.items()}, reactor)
    except StartupError as e:
        raise SystemExit(f"{_program()}: {e}") from None
