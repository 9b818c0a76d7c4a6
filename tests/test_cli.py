"""
The C{hyperdb-mcp} command line, run as a user runs it: a subprocess with
its own state directory and ports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from hyperdaemon import __version__
from hyperdaemon.cli import describe
from support import (
    QUICK,
    DaemonProcess,
    ask,
    free_port,
    pid_alive,
    port_is_free,
    status,
)

NO_DAEMON = "No daemon is currently running."


class CliTestCase:
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
        self.tmp = tmp_path
        self._daemons = daemons
        self.state = tmp_path / "state"
        # Status and stop scan this range when no port is pinned.
        first = free_port()
        self.range = f"{first}-{first}"
        self.env = dict(os.environ, HYPERDB_STATE_DIR=str(self.state),
                        HYPERDB_DAEMON_PORT_RANGE=self.range)

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hyperdaemon", *args],
            env=env or self.env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start_daemon(self, port: int | None = None) -> DaemonProcess:
        daemon = DaemonProcess(self.state, port, "--idle-timeout", "0", env=self.env).start()
        self._daemons.append(daemon)
        daemon.wait_ready()
        return daemon

    def assert_one_line_error(self, result: subprocess.CompletedProcess[str], *needles: str) -> None:
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        for needle in needles:
            assert needle in result.stderr


class StatusTests(CliTestCase):
    def test_status_without_a_daemon_fails(self) -> None:
        result = self.cli("daemon", "status")
        assert result.returncode == 1
        assert result.stderr.strip() == NO_DAEMON
        assert result.stdout == ""

    def test_status_describes_the_daemon(self) -> None:
        daemon = self.start_daemon()
        result = self.cli("daemon", "status", "--port", str(daemon.port))
        assert result.returncode == 0, result.stderr
        assert f"hyperdb-mcp daemon {__version__} is running" in result.stdout
        assert f"pid        {daemon.pid}" in result.stdout
        assert f"127.0.0.1:{daemon.port}" in result.stdout
        assert "sessions   0" in result.stdout

    def test_status_json_is_the_status_object(self) -> None:
        daemon = self.start_daemon()
        result = self.cli("daemon", "status", "--json", "--port", str(daemon.port))
        assert result.returncode == 0, result.stderr
        facts = json.loads(result.stdout)
        assert facts["pid"] == daemon.pid
        assert facts["hyperd_endpoint"] == daemon.record()["hyperd_endpoint"]

    def test_status_finds_the_daemon_through_daemon_json(self) -> None:
        daemon = self.start_daemon()  # a port outside the scanned range
        result = self.cli("daemon", "status", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == daemon.pid

    def test_status_finds_the_daemon_by_scanning(self) -> None:
        port = int(self.range.split("-")[0])
        daemon = self.start_daemon(port)
        daemon.record_path.unlink()
        result = self.cli("daemon", "status", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == daemon.pid

    def test_corrupt_discovery_file_is_removed(self) -> None:
        self.state.mkdir(mode=0o700)
        (self.state / "daemon.json").write_text("{not json")
        result = self.cli("daemon", "status")
        assert result.returncode == 1
        assert result.stderr.strip() == NO_DAEMON
        assert not (self.state / "daemon.json").exists()

    def test_stale_discovery_file_is_removed(self) -> None:
        self.state.mkdir(mode=0o700)
        (self.state / "daemon.json").write_text(json.dumps({
            "pid": 999999, "hyperd_endpoint": "127.0.0.1:1", "health_port": free_port(),
            "started_at": "2026-01-01T00:00:00+00:00", "version": "0.0.1",
        }))
        result = self.cli("daemon", "status")
        assert result.returncode == 1
        assert not (self.state / "daemon.json").exists()

    def stale_record(self, corrupt: bool) -> Path:
        self.state.mkdir(mode=0o700)
        path = self.state / "daemon.json"
        path.write_text("{not json" if corrupt else json.dumps({
            "pid": 999999, "hyperd_endpoint": "127.0.0.1:1", "health_port": free_port(),
            "started_at": "2026-01-01T00:00:00+00:00", "version": "0.0.1",
        }))
        return path

    def test_a_pinned_port_still_removes_a_stale_or_corrupt_discovery_file(self) -> None:
        for corrupt in (False, True):
            for pin in ("flag", "variable"):
                record = self.stale_record(corrupt)
                port = str(free_port())
                if pin == "flag":
                    result = self.cli("daemon", "status", "--port", port)
                else:
                    result = self.cli("daemon", "status",
                                      env=dict(self.env, HYPERDB_DAEMON_PORT=port))
                assert (result.returncode, result.stderr.strip()) == (1, NO_DAEMON)
                assert not record.exists(), f"corrupt={corrupt}, pinned by {pin}"
                self.state.rmdir()

    def test_a_pinned_port_keeps_a_discovery_file_that_names_a_live_daemon(self) -> None:
        daemon = self.start_daemon()
        result = self.cli("daemon", "status", "--port", str(free_port()))
        assert (result.returncode, result.stderr.strip()) == (1, NO_DAEMON)
        assert daemon.record()["pid"] == daemon.pid

    def test_status_says_when_the_daemon_found_uses_another_state_dir(self) -> None:
        daemon = self.start_daemon(int(self.range.split("-")[0]))
        own = self.cli("daemon", "status")
        assert (own.returncode, own.stderr) == (0, "")
        assert f"state dir  {self.state}\n" in own.stdout
        other = self.tmp / "other-state"
        env = dict(self.env, HYPERDB_STATE_DIR=str(other))
        note = (f"hyperdb-mcp: note: the daemon on port {daemon.port} uses the state directory "
                f"{self.state}, not {other}.\n")
        result = self.cli("daemon", "status", env=env)
        assert (result.returncode, result.stderr) == (0, note)
        assert f"state dir  {self.state}\n" in result.stdout
        result = self.cli("daemon", "status", "--json", "--state-dir", str(other), env=self.env)
        assert (result.returncode, result.stderr) == (0, note)
        assert json.loads(result.stdout)["state_dir"] == str(self.state)

    def test_a_foreign_listener_is_not_a_daemon(self) -> None:
        import socket

        port = int(self.range.split("-")[0])
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
            listener.listen()
            result = self.cli("daemon", "status")
        assert result.returncode == 1
        assert result.stderr.strip() == NO_DAEMON


class StopTests(CliTestCase):
    def test_stop_without_a_daemon_fails(self) -> None:
        result = self.cli("daemon", "stop")
        assert result.returncode == 1
        assert result.stderr.strip() == NO_DAEMON

    def test_stop_returns_once_the_daemon_is_gone(self) -> None:
        daemon = self.start_daemon()
        hyperd = status(daemon.port)["hyperd_pid"]
        result = self.cli("daemon", "stop", "--port", str(daemon.port))
        assert result.returncode == 0, result.stderr
        # No waiting: all of this holds when stop returns.
        assert port_is_free(daemon.port)
        assert not pid_alive(daemon.pid)
        assert not daemon.record_path.exists()
        assert daemon.wait_exit() == 0
        assert not pid_alive(hyperd)

    def test_stop_finds_the_daemon_without_a_port(self) -> None:
        daemon = self.start_daemon()
        result = self.cli("daemon", "stop")
        assert result.returncode == 0, result.stderr
        assert not pid_alive(daemon.pid)


class RunTests(CliTestCase):
    """`hyperdb-mcp daemon` refuses what it cannot use, in one line, leaving nothing."""

    def test_bad_port(self) -> None:
        result = self.cli("daemon", "--port", "abc")
        self.assert_one_line_error(result, "--port", "'abc'")

    def test_bad_port_variable(self) -> None:
        result = self.cli("daemon", env=dict(self.env, HYPERDB_DAEMON_PORT="70000"))
        self.assert_one_line_error(result, "HYPERDB_DAEMON_PORT", "70000")

    def test_bad_idle_timeout(self) -> None:
        result = self.cli("daemon", "--port", str(free_port()), "--idle-timeout", "-5")
        self.assert_one_line_error(result, "--idle-timeout", "-5")

    def test_unknown_flag(self) -> None:
        result = self.cli("daemon", "--frobnicate")
        self.assert_one_line_error(result, "--frobnicate")
        assert result.returncode == 2

    def test_state_dir_that_is_a_file(self) -> None:
        blocker = self.tmp / "file"
        blocker.write_text("")
        result = self.cli("daemon", "--port", str(free_port()), "--state-dir", str(blocker))
        self.assert_one_line_error(result, str(blocker), "--state-dir")

    @pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
    def test_state_dir_without_room_for_its_logs_folder_names_that_folder(self) -> None:
        # /proc is a directory in which no folder can be made.
        result = self.cli("daemon", "--port", str(free_port()), "--state-dir", "/proc")
        self.assert_one_line_error(
            result, "Cannot create the logs folder /proc/logs inside the state directory /proc: ",
            "--state-dir")

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a file system")
    def test_read_only_state_dir_of_a_loose_mode_is_one_line_for_daemon_and_mcp_server(
            self, tmpfs: Callable[[Path, str], None]) -> None:
        tmpfs(self.state, "size=1m,mode=0755")
        subprocess.run(["mount", "-o", "remount,ro", str(self.state)], check=True)
        expected = (f"Cannot make the state directory {self.state} private (mode 0700 instead "
                    f"of 0755): Read-only file system; ")
        daemon = self.cli("daemon", "--port", str(free_port()))
        self.assert_one_line_error(daemon, expected, "HYPERDB_STATE_DIR")
        server = self.cli("--ephemeral-only")
        self.assert_one_line_error(server, expected, "HYPERDB_STATE_DIR")
        assert (daemon.returncode, server.returncode) == (1, 1)

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a file system")
    def test_read_only_sessions_folder_is_one_line_for_the_mcp_server(
            self, tmpfs: Callable[[Path, str], None]) -> None:
        sessions = self.state / "sessions"
        sessions.mkdir(parents=True)
        self.state.chmod(0o700)
        tmpfs(sessions, "size=1m,mode=0700")
        subprocess.run(["mount", "-o", "remount,ro", str(sessions)], check=True)
        result = self.cli("--ephemeral-only")
        self.assert_one_line_error(
            result, f"Cannot create this session's folder in {sessions}: Read-only file system; ",
            "HYPERDB_STATE_DIR")
        assert result.returncode == 1

    @pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
    def test_unwritable_state_dir(self) -> None:
        locked = self.tmp / "locked"
        locked.mkdir(mode=0o500)
        result = self.cli("daemon", "--port", str(free_port()), "--state-dir", str(locked / "s"))
        self.assert_one_line_error(result, str(locked / "s"))

    def test_missing_hyperd(self) -> None:
        missing = self.tmp / "nowhere" / "hyperd"
        result = self.cli("daemon", "--port", str(free_port()),
                          env=dict(self.env, HYPERD_PATH=str(missing)))
        self.assert_one_line_error(result, str(missing), "HYPERD_PATH")

    def test_broken_hyperd_stops_the_daemon_with_a_clear_reason(self) -> None:
        broken = self.tmp / "hyperd"
        broken.write_text("#!/bin/sh\nexit 7\n")
        broken.chmod(0o755)
        port = free_port()
        result = self.cli("daemon", "--port", str(port), env=dict(self.env, HYPERD_PATH=str(broken)))
        assert result.returncode == 1
        assert "hyperd exited with code 7 before it was ready" in result.stderr
        assert "Traceback" not in result.stderr
        assert port_is_free(port)
        assert not (self.state / "daemon.json").exists()

    def test_hyperd_that_is_not_a_program(self) -> None:
        junk = self.tmp / "hyperd"
        junk.write_bytes(b"\x00\x01 not an executable")
        junk.chmod(0o755)
        port = free_port()
        result = self.cli("daemon", "--port", str(port), env=dict(self.env, HYPERD_PATH=str(junk)),
                          timeout=QUICK)
        assert result.returncode == 1
        assert f"cannot run {junk}" in result.stderr
        assert port_is_free(port)

    def test_refuses_to_start_while_its_users_daemon_runs_elsewhere_in_the_range(self) -> None:
        running = self.start_daemon()
        # Whatever holds the ports below it, the scan must find the daemon.
        span = f"{running.port - 3}-{running.port}"
        result = self.cli("daemon", env=dict(self.env, HYPERDB_DAEMON_PORT_RANGE=span),
                          timeout=QUICK)
        self.assert_one_line_error(result, f"already running on port {running.port}")

    def test_unknown_flag_points_at_the_help_of_the_subcommand_run(self) -> None:
        for command in (["daemon"], ["daemon", "status"], ["daemon", "stop"]):
            result = self.cli(*command, "--bogus")
            self.assert_one_line_error(result, "--bogus")
            assert result.returncode == 2
            name = " ".join(["hyperdb-mcp", *command])
            assert result.stderr.startswith(f"{name}: "), result.stderr
            assert result.stderr.rstrip().endswith(f"(see '{name} --help')"), result.stderr

    def test_mcp_server_unusable_persistent_db_is_one_line_and_starts_nothing(self) -> None:
        blocker = self.tmp / "a-file"
        blocker.write_text("")
        cases = [
            ("/proc/nope/x.hyper", "Cannot create the folder /proc/nope for the persistent "
                                   "database /proc/nope/x.hyper: No such file or directory; "),
            (f"{blocker}/x.hyper", f"Cannot create the folder {blocker} for the persistent "
                                   f"database {blocker}/x.hyper: File exists; "),
            (str(self.tmp), f"The persistent database {self.tmp} is a folder, not a .hyper file; "),
        ]
        for path, message in cases:
            for how in (["--persistent-db", path], []):
                result = self.cli(*how, env=dict(self.env, HYPERDB_PERSISTENT_DB=path))
                self.assert_one_line_error(result, f"hyperdb-mcp: {message}", "--persistent-db",
                                           "HYPERDB_PERSISTENT_DB", "--ephemeral-only")
                assert result.returncode == 1
        # Refused before a daemon was looked for, or spawned.
        assert port_is_free(int(self.range.split("-")[0]))
        assert not (self.state / "daemon.json").exists()

    def assert_only_own_events(self, log: str, what: str) -> None:
        """Every line of C{log} is an event of ours: no Twisted chatter about ports."""
        for line in log.splitlines():
            # "2026-11-30T05:51:44+0000 [hyperdaemon.daemon#info] ..."
            namespace = line.partition(" [")[2].partition("#")[0]
            assert namespace.startswith("hyperdaemon."), f"{what}: {line!r}\n{log}"

    def test_starting_hyperd_logs_what_a_person_needs_only(self) -> None:
        daemon = DaemonProcess(self.state, None, "--idle-timeout", "0", env=self.env).start()
        self._daemons.append(daemon)
        daemon.wait_ready()
        assert ask(daemon.port, "STOP") == ["STOPPING"]
        assert daemon.wait_exit() == 0
        for what, log in (("stderr", daemon.output()),
                          ("daemon.log", (self.state / "logs" / "daemon.log").read_text())):
            # From the health port's bind (which twisted logs on its own, once) to the
            # shutdown, which closes it: hyperd's start.
            start = log.partition("answering on 127.0.0.1")[2].partition("\n")[2]
            start = start.partition("stopping: STOP command")[0]
            assert "] hyperd[" in start
            self.assert_only_own_events(start.rpartition("\n")[0], what)
        for flags in (["--ephemeral-only"], ["--no-daemon", "--ephemeral-only"]):
            result = self.cli(*flags)  # stdin is closed: it serves nothing and exits
            assert result.returncode == 0, result.stderr
            self.assert_only_own_events(result.stderr, f"hyperdb-mcp {' '.join(flags)}")
        assert "] hyperd[" in result.stderr  # the private hyperd's start is logged
        stop = self.cli("daemon", "stop")
        assert stop.returncode == 0, stop.stderr

    def test_mcp_server_bad_flag(self) -> None:
        result = self.cli("--read-onyl")
        self.assert_one_line_error(result, "--read-onyl", "(see 'hyperdb-mcp --help')")
        assert result.returncode == 2


class DescribeTests:
    """The person-readable status copes with an upstream daemon's STATUS."""

    def test_upstream_status_fields_only(self) -> None:
        text = describe({
            "pid": 2278, "hyperd_endpoint": "127.0.0.1:43209", "health_port": 7485,
            "started_at": "2026-11-28T10:48:14.996123965+00:00", "version": "0.7.3",
        })
        assert "hyperdb-mcp daemon 0.7.3 is running" in text
        assert "pid        2278" in text
        assert "hyperd     127.0.0.1:43209" in text

    def test_sessions_are_listed(self) -> None:
        text = describe({
            "pid": 1, "health_port": 2, "version": "1", "uptime_s": 5.0,
            "sessions": [{"id": "s1", "pid": 42, "name": "cursor", "ephemeral_db": "/x/e.hyper",
                          "attached_at": 0}],
        })
        assert "sessions   1" in text
        assert "s1: pid 42 cursor" in text
        assert "/x/e.hyper" in text
