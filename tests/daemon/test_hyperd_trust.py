"""
A session sends its statements only to a hyperd of its own user, and proves
hyperd's password without ever sending it: checked against a fake libpq
server run as another user (root only) on a real socket.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading

import psycopg
import pytest

from hyperdaemon import peeruid
from hyperdaemon.client.session import Credentials, SessionError, connect_hyperd
from support import QUICK, fork_reporting, free_port, pid_alive, wait_for

NOBODY = 65534
SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class FakeHyperd:
    """
    A libpq server look-alike in a forked child (as C{uid}): it answers the
    startup with C{auth} (0: no password needed; 3: send it in clear) and
    reports every message it receives afterwards (type and body).
    """

    def __init__(self, auth: int, uid: int | None = None) -> None:
        self.auth, self.uid, self.port, self.pid = auth, uid, free_port(), 0
        self.received: list[bytes] = []

    def _serve(self, report: int) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        os.write(report, b"LISTENING\n")
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    self._converse(conn, report)
                except (OSError, struct.error):
                    pass

    def _converse(self, conn: socket.socket, report: int) -> None:
        def exactly(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    raise OSError("closed")
                data += chunk
            return data

        while True:  # SSL and GSS requests first, then the startup message
            length, code = struct.unpack("!ii", exactly(8))
            exactly(length - 8)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                conn.sendall(b"N")
                continue
            break
        conn.sendall(b"R" + struct.pack("!ii", 8, self.auth))
        if self.auth == 0:
            conn.sendall(b"Z" + struct.pack("!i", 5) + b"I")
        while True:
            kind = exactly(1)
            (length,) = struct.unpack("!i", exactly(4))
            body = exactly(length - 4)
            os.write(report, (kind + body).hex().encode() + b"\n")

    def start(self) -> "FakeHyperd":
        pid, read_end = fork_reporting(self._serve, self.uid)
        self.pid = pid
        events: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(read_end, events), daemon=True)
        self._reader.start()
        wait_for(lambda: events or not pid_alive(pid), QUICK, "the fake hyperd to listen")
        return self

    def _read(self, fd: int, events: list[str]) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for raw in pipe:
                line = raw.decode().strip()
                events.append(line)
                if line != "LISTENING":
                    self.received.append(bytes.fromhex(line))

    def stop(self) -> list[bytes]:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.pid = 0
        self._reader.join(QUICK)
        return self.received


@pytest.fixture
def fake():
    started = []

    def make(auth: int, uid: int | None = None) -> FakeHyperd:
        started.append(FakeHyperd(auth, uid).start())
        return started[-1]

    yield make
    for f in started:
        if f.pid:
            f.stop()


@pytest.mark.skipif(os.geteuid() != 0 or not peeruid.SUPPORTED,
                    reason="needs root on Linux to run a second user's fake hyperd")
def test_a_hyperd_endpoint_held_by_another_user_gets_no_statement(fake) -> None:
    other = fake(auth=0, uid=NOBODY)
    with pytest.raises(SessionError, match=r"held by .*uid 65534.*nothing was sent"):
        connect_hyperd(Credentials("127.0.0.1", other.port, "tableau_internal_user", None))
    received = other.stop()
    # Only the goodbye of the closed connection, never a query.
    assert [m[:1] for m in received if m[:1] != b"X"] == []


def test_the_password_is_never_sent_in_clear(fake) -> None:
    server = fake(auth=3)
    secret = "never-in-clear-5a1f"
    with pytest.raises(psycopg.OperationalError):
        connect_hyperd(Credentials("127.0.0.1", server.port, "tableau_internal_user", secret))
    received = server.stop()
    assert not any(secret.encode() in message for message in received)
