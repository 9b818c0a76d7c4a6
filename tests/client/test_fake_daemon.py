"""
Another local user's fake daemon in the port range: clients, C{daemon
status|stop} and a starting daemon must send it nothing but C{PING}, and end
on a daemon of their own user (SPEC.md, Security).

The fake runs in a forked child that has dropped to uid 65534 (so the tests
need root); it answers like a daemon of ours (a newer one, with the session
commands) and reports every line it receives to the test.  Real daemons,
real C{hyperd}, real sockets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from hyperdaemon import __version__, peeruid

from hyperdaemon.client import healthclient
from hyperdaemon.daemon.service import SESSION_PROTOCOL
from hyperdaemon.client.finder import DaemonAddress, DaemonUnavailable, Finder
from hyperdaemon.client.healthclient import OtherUsersPort, PortState
from hyperdaemon.client.session import Session
from support import (
    QUICK,
    READY_TIMEOUT,
    Clients,
    DaemonProcess,
    fork_reporting,
    free_port,
    pid_alive,
    status,
    wait_for,
)

NOBODY = 65534
FAKE_VERSION = "99.0.0"
NO_DAEMON = "No daemon is currently running."


class OtherUsersDaemon:
    """
    A daemon look-alike run as another user on C{port}: it answers C{PING}
    as C{hyperdb-mcp 99.0.0}, a plausible C{STATUS} (with the session
    commands), C{OK} with made-up credentials to C{SESSION} and C{READY}, and
    reports each connection and line to this process through a pipe.
    """

    def __init__(self, port: int, uid: int = NOBODY) -> None:
        self.port = port
        self.uid = uid
        self.pid = 0
        self._events: list[str] = []
        self._reader: threading.Thread | None = None

    # -- the child ------------------------------------------------------------

    def _reply(self, line: str) -> str:
        command = line.strip().partition(" ")[0]
        credentials = {"hyperd_endpoint": "127.0.0.1:1", "hyperd_user": "tableau_internal_user",
                       "hyperd_password": "attacker"}
        if command == "PING":
            return f"PONG hyperdb-mcp {FAKE_VERSION}"
        if command == "STATUS":
            return json.dumps({
                "pid": os.getpid(), "health_port": self.port, "version": FAKE_VERSION,
                "started_at": "2026-01-01T00:00:00+00:00", "state": "ready", "hyperd_pid": 1,
                "restarts": 0, "uptime_s": 1.0, "idle_timeout_s": 0, "compat": False,
                "sessions": [], "session_protocol": SESSION_PROTOCOL, **credentials,
            })
        if command == "SESSION":
            return "OK " + json.dumps({"id": "s1", **credentials})
        if command == "READY":
            return "OK " + json.dumps(credentials)
        if command == "STOP":
            return "STOPPING"
        return "OK"

    def _serve(self, report: int) -> None:
        def say(event: str) -> None:
            os.write(report, event.encode("utf-8", "replace") + b"\n")

        def converse(conn: socket.socket) -> None:
            with conn, conn.makefile("rwb") as f:
                for raw in f:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    say(f"LINE {line}")  # before the reply: the test sees it first
                    f.write(self._reply(line).encode("utf-8") + b"\n")
                    f.flush()

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        say("LISTENING")
        while True:
            conn, _ = listener.accept()
            say("CONNECTION")
            threading.Thread(target=converse, args=(conn,), daemon=True).start()

    # -- the test's side --------------------------------------------------------

    def start(self) -> "OtherUsersDaemon":
        pid, read_end = fork_reporting(self._serve, self.uid)
        self.pid = pid
        self._reader = threading.Thread(target=self._read, args=(read_end,), daemon=True)
        self._reader.start()
        wait_for(lambda: "LISTENING" in self._events or not pid_alive(pid), QUICK,
                 "the fake daemon to listen")
        assert "LISTENING" in self._events, "the fake daemon could not listen"
        return self

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for raw in pipe:
                self._events.append(raw.decode("utf-8").rstrip("\n"))

    def stop(self) -> None:
        """Kill it; afterwards L{lines} holds everything it ever received."""
        if not self.pid:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        self.pid = 0
        assert self._reader is not None
        self._reader.join(QUICK)

    def lines(self) -> list[str]:
        return [e[len("LINE "):] for e in self._events if e.startswith("LINE ")]

    def connections(self) -> int:
        return self._events.count("CONNECTION")


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not peeruid.SUPPORTED,
                       reason="needs root on Linux to run a second user's fake daemon"),
    # Clients spawn daemons and hyperds: more time than an asynchronous test's default.
    pytest.mark.deadline(180),
]


#: Starts a fake daemon of another user (on the given port, or the range's first).
Fakes = Callable[..., OtherUsersDaemon]


@pytest.fixture
def fakes(clients: Clients) -> Iterator[Fakes]:
    """
    Starts another user's fake daemon, on the first port of the range
    unless told otherwise; each is stopped at the end, before the clients'
    world ends (whose clean-up must not find, and STOP, a fake).
    """
    started: list[OtherUsersDaemon] = []

    def fake(port: int | None = None) -> OtherUsersDaemon:
        started.append(OtherUsersDaemon(clients.ports[0] if port is None else port).start())
        return started[-1]

    yield fake
    for fake in reversed(started):
        fake.stop()


def assert_only_pinged(fake: OtherUsersDaemon) -> None:
    fake.stop()
    assert [line for line in fake.lines() if line != "PING"] == []


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hyperdaemon", *args], env=env,
        capture_output=True, text=True, timeout=READY_TIMEOUT, stdin=subprocess.DEVNULL,
    )


def assert_ours(port: int) -> dict[str, Any]:
    """The daemon on C{port} is a real one of this user; its STATUS."""
    facts = status(port)
    assert facts["version"] == __version__
    assert os.stat(f"/proc/{facts['pid']}").st_uid == os.geteuid()
    return facts


class ClientTests:
    @pytest_twisted.ensureDeferred
    async def test_session_open_skips_another_users_daemon_and_starts_its_own(
            self, clients: Clients, fakes: Fakes) -> None:
        fake = fakes()
        session = await clients.open()
        assert session._source.address.port == clients.ports[1]
        facts = assert_ours(clients.ports[1])
        assert [s["pid"] for s in facts["sessions"]] == [os.getpid()]
        assert (await session.query("SELECT 1")).rows == [(1,)]
        assert_only_pinged(fake)

    @pytest_twisted.ensureDeferred
    async def test_a_discovery_file_naming_another_users_daemon_is_not_trusted(
            self, clients: Clients, fakes: Fakes) -> None:
        fake = fakes(free_port())  # outside the range: only daemon.json names it
        clients.state.mkdir(mode=0o700)
        record = clients.state / "daemon.json"
        record.write_text(json.dumps({
            "pid": fake.pid, "hyperd_endpoint": "127.0.0.1:1", "health_port": fake.port,
            "started_at": "2026-01-01T00:00:00+00:00", "version": FAKE_VERSION,
            "hyperd_user": "tableau_internal_user", "hyperd_password": "attacker",
        }))
        record.chmod(0o600)
        session = await clients.open()
        assert session._source.address.port == clients.ports[0]
        assert_ours(clients.ports[0])
        assert json.loads(record.read_text())["health_port"] == clients.ports[0]
        assert_only_pinged(fake)

    @pytest_twisted.ensureDeferred
    async def test_a_session_connection_to_a_port_that_changed_hands_sends_only_ping(
            self, clients: Clients, fakes: Fakes) -> None:
        # The finder checked the port, then it changed hands before the
        # session's own connection: that connection is checked again.
        fake = fakes()
        real = Finder.from_environment(environ=clients.env)
        stale = DaemonAddress(fake.port, FAKE_VERSION, SESSION_PROTOCOL, {})
        answers = iter([stale])

        class StaleFirst:
            state_dir = real.state_dir

            def ensure(self) -> DaemonAddress:
                return next(answers, None) or real.ensure()

        session = await clients.open(finder=StaleFirst())
        assert session._source.address.port == clients.ports[1]
        assert (await session.query("SELECT 1")).rows == [(1,)]
        assert_only_pinged(fake)

    @pytest_twisted.ensureDeferred
    async def test_session_open_on_another_users_pinned_port_fails_naming_them(
            self, clients: Clients, fakes: Fakes) -> None:
        fake = fakes()
        with pytest.raises(DaemonUnavailable) as caught:
            await Session.open(reactor, environ=clients.env, port=fake.port)
        message = str(caught.value)
        assert f"Port {fake.port} is held by another user, nobody (uid {NOBODY})" in message
        assert "HYPERDB_DAEMON_PORT" in message
        assert not any(_listening(port) for port in clients.ports[1:])
        assert_only_pinged(fake)

    @pytest_twisted.ensureDeferred
    async def test_health_requests_check_their_own_connection(
            self, fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
        # Even where the listener's owner is not known (or it changed hands
        # since), STATUS and STOP go only to a connection this user accepted.
        fake = fakes()
        monkeypatch.setattr(peeruid, "listener_uid", lambda port, host="127.0.0.1": None)
        probe = await deferToThread(healthclient.probe_port, fake.port)
        assert ((probe.state, probe.version, probe.owner)
                == (PortState.OTHER_USER, FAKE_VERSION, NOBODY))
        with pytest.raises(OtherUsersPort):
            await deferToThread(healthclient.status, fake.port)
        with pytest.raises(OtherUsersPort):
            await deferToThread(healthclient.connect_own, fake.port)
        fake.stop()
        assert fake.lines() == ["PING"] * 3


class CommandLineTests:
    @pytest_twisted.ensureDeferred
    async def test_daemon_status_does_not_report_another_users_daemon(
            self, clients: Clients, fakes: Fakes) -> None:
        fake = fakes()
        result = await deferToThread(cli, clients.env, "daemon", "status", "--json")
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            f"hyperdb-mcp: skipped port {fake.port}: it is held by another user, "
            f"nobody (uid {NOBODY}).",
            NO_DAEMON,
        ]
        assert_only_pinged(fake)

    @pytest_twisted.ensureDeferred
    async def test_daemon_status_finds_its_own_daemon_past_another_users(
            self, clients: Clients, fakes: Fakes, daemons: list[DaemonProcess]) -> None:
        fake = fakes()
        daemon = DaemonProcess(clients.state, clients.ports[2], "--idle-timeout", "0",
                               env=clients.env).start()
        daemons.append(daemon)
        await deferToThread(daemon.wait_ready)
        result = await deferToThread(cli, clients.env, "daemon", "status", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == daemon.pid
        assert_only_pinged(fake)

    @pytest_twisted.ensureDeferred
    async def test_daemon_stop_does_not_stop_another_users_daemon(
            self, clients: Clients, fakes: Fakes) -> None:
        fake = fakes()
        result = await deferToThread(cli, clients.env, "daemon", "stop")
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1] == NO_DAEMON
        assert_only_pinged(fake)

    @pytest_twisted.ensureDeferred
    async def test_status_and_stop_on_another_users_pinned_port_name_them(
            self, clients: Clients, fakes: Fakes) -> None:
        fake = fakes()
        for action in ("status", "stop"):
            result = await deferToThread(cli, clients.env, "daemon", action,
                                         "--port", str(fake.port))
            assert result.returncode == 1
            assert result.stderr.splitlines() == [
                f"hyperdb-mcp: port {fake.port} is held by another user, nobody "
                f"(uid {NOBODY}), not by your daemon: pin a port of your own with --port or "
                f"HYPERDB_DAEMON_PORT."
            ], action
        assert_only_pinged(fake)


class StartingDaemonTests:
    @pytest_twisted.ensureDeferred
    async def test_a_daemon_starts_beside_another_users_daemon(
            self, clients: Clients, fakes: Fakes, daemons: list[DaemonProcess]) -> None:
        fake = fakes()
        daemon = DaemonProcess(clients.state, clients.ports[1], "--idle-timeout", "0",
                               env=clients.env)
        daemon.args.remove("--port")
        daemon.args.remove(str(clients.ports[1]))  # no pinned port: it scans the range
        daemon.start()
        daemons.append(daemon)
        facts = await deferToThread(daemon.wait_ready)
        assert (facts["pid"], facts["health_port"]) == (daemon.pid, clients.ports[1])
        assert_only_pinged(fake)
        daemon.proc.send_signal(signal.SIGTERM)
        assert await deferToThread(daemon.wait_exit) == 0
        assert (f"port {fake.port} is held by another user, nobody (uid {NOBODY}): "
                f"skipped" in daemon.output())

    @pytest_twisted.ensureDeferred
    async def test_a_daemon_on_another_users_pinned_port_refuses_naming_them(
            self, clients: Clients, fakes: Fakes) -> None:
        fake = fakes()
        result = await deferToThread(cli, clients.env, "daemon", "--port", str(fake.port))
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"hyperdb-mcp daemon: Port {fake.port} is held by another user, nobody "
            f"(uid {NOBODY}): pin a port of your own with --port or HYPERDB_DAEMON_PORT."
        ]
        assert_only_pinged(fake)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True

