"""
The blocking health client against small real servers on loopback: what a
port is (free, foreign, another user's, ours) and PONG parsing.  Another
user's daemon run in a process of its own is in test_fake_daemon.py.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hyperdaemon import peeruid

from hyperdaemon.client import healthclient
from hyperdaemon.client.healthclient import PortState, parse_pong, probe_port
from support import free_port

#: A uid that is not ours (only root can make sockets owned by it).
NOBODY = 65534


class ParsePongTests:
    def test_identified_pong(self) -> None:
        assert parse_pong("PONG hyperdb-mcp 0.7.3") == "0.7.3"

    def test_anything_else_is_not_a_daemon(self) -> None:
        for line in ("PONG", "PONG hyperdb-mcp", "PONG other 1.0", "pong hyperdb-mcp 1",
                     "PONG hyperdb-mcp 1 extra", "PONG  hyperdb-mcp 1", "+PONG", ""):
            assert parse_pong(line) is None, line


class FakePeer:
    """
    A one-connection-at-a-time server answering each line with
    C{reply(line)}; its listening socket is owned by C{owner} (default: us),
    and it counts the connections it accepts.
    """

    def __init__(self, reply: Callable[[bytes], bytes | None], owner: int | None = None) -> None:
        if owner is None:
            self.sock = socket.socket()
        else:
            # The kernel records the creating euid as the socket's owner.
            saved = os.geteuid()
            os.seteuid(owner)
            try:
                self.sock = socket.socket()
            finally:
                os.seteuid(saved)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self._reply = reply
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                f = conn.makefile("rwb")
                for line in f:
                    answer = self._reply(line.strip())
                    if answer is None:
                        break
                    f.write(answer)
                    f.flush()

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone
        # would not, and the thread could then accept on a reused fd.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        assert not self._thread.is_alive(), "the fake peer's thread did not stop"
        self.sock.close()


class ProbePortTests:
    @pytest.fixture(autouse=True)
    def _peers(self) -> Iterator[None]:
        self.peers: list[FakePeer] = []
        yield
        for peer in reversed(self.peers):
            peer.close()

    def peer(self, reply: Callable[[bytes], bytes | None], owner: int | None = None) -> FakePeer:
        """A fake peer, closed after the test."""
        self.peers.append(FakePeer(reply, owner))
        return self.peers[-1]

    def test_nothing_listening_is_free(self) -> None:
        assert probe_port(free_port()).state == PortState.FREE

    def test_a_daemon_of_ours(self) -> None:
        peer = self.peer(lambda line: b"PONG hyperdb-mcp 2.0\n" if line == b"PING" else b"{}\n")
        found = probe_port(peer.port)
        assert (found.state, found.version) == (PortState.DAEMON, "2.0")

    def test_a_daemon_that_refuses_status_is_still_ours_if_we_own_it(self) -> None:
        # Who owns the socket decides, not what the port answers.
        peer = self.peer(
            lambda line: b"PONG hyperdb-mcp 2.0\n" if line == b"PING" else b"ERR forbidden\n"
        )
        found = probe_port(peer.port)
        assert (found.state, found.owner) == (PortState.DAEMON, os.geteuid())

    def test_another_users_port_is_not_even_connected_to(self) -> None:
        require_root()
        peer = self.peer(lambda line: b"PONG hyperdb-mcp 2.0\n", owner=NOBODY)
        found = probe_port(peer.port)
        assert (found.state, found.owner) == (PortState.OTHER_USER, NOBODY)
        assert peer.connections == 0
        assert "nobody (uid 65534)" in found.held_by()

    def test_a_daemon_shaped_answer_whose_owner_is_unknown_is_foreign(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        peer = self.peer(lambda line: b"PONG hyperdb-mcp 2.0\n")

        def unknown(sock: socket.socket) -> int:
            raise peeruid.UnknownPeer("closed")

        monkeypatch.setattr(peeruid, "server_uid", unknown)
        assert probe_port(peer.port).state == PortState.FOREIGN

    def test_a_program_that_answers_something_else(self) -> None:
        peer = self.peer(lambda line: b"+OK redis\n")
        assert probe_port(peer.port).state == PortState.FOREIGN

    def test_a_program_that_closes_at_once(self) -> None:
        peer = self.peer(lambda line: None)
        assert probe_port(peer.port).state == PortState.FOREIGN

    def test_a_program_that_never_answers_is_foreign_within_the_timeout(self) -> None:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            started = time.monotonic()
            found = probe_port(silent.getsockname()[1], timeout=0.3)
            assert found.state == PortState.FOREIGN
            assert time.monotonic() - started < 5


def require_root() -> None:
    if os.geteuid() != 0 or not peeruid.SUPPORTED:
        pytest.skip("only root on Linux can make a socket owned by another uid")


class LocateTests:
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> Iterator[None]:
        self.state = tmp_path / "state"
        self.peers: list[FakePeer] = []
        yield
        for peer in reversed(self.peers):
            peer.close()

    def another_users_daemon(self) -> FakePeer:
        """A fake daemon of another user, closed after the test."""
        require_root()
        self.peers.append(FakePeer(lambda line: b"PONG hyperdb-mcp 2.0\n", owner=NOBODY))
        return self.peers[-1]

    def test_a_pinned_port_may_be_another_users(self) -> None:
        from hyperdaemon.config import PortChoice

        peer = self.another_users_daemon()
        found = healthclient.locate(self.state, PortChoice(peer.port, 1, 1))
        assert (found.state, found.owner) == (PortState.OTHER_USER, NOBODY)

    def test_a_scan_skips_another_users_port_and_reports_it(self) -> None:
        from hyperdaemon.config import PortChoice

        peer = self.another_users_daemon()
        skipped: list[healthclient.PortProbe] = []
        assert healthclient.locate(
            self.state, PortChoice(None, peer.port, peer.port), on_skip=skipped.append,
        ) is None
        assert [(p.port, p.owner) for p in skipped] == [(peer.port, NOBODY)]
        assert peer.connections == 0

    def test_a_skipped_port_is_logged_by_default(self) -> None:
        from hyperdaemon.config import PortChoice
        from twisted.logger import formatEvent, globalLogPublisher

        peer = self.another_users_daemon()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            healthclient.locate(self.state, PortChoice(None, peer.port, peer.port))
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert (f"port {peer.port} is held by another user, nobody (uid {NOBODY}): skipped"
                in [formatEvent(e) for e in events])


class WaitTests:
    def test_wait_pid_gone_for_an_exited_process(self) -> None:
        import subprocess
        import sys

        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        assert healthclient.wait_pid_gone(proc.pid, 5)

    def test_wait_pid_gone_times_out_for_a_live_process(self) -> None:
        import os

        assert not healthclient.wait_pid_gone(os.getpid(), 0.05)

    def test_wait_port_free(self) -> None:
        assert healthclient.wait_port_free(free_port(), 1)
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            assert not healthclient.wait_port_free(busy.getsockname()[1], 0.1)
