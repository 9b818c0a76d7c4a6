"""
Integration tests of the daemon: the real daemon process, the real hyperd,
real sockets.  Each test has its own state directory and a free port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import attrs
import pytest
import pytest_twisted

from hyperdaemon import __version__
from support import (
    QUICK,
    READY_TIMEOUT,
    children_of,
    free_port,
    port_is_open,
    DaemonProcess,
    ask,
    hyperd_query,
    pid_alive,
    port_is_free,
    status,
    until,
    wait_for,
    run_as,
)


def daemon_port(port: int) -> int:
    """C{port}, once something answers a PING there."""
    wait_for(lambda: port_is_open(port), READY_TIMEOUT, f"port {port} to answer")
    return port


class DaemonTestCase:
    """Tests with daemon processes of their own, in the test's folder (C{self.tmp})."""

    @pytest.fixture(autouse=True)
    def _world(self, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
        self.tmp = tmp_path
        self._daemons = daemons

    def start_daemon(self, *extra: str, port: int | None = None,
                     env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(self.tmp / "state", port, *extra, env=env).start()
        self._daemons.append(daemon)
        return daemon

    def assert_gone(self, daemon: DaemonProcess, hyperd_pid: int) -> None:
        """The daemon exited 0, freed its port, removed its file, took hyperd."""
        assert daemon.wait_exit() == 0
        assert port_is_free(daemon.port)
        assert not daemon.record_path.exists()
        wait_for(lambda: not pid_alive(hyperd_pid), QUICK, "hyperd to exit")


class CommandTests(DaemonTestCase):
    """Every command of SPEC.md against a running daemon."""

    @pytest.fixture(autouse=True)
    def _daemon(self, _world: None) -> None:
        self.daemon = self.start_daemon("--idle-timeout", "0")
        self.facts = self.daemon.wait_ready()

    def test_ping_identifies_the_daemon(self) -> None:
        assert ask(self.daemon.port, "PING") == [f"PONG hyperdb-mcp {__version__}"]

    def test_heartbeat_answers_ok(self) -> None:
        assert ask(self.daemon.port, "HEARTBEAT") == ["OK"]

    def test_status_has_the_spec_fields(self) -> None:
        facts = status(self.daemon.port)
        record = self.daemon.record()
        for field in ("pid", "hyperd_endpoint", "health_port", "started_at", "version",
                      "hyperd_user", "hyperd_password"):
            assert facts[field] == record[field], field
        assert facts["pid"] == self.daemon.pid
        assert facts["health_port"] == self.daemon.port
        assert facts["version"] == __version__
        assert pid_alive(facts["hyperd_pid"])
        assert facts["restarts"] == 0
        assert facts["idle_timeout_s"] == 0
        assert facts["compat"] is False
        assert facts["sessions"] == []
        assert isinstance(facts["uptime_s"], float)

    def test_several_commands_on_one_connection(self) -> None:
        replies = ask(self.daemon.port, "PING", "HEARTBEAT", "NONSENSE", "PING")
        assert replies == [f"PONG hyperdb-mcp {__version__}", "OK", "ERR unknown command",
                           f"PONG hyperdb-mcp {__version__}"]

    def test_report_hyperd_error_keeps_a_healthy_hyperd(self) -> None:
        before = self.facts["hyperd_pid"]
        assert ask(self.daemon.port, "REPORT_HYPERD_ERROR") == ["OK"]
        # The check it triggers must pass; afterwards the same hyperd serves.
        after = status(self.daemon.port)
        assert after["hyperd_pid"] == before
        assert after["restarts"] == 0
        assert hyperd_query(after) == 2

    def test_discovery_credentials_open_a_libpq_connection(self) -> None:
        assert hyperd_query(self.daemon.record(), "SELECT 6 * 7") == 42

    def test_hyperd_refuses_a_wrong_password(self) -> None:
        import psycopg

        record = dict(self.daemon.record(), hyperd_password="not-the-password")
        with pytest.raises(psycopg.OperationalError):
            hyperd_query(record)

    def test_daemon_loads_neither_libpq_nor_openssl(self) -> None:
        # Its memory budget: hyperd is probed through the daemon's own
        # protocol client, and nothing in the daemon needs OpenSSL.
        maps = Path(f"/proc/{self.daemon.pid}/maps").read_text()
        for library in ("libpq", "libcrypto", "libssl", "psycopg"):
            assert library not in maps

    def test_state_files_are_private(self) -> None:
        state = self.daemon.state_dir
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "logs").stat().st_mode) == 0o700
        assert stat.S_IMODE(self.daemon.record_path.stat().st_mode) == 0o600
        assert stat.S_IMODE((state / "logs" / "daemon.log").stat().st_mode) == 0o600

    def test_logs_hold_no_secret(self) -> None:
        password = self.daemon.record()["hyperd_password"]
        logs = self.daemon.state_dir / "logs"
        for path in logs.rglob("*"):
            if path.is_file():
                assert password not in path.read_text(errors="replace"), str(path)

    def test_stop_command_shuts_down_cleanly(self) -> None:
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=QUICK) as s:
            s.sendall(b"STOP\n")
            assert s.makefile("rb").readline() == b"STOPPING\n"
        self.assert_gone(self.daemon, self.facts["hyperd_pid"])


class SessionCommandTests(DaemonTestCase):
    """SESSION, READY and BYE on the wire, against the real daemon and hyperd."""

    @pytest.fixture(autouse=True)
    def _daemon(self, _world: None) -> Iterator[None]:
        self.daemon = self.start_daemon("--idle-timeout", "0")
        self.daemon.wait_ready()
        self.folder = self.daemon.state_dir / "sessions" / f"{os.getpid()}-test"
        self.folder.mkdir()
        self.ephemeral = self.folder / "scratch.hyper"
        self.sockets: list[socket.socket] = []
        yield
        for s in self.sockets:
            s.close()

    def connect(self) -> tuple[socket.socket, Any]:
        s = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=QUICK)
        self.sockets.append(s)
        return s, s.makefile("rwb")

    def send(self, f: Any, line: str) -> str:
        f.write(line.encode() + b"\n")
        f.flush()
        return f.readline().decode().rstrip("\n")

    def session(self, f: Any, **fields: Any) -> str:
        fields = {"pid": os.getpid(), "name": "wire", "ephemeral_db": str(self.ephemeral),
                  **fields}
        return self.send(f, "SESSION " + json.dumps(fields))

    def test_session_gives_credentials_and_is_listed(self) -> None:
        _, f = self.connect()
        reply = self.session(f)
        assert reply.startswith("OK "), reply
        facts = json.loads(reply[3:])
        assert facts["hyperd_endpoint"] == self.daemon.record()["hyperd_endpoint"]
        assert hyperd_query(facts) == 2
        listed = status(self.daemon.port)["sessions"]
        assert ([(s["id"], s["pid"], s["name"], s["ephemeral_db"]) for s in listed]
                == [(facts["id"], os.getpid(), "wire", str(self.ephemeral))])

    def test_ready_gives_the_same_credentials(self) -> None:
        _, f = self.connect()
        reply = self.send(f, "READY")
        assert reply.startswith("OK "), reply
        assert json.loads(reply[3:])["hyperd_password"] == self.daemon.record()["hyperd_password"]

    def test_paths_outside_the_sessions_folder_are_refused(self) -> None:
        _, f = self.connect()
        victim = self.tmp / "precious.hyper"
        for path in (str(victim), "relative.hyper", str(self.folder / "x.txt"),
                     str(self.folder / ".." / ".." / "precious.hyper")):
            reply = self.session(f, ephemeral_db=path)
            assert reply.startswith("ERR ephemeral_db"), reply
        assert self.session(f, pid="me").startswith("ERR ")
        assert status(self.daemon.port)["sessions"] == []

    def test_a_dropped_session_loses_its_database_and_folder(self) -> None:
        import psycopg

        sock, f = self.connect()
        facts = json.loads(self.session(f)[3:])
        host, _, port = facts["hyperd_endpoint"].rpartition(":")
        with psycopg.connect(host=host, port=int(port), user=facts["hyperd_user"],
                             password=facts["hyperd_password"], autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.ephemeral}"')
            conn.execute(f'ATTACH DATABASE "{self.ephemeral}" AS local')
            conn.execute("CREATE TABLE local.public.t (x int)")
            f.close()
            sock.close()  # the "client" dies: its session connection drops first
        wait_for(lambda: not self.folder.exists(), QUICK, "the session folder to go")
        assert status(self.daemon.port)["sessions"] == []

    def test_bye_leaves_cleanup_to_the_client(self) -> None:
        _, f = self.connect()
        self.session(f)
        assert self.send(f, "BYE") == "OK"
        assert status(self.daemon.port)["sessions"] == []
        assert self.folder.exists()

    def test_stop_removes_the_folders_of_attached_sessions(self) -> None:
        _, f = self.connect()
        self.session(f)
        assert ask(self.daemon.port, "STOP") == ["STOPPING"]
        assert self.daemon.wait_exit() == 0
        assert not self.folder.exists()


class BadInputTests(DaemonTestCase):
    """Malformed input gets an error or a clean close; the daemon is unharmed."""

    @pytest.fixture(autouse=True)
    def _daemon(self, _world: None) -> None:
        self.daemon = self.start_daemon("--idle-timeout", "0")
        self.daemon.wait_ready()

    def raw(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=QUICK) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def assert_unharmed(self) -> None:
        assert ask(self.daemon.port, "PING") == [f"PONG hyperdb-mcp {__version__}"]
        assert status(self.daemon.port)["state"] == "ready"

    def test_over_long_line_is_refused_and_closed(self) -> None:
        # Just over the limit, so that the daemon has read all of it when it
        # closes (unread bytes would turn its close into a reset).
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=QUICK) as s:
            s.sendall(b"A" * 5000)
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        assert reply == b"ERR line too long\n"
        self.assert_unharmed()

    def test_invalid_utf8_gets_an_error_and_the_connection_stays(self) -> None:
        assert (self.raw(b"\xff\xfe\n PING \r\n")
                == f"ERR invalid utf-8\nPONG hyperdb-mcp {__version__}\n".encode())
        self.assert_unharmed()

    def test_binary_garbage_is_an_unknown_command(self) -> None:
        assert self.raw(b"\x00\x01\x02\x03\n") == b"ERR unknown command\n"
        self.assert_unharmed()

    def test_connections_that_vanish_do_no_harm(self) -> None:
        for data in (b"", b"PIN", b"STATUS"):
            with socket.create_connection(("127.0.0.1", self.daemon.port)) as s:
                s.sendall(data)
        self.assert_unharmed()


class LifecycleTests(DaemonTestCase):
    def test_second_daemon_on_the_port_is_refused(self) -> None:
        first = self.start_daemon("--idle-timeout", "0")
        first.wait_ready()
        second = self.start_daemon("--idle-timeout", "0", port=first.port)
        code = second.wait_exit()
        out = second.output()
        assert code != 0
        assert f"already running on port {first.port}" in out
        assert "hyperdb-mcp daemon status" in out
        assert "Traceback" not in out
        assert status(first.port)["pid"] == first.pid

    def test_a_daemon_that_loses_its_port_kills_the_host_it_started(self) -> None:
        from conftest import _leaked_hosts
        from hyperdaemon.mcp.launcher import START_VAR

        first = self.start_daemon("--idle-timeout", "0")
        first.wait_ready()
        other = self.tmp / "other-state"
        # As a launcher spawns one: its host starts before the daemon knows
        # whether it can run.
        second = DaemonProcess(other, first.port, "--state-dir", str(other),
                               env={START_VAR: "1"}).start()
        self._daemons.append(second)
        assert second.wait_exit() != 0
        assert "already running" in second.output()
        assert _leaked_hosts(other) == {}
        assert status(first.port)["pid"] == first.pid

    def test_ping_and_status_answer_while_hyperd_starts(self) -> None:
        from hyperdaemon.config import hyperd_executable

        gate = self.tmp / "gate"
        wrapper = self.tmp / "hyperd"
        # The real hyperd, started only once the test opens the gate.
        wrapper.write_text(
            "#!/bin/sh\n"
            f"while [ ! -e '{gate}' ]; do sleep 0.02; done\n"
            f"exec '{hyperd_executable(os.environ)}' \"$@\"\n"
        )
        wrapper.chmod(0o755)
        daemon = self.start_daemon("--idle-timeout", "0", env={"HYPERD_PATH": str(wrapper)})
        wait_for(lambda: port_is_open(daemon.port), QUICK, "the health port")
        assert ask(daemon.port, "PING") == [f"PONG hyperdb-mcp {__version__}"]
        facts = status(daemon.port)
        assert facts["state"] == "starting"
        assert facts["hyperd_endpoint"] is None
        assert not daemon.record_path.exists()
        gate.touch()
        facts = daemon.wait_ready()
        assert hyperd_query(daemon.record()) == 2

    def test_concurrent_starts_leave_exactly_one_daemon(self) -> None:
        port = free_port()
        daemons = [self.start_daemon("--idle-timeout", "0", port=port) for _ in range(5)]
        winner = wait_for(
            lambda: (lambda f: f if f["state"] == "ready" else None)(status(daemon_port(port))),
            READY_TIMEOUT, "one daemon to be ready",
        )
        losers = [d for d in daemons if d.pid != winner["pid"]]
        assert len(losers) == 4
        for loser in losers:
            assert loser.wait_exit() != 0
            assert children_of(loser.pid) == []
        hyperds = [p for d in daemons for p in children_of(d.pid)]
        assert hyperds == [winner["hyperd_pid"]]

    def test_killed_hyperd_is_replaced_and_queryable(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0")
        old = daemon.wait_ready()
        os.kill(old["hyperd_pid"], signal.SIGKILL)
        new = wait_for(
            lambda: (lambda f: f if f["state"] == "ready" and f["hyperd_pid"] != old["hyperd_pid"]
                     else None)(status(daemon.port)),
            QUICK, "a new hyperd",
        )
        assert new["restarts"] == 1
        assert new["hyperd_endpoint"] != old["hyperd_endpoint"]
        wait_for(lambda: daemon.record()["hyperd_endpoint"] == new["hyperd_endpoint"],
                 QUICK, "daemon.json to name the new hyperd")
        assert hyperd_query(daemon.record()) == 2

    def test_restart_limit_shuts_the_daemon_down(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0")
        facts = daemon.wait_ready()
        killed = []
        # Three replacements are allowed within 60 s; the fourth death ends it.
        for n in range(4):
            os.kill(facts["hyperd_pid"], signal.SIGKILL)
            killed.append(facts["hyperd_pid"])
            if n == 3:
                break
            facts = wait_for(
                lambda: (lambda f: f if f["state"] == "ready" and f["hyperd_pid"] not in killed
                         else None)(status(daemon.port)),
                QUICK, f"replacement number {n + 1}",
            )
            assert facts["restarts"] == n + 1
        assert daemon.wait_exit() == 1
        assert "giving up after 3 replacements within 60 s" in daemon.output()
        log = (daemon.state_dir / "logs" / "daemon.log").read_text()
        assert "giving up after 3 replacements within 60 s" in log
        assert port_is_free(daemon.port)
        assert not daemon.record_path.exists()

    def test_killed_daemon_takes_hyperd_with_it(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0")
        facts = daemon.wait_ready()
        daemon.proc.kill()
        daemon.proc.wait(QUICK)
        wait_for(lambda: not pid_alive(facts["hyperd_pid"]), QUICK, "the orphaned hyperd to exit")

    def test_sigterm_shuts_down_cleanly(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0")
        facts = daemon.wait_ready()
        daemon.proc.send_signal(signal.SIGTERM)
        self.assert_gone(daemon, facts["hyperd_pid"])

    def test_sigint_shuts_down_cleanly(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0")
        facts = daemon.wait_ready()
        daemon.proc.send_signal(signal.SIGINT)
        self.assert_gone(daemon, facts["hyperd_pid"])

    def test_idle_daemon_stops_itself(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "1")
        facts = daemon.wait_ready()
        self.assert_gone(daemon, facts["hyperd_pid"])
        assert "idle for 1 s" in daemon.output()

    def test_heartbeats_keep_an_idle_daemon_alive(self) -> None:
        import time

        # A heartbeat every 0.2 s against a 3 s idle timeout: a margin of
        # 15 that a loaded machine cannot eat up.
        daemon = self.start_daemon("--idle-timeout", "3")
        facts = daemon.wait_ready()
        # Heartbeat for three idle periods; the daemon must still be there.
        end = time.monotonic() + 9.0
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=QUICK) as s:
            f = s.makefile("rwb")
            while time.monotonic() < end:
                f.write(b"HEARTBEAT\n")
                f.flush()
                assert f.readline() == b"OK\n"
                time.sleep(0.2)  # pacing, not waiting for an outcome
        assert daemon.proc.poll() is None
        # Without them it stops.
        self.assert_gone(daemon, facts["hyperd_pid"])

    def test_idle_timeout_from_the_environment(self) -> None:
        daemon = self.start_daemon(env={"HYPERDB_DAEMON_IDLE_TIMEOUT": "1"})
        facts = daemon.wait_ready()
        assert facts["idle_timeout_s"] == 1
        self.assert_gone(daemon, facts["hyperd_pid"])

    def test_compat_starts_hyperd_without_a_password(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0", "--compat")
        facts = daemon.wait_ready()
        assert facts["compat"] is True
        assert daemon.record()["hyperd_password"] is None
        assert hyperd_query(daemon.record()) == 2

    def test_stop_leaves_a_successors_discovery_file(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0")
        facts = daemon.wait_ready()
        successor = dict(daemon.record(), pid=1, health_port=1)
        import json

        daemon.record_path.write_text(json.dumps(successor))
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
        assert json.loads(daemon.record_path.read_text()) == successor
        wait_for(lambda: not pid_alive(facts["hyperd_pid"]), QUICK, "hyperd to exit")


class PortLockTests:
    """The health port is the single-instance lock, taken before anything starts."""

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    def test_busy_port_fails_privileged_start_loudly(self) -> None:
        from twisted.internet import reactor

        from hyperdaemon.config import hyperd_executable
        from hyperdaemon.daemon.service import DaemonService, DaemonSettings, StartupError

        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            settings = DaemonSettings(port=port, state_dir=self.tmp, logs_dir=self.tmp / "logs",
                                      idle_timeout=0, hyperd=hyperd_executable(os.environ))
            service = DaemonService(reactor, settings, on_shutdown=lambda: None)
            with pytest.raises(StartupError) as caught:
                service.privilegedStartService()
        assert f"127.0.0.1:{port}" in str(caught.value)
        assert "hyperdb-mcp daemon status" in str(caught.value)
        assert service.supervisor.state == "stopped"
        assert not (self.tmp / "daemon.json").exists()

    def test_hyperd_is_watched_only_while_sessions_are_attached(self) -> None:
        from twisted.internet import reactor

        from hyperdaemon.config import hyperd_executable
        from hyperdaemon.daemon.service import DaemonService, DaemonSettings

        settings = DaemonSettings(port=free_port(), state_dir=self.tmp,
                                  logs_dir=self.tmp / "logs", idle_timeout=0,
                                  hyperd=hyperd_executable(os.environ))
        service = DaemonService(reactor, settings, on_shutdown=lambda: None)
        assert not service.supervisor.watched  # an idle daemon sleeps
        first, _ = service.attach_session({"pid": os.getpid()})
        second, _ = service.attach_session({"pid": os.getpid()})
        assert service.supervisor.watched
        service.end_session(first, clean=True)
        assert service.supervisor.watched
        service.end_session(second, clean=True)
        assert not service.supervisor.watched


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
class OtherUserTests(DaemonTestCase):
    """Another local user can neither use, stop, nor read the daemon."""

    def test_other_user_gets_only_ping_whatever_the_command(self) -> None:
        from hyperdaemon.daemon.protocol import COMMANDS

        # Every command the protocol knows, from its own table (so that a new
        # one is checked here at once), bare and with an argument, and one it
        # does not know.
        assert {"PING", "HEARTBEAT", "STATUS", "STOP", "REPORT_HYPERD_ERROR",
                "SESSION", "READY", "BYE"} <= set(COMMANDS)
        argument = json.dumps({"pid": os.getpid(), "name": "intruder", "ephemeral_db": None,
                               "release": True, "path": str(self.tmp / "x.hyper")})
        lines = [line for command in (*COMMANDS, "X") for line in (command, f"{command} {argument}")]
        daemon = self.start_daemon("--idle-timeout", "0")
        daemon.wait_ready()

        def converse() -> str:
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=QUICK) as s:
                f = s.makefile("rwb")
                replies = []
                for line in lines:
                    f.write(line.encode() + b"\n")
                    f.flush()
                    replies.append(f.readline().decode().strip())
                return "\n".join(replies)

        replies = dict(zip(lines, run_as(NOBODY, converse).splitlines(), strict=True))
        pong = f"PONG hyperdb-mcp {__version__}"
        assert replies == {line: pong if line.partition(" ")[0] == "PING"
                           else "ERR forbidden" for line in lines}
        facts = status(daemon.port)
        assert (facts["state"], facts["sessions"], facts["restarts"]) == ("ready", [], 0)
        assert daemon.proc.poll() is None

    def test_other_user_cannot_read_the_discovery_file(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0")
        daemon.wait_ready()

        def read() -> str:
            try:
                daemon.record_path.read_text()
            except PermissionError:
                return "denied"
            return "read"

        assert run_as(NOBODY, read) == "denied"

    def test_other_user_cannot_log_in_to_hyperd(self) -> None:
        import psycopg

        daemon = self.start_daemon("--idle-timeout", "0")
        facts = daemon.wait_ready()
        host, _, port = facts["hyperd_endpoint"].rpartition(":")
        # Load psycopg's lazily imported parts while files are readable.
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host=host, port=int(port), user="tableau_internal_user",
                            password="wrong", connect_timeout=5)

        def log_in() -> str:
            try:
                psycopg.connect(host=host, port=int(port), user="tableau_internal_user",
                                connect_timeout=5).close()
            except psycopg.OperationalError:
                return "refused"
            return "connected"

        assert run_as(NOBODY, log_in) == "refused"


# -- hostile or broken files (issue 11, item 8) ---------------------------------


def hyperd_execute(record: dict[str, Any], *statements: str) -> None:
    """Run C{statements} (no result rows) on the hyperd that C{record} names."""
    import psycopg

    host, _, port = record["hyperd_endpoint"].rpartition(":")
    with psycopg.connect(
        host=host, port=int(port), user=record["hyperd_user"],
        password=record["hyperd_password"], autocommit=True, connect_timeout=5,
    ) as conn:
        for statement in statements:
            conn.execute(statement)


def daemon_log(state: Path) -> str:
    return (state / "logs" / "daemon.log").read_text(errors="replace")


def one_line(text: str) -> str:
    """C{text} with its white space (line breaks of a help text) collapsed."""
    return " ".join(text.split())


class HostileFileTests(DaemonTestCase):
    """Strange entries in the state directory neither crash the daemon nor lead it astray."""

    @pytest.fixture(autouse=True)
    def _folders(self, _world: None) -> None:
        self.state = self.tmp / "state"
        self.sessions = self.state / "sessions"

    def daemon_and_a_database_outside(self) -> tuple[DaemonProcess, Path, Path]:
        """A ready daemon, a folder outside its state directory, and a database in that folder."""
        daemon = self.start_daemon("--idle-timeout", "0")
        daemon.wait_ready()
        outside = self.tmp / "outside"
        outside.mkdir()
        victim = outside / "scratch.hyper"
        hyperd_execute(daemon.record(), f'CREATE DATABASE "{victim}"')
        return daemon, outside, victim

    def test_stray_session_folder_names_are_ignored_and_logged(self) -> None:
        strays = ["99999999999999999999-x", "\u00b2-x"]
        for name in strays:
            (self.sessions / name).mkdir(parents=True)
        daemon = self.start_daemon("--idle-timeout", "0")
        daemon.wait_ready()
        log = daemon_log(self.state)
        for name in strays:
            assert f"ignored {self.sessions / name}: not a session folder" in log
            assert (self.sessions / name).is_dir()
        assert "Traceback" not in log

    def test_session_refuses_a_folder_that_is_a_symlink(self) -> None:
        daemon, outside, victim = self.daemon_and_a_database_outside()
        link = self.sessions / f"{os.getpid()}-evil"
        link.symlink_to(outside)
        fields = {"pid": os.getpid(), "ephemeral_db": str(link / "scratch.hyper")}
        reply = ask(daemon.port, "SESSION " + json.dumps(fields))[0]
        assert reply.startswith("ERR ephemeral_db must not lead through a symbolic link"), reply
        assert status(daemon.port)["sessions"] == []
        assert victim.is_file()

    def test_a_folder_turned_into_a_symlink_is_never_followed_when_dropped(self) -> None:
        daemon, outside, victim = self.daemon_and_a_database_outside()
        folder = self.sessions / f"{os.getpid()}-swapped"
        folder.mkdir()
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=QUICK) as s:
            f = s.makefile("rwb")
            fields = {"pid": os.getpid(), "ephemeral_db": str(folder / "scratch.hyper")}
            f.write(b"SESSION " + json.dumps(fields).encode() + b"\n")
            f.flush()
            assert f.readline().startswith(b"OK ")
            # Accepted; now the folder becomes a link out of the state directory.
            folder.rmdir()
            folder.symlink_to(outside)
            f.close()
        # The connection dropped without BYE: the daemon cleans up.
        wait_for(lambda: not os.path.lexists(folder), QUICK, "the link to be removed")
        assert victim.is_file()
        assert "not dropping" in daemon_log(self.state)

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a link of another user")
    def test_a_state_dir_symlink_of_another_user_is_refused(self) -> None:
        target = self.tmp / "victim"
        target.mkdir()
        os.chmod(target, 0o755)
        self.state.symlink_to(target)
        os.lchown(self.state, NOBODY, NOBODY)
        daemon = self.start_daemon("--idle-timeout", "0")
        assert daemon.wait_exit() == 1
        out = daemon.output()
        assert "Traceback" not in out
        assert len(out.strip().splitlines()) == 1, out
        assert (f"The state directory {self.state} is a symbolic link owned by another "
                f"user (uid {NOBODY})" in out)
        assert "--state-dir" in out
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
        assert os.listdir(target) == []

    def test_daemon_replaces_a_directory_at_daemon_json(self) -> None:
        (self.state / "daemon.json").mkdir(parents=True)
        daemon = self.start_daemon("--idle-timeout", "0")
        daemon.wait_ready()
        wait_for(lambda: daemon.record_path.is_file(), QUICK, "daemon.json to be a file")
        assert daemon.record()["pid"] == daemon.pid
        assert "which was not a discovery record (not a regular file)" in daemon_log(self.state)


class BrokenDiscoveryFileTests:
    """`daemon status` gets past anything at daemon.json, at once and in one line."""

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        from hyperdaemon.discovery import prepare_state_dir
        from support import free_range

        self.state = tmp_path / "state"
        prepare_state_dir(self.state)
        first, last = free_range(2)
        self.env = dict(os.environ, HYPERDB_STATE_DIR=str(self.state),
                        HYPERDB_DAEMON_PORT_RANGE=f"{first}-{last}")

    def status_command(self) -> Any:
        import subprocess

        return subprocess.run(
            [sys.executable, "-m", "hyperdaemon", "daemon", "status"], env=self.env,
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )

    def assert_no_daemon_and_file_gone(self) -> None:
        result = self.status_command()
        assert result.returncode == 1
        assert result.stderr.strip() == "No daemon is currently running."
        assert not os.path.lexists(self.state / "daemon.json")

    def test_a_fifo_is_removed_and_status_answers(self) -> None:
        os.mkfifo(self.state / "daemon.json", 0o600)
        self.assert_no_daemon_and_file_gone()

    def test_an_empty_directory_is_removed_and_status_answers(self) -> None:
        (self.state / "daemon.json").mkdir()
        self.assert_no_daemon_and_file_gone()

    def test_a_symlink_is_removed_not_its_target(self) -> None:
        elsewhere = self.state.parent / "elsewhere.json"
        elsewhere.write_text("{}")
        (self.state / "daemon.json").symlink_to(elsewhere)
        self.assert_no_daemon_and_file_gone()
        assert elsewhere.read_text() == "{}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small file system")
class ScarceStateDirTests(DaemonTestCase):
    """A state directory that turns read-only or fills up."""

    @pytest.fixture(autouse=True)
    def _mounts(self, tmpfs: Callable[[Path, str], None], _world: None) -> None:
        # The state directory on a file system of its own, its logs on
        # another, so that the daemon can still log what went wrong.
        self.state = self.tmp / "state"
        tmpfs(self.state, "size=1m,mode=0700")
        tmpfs(self.state / "logs", "size=64m,mode=0700")

    def test_shutdown_finishes_when_the_state_dir_turned_read_only(self) -> None:
        import subprocess

        daemon = self.start_daemon("--idle-timeout", "0")
        facts = daemon.wait_ready()
        subprocess.run(["mount", "-o", "remount,ro", str(self.state)], check=True)
        assert ask(daemon.port, "STOP") == ["STOPPING"]
        assert daemon.wait_exit() == 0
        out = daemon.output()
        assert "Traceback" not in out
        assert f"could not remove {self.state / 'daemon.json'}" in out
        assert "[hyperdaemon.daemon#info] stopped\n" in out
        assert port_is_free(daemon.port)
        wait_for(lambda: not pid_alive(facts["hyperd_pid"]), QUICK, "hyperd to exit")

    def test_a_full_state_dir_withdraws_the_stale_discovery_file(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0")
        old = daemon.wait_ready()
        assert daemon.record()["hyperd_endpoint"] == old["hyperd_endpoint"]
        fd = os.open(self.state / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as e:
            assert e.errno == 28  # ENOSPC
        finally:
            os.close(fd)
        os.kill(old["hyperd_pid"], signal.SIGKILL)
        new = wait_for(
            lambda: (lambda f: f if f["state"] == "ready" and f["hyperd_pid"] != old["hyperd_pid"]
                     else None)(status(daemon.port)),
            READY_TIMEOUT, "a new hyperd",
        )
        assert new["hyperd_endpoint"] != old["hyperd_endpoint"]
        wait_for(lambda: not daemon.record_path.exists(), QUICK,
                 "the stale daemon.json to be removed")
        assert f"removed the stale {self.state / 'daemon.json'}" in daemon_log(self.state)


class SharedStateDirTests(DaemonTestCase):
    def test_a_second_daemon_on_the_same_state_dir_is_refused(self) -> None:
        first = self.start_daemon("--idle-timeout", "0")
        first.wait_ready()
        published = first.record()
        second = self.start_daemon("--idle-timeout", "0")  # another pinned port
        assert second.wait_exit(30) == 1
        out = second.output()
        assert "Traceback" not in out
        assert (f"another hyperdb-mcp daemon already uses the state directory "
                f"{self.tmp / 'state'}, on port {first.port}" in out)
        assert f"hyperdb-mcp daemon stop --port {first.port}" in out
        assert "--state-dir" in out
        assert first.record() == published
        assert status(first.port)["pid"] == first.pid
        assert hyperd_query(first.record()) == 2

    def test_a_stale_discovery_file_of_a_dead_daemon_does_not_stop_a_start(self) -> None:
        state = self.tmp / "state"
        first = self.start_daemon("--idle-timeout", "0")
        first.wait_ready()
        stale = first.record()
        first.proc.kill()
        first.wait_exit()
        assert json.loads(first.record_path.read_text()) == stale
        second = self.start_daemon("--idle-timeout", "0")
        second.wait_ready()
        wait_for(lambda: json.loads((state / "daemon.json").read_text())["pid"] == second.pid,
                 QUICK, "daemon.json to name the new daemon")


class CompatWarningTests(DaemonTestCase):
    WARNING = "--compat: hyperd accepts any local user without a password"

    def test_compat_logs_a_warning_at_start(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0", "--compat")
        daemon.wait_ready()
        log = one_line(daemon_log(self.tmp / "state"))
        assert self.WARNING in log
        assert "read and write files as this user through COPY" in log

    def test_no_warning_without_compat(self) -> None:
        daemon = self.start_daemon("--idle-timeout", "0")
        daemon.wait_ready()
        assert self.WARNING not in daemon_log(self.tmp / "state")

    def test_help_says_compat_is_unsafe(self) -> None:
        import subprocess

        from hyperdaemon.daemon.tap import Options

        cli_help = subprocess.run(
            [sys.executable, "-m", "hyperdaemon", "daemon", "--help"],
            capture_output=True, text=True, timeout=QUICK, check=True,
        ).stdout
        for text in (str(Options()), cli_help):
            text = one_line(text)
            assert ("UNSAFE on a machine shared with other users: any local user can "
                    "then log in to hyperd" in text)
            assert "read and write files as you (COPY ... TO/FROM)" in text


# -- drops of dead sessions' databases (issue 11, item 7) -----------------------


@attrs.define
class InProcessDaemon:
    """
    The daemon's service in this process, with the real hyperd, and libpq
    connections that hold sessions' databases attached.
    """

    tmp: Path
    service: Any = None
    connections: list[Any] = attrs.Factory(list)

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def start(self, **tunables: float) -> Any:
        from twisted.internet import reactor

        from hyperdaemon.config import hyperd_executable
        from hyperdaemon.daemon.service import DaemonService, DaemonSettings
        from hyperdaemon.discovery import prepare_state_dir

        logs = prepare_state_dir(self.state)
        settings = DaemonSettings(port=free_port(), state_dir=self.state, logs_dir=logs,
                                  idle_timeout=0, hyperd=hyperd_executable(os.environ))
        self.service = DaemonService(reactor, settings, on_shutdown=lambda: None)
        for name, value in tunables.items():
            setattr(self.service, name, value)
        self.service.privilegedStartService()
        self.service.startService()
        return self.service

    async def session_holding_its_database(self, name: str) -> tuple[str, Path, Any]:
        """A session whose database a libpq connection has attached: id, folder, connection."""
        import psycopg
        from twisted.internet.threads import deferToThread

        folder = self.service.settings.sessions_dir / f"{os.getpid()}-{name}"
        folder.mkdir(mode=0o700)
        database = folder / "scratch.hyper"
        session_id, ready = self.service.attach_session({"pid": os.getpid(),
                                                         "ephemeral_db": str(database)})
        facts = await ready

        def attach() -> Any:
            host, _, port = facts["hyperd_endpoint"].rpartition(":")
            conn = psycopg.connect(host=host, port=int(port), user=facts["hyperd_user"],
                                   password=facts["hyperd_password"], autocommit=True,
                                   connect_timeout=5)
            conn.execute(f'CREATE DATABASE "{database}"')
            conn.execute(f'ATTACH DATABASE "{database}" AS scratch')
            return conn

        conn = await deferToThread(attach)
        self.connections.append(conn)
        return session_id, folder, conn

    async def end(self) -> None:
        """Close the connections, then shut the service down and wait until it has stopped."""
        for conn in reversed(self.connections):
            conn.close()
        if self.service is not None:
            self.service.shutdown("the test is over")
            await self.service.stopService()


@pytest_twisted.async_yield_fixture
async def in_process(tmp_path: Path) -> AsyncIterator[InProcessDaemon]:
    daemon = InProcessDaemon(tmp_path)
    yield daemon
    await daemon.end()


@pytest.mark.deadline(180)
class DropRetryTests:
    """
    The daemon in this process, with the real hyperd: a database that a
    libpq connection still has attached is dropped once it is let go,
    however long that takes.
    """

    @pytest_twisted.ensureDeferred
    async def test_a_database_in_use_past_the_old_limit_is_dropped_once_let_go(
            self, in_process: InProcessDaemon) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater
        from twisted.internet.threads import deferToThread

        # The old limit was 10 s; here the daemon's patience is 0.5 s.
        service = in_process.start(drop_patience=0.5, drop_retry_max=0.5)
        session_id, folder, conn = await in_process.session_holding_its_database("held")
        service.end_session(session_id, clean=False)  # its connection dropped
        # The database stays attached four times the daemon's patience.
        await deferLater(reactor, 2.0, lambda: None)
        assert (folder / "scratch.hyper").exists()
        await deferToThread(conn.close)
        await until(lambda: not folder.exists(), QUICK, "the folder to be removed")
        # Logged once the removal (in a thread) has reported back.
        removed = f"removed the ephemeral database of session {session_id}"
        await until(lambda: removed in daemon_log(in_process.state), QUICK, "the removal's log")
        log = daemon_log(in_process.state)
        assert f"{folder / 'scratch.hyper'} is still in use after 0.5 s; trying again" in log

    @pytest_twisted.ensureDeferred
    async def test_a_waiting_drop_is_tried_again_when_a_session_ends(
            self, in_process: InProcessDaemon) -> None:
        from twisted.internet.threads import deferToThread

        # Retries a minute apart: only a session ending can make it prompt.
        service = in_process.start(drop_patience=0.0, drop_retry_first=60.0,
                                   drop_retry_max=60.0)
        session_id, folder, conn = await in_process.session_holding_its_database("held")
        service.end_session(session_id, clean=False)
        await until(lambda: "is still in use" in daemon_log(in_process.state), QUICK,
                    "a drop refused while the database is attached")
        # Let go of it for sure (a closing connection may keep it a moment).
        await deferToThread(conn.execute, "DETACH DATABASE scratch")
        other, ready = service.attach_session({"pid": os.getpid()})
        await ready
        service.end_session(other, clean=True)
        await until(lambda: not folder.exists(), QUICK, "the folder to be removed")

    @pytest_twisted.ensureDeferred
    async def test_a_client_that_comes_back_keeps_its_database(
            self, in_process: InProcessDaemon) -> None:
        from twisted.internet.threads import deferToThread

        service = in_process.start()
        session_id, folder, conn = await in_process.session_holding_its_database("back")
        service.end_session(session_id, clean=False)
        # The client reconnects and registers the same database again.
        again, ready = service.attach_session({"pid": os.getpid(),
                                               "ephemeral_db": str(folder / "scratch.hyper")})
        await ready
        await deferToThread(conn.close)
        await until(lambda: not service._cleanups, QUICK, "the daemon's drops to settle")
        assert (folder / "scratch.hyper").exists()
        assert [s["id"] for s in service.status()["sessions"]] == [again]
