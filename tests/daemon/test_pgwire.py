"""
The daemon's own PostgreSQL-protocol client: SCRAM against the RFC's test
vectors, the protocol against scripted server bytes, and the real hyperd.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from hyperdaemon.daemon import pgwire
from hyperdaemon.config import hyperd_executable
from hyperdaemon.daemon.supervisor import HyperdInstance, HyperdSupervisor
from support import assert_no_result, failure_result_of, success_result_of, until

# RFC 7677, section 3.
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def message(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def auth(code: int, data: bytes = b"") -> bytes:
    return message(b"R", struct.pack("!I", code) + data)


READY = message(b"Z", b"I")


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!I", len(value)) + value
    return message(b"D", body)


def error(text: str, code: str) -> bytes:
    return message(b"E", b"SERROR\x00C" + code.encode() + b"\x00M" + text.encode() + b"\x00\x00")


def sent(transport: StringTransport, startup: bool = True) -> list[tuple[bytes, bytes]]:
    """The client's messages (after the startup message), as (kind, payload)."""
    data, out = transport.value(), []
    if startup:
        (length,) = struct.unpack_from("!I", data)
        data = data[length:]
    while data:
        kind, size = struct.unpack_from("!cI", data)
        out.append((kind, data[5:size + 1]))
        data = data[size + 1:]
    return out


class Pbkdf2Tests:
    def test_known_answer(self) -> None:
        # The published PBKDF2-HMAC-SHA256 vector for c=4096, dkLen=32.
        assert (pgwire.pbkdf2_sha256(b"password", b"salt", 4096).hex()
                == "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a")

    def test_each_key_is_derived_once(self) -> None:
        # Every connection to one hyperd gets the same salt: only the first
        # one may spend the reactor's time on the 4096 iterations.
        password, salt = os.urandom(20), os.urandom(16)
        before = pgwire.pbkdf2_sha256.cache_info()
        first = pgwire.pbkdf2_sha256(password, salt, 4096)
        assert pgwire.pbkdf2_sha256(password, salt, 4096) == first
        after = pgwire.pbkdf2_sha256.cache_info()
        assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)

    def test_matches_hashlib_for_long_passwords(self) -> None:
        if not hasattr(hashlib, "pbkdf2_hmac"):
            pytest.skip("this Python has no OpenSSL pbkdf2_hmac to compare with")
        password, salt = os.urandom(100), os.urandom(16)
        assert (pgwire.pbkdf2_sha256(password, salt, 7)
                == hashlib.pbkdf2_hmac("sha256", password, salt, 7))


class ScramTests:
    def test_rfc_7677_exchange(self) -> None:
        client = pgwire.ScramClient("pencil", nonce=RFC_NONCE, user="user")
        assert client.first_message() == b"n,,n=user,r=" + RFC_NONCE.encode()
        assert client.final_message(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
        client.verify(RFC_SERVER_FINAL)
        assert client.verified

    def test_user_name_is_left_to_the_startup_message(self) -> None:
        assert pgwire.ScramClient("pw", nonce="abc").first_message() == b"n,,n=,r=abc"

    def test_server_signature_that_does_not_match_is_refused(self) -> None:
        client = pgwire.ScramClient("pencil", nonce=RFC_NONCE, user="user")
        client.final_message(RFC_SERVER_FIRST)
        forged = b"v=" + base64.b64encode(b"\x00" * 32)
        with pytest.raises(pgwire.PGError):
            client.verify(forged)

    def test_challenge_that_does_not_extend_our_nonce_is_refused(self) -> None:
        client = pgwire.ScramClient("pencil", nonce="other")
        with pytest.raises(pgwire.PGError):
            client.final_message(RFC_SERVER_FIRST)

    def test_malformed_challenges_are_refused(self) -> None:
        for challenge in (b"", b"r=x", b"r=abc,s=***,i=1", b"r=abc,s=AAAA,i=zero",
                          b"r=abc,s=AAAA,i=0", b"\xff"):
            client = pgwire.ScramClient("pw", nonce="abc")
            with pytest.raises(pgwire.PGError):
                client.final_message(challenge)


class ProtocolTests:
    def connect(self, password: str | None = "pw") -> tuple[pgwire.PGClientProtocol,
                                                            StringTransport]:
        protocol = pgwire.PGClientProtocol("someone", password)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def ready(self) -> tuple[pgwire.PGClientProtocol, StringTransport]:
        protocol, transport = self.connect()
        protocol.dataReceived(auth(pgwire.AUTH_OK) + message(b"S", b"a\x00b\x00") + READY)
        success_result_of(protocol.ready)
        transport.clear()
        return protocol, transport

    def test_startup_message_names_the_user(self) -> None:
        _, transport = self.connect()
        body = struct.pack("!I", pgwire.PROTOCOL_VERSION) + b"user\x00someone\x00\x00"
        assert transport.value() == struct.pack("!I", len(body) + 4) + body

    def test_ready_after_authentication_and_ready_for_query(self) -> None:
        protocol, _ = self.connect()
        protocol.dataReceived(auth(pgwire.AUTH_OK))
        assert_no_result(protocol.ready)
        protocol.dataReceived(READY)
        assert success_result_of(protocol.ready) is protocol

    def test_messages_split_anywhere_are_reassembled(self) -> None:
        protocol, _ = self.connect()
        for byte in auth(pgwire.AUTH_OK) + READY:
            protocol.dataReceived(bytes([byte]))
        success_result_of(protocol.ready)

    def test_cleartext_password(self) -> None:
        protocol, transport = self.connect()
        transport.clear()
        protocol.dataReceived(auth(pgwire.AUTH_CLEARTEXT))
        assert transport.value() == message(b"p", b"pw\x00")

    def test_scram_exchange_sends_mechanism_then_proof(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(auth(pgwire.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
        [(kind, payload)] = sent(transport)
        assert kind == b"p"
        assert payload.startswith(b"SCRAM-SHA-256\x00")
        first = payload[len(b"SCRAM-SHA-256\x00") + 4:]
        assert first.startswith(b"n,,n=,r=")
        nonce = first[len(b"n,,n=,r="):]
        protocol.dataReceived(auth(pgwire.AUTH_SASL_CONTINUE,
                                   b"r=" + nonce + b"srv,s=QUJD,i=2"))
        kind, proof = sent(transport)[1]
        assert proof.startswith(b"c=biws,r=" + nonce + b"srv,p=")
        # A wrong server signature ends the connection before it is ready.
        protocol.dataReceived(auth(pgwire.AUTH_SASL_FINAL, b"v=AAAA"))
        assert isinstance(failure_result_of(protocol.ready).value, pgwire.PGError)
        assert transport.disconnecting

    def test_scram_without_the_server_signature_is_refused(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(auth(pgwire.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
        first = sent(transport)[0][1][len(b"SCRAM-SHA-256\x00") + 4:]
        nonce = first[len(b"n,,n=,r="):]
        protocol.dataReceived(auth(pgwire.AUTH_SASL_CONTINUE, b"r=" + nonce + b"x,s=QUJD,i=2"))
        protocol.dataReceived(auth(pgwire.AUTH_OK) + READY)  # no SASL final message
        failure_result_of(protocol.ready, pgwire.PGError)
        assert transport.disconnecting

    def test_malformed_row_breaks_the_connection(self) -> None:
        protocol, transport = self.ready()
        d = protocol.query("SELECT 1")
        protocol.dataReceived(message(b"D", b"\x00\x01\x00"))  # a truncated column
        failure_result_of(d, pgwire.PGError)
        assert transport.disconnecting

    def test_password_asked_but_none_known(self) -> None:
        protocol, transport = self.connect(password=None)
        protocol.dataReceived(auth(pgwire.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
        failure = failure_result_of(protocol.ready, pgwire.PGError)
        assert "password" in str(failure.value)

    def test_unknown_authentication_is_refused(self) -> None:
        protocol, _ = self.connect()
        protocol.dataReceived(auth(5, b"salt"))  # MD5
        failure_result_of(protocol.ready, pgwire.PGError)

    def test_refusal_during_startup_fails_ready_with_sqlstate(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(error("could not connect", "42501"))
        failure = failure_result_of(protocol.ready, pgwire.PGError)
        assert failure.value.sqlstate == "42501"
        assert protocol.closed

    def test_query_returns_rows_as_text_or_none(self) -> None:
        protocol, transport = self.ready()
        d = protocol.query("SELECT 1")
        assert sent(transport, startup=False) == [(b"Q", b"SELECT 1\x00")]
        protocol.dataReceived(message(b"T", b"...") + data_row(b"1", None) + data_row(b"2", b"x")
                              + message(b"C", b"SELECT 2\x00"))
        assert_no_result(d)
        protocol.dataReceived(READY)
        assert success_result_of(d) == [("1", None), ("2", "x")]

    def test_query_error_fails_only_that_query(self) -> None:
        protocol, transport = self.ready()
        bad, good = protocol.query("SELEC"), protocol.query("SELECT 2")
        protocol.dataReceived(error("syntax error", "42601") + READY)
        assert failure_result_of(bad, pgwire.PGError).value.sqlstate == "42601"
        protocol.dataReceived(data_row(b"2") + READY)
        assert success_result_of(good) == [("2",)]
        assert not protocol.closed

    def test_queries_are_sent_one_at_a_time(self) -> None:
        protocol, transport = self.ready()
        protocol.query("SELECT 1")
        protocol.query("SELECT 2")
        assert sent(transport, startup=False) == [(b"Q", b"SELECT 1\x00")]
        protocol.dataReceived(READY)
        assert sent(transport, startup=False)[1:] == [(b"Q", b"SELECT 2\x00")]

    def test_cancelled_running_query_drops_the_connection(self) -> None:
        protocol, transport = self.ready()
        d = protocol.query("SELECT 1")
        d.cancel()
        failure_result_of(d, defer.CancelledError)
        assert protocol.closed
        assert transport.disconnecting

    def test_cancelled_waiting_query_is_never_sent(self) -> None:
        protocol, transport = self.ready()
        protocol.query("SELECT 1")
        waiting = protocol.query("SELECT 2")
        waiting.cancel()
        failure_result_of(waiting, defer.CancelledError)
        protocol.dataReceived(READY)
        assert [payload for _, payload in sent(transport, startup=False)] == [b"SELECT 1\x00"]
        assert not protocol.closed

    def test_lost_connection_fails_pending_queries(self) -> None:
        protocol, _ = self.ready()
        running, waiting = protocol.query("SELECT 1"), protocol.query("SELECT 2")
        protocol.connectionLost(Failure(ConnectionResetError()))
        failure_result_of(running, pgwire.PGError)
        failure_result_of(waiting, pgwire.PGError)
        failure_result_of(protocol.query("SELECT 3"), pgwire.PGError)

    def test_oversized_message_breaks_the_connection(self) -> None:
        protocol, transport = self.ready()
        d = protocol.query("SELECT 1")
        protocol.dataReceived(b"D" + struct.pack("!I", pgwire.MAX_MESSAGE + 1))
        failure_result_of(d, pgwire.PGError)
        assert transport.disconnecting

    def test_close_says_goodbye(self) -> None:
        protocol, transport = self.ready()
        protocol.close()
        assert transport.value() == message(b"X")
        assert transport.disconnecting

    def test_connect_times_out_when_nothing_answers(self) -> None:
        memory = MemoryReactorClock()
        d = pgwire.connect(memory, "127.0.0.1", 5, "someone", "pw", 2.0)
        memory.advance(2.0)
        failure_result_of(d, defer.TimeoutError)

    def test_connect_times_out_when_never_ready(self) -> None:
        memory = MemoryReactorClock()
        d = pgwire.connect(memory, "127.0.0.1", 5, "someone", "pw", 2.0)
        [(_, _, factory, _, _)] = memory.tcpClients
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        memory.advance(2.0)
        failure_result_of(d, defer.TimeoutError)
        assert transport.disconnecting


@pytest_twisted.async_yield_fixture
async def hyperd(tmp_path: Path) -> AsyncIterator[HyperdInstance]:
    """A real hyperd, with the random password the supervisor gives it; stopped at the end."""
    ready: list[HyperdInstance] = []
    supervisor = HyperdSupervisor(reactor, hyperd_executable(os.environ), tmp_path / "logs",
                                  False, on_ready=ready.append, on_give_up=lambda _: None)
    supervisor.startService()
    try:
        await until(lambda: ready, 60, "hyperd to be ready")
        yield ready[0]
    finally:
        await supervisor.stopService()


class RealHyperdTests:
    """Against the real hyperd, with the random password the supervisor gives it."""

    @pytest_twisted.ensureDeferred
    async def test_query_and_error_on_real_hyperd(self, hyperd: HyperdInstance) -> None:
        connection = await pgwire.connect(reactor, hyperd.host, hyperd.port, hyperd.user,
                                          hyperd.password, 5.0)
        try:
            assert await connection.query("SELECT 20 + 22, NULL") == [("42", None)]
            with pytest.raises(pgwire.PGError) as caught:
                await connection.query("SELEC 1")
            assert caught.value.sqlstate == "42601"
            assert await connection.query("SELECT 'after'") == [("after",)]
        finally:
            connection.close()

    @pytest_twisted.ensureDeferred
    async def test_wrong_password_is_refused_by_real_hyperd(self, hyperd: HyperdInstance) -> None:
        with pytest.raises(pgwire.PGError):
            await pgwire.connect(reactor, hyperd.host, hyperd.port, hyperd.user,
                                 hyperd.password + "x", 5.0)
